"""The re-login hint: a ``sidecar login`` command that works for the configured flavor.

It goes into the 511 body's ``login`` field, ``status`` and ``token``.  It
names what identifies the login (flavor, issuer, client id, upstream) and
never a secret: a client secret stays in the configuration or the
environment, where the same command finds it again.
"""

from __future__ import annotations

import shlex

from sidecar.config import Settings


def login_hint(settings: Settings, api_url: str | None = None) -> str:
    """``sidecar login --upstream API`` (relay), or ``sidecar login --flavor oauth2 --issuer I --client-id C`` (SPEC §8).

    ``api_url`` is the store's (or the last one's), used when no upstream is configured.
    """
    upstream = settings.upstream or api_url
    if settings.flavor != "oauth2":
        return f"sidecar login --upstream {upstream}" if upstream else "sidecar login --upstream <API>"
    issuer = shlex.quote(settings.issuer) if settings.issuer else "<ISSUER>"
    client_id = shlex.quote(settings.client_id) if settings.client_id else "<CLIENT_ID>"
    hint = f"sidecar login --flavor oauth2 --issuer {issuer} --client-id {client_id}"
    return hint + (f" --upstream {shlex.quote(upstream)}" if upstream else "")

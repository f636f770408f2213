"""Revoking the refresh token at logout (RFC 7009), with the client's authentication.

RFC 7009 §2.2: 200 means revoked, and also "was not valid anyway"; anything
else is a failure to report.  The outcome is a value, not an exception: the
caller clears the store either way.
"""

from __future__ import annotations

import dataclasses

from sidecar.auth.oidc.client_auth import client_credentials
from sidecar.auth.oidc.discovery import ProviderMetadata
from sidecar.auth.oidc.http import ProviderError, ProviderSession, post_form
from sidecar.config import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    """How a revocation went: ``revoked``, else ``problem`` says why not (None: the provider has no endpoint)."""

    revoked: bool
    problem: str | None = None


async def revoke(
    session: ProviderSession, settings: Settings, metadata: ProviderMetadata, refresh_token: str
) -> Revocation:
    """Revoke ``refresh_token`` at the revocation endpoint; network and provider failures come back as a problem."""
    url = metadata.revocation_endpoint
    if url is None:
        return Revocation(False, None)
    credentials = client_credentials(settings, required=False)
    form = {"token": refresh_token, "token_type_hint": "refresh_token", **credentials.form}
    try:
        answer = await post_form(session, url, form, what="revocation endpoint", headers=credentials.headers)
    except ProviderError as exc:
        return Revocation(False, str(exc))
    if answer.status == 200:
        return Revocation(True)
    return Revocation(False, f"the revocation endpoint answered {answer.describe()}")

"""Client authentication at the provider's token, device and revocation endpoints (RFC 6749 §2.3).

``client_auth`` chooses the method: ``basic`` (client_secret_basic: id and
secret in HTTP Basic), ``post`` (client_secret_post: both in the form) or
``none`` (a public client: ``client_id`` in the form only).  Unset keeps the
behaviour sidecar always had: Basic when a secret is configured, else
``client_id`` in the form.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from urllib.parse import quote_plus

from sidecar.config import Settings
from sidecar.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What one request carries to authenticate the client: headers and form fields.  ``repr`` hides both."""

    headers: Mapping[str, str]
    form: Mapping[str, str]

    def __repr__(self) -> str:
        return f"ClientCredentials(headers={sorted(self.headers)}, form={sorted(self.form)})"


def basic_credentials(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded, then HTTP Basic."""
    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def client_method(settings: Settings) -> str:
    """The method in force: ``basic``, ``post`` or ``none`` (what an unset ``client_auth`` means here)."""
    if settings.client_auth is not None:
        return settings.client_auth
    return "basic" if settings.client_id and settings.client_secret else "none"


def client_credentials(settings: Settings, *, required: bool = True) -> ClientCredentials:
    """The credentials ``settings`` call for; ConfigError when the chosen method lacks what it needs.

    ``required`` false (a refresh, as before §8) lets a client without an id
    send nothing; a login always needs the id.
    """
    method = client_method(settings)
    client_id = settings.client_id
    if not client_id:
        if required or settings.client_auth in ("basic", "post"):
            raise ConfigError("client_id: required to log in to an OAuth 2.0 provider (--client-id)")
        return ClientCredentials({}, {})
    if method == "none":
        return ClientCredentials({}, {"client_id": client_id})
    secret = settings.client_secret
    if not secret:
        raise ConfigError(f"client_secret: client_auth = {method} needs one (SIDECAR_CLIENT_SECRET)")
    if method == "post":
        return ClientCredentials({}, {"client_id": client_id, "client_secret": secret})
    return ClientCredentials({"Authorization": basic_credentials(client_id, secret)}, {})

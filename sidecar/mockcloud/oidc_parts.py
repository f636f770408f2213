"""The mock provider's pure parts: registered clients, client authentication, PKCE, ID tokens, switches.

Written apart from sidecar's own OIDC client code on purpose (the mock
imports nothing from ``sidecar.auth``), so a bug on one side is not mirrored
on the other.  Nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# The client the mock knows out of the box: public (no secret), as a CLI is.
DEFAULT_CLIENT_ID = "sidecar-cli"
# RFC 7591 names for the three ways a client authenticates.
BASIC = "client_secret_basic"
POST = "client_secret_post"
NONE = "none"
# ID tokens live as long as a typical provider's: an hour.
ID_TOKEN_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class MockClient:
    """A registered client: public (``secret`` None, method ``none``) or confidential (basic or post)."""

    secret: str | None = None
    method: str = NONE


@dataclass(slots=True)
class OidcSwitches:
    """What the next OIDC calls do wrong on purpose; tests flip these as attributes.

    ``pending_polls`` and ``slow_down_polls`` count down one per device poll.
    """

    deny: bool = False  # authorize redirects with access_denied; device polls answer it
    omit_refresh_token: bool = False  # grants carry no refresh token even with offline_access
    announced_issuer: str | None = None  # the discovery document names this issuer instead
    openid_configuration: bool = True  # False: only RFC 8414's well-known document answers
    id_token_nonce: str | None = None  # the ID token carries this nonce instead of the one asked for
    pending_polls: int = 0  # device polls answer authorization_pending this many times, even once approved
    slow_down_polls: int = 0  # device polls answer slow_down this many times
    expire_device_codes: bool = False  # device polls answer expired_token
    device_interval: int = 5  # the interval a device authorization answer asks for
    revocation_status: int | None = None  # revocation answers this status with server_error
    seen: dict[str, Any] = field(default_factory=dict)  # the last form or query each endpoint got


def s256_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6: BASE64URL(SHA256(verifier)) == challenge, and the verifier is 43-128 characters."""
    if not 43 <= len(verifier) <= 128:
        return False
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    computed = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return hmac.compare_digest(computed, challenge)


def authenticate(
    clients: Mapping[str, MockClient], form: Mapping[str, str], basic: tuple[str, str] | None
) -> str | None:
    """The client id the request proves, or None: each client must use exactly its registered method."""
    if basic is not None:
        client_id, secret = basic
        method, presented = BASIC, secret
    elif "client_secret" in form:
        client_id, method, presented = form.get("client_id", ""), POST, form["client_secret"]
    else:
        client_id, method, presented = form.get("client_id", ""), NONE, ""
    client = clients.get(client_id)
    if client is None or client.method != method:
        return None
    if method != NONE and not hmac.compare_digest((client.secret or "").encode(), presented.encode()):
        return None
    return client_id


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def mint_id_token(key: bytes, claims: Mapping[str, Any]) -> str:
    """An HS256 JWS of ``claims`` (the mock's key; sidecar does not check signatures, SPEC §8)."""
    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64(orjson.dumps(dict(claims)))
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def new_user_code() -> str:
    """Eight letters without vowels or look-alikes, as RFC 8628 §6.1 suggests: ``BCDF-GHJK``."""
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    code = "".join(secrets.choice(letters) for _ in range(8))
    return f"{code[:4]}-{code[4:]}"


def discovery_document(issuer: str, announced: str | None) -> dict[str, Any]:
    """The provider metadata (OpenID Connect Discovery 1.0 / RFC 8414) for endpoints under ``issuer``."""
    return {
        "issuer": announced or issuer,
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "device_authorization_endpoint": f"{issuer}/oauth/device_authorization",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "userinfo_endpoint": f"{issuer}/oauth/userinfo",
        "jwks_uri": f"{issuer}/oauth/jwks",
        "response_types_supported": ["code"],
        "grant_types_supported": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
        ],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["HS256"],
        "scopes_supported": ["openid", "offline_access", "profile", "email"],
        "token_endpoint_auth_methods_supported": [BASIC, POST, NONE],
        "revocation_endpoint_auth_methods_supported": [BASIC, POST, NONE],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
    }

"""Login grants at the token endpoint (authorization code, device code), and the pair they make.

Both flows post a form with the configured client authentication and turn a
2xx answer into a TokenPair through ``pair_from_grant`` (the same checks as
every refresh: b64token, 16 KiB).  A login must bring a refresh token: without
one sidecar could not keep the login alive, so it is an error naming
``offline_access``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.auth.oidc.client_auth import client_credentials
from sidecar.auth.oidc.discovery import ProviderMetadata
from sidecar.auth.oidc.http import Answer, ProviderSession, post_form
from sidecar.auth.oidc.idtoken import IdClaims, check_id_token
from sidecar.config import Settings
from sidecar.errors import ConfigError, LoginError, RefreshTransient
from sidecar.tokens import TokenPair, pair_from_grant

# SPEC §8: an ID token, and a refresh token to keep the login alive.
DEFAULT_SCOPE = "openid offline_access"
# RFC 6749 §5.2 errors a login answer can carry that are the configuration's fault.
_HINTS = {
    "invalid_client": "check client_id, client_secret and client_auth",
    "unauthorized_client": "this client may not use this grant; check the client's settings at the provider",
    "invalid_scope": "check scope: the provider refuses the scope asked for",
    "unsupported_grant_type": "the provider does not offer this flow to this client",
}


def login_scope(settings: Settings) -> str:
    return settings.scope or DEFAULT_SCOPE


def asks_for_openid(settings: Settings) -> bool:
    return "openid" in login_scope(settings).split()


def audience_parameters(settings: Settings) -> dict[str, str]:
    """``audience`` (Auth0) and RFC 8707 ``resource``, when set."""
    extra = {}
    if settings.audience:
        extra["audience"] = settings.audience
    if settings.resource:
        extra["resource"] = settings.resource
    return extra


def endpoint(metadata: ProviderMetadata, name: str) -> str:
    """The endpoint ``name`` (``token_endpoint``...), or ConfigError when the provider has none."""
    url = getattr(metadata, name)
    if not isinstance(url, str):
        where = f"issuer {metadata.issuer}" if metadata.issuer else "this configuration (set issuer)"
        raise ConfigError(f"issuer: {where} has no {name}")
    return url


async def token_request(
    session: ProviderSession, settings: Settings, metadata: ProviderMetadata, form: Mapping[str, str]
) -> Answer:
    """POST ``form`` plus the client's credentials to the token endpoint."""
    credentials = client_credentials(settings)
    return await post_form(
        session,
        endpoint(metadata, "token_endpoint"),
        {**form, **credentials.form},
        what="token endpoint",
        headers=credentials.headers,
    )


def refusal(answer: Answer, what: str = "token endpoint") -> LoginError:
    """The LoginError for a non-2xx answer: status, error code, and a hint when the configuration is to blame."""
    hint = _HINTS.get(answer.error or "") or (_HINTS["invalid_client"] if answer.status == 401 else None)
    return LoginError(f"login failed: the {what} answered {answer.describe()}" + (f"; {hint}" if hint else ""))


def login_pair(
    document: Mapping[str, Any],
    *,
    settings: Settings,
    metadata: ProviderMetadata,
    nonce: str | None,
    now: float,
    api_url: str | None,
) -> tuple[TokenPair, IdClaims | None]:
    """The pair a 2xx login answer grants, and who its ID token names (None without one)."""
    token_type = document.get("token_type")
    if isinstance(token_type, str) and token_type.lower() != "bearer":
        raise LoginError("login failed: the provider granted a token that is not a bearer token (token_type)")
    if not document.get("refresh_token"):
        raise LoginError(
            "login failed: the provider granted no refresh token, so the login could not be kept alive; "
            "request offline_access in scope (or the provider's equivalent) and allow it for this client"
        )
    claims = None
    if "id_token" in document:
        assert settings.client_id is not None  # client_credentials demanded it before the request
        claims = check_id_token(
            document["id_token"], issuer=metadata.issuer, client_id=settings.client_id, nonce=nonce, now=now
        )
    try:
        pair = pair_from_grant(document, previous=None, now=now, api_url=api_url)
    except RefreshTransient as exc:
        raise LoginError(f"login failed: the provider's answer is not usable ({exc.reason})") from None
    return pair, claims

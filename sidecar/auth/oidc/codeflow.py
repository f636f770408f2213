"""The authorization code flow with PKCE and a loopback redirect (RFC 6749 §4.1, RFC 7636, RFC 8252).

The browser goes to the provider's authorization endpoint and comes back to
``http://127.0.0.1:<random port>/callback`` (auth/callback.py) with a code
and our ``state``.  The code is exchanged at the token endpoint before the
browser is told how the login went, so the page it lands on tells the truth.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping

from aiohttp import web
from yarl import URL

from sidecar.auth.answers import error_code
from sidecar.auth.callback import loopback_callback, page
from sidecar.auth.oidc.discovery import ProviderMetadata
from sidecar.auth.oidc.grant import (
    asks_for_openid,
    audience_parameters,
    endpoint,
    login_pair,
    login_scope,
    refusal,
    token_request,
)
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.idtoken import IdClaims
from sidecar.auth.oidc.pkce import Pkce, new_nonce, new_pkce, new_state
from sidecar.config import Settings
from sidecar.errors import LoginError, SidecarError
from sidecar.tokens import TokenPair

Announce = Callable[[str], None]
Login = tuple[TokenPair, IdClaims | None]
# What the browser is told, per error the provider sends back (RFC 6749 §4.1.2.1).
_DENIED = "access_denied"


def authorization_url(
    settings: Settings,
    metadata: ProviderMetadata,
    *,
    redirect_uri: str,
    state: str,
    pkce: Pkce,
    nonce: str | None,
) -> str:
    """Where the browser starts: the authorization endpoint with every parameter of this login.

    Parameters the endpoint URL already carries (an Azure AD B2C policy, say) are kept.
    With ``offline_access`` the request carries ``prompt=consent``: OpenID
    Connect Core §11 requires it, and providers that follow it (node
    oidc-provider) grant no refresh token without it.
    """
    assert settings.client_id is not None  # checked by client_credentials before any flow starts
    scope = login_scope(settings)
    query = {
        "response_type": "code",
        "client_id": settings.client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": pkce.method,
        **({"nonce": nonce} if nonce is not None else {}),
        **({"prompt": "consent"} if "offline_access" in scope.split() else {}),
        **audience_parameters(settings),
    }
    return str(URL(endpoint(metadata, "authorization_endpoint")).update_query(query))


def callback_error(query: Mapping[str, str], state: str, issuer: str | None) -> LoginError | None:
    """What is wrong with the redirect's query, if anything: state first, then the provider's error, then ``iss``."""
    if not secrets.compare_digest(query.get("state", "").encode(), state.encode()):
        return LoginError(
            "login failed: the callback's state does not match (a stale or forged login link); run sidecar login again"
        )
    if "error" in query:
        code = error_code(query["error"]) or "unknown"
        if code == _DENIED:
            return LoginError("login failed: the login was denied at the provider (access_denied)")
        return LoginError(f"login failed: the provider answered error={code}")
    # RFC 9207: a provider that names itself must be the one we asked (mix-up defence).
    if "iss" in query and issuer is not None and query["iss"] != issuer:
        return LoginError("login failed: the callback came from another issuer (iss); refused")
    if not query.get("code"):
        return LoginError("login failed: the callback carries no authorization code")
    return None


async def code_flow(
    session: ProviderSession,
    settings: Settings,
    metadata: ProviderMetadata,
    *,
    announce: Announce,
    timeout: float,
    api_url: str | None,
    clock: Callable[[], float] = time.time,
) -> Login:
    """Run the browser flow; the pair and the ID token's claims, or LoginError."""
    pkce = new_pkce()
    state = new_state()
    nonce = new_nonce() if asks_for_openid(settings) else None
    outcome: asyncio.Future[Login] = asyncio.get_running_loop().create_future()
    redirect: list[str] = []

    async def judge(query: Mapping[str, str]) -> web.Response:
        if outcome.done():
            return page(410, "Already done", "This login has finished; return to the terminal.")
        problem = callback_error(query, state, metadata.issuer)
        if problem is None:
            try:
                outcome.set_result(await _exchange(query["code"]))
            except SidecarError as exc:
                problem = exc if isinstance(exc, LoginError) else LoginError(f"login failed: {exc}")
        if problem is not None:
            if not outcome.done():
                outcome.set_exception(problem)
            return page(400, "Login failed", f"{_sentence(problem)} Return to the terminal.")
        return page(200, "Logged in", "sidecar has your login. You can close this tab.")

    async def _exchange(code: str) -> Login:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect[0],
            "code_verifier": pkce.verifier,
            **audience_parameters(settings),
        }
        answer = await token_request(session, settings, metadata, form)
        if not answer.ok:
            raise refusal(answer)
        return login_pair(
            answer.document, settings=settings, metadata=metadata, nonce=nonce, now=clock(), api_url=api_url
        )

    async with loopback_callback(judge) as redirect_uri:
        redirect.append(redirect_uri)
        announce(authorization_url(settings, metadata, redirect_uri=redirect_uri, state=state, pkce=pkce, nonce=nonce))
        try:
            return await asyncio.wait_for(outcome, timeout)
        except TimeoutError:
            raise LoginError(
                f"login timed out after {timeout:g} s without the browser coming back; run sidecar login again"
            ) from None


def _sentence(error: SidecarError) -> str:
    """The error's message as a sentence for the browser tab (it quotes only codes, never free text)."""
    text = str(error).removeprefix("login failed: ")
    return text[:1].upper() + text[1:] + "."

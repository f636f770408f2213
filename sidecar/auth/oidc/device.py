"""The device authorization grant (RFC 8628), the headless login of the oauth2 flavor.

sidecar asks the device authorization endpoint for a code, shows the user
where to approve it, and polls the token endpoint at the given interval:
``authorization_pending`` waits on, ``slow_down`` adds 5 s to the interval
for good, ``access_denied`` and ``expired_token`` end the login.  PKCE S256
goes along when the provider advertises it (Keycloak can require it).
The sleep and the monotonic clock are injected, so tests never wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from yarl import URL

from sidecar.auth.oidc.client_auth import client_credentials
from sidecar.auth.oidc.discovery import ProviderMetadata
from sidecar.auth.oidc.grant import audience_parameters, endpoint, login_pair, login_scope, refusal, token_request
from sidecar.auth.oidc.http import ProviderSession, post_form
from sidecar.auth.oidc.idtoken import IdClaims
from sidecar.auth.oidc.pkce import new_pkce
from sidecar.config import Settings
from sidecar.errors import LoginError
from sidecar.tokens import TokenPair

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §3.2: without an interval the client waits 5 s; §3.5: slow_down adds 5 s.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# An interval past this is a broken provider; waiting a minute between polls is plenty.
MAX_INTERVAL = 60.0
# Nor does sidecar poll more than once a second, whatever a provider says (0 would be a busy loop).
MIN_INTERVAL = 1.0
# expires_in is required; a provider that leaves it out gets ten minutes, and none gets more than an hour.
DEFAULT_EXPIRES_IN = 600.0
MAX_EXPIRES_IN = 3600.0
# A user code is a few characters; anything longer or unprintable is not shown.
MAX_USER_CODE = 64

Login = tuple[TokenPair, IdClaims | None]


@dataclasses.dataclass(frozen=True, slots=True)
class DevicePrompt:
    """What the user is shown: where to go, and the code to enter there (or a URI that carries it)."""

    verification_uri: str
    user_code: str
    verification_uri_complete: str | None
    expires_in: float


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceCode:
    """The device authorization answer: the prompt, and what polling needs.  ``repr`` hides the device code."""

    device_code: str
    prompt: DevicePrompt
    interval: float

    def __repr__(self) -> str:
        return f"DeviceCode(device_code='***', prompt={self.prompt!r}, interval={self.interval!r})"


def _printable(value: object, limit: int) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit and all(" " <= c <= "~" for c in value):
        return value
    return None


def _web_url(value: object) -> str | None:
    text = _printable(value, 2048)
    if text is None:
        return None
    try:
        url = URL(text)
    except ValueError:
        return None
    return text if url.scheme in ("http", "https") and url.host else None


def _seconds(value: object, default: float, limit: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return min(float(value), limit)
    return default


def device_code_from(document: Mapping[str, Any]) -> DeviceCode:
    """The checked device authorization answer; LoginError when it lacks what the flow needs.

    Google names the URI ``verification_url``; it is accepted as a twin.
    """
    device_code = document.get("device_code")
    user_code = _printable(document.get("user_code"), MAX_USER_CODE)
    uri = _web_url(document.get("verification_uri") or document.get("verification_url"))
    if not isinstance(device_code, str) or not device_code or user_code is None or uri is None:
        raise LoginError(
            "login failed: the device authorization endpoint's answer lacks a device_code, user_code or verification_uri"
        )
    prompt = DevicePrompt(
        verification_uri=uri,
        user_code=user_code,
        verification_uri_complete=_web_url(document.get("verification_uri_complete")),
        expires_in=_seconds(document.get("expires_in"), DEFAULT_EXPIRES_IN, MAX_EXPIRES_IN),
    )
    interval = max(MIN_INTERVAL, _seconds(document.get("interval"), DEFAULT_INTERVAL, MAX_INTERVAL))
    return DeviceCode(device_code, prompt, interval)


async def device_flow(
    session: ProviderSession,
    settings: Settings,
    metadata: ProviderMetadata,
    *,
    show: Callable[[DevicePrompt], None],
    api_url: str | None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Login:
    """Run the device flow; the pair and the ID token's claims, or LoginError.  Waits as long as the code lives."""
    pkce = new_pkce() if metadata.advertises_s256 else None
    credentials = client_credentials(settings)
    request = {
        "scope": login_scope(settings),
        **audience_parameters(settings),
        **({"code_challenge": pkce.challenge, "code_challenge_method": pkce.method} if pkce else {}),
        **credentials.form,
    }
    answer = await post_form(
        session,
        endpoint(metadata, "device_authorization_endpoint"),
        request,
        what="device authorization endpoint",
        headers=credentials.headers,
    )
    if not answer.ok:
        raise refusal(answer, "device authorization endpoint")
    code = device_code_from(answer.document)
    show(code.prompt)
    deadline = monotonic() + code.prompt.expires_in
    interval = code.interval
    poll = {"grant_type": DEVICE_GRANT, "device_code": code.device_code}
    if pkce is not None:
        poll["code_verifier"] = pkce.verifier
    while True:
        if monotonic() + interval > deadline:
            raise LoginError("login failed: the code expired before it was approved; run sidecar login again")
        await sleep(interval)
        answer = await token_request(session, settings, metadata, poll)
        if answer.ok:
            return login_pair(
                answer.document, settings=settings, metadata=metadata, nonce=None, now=clock(), api_url=api_url
            )
        if answer.error == "authorization_pending":
            continue
        if answer.error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        if answer.error == "access_denied":
            raise LoginError("login failed: the login was denied at the provider (access_denied)")
        if answer.error == "expired_token":
            raise LoginError(
                "login failed: the code expired before it was approved (expired_token); run sidecar login again"
            )
        raise refusal(answer)

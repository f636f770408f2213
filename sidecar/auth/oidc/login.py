"""Which oauth2 login runs, with what: discovery first, then the code flow or the device flow.

Configuration is checked before anything is sent: an issuer (the
authorization and device endpoints come only from discovery) and a client
id, with a secret when ``client_auth`` needs one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sidecar.auth.oidc.client_auth import client_credentials
from sidecar.auth.oidc.codeflow import Announce, code_flow
from sidecar.auth.oidc.device import DevicePrompt, device_flow
from sidecar.auth.oidc.discovery import provider_metadata
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.idtoken import IdClaims
from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.tokens import TokenPair

# --flow names: the browser flow, and the headless one (``poll`` is its relay name).
BROWSER_FLOW = "callback"
DEVICE_FLOW = "device"


def check_login_settings(settings: Settings) -> None:
    """ConfigError unless ``settings`` can log in to a provider."""
    if not settings.issuer:
        raise ConfigError(
            "issuer: logging in with flavor oauth2 needs the provider's issuer URL (--issuer); "
            "token_url alone only refreshes"
        )
    client_credentials(settings)


def device_instructions(prompt: DevicePrompt) -> str:
    """What the terminal shows for a device code: the complete URI if there is one, else the URI and the code."""
    minutes = f"{prompt.expires_in / 60:.0f} minutes" if prompt.expires_in >= 120 else f"{prompt.expires_in:.0f} s"
    if prompt.verification_uri_complete:
        where = (
            f"To log in, open this URL on any device and approve:\n\n    {prompt.verification_uri_complete}\n\n"
            f"(or open {prompt.verification_uri} and enter the code {prompt.user_code})"
        )
    else:
        where = f"To log in, open this URL on any device:\n\n    {prompt.verification_uri}\n\nand enter the code:\n\n    {prompt.user_code}"
    return f"{where}\n\nThe code is valid for {minutes}. Waiting for approval..."


async def oauth2_login(
    session: ProviderSession,
    settings: Settings,
    *,
    flow: str,
    announce: Announce,
    show: Callable[[DevicePrompt], None],
    timeout: float,
    api_url: str | None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[TokenPair, IdClaims | None]:
    """Discover the provider and run ``flow``; the pair and who the ID token names (None without one)."""
    check_login_settings(settings)
    metadata = await provider_metadata(session, settings)
    if flow == DEVICE_FLOW:
        return await device_flow(
            session, settings, metadata, show=show, api_url=api_url, clock=clock, monotonic=monotonic, sleep=sleep
        )
    return await code_flow(
        session, settings, metadata, announce=announce, timeout=timeout, api_url=api_url, clock=clock
    )

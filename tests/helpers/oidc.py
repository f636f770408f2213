"""The OIDC tests' shared parts: settings aimed at the mock provider, a scripted browser, logins run in-process.

The browser is an aiohttp client: it follows the provider's redirect to the
login's loopback callback like a real one, and returns the page it lands on.
Discovery's per-process cache is emptied whenever settings are made, since a
later test's mock cloud may get an earlier one's port.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.auth.oidc.codeflow import Login
from sidecar.auth.oidc.device import DevicePrompt
from sidecar.auth.oidc.discovery import CACHE
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.login import oauth2_login
from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.mockcloud import MockCloud
from sidecar.mockcloud.oidc_parts import DEFAULT_CLIENT_ID

# A login in these tests never needs more than a second; a hang still ends.
LOGIN_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """What the scripted browser saw last: status, body and (when not following) Location."""

    status: int
    text: str
    location: str | None = None


def oidc_settings(cloud: MockCloud, store_path: Path, **overrides: Any) -> Settings:
    """oauth2 settings with only the mock cloud as issuer and its public client (``overrides`` win)."""
    CACHE.forget()
    values: dict[str, Any] = {
        "flavor": "oauth2",
        "issuer": cloud.base_url,
        "client_id": DEFAULT_CLIENT_ID,
        "upstream": cloud.base_url,
        "store": str(store_path),
        "read_timeout": 5.0,
        **overrides,
    }
    return Settings(**values)


async def browse(url: str, *, follow: bool = True) -> Page:
    """GET ``url`` as a browser would."""
    async with aiohttp.ClientSession() as browser, browser.get(url, allow_redirects=follow) as response:
        return Page(response.status, await response.text(), response.headers.get("Location"))


Browser = Callable[[str], Awaitable[Page]]


async def code_login(settings: Settings, *, browser: Browser = browse) -> tuple[Login | SidecarError, Page]:
    """Run the code flow with ``browser`` opening the authorization URL; the login (or its error) and the last page."""
    opened: list[asyncio.Task[Page]] = []
    result: Login | SidecarError
    async with aiohttp.ClientSession() as session:
        try:
            result = await oauth2_login(
                ProviderSession(session),
                settings,
                flow="callback",
                announce=lambda url: opened.append(asyncio.ensure_future(browser(url))),
                show=lambda _prompt: None,
                timeout=LOGIN_TIMEOUT,
                api_url=settings.upstream,
            )
        except SidecarError as exc:
            result = exc
    assert len(opened) == 1, "the flow announced no authorization URL"
    return result, await opened[0]


class Polling:
    """The device flow's injected sleep and monotonic clock: each sleep is recorded and moves the clock.

    ``on_sleep(n, prompt)`` runs after the n-th sleep (1-based), e.g. to approve the code.
    """

    def __init__(self, on_sleep: Callable[[int, DevicePrompt], Awaitable[None]] | None = None) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.prompts: list[DevicePrompt] = []
        self._on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def show(self, prompt: DevicePrompt) -> None:
        self.prompts.append(prompt)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self._on_sleep is not None:
            await self._on_sleep(len(self.slept), self.prompts[-1])


async def approve(prompt: DevicePrompt, *, deny: bool = False) -> Page:
    """Open the complete verification URI as the user would, approving (or denying) the code."""
    assert prompt.verification_uri_complete is not None
    return await browse(prompt.verification_uri_complete + ("&deny=1" if deny else ""))


async def device_login(settings: Settings, polling: Polling) -> Login | SidecarError:
    """Run the device flow with ``polling``'s sleep and clock; the login or its error."""
    async with aiohttp.ClientSession() as session:
        try:
            return await oauth2_login(
                ProviderSession(session),
                settings,
                flow="device",
                announce=lambda _url: None,
                show=polling.show,
                timeout=LOGIN_TIMEOUT,
                api_url=settings.upstream,
                monotonic=polling.monotonic,
                sleep=polling.sleep,
            )
        except SidecarError as exc:
            return exc

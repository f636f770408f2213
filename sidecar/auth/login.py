"""``sidecar login``: the browser callback flow and the headless poll flow of SPEC §1.

Callback: a one-shot listener on ``127.0.0.1:<random port>/callback`` receives
the cloud's redirect; ``state`` must match.  Poll: a one-time code the user
opens on any device while this command polls the cloud.  Either way the pair
lands in the store with its expiry, atomically and under the store lock.
The oauth2 flavor logs in to a standard provider instead (SPEC §8,
sidecar/auth/oidc/): the code flow by default, ``--flow device`` headless.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import secrets
import sys
import time
import webbrowser
from collections.abc import Callable, Mapping
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from sidecar.auth.answers import AnswerTooLarge, error_code, json_object, read_capped
from sidecar.auth.callback import loopback_callback, page
from sidecar.auth.oidc.device import DevicePrompt
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.login import BROWSER_FLOW, DEVICE_FLOW, check_login_settings, device_instructions, oauth2_login
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound, Proxies, client_session, proxy_options
from sidecar.errors import ConfigError, LoginError, RefreshTransient
from sidecar.store.interface import StoreSnapshot, write_pair
from sidecar.store.location import open_store
from sidecar.tokens import TokenPair, format_timestamp, pair_from_grant

log = logging.getLogger("sidecar.login")

LOGIN_PATH = "/api/v1/cli/login"
POLL_PATH = "/api/v1/auth/cli-login/poll"
DEVICE_PAGE = "/cli-login"
# SPEC §1: poll about once a second, five minutes in all.
POLL_INTERVAL = 1.0
LOGIN_TIMEOUT = 300.0

Announce = Callable[[str], None]


def _pair(grant: Mapping[str, Any], api_url: str, now: float) -> TokenPair:
    """The pair a login answer grants; both tokens are required, the expiry is not (refreshed on first use)."""
    try:
        return pair_from_grant(grant, previous=None, now=now, api_url=api_url)
    except RefreshTransient as exc:
        raise LoginError(f"login failed: the cloud's answer is not usable ({exc.reason})") from None


async def callback_flow(
    upstream: str, *, timeout: float, announce: Announce, clock: Callable[[], float] = time.time
) -> TokenPair:
    """Run the browser flow; returns the pair or raises LoginError."""
    state = secrets.token_urlsafe(24)
    outcome: asyncio.Future[TokenPair] = asyncio.get_running_loop().create_future()

    def judge(query: Mapping[str, str]) -> web.Response:
        if outcome.done():
            return page(410, "Already done", "This login has finished; return to the terminal.")
        if not secrets.compare_digest(query.get("state", "").encode(), state.encode()):
            outcome.set_exception(
                LoginError(
                    "login failed: the callback's state does not match (a stale or forged login link); run sidecar login again"
                )
            )
            return page(400, "Login failed", "The state does not match this login. Run sidecar login again.")
        if "error" in query:
            code = error_code(query["error"]) or "unknown"
            outcome.set_exception(LoginError(f"login failed: the cloud answered error={code}"))
            return page(400, "Login failed", f"The cloud answered: {code}. Return to the terminal.")
        try:
            pair = _pair(query, upstream, clock())
        except LoginError as exc:
            outcome.set_exception(exc)
            return page(400, "Login failed", "The cloud's answer was incomplete. Return to the terminal.")
        outcome.set_result(pair)
        return page(200, "Logged in", "sidecar has your login. You can close this tab.")

    async with loopback_callback(judge) as redirect_uri:
        announce(upstream.rstrip("/") + LOGIN_PATH + "?" + urlencode({"redirect_uri": redirect_uri, "state": state}))
        try:
            return await asyncio.wait_for(outcome, timeout)
        except TimeoutError:
            raise LoginError(
                f"login timed out after {_minutes(timeout)} without the browser coming back; run sidecar login again"
            ) from None


def one_time_code() -> str:
    """``c_`` + 24 random bytes, base64url without padding (SPEC §1)."""
    return "c_" + base64.urlsafe_b64encode(secrets.token_bytes(24)).decode("ascii").rstrip("=")


async def poll_flow(
    upstream: str,
    session: aiohttp.ClientSession,
    *,
    timeout: float,
    announce: Announce,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.time,
    proxies: Proxies | None = None,
) -> TokenPair:
    """Run the headless flow; returns the pair or raises LoginError.

    ``proxies`` is the egress proxy choice (None: straight to the cloud).
    """
    code = one_time_code()
    base = upstream.rstrip("/")
    announce(f"{base}{DEVICE_PAGE}?code={code}")
    deadline = time.monotonic() + timeout
    url = f"{base}{POLL_PATH}?code={code}"
    options = proxy_options(proxies.route(url) if proxies else None, url, {"Accept": "application/json"})
    while True:
        try:
            async with session.get(url, allow_redirects=False, **options) as response:
                status = response.status
                body = await read_capped(response)
        except AnswerTooLarge:
            raise LoginError("login failed: the cloud answered with a body over 1 MiB") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise LoginError(f"login failed: the cloud could not be reached ({type(exc).__name__})") from None
        document = json_object(body)
        if status == 202 or (status == 200 and document.get("status") == "pending"):
            if time.monotonic() + interval > deadline:
                raise LoginError(
                    f"login timed out after {_minutes(timeout)} without the code being approved; run sidecar login again"
                )
            await asyncio.sleep(interval)
            continue
        if status == 200:
            return _pair(document, upstream, clock())
        error = error_code(document.get("error"))
        suffix = f" ({error})" if error else ""
        raise LoginError(f"login failed: the cloud answered HTTP {status}{suffix}")


def _minutes(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:g} minute{'' if seconds == 60 else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"


def _graphical_browser_likely() -> bool:
    """On Linux without a display, webbrowser would start a console browser in this terminal."""
    if not sys.platform.startswith("linux"):
        return True
    import os

    return any(os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))


async def save_login(settings: Settings, pair: TokenPair) -> None:
    """Write the new pair under the store lock, keeping unknown fields of the old record."""

    def build(snapshot: StoreSnapshot) -> TokenPair:
        previous = snapshot.pair
        return dataclasses.replace(pair, extra=previous.extra) if previous is not None and previous.extra else pair

    await write_pair(open_store(settings.store), build)


async def login_upstream(settings: Settings) -> str:
    if settings.upstream:
        return settings.upstream
    previous = (await open_store(settings.store).read()).pair
    if previous is not None and previous.api_url:
        return previous.api_url
    raise ConfigError("upstream: login needs the cloud API URL: --upstream API or SIDECAR_UPSTREAM")


def _browser_announcer(open_browser: bool, err: TextIO) -> Announce:
    """Print the login URL, and open it in a browser when asked to and one is likely to show."""

    def announce(url: str) -> None:
        print(f"To log in, open this URL in your browser:\n\n    {url}\n", file=err, flush=True)
        if open_browser and _graphical_browser_likely():
            try:
                webbrowser.open(url, new=2)
            except Exception:
                pass
        print("Waiting for the browser to come back...", file=err, flush=True)

    return announce


def _expiry(pair: TokenPair) -> str:
    if pair.expires_at:
        return f"expires {format_timestamp(pair.expires_at)}"
    return "has no expiry: it will be refreshed on first use"


async def login_command(
    settings: Settings, *, flow: str, open_browser: bool, timeout: float = LOGIN_TIMEOUT, err: TextIO = sys.stderr
) -> int:
    """Log in with the chosen flow and store the pair; exit 0, or LoginError (exit 1).

    ``device`` and ``poll`` both name the headless flow of the configured flavor.
    """
    if settings.flavor == "oauth2":
        return await oauth2_login_command(settings, flow=flow, open_browser=open_browser, timeout=timeout, err=err)
    upstream = await login_upstream(settings)

    if flow in ("poll", DEVICE_FLOW):

        def announce(url: str) -> None:
            print(
                f"To log in, open this URL on any device and approve:\n\n    {url}\n\nWaiting for approval...",
                file=err,
                flush=True,
            )

        outbound = Outbound(settings)
        async with client_session(settings, outbound) as session:
            pair = await poll_flow(upstream, session, timeout=timeout, announce=announce, proxies=outbound.proxies)
    else:
        pair = await callback_flow(upstream, timeout=timeout, announce=_browser_announcer(open_browser, err))
    await save_login(settings, pair)
    print(f"Logged in to {upstream}. The access token {_expiry(pair)}. Stored in {settings.store}.", file=err)
    return 0


async def oauth2_login_command(
    settings: Settings, *, flow: str, open_browser: bool, timeout: float = LOGIN_TIMEOUT, err: TextIO = sys.stderr
) -> int:
    """Log in at the provider ``issuer`` names (SPEC §8) and store the pair; the store is untouched on failure."""
    check_login_settings(settings)
    previous = (await open_store(settings.store).read()).pair
    api_url = settings.upstream or (previous.api_url if previous is not None else None)
    headless = flow in ("poll", DEVICE_FLOW)

    def show(prompt: DevicePrompt) -> None:
        print(device_instructions(prompt), file=err, flush=True)

    outbound = Outbound(settings)
    async with client_session(settings, outbound) as session:
        pair, claims = await oauth2_login(
            ProviderSession(session, outbound.proxies),
            settings,
            flow=DEVICE_FLOW if headless else BROWSER_FLOW,
            announce=_browser_announcer(open_browser, err),
            show=show,
            timeout=timeout,
            api_url=api_url,
        )
    await save_login(settings, pair)
    who = f" as {claims.name or claims.email or claims.subject}" if claims is not None else ""
    print(
        f"Logged in at {settings.issuer}{who}. The access token {_expiry(pair)}. Stored in {settings.store}.", file=err
    )
    if api_url is None:
        print("Give sidecar serve the API these tokens are for: --upstream URL.", file=err)
    return 0

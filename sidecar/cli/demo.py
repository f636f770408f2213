"""``sidecar demo``: a mock cloud with short-lived tokens, a real login, and the proxy.

Everything runs in this process on loopback with a throwaway token store, so
the demo never touches a real login.  Ctrl-C stops it all and exits 0.  With
``--flavor oauth2`` the mock cloud is also the OpenID Connect provider: the
login is discovery + authorization code + PKCE, refreshes go to its token
endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import aiohttp

from sidecar.auth.login import callback_flow, save_login
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.login import BROWSER_FLOW, oauth2_login
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound, client_session
from sidecar.mockcloud import MockCloud
from sidecar.mockcloud.oidc_parts import DEFAULT_CLIENT_ID
from sidecar.server.app import Sidecar
from sidecar.server.listen import parse_listen
from sidecar.server.serve import install_uvloop, serve
from sidecar.tokens import TokenPair


async def _act_as_browser(url: str) -> None:
    """Follow the login redirects the way a browser would (the mock cloud approves at once)."""
    async with aiohttp.ClientSession() as browser, browser.get(url) as response:
        await response.read()


def instructions(proxy_url: str, cloud_url: str, store: str, access_ttl: float, *, oauth2: bool = False) -> str:
    provider = (
        f"""  provider   : {cloud_url}  (issuer; client id {DEFAULT_CLIENT_ID}, a public client)
  curl -s '{cloud_url}/.well-known/openid-configuration'
  sidecar status --store '{store}' --flavor oauth2 --issuer '{cloud_url}' --client-id {DEFAULT_CLIENT_ID}
"""
        if oauth2
        else ""
    )
    return f"""
sidecar demo is running.
  mock cloud : {cloud_url}  (access tokens live {access_ttl:g} s)
  proxy      : {proxy_url}
  token store: {store}  (temporary, removed on exit)
{provider}
Try, in another terminal:
  curl -s '{proxy_url}/api/v1/auth/whoami'
  curl -s '{proxy_url}/api/v1/echo?hello=world'
  curl -s '{proxy_url}/_sidecar/status'        # watch "refreshes" count up every ~{access_ttl / 2:g} s
  curl -s -X POST '{cloud_url}/_mock/revoke-refresh' -o /dev/null; \\
  curl -s -X POST '{cloud_url}/_mock/revoke-access' -o /dev/null; \\
  curl -s -i '{proxy_url}/api/v1/echo'          # the refresh token is dead: 511 with a re-login hint

Press Ctrl-C to stop.
"""


async def run_demo(settings: Settings, *, access_ttl: float, cloud_port: int, out: TextIO) -> None:
    address = parse_listen(settings.listen, settings.allow_remote)
    cloud = MockCloud(access_ttl=access_ttl)
    cloud_url = await cloud.start("127.0.0.1", cloud_port)
    try:
        settings = dataclasses.replace(settings, upstream=cloud_url)
        oauth2 = settings.flavor == "oauth2"
        if oauth2:
            # The mock cloud is the provider; its public client needs no secret.
            settings = dataclasses.replace(
                settings, issuer=cloud_url, token_url=None, client_id=DEFAULT_CLIENT_ID, client_auth=None
            )
        flow = "the authorization code flow with PKCE" if oauth2 else "the browser flow"
        print(
            f"Logging in to the mock cloud at {cloud_url} through {flow} (the demo plays the browser)...",
            file=out,
            flush=True,
        )
        pending: list[asyncio.Task[None]] = []

        def browse(url: str) -> None:
            pending.append(asyncio.ensure_future(_act_as_browser(url)))

        pair = await (
            _oauth2_login(settings, browse) if oauth2 else callback_flow(cloud_url, timeout=30, announce=browse)
        )
        await asyncio.gather(*pending)
        await save_login(settings, pair)

        def ready(url: str, _sidecar: Sidecar) -> None:
            print(instructions(url, cloud_url, settings.store, access_ttl, oauth2=oauth2), file=out, flush=True)

        await serve(settings, address, ready=ready)
    finally:
        await cloud.stop()


async def _oauth2_login(settings: Settings, browse: Callable[[str], None]) -> TokenPair:
    outbound = Outbound(settings)
    async with client_session(settings, outbound) as session:
        pair, _claims = await oauth2_login(
            ProviderSession(session, outbound.proxies),
            settings,
            flow=BROWSER_FLOW,
            announce=browse,
            show=lambda _prompt: None,
            timeout=30,
            api_url=settings.upstream,
        )
    return pair


def demo_command(settings: Settings, *, access_ttl: float, cloud_port: int, out: TextIO = sys.stdout) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    settings = dataclasses.replace(settings, store=str(workdir / "tokens.json"))
    install_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_demo(settings, access_ttl=access_ttl, cloud_port=cloud_port, out=out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("sidecar demo stopped.", file=out)
    return 0

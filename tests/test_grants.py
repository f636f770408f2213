"""What a token endpoint grants is checked before it is used or stored (SPEC §3).

The token endpoint here is a real aiohttp server on 127.0.0.1 that answers a
refresh with whatever body a test scripts: a token carrying CR LF and a
second request, a token outside Latin-1, one over 16 KiB, a body that never
ends.  The manager and the proxy run against it as they would against a
hostile or broken cloud.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeClock, ManagerFactory, ProxyFactory, stored
from helpers.proxying import fetch

from sidecar.errors import RefreshTransient
from sidecar.store.file import TokenFile
from sidecar.tokens import MAX_TOKEN_LENGTH, TokenPair, is_b64token

MIB = 1024 * 1024
REFRESH_PATH = "/api/v1/auth/token/refresh"
INJECTION = "NEWAT\r\nX-Injected: yes\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x"
ServerFactory = Callable[..., Awaitable[TestServer]]


class HostileCloud:
    """A token endpoint answering every refresh with ``grant``, and an echo endpoint recording what reached it."""

    def __init__(self, grant: dict[str, Any]) -> None:
        self.grant = grant
        self.refreshes = 0
        self.seen: list[dict[str, str]] = []
        self.paths: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(REFRESH_PATH, self.refresh)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def refresh(self, request: web.Request) -> web.Response:
        self.refreshes += 1
        return web.json_response(self.grant)

    async def echo(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.seen.append(dict(request.headers))
        return web.json_response({"ok": True})


def seed_pair(store_path: Path, api_url: str, clock: FakeClock, *, expired: bool) -> TokenPair:
    """A login at ``api_url`` whose access token is expired (or has an hour left)."""
    pair = TokenPair(
        access_token="at_old",
        refresh_token="rt_old",
        api_url=api_url,
        expires_at=clock() + (-10 if expired else 3600),
        obtained_at=clock() - 100,
    )
    TokenFile(store_path).write(pair)
    return pair


def tokens_of(pair: TokenPair) -> tuple[str | None, str]:
    return pair.access_token, pair.refresh_token


async def hostile(aiohttp_server: ServerFactory, grant: dict[str, Any]) -> tuple[HostileCloud, str]:
    cloud = HostileCloud(grant)
    server = await aiohttp_server(cloud.app())
    return cloud, str(server.make_url("")).rstrip("/")


# -- the pure check ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["abc", "eyJhbGciOi.J9-_~+/x", "dG9rZW4=", "a==", "x" * MAX_TOKEN_LENGTH],
    ids=["plain", "jwt-like", "padded", "padding-only-at-the-end", "16-KiB"],
)
def test_b64tokens_are_accepted(value: str) -> None:
    assert is_b64token(value)


@pytest.mark.parametrize(
    "value",
    ["", "a b", "a\r\nX: y", "\u2603", "a=b", "tab\t", "x" * (MAX_TOKEN_LENGTH + 1), None, 42],
    ids=["empty", "space", "crlf", "snowman", "inner-equals", "tab", "over-16-KiB", "none", "number"],
)
def test_anything_else_is_refused(value: object) -> None:
    assert not is_b64token(value)


# -- a refresh granting an unusable access token ---------------------------------------


@pytest.mark.parametrize(
    "access_token",
    [INJECTION, "snow\u2603man", "x" * (MAX_TOKEN_LENGTH + 1)],
    ids=["header-injection", "non-latin-1", "over-16-KiB"],
)
async def test_unusable_access_token_is_transient_and_the_new_refresh_token_is_saved(
    aiohttp_server: ServerFactory,
    store_path: Path,
    clock: FakeClock,
    make_manager: ManagerFactory,
    access_token: str,
) -> None:
    """The stale token is handed out, the failure is transient, and the rotated refresh token (the only live one) is stored."""
    cloud, url = await hostile(
        aiohttp_server, {"accessToken": access_token, "refreshToken": "rt_new", "expiresIn": 3600}
    )
    old = seed_pair(store_path, url, clock, expired=True)
    manager = await make_manager(upstream=url)
    assert await manager.access_token() == old.access_token
    assert cloud.refreshes == 1
    assert (manager.stats.ok, manager.stats.transient) == (0, 1)
    assert "b64token" in (manager.stats.last_error or "")
    kept = stored(store_path)
    assert (kept.access_token, kept.refresh_token) == (old.access_token, "rt_new")


async def test_unusable_refresh_token_is_transient_and_the_store_is_unchanged(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A granted refresh token with CR LF in it is neither used nor stored."""
    cloud, url = await hostile(aiohttp_server, {"accessToken": "at_fine", "refreshToken": "rt\r\nX-Injected: yes"})
    old = seed_pair(store_path, url, clock, expired=True)
    manager = await make_manager(upstream=url)
    assert await manager.access_token() == old.access_token
    assert (cloud.refreshes, manager.stats.transient) == (1, 1)
    assert tokens_of(stored(store_path)) == tokens_of(old)


async def test_injected_token_never_reaches_a_request_head(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory
) -> None:
    """Through the proxy, a grant smuggling a header and a second request adds neither: the upstream sees the old token, once."""
    cloud, url = await hostile(aiohttp_server, {"accessToken": INJECTION, "refreshToken": "rt_new", "expiresIn": 3600})
    seed_pair(store_path, url, clock, expired=True)
    proxy = await make_proxy(upstream=url)
    async with aiohttp.ClientSession() as client:
        replies = [await fetch(client, "GET", proxy.url + "/api/v1/echo") for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert cloud.paths == ["/api/v1/echo"] * 3
    assert all("X-Injected" not in headers for headers in cloud.seen)
    assert {headers["Authorization"] for headers in cloud.seen} == {"Bearer at_old"}


async def test_non_latin1_token_gives_no_500(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory
) -> None:
    """A granted token with a snowman in it is refused at the grant: requests go on with the stale token, not as 500s."""
    cloud, url = await hostile(
        aiohttp_server, {"accessToken": "snow\u2603", "refreshToken": "rt_new", "expiresIn": 3600}
    )
    seed_pair(store_path, url, clock, expired=True)
    proxy = await make_proxy(upstream=url)
    async with aiohttp.ClientSession() as client:
        reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    assert reply.status == 200
    assert cloud.seen[0]["Authorization"] == "Bearer at_old"


# -- the answer's size -------------------------------------------------------------------


async def test_token_endpoint_body_over_1_mib_is_transient_without_reading_it_all(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """An answer that never ends is cut after 1 MiB: a transient failure at once, not a read of everything it sends."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"accessToken": "')
        chunk = b"a" * 65536
        try:
            while sent < 256 * MIB:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_post(REFRESH_PATH, endless)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    old = seed_pair(store_path, url, clock, expired=True)
    manager = await make_manager(upstream=url)
    started = time.monotonic()
    assert await manager.access_token() == old.access_token
    assert time.monotonic() - started < 10
    assert "1 MiB" in (manager.stats.last_error or "")
    assert sent < 64 * MIB
    assert tokens_of(stored(store_path)) == tokens_of(old)


async def test_token_endpoint_announcing_over_1_mib_is_refused_before_reading(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A Content-Length over 1 MiB is refused from the head alone."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b" " * (MIB + 1), content_type="application/json")

    app = web.Application()
    app.router.add_post(REFRESH_PATH, big)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    seed_pair(store_path, url, clock, expired=True)
    manager = await make_manager(upstream=url)
    with pytest.raises(RefreshTransient, match="1 MiB"):
        await manager.force_refresh()


async def test_a_grant_of_exactly_1_mib_is_read(
    aiohttp_server: ServerFactory, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """The cap is a limit, not a cut-off below it: a padded 1 MiB grant still works."""
    grant = b'{"accessToken": "at_new", "refreshToken": "rt_new", "expiresIn": 3600}'

    async def padded(request: web.Request) -> web.Response:
        return web.Response(body=grant + b" " * (MIB - len(grant)), content_type="application/json")

    app = web.Application()
    app.router.add_post(REFRESH_PATH, padded)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    seed_pair(store_path, url, clock, expired=True)
    manager = await make_manager(upstream=url)
    assert await manager.access_token() == "at_new"
    assert stored(store_path).refresh_token == "rt_new"

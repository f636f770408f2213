"""Regression tests for the review fixes (commit "Review fixes: ..."): one test per defect.

Each test here failed on the code before those fixes.  Expiry and backoff are
driven by the fake clock shared by the manager, the proxy and the mock cloud;
nothing sleeps waiting for a token to expire.  Where the bytes on the wire
matter, a scripted raw upstream (tests/helpers/scripted.py) records them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    FakeClock,
    ManagerFactory,
    ProxyFactory,
    RunningProxy,
    assert_one_line_failure,
    poll_until,
    run_sidecar,
    seed_expired,
    seed_store,
    stored,
)
from helpers.proxying import assert_problem, authority, fetch, raw_get, wait_for_log_lines
from helpers.scripted import OK, Conn, StartUpstream, answer_each
from helpers.serving import running_serve
from helpers.wire import raw_request

from sidecar.auth.refresh import make_refresher
from sidecar.config import Settings
from sidecar.errors import StoreError
from sidecar.manager import TokenManager
from sidecar.mockcloud import MockCloud
from sidecar.refreshing import Refresher
from sidecar.server.app import running_sidecar
from sidecar.store.file import FileStore, TokenFile
from sidecar.tokens import TokenPair

MIB = 1024 * 1024
# Inside the default 120 s leeway of a mock-cloud token (it lives a day), still valid.
INTO_LEEWAY = 86400.0 - 60.0
# README: after a grant with no usable expiry the next refresh waits at least
# this long (sidecar.manager.MIN_REFRESH_INTERVAL; a literal here so that this
# file still imports against code that predates the constant).
MIN_REFRESH_INTERVAL = 60.0
# How long a subprocess that must fail at once may take; a hang fails the test.
FAIL_FAST = 6.0
# A WebSocket handshake, minus the Host line.
WS_HANDSHAKE = [
    "GET /api/v1/ws HTTP/1.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]


async def raw_head(url: str, request: bytes) -> bytes:
    """Send ``request`` verbatim and return the response head, or b"" if the server closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        writer.write(request)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
    finally:
        writer.close()


class NoExpiryEndpoint:
    """A token endpoint that grants a new pair without any expiry, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        self.calls += 1
        return TokenPair(
            access_token=f"at_noexpiry_{self.calls}",
            refresh_token=f"rt_noexpiry_{self.calls}",
            api_url=pair.api_url,
            expires_at=None,
            obtained_at=now,
        )


class EnoughSleeps(Exception):
    """Ends a proactive loop after the sleeps a test wanted to see."""


class LoopSpinning(BaseException):
    """Stops a proactive loop that keeps refreshing without sleeping (a BaseException: the loop catches Exception)."""


class CountingRefresher:
    """Passes refreshes to ``inner``, counting the attempts; raises LoopSpinning past ``guard`` of them."""

    def __init__(self, inner: Refresher, guard: int = 5) -> None:
        self.inner = inner
        self.guard = guard
        self.calls = 0

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        self.calls += 1
        if self.calls > self.guard:
            raise LoopSpinning()
        return await self.inner.refresh(pair, now)


class _FailingWrite:
    """A prepared write whose commit fails as on a full disk."""

    async def commit(self, pair: TokenPair) -> object:
        raise StoreError("cannot write token store: No space left on device")

    async def abort(self) -> None:
        pass


class StoreFailingOneCommit(FileStore):
    """A file store whose first refresh commit fails, as on a full disk; later writes work."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures_left = 1

    async def begin_write(self, expected: object) -> Any:
        if self.failures_left:
            self.failures_left -= 1
            return _FailingWrite()
        return await super().begin_write(expected)


def seed_without_api_url(store_path: Path, clock: FakeClock) -> TokenPair:
    """A store holding an expired pair without apiUrl (so with no upstream configured the refresher has no URL)."""
    pair = TokenPair(
        access_token="at_local_stale",
        refresh_token="rt_local_unknown",
        api_url=None,
        expires_at=clock() - 10,
        obtained_at=clock() - 100,
    )
    TokenFile(store_path).write(pair)
    return pair


def metric(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no sample {name} in:\n{text}")


# -- 1. request smuggling ---------------------------------------------------------


async def test_connection_naming_content_length_keeps_the_body_framed(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """A body framed by a Content-Length that the Connection header names reaches the upstream framed, and the next request on that connection arrives intact."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: up\r\n\r\n"
    head = "\r\n".join(
        [
            "POST /first HTTP/1.1",
            f"Host: {authority(proxy.url)}",
            "Connection: Content-Length",
            f"Content-Length: {len(smuggled)}",
        ]
    )
    first = await raw_request(proxy.url, head, smuggled)
    second = await fetch(client, "GET", proxy.url + "/second")
    conn: Conn = server.conns[0]
    assert b"\r\nContent-Length: %d\r\n" % len(smuggled) in conn.heads[0]
    assert conn.bodies[0] == smuggled
    assert [head.split(b"\r\n", 1)[0] for head in conn.heads] == [b"POST /first HTTP/1.1", b"GET /second HTTP/1.1"]
    assert len(server.conns) == 1
    assert (first.status, second.status) == (200, 200)


# -- 2. refresh storm ----------------------------------------------------------------


async def test_grant_without_expiry_is_not_refreshed_on_every_use(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """After a grant with no expiry, 20 uses make one refresh call and the next refresh waits the minimum interval."""
    seed_expired(store_path, cloud)
    endpoint = NoExpiryEndpoint()
    manager = await make_manager(refresher=endpoint)
    tokens = [await manager.access_token() for _ in range(20)]
    assert endpoint.calls == 1
    assert set(tokens) == {"at_noexpiry_1"}
    next_refresh = manager.next_refresh_at()
    assert next_refresh is not None and next_refresh >= clock() + MIN_REFRESH_INTERVAL


# -- 3. an unsaved refreshed pair ---------------------------------------------------


async def test_unsaved_refreshed_pair_is_not_overridden_by_the_spent_one(
    cloud: MockCloud, store_path: Path, clock: FakeClock, monotonic: FakeClock
) -> None:
    """When the rotated pair could not be saved, the next refresh spends its refresh token, not the spent one still on disk, and saves the newest pair."""
    first = seed_store(store_path, cloud, obtained_at=clock())
    async with aiohttp.ClientSession() as session:
        settings = Settings(upstream=cloud.base_url, store=str(store_path), read_timeout=5.0)
        manager = TokenManager(
            StoreFailingOneCommit(store_path),
            make_refresher(session, settings),
            clock=clock,
            monotonic=monotonic,
            random=lambda: 0.5,
        )
        clock.advance(INTO_LEEWAY)
        unsaved = await manager.access_token()
        assert unsaved != first.access_token
        assert stored(store_path).refresh_token == first.refresh_token  # the file still holds the spent pair
        clock.advance(INTO_LEEWAY)
        newest = await manager.access_token()
    assert cloud.chain_revocations == 0
    assert cloud.refresh_calls == 2
    assert newest not in (first.access_token, unsaved)
    assert cloud.access_token_valid(newest)
    assert stored(store_path).access_token == newest


# -- 4. shutdown with a refresh in flight ---------------------------------------------


async def test_shutdown_waits_for_a_refresh_in_flight_to_save_its_pair(
    login: TokenPair, cloud: MockCloud, store_path: Path, clock: FakeClock
) -> None:
    """Leaving the running sidecar while a refresh is in flight lets it finish and write the rotated pair to the store."""
    settings = Settings(upstream=cloud.base_url, store=str(store_path), read_timeout=5.0, log_format="json")
    cloud.hang_next_refreshes(1, seconds=0.3)
    async with running_sidecar(settings, log_stream=io.StringIO(), clock=clock, proactive=False) as sidecar:
        refresh = asyncio.ensure_future(sidecar.manager.force_refresh())
        await poll_until(lambda: cloud.refresh_calls == 1, 2, "the refresh reaching the token endpoint")
    assert refresh.done()
    token = await refresh
    rotated = stored(store_path)
    assert rotated.refresh_token != login.refresh_token
    assert rotated.access_token == token
    assert cloud.access_token_valid(token)


# -- 5. oauth2: a wrong client secret ------------------------------------------------


async def test_oauth2_wrong_client_secret_is_transient_not_dead(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """An oauth2 token endpoint refusing the client (401 invalid_client) keeps the store and the stale token, counting a transient failure."""
    old = seed_store(store_path, cloud)
    cloud.oauth_client = ("cli", "right")
    manager = await make_manager(
        flavor="oauth2", token_url=cloud.base_url + "/oauth/token", client_id="cli", client_secret="typo"
    )
    clock.advance(INTO_LEEWAY)
    assert await manager.access_token() == old.access_token
    assert cloud.refresh_calls == 1
    assert stored(store_path).refresh_token == old.refresh_token
    assert (manager.stats.transient, manager.stats.dead) == (1, 0)


# -- 6. no request text in logs ---------------------------------------------------------


async def test_malformed_requests_are_not_quoted_in_the_log(
    cloud: MockCloud, store_path: Path, env: dict[str, str], listen: str
) -> None:
    """A header with an invalid character and an oversized header get 400 or a close, and serve's stderr quotes neither, nor a traceback."""
    seed_store(store_path, cloud)
    host = listen.encode()
    bad_cookie = b"GET /api/v1/echo HTTP/1.1\r\nHost: " + host + b"\r\nCookie: session=SUPERSECRETCOOKIE\x01\r\n\r\n"
    huge_header = b"GET /api/v1/echo HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: HUGESECRET" + b"a" * 9000 + b"\r\n\r\n"
    async with running_serve(
        env, listen, "--store", str(store_path), "--upstream", cloud.base_url, "--log-format", "text"
    ) as served:
        for request in (bad_cookie, huge_header):
            head = await raw_head(served.base_url, request)
            assert head == b"" or head.split(b" ", 2)[1] == b"400", head
        assert await served.stop() == 0
    assert "SUPERSECRETCOOKIE" not in served.stderr
    assert "HUGESECRET" not in served.stderr
    assert "Traceback" not in served.stderr


# -- 7. a ConfigError from the refresher --------------------------------------------------


async def test_refresher_config_error_is_transient_with_backoff(
    store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """With no upstream anywhere the refresh fails as transient: the stale token is handed out and a second use makes no second attempt."""
    stale = seed_without_api_url(store_path, clock)
    async with aiohttp.ClientSession() as session:
        refresher = CountingRefresher(make_refresher(session, Settings(store=str(store_path))))
        manager = await make_manager(refresher=refresher)
        assert [await manager.access_token(), await manager.access_token()] == [stale.access_token] * 2
    assert refresher.calls == 1
    assert manager.stats.transient == 1


async def test_proactive_loop_backs_off_after_a_refresher_config_error(
    store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """The proactive loop sleeps through the backoff after a configuration error instead of retrying at once."""
    seed_without_api_url(store_path, clock)
    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        clock.advance(0.01)  # 20 sleeps stay well inside the first backoff (1 s)
        if sleeps >= 20:
            raise EnoughSleeps()
        await asyncio.sleep(0)

    async with aiohttp.ClientSession() as session:
        refresher = CountingRefresher(make_refresher(session, Settings(store=str(store_path))))
        manager = await make_manager(refresher=refresher, sleep=sleep)
        with pytest.raises(EnoughSleeps):
            await asyncio.wait_for(manager.run_proactive(), 5)
    assert refresher.calls == 1
    assert sleeps == 20


# -- 8. refresh beside the traffic -----------------------------------------------------


async def test_due_but_valid_token_is_used_while_the_refresh_runs(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """A request with the token inside the leeway but still valid is answered at once with that token while the refresh runs beside it."""
    proxy = await make_proxy()
    clock.advance(INTO_LEEWAY)
    cloud.hang_next_refreshes(1, seconds=1.5)
    started = time.monotonic()
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert reply.json()["authorization"] == f"Bearer {login.access_token}"
    assert elapsed < 0.5
    await poll_until(lambda: cloud.refresh_calls == 1, 1, "the background refresh reaching the token endpoint")


# -- 9. replay_limit above 1 MiB --------------------------------------------------------


async def test_body_over_1_mib_within_replay_limit_is_forwarded(
    login: TokenPair, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With replay_limit 4 MiB, a 2 MiB POST reaches the upstream whole instead of hitting aiohttp's 1 MiB limit."""
    proxy = await make_proxy(replay_limit=4 * MIB)
    body = os.urandom(2 * MIB)
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=body)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_body_over_1_mib_within_replay_limit_is_replayed_after_a_401(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """With replay_limit 4 MiB, a 2 MiB POST rejected with 401 is replayed after the refresh and succeeds."""
    proxy = await make_proxy(replay_limit=4 * MIB)
    body = os.urandom(2 * MIB)
    cloud.revoke_access_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=body)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert cloud.refresh_calls == 1
    (line,) = await wait_for_log_lines(proxy, 1)
    assert line["retried"] is True


# -- 10. workers on a busy port -----------------------------------------------------------


async def test_workers_on_a_busy_port_exit_2_at_once(env: dict[str, str], store_path: Path) -> None:
    """serve --workers 2 on a port someone else holds exits 2 at once with one stderr line about listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = await run_sidecar(
            env,
            "serve",
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            str(store_path),
            "--upstream",
            "http://127.0.0.1:9",
            timeout=FAIL_FAST,
        )
    assert_one_line_failure(run, 2)
    assert "listen" in run.err


# -- 11. upstream URL validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "secret"),
    [("https://user:hunter2secret@example.test", "hunter2secret"), ("http://127.0.0.1:99999", None)],
    ids=["credentials", "port-out-of-range"],
)
async def test_bad_upstream_url_is_exit_2(
    env: dict[str, str], store_path: Path, listen: str, upstream: str, secret: str | None
) -> None:
    """An upstream URL carrying credentials or an impossible port makes serve exit 2 with one stderr line that does not repeat the password."""
    run = await run_sidecar(
        env, "serve", "--listen", listen, "--store", str(store_path), "--upstream", upstream, timeout=FAIL_FAST
    )
    assert_one_line_failure(run, 2)
    if secret is not None:
        assert secret not in run.err


# -- 12. WebSocket handshakes ---------------------------------------------------------------


async def test_websocket_handshake_with_a_non_latin1_header_is_upgraded(proxy: RunningProxy) -> None:
    """A WebSocket handshake carrying a UTF-8 header value outside Latin-1 is upgraded, not answered 500."""
    request = "\r\n".join([*WS_HANDSHAKE, f"Host: {authority(proxy.url)}", "X-Name: \u20ac"]).encode() + b"\r\n\r\n"
    head = await raw_head(proxy.url, request)
    assert head.startswith(b"HTTP/1.1 101 "), head


async def test_websocket_handshake_refused_by_the_upstream_is_a_problem(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """An upstream refusing the WebSocket handshake with 403 gives the client a 403 upstream-refused-upgrade problem."""
    server = await upstream(answer_each(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"))
    proxy = await make_proxy(upstream=server.url)
    reply = await raw_request(proxy.url, "\r\n".join([*WS_HANDSHAKE, f"Host: {authority(proxy.url)}"]))
    assert_problem(reply, 403, "upstream-refused-upgrade")


# -- 13. relayed responses gain no headers --------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [OK, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    ids=["complete", "streamed"],
)
async def test_relayed_response_gains_no_content_type_or_server(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, answer: bytes
) -> None:
    """An upstream answer without Content-Type and Server reaches the client without them."""
    server = await upstream(answer_each(answer))
    proxy = await make_proxy(upstream=server.url)
    reply = await raw_request(proxy.url, raw_get(proxy, "/x"))
    assert (reply.status, reply.body) == (200, b"ok")
    assert "Content-Type" not in reply.headers
    assert "Server" not in reply.headers


# -- 14. path confinement --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/api/..;/x", "/api/%2e%2e;jsessionid=1/x"])
async def test_dot_dot_segment_with_path_parameter_gets_bad_target(
    proxy: RunningProxy, cloud: MockCloud, target: str
) -> None:
    """A ".." segment carrying a ;path-parameter (plain or encoded) gets 400 bad-target and is not forwarded."""
    reply = await raw_request(proxy.url, raw_get(proxy, target))
    assert_problem(reply, 400, "bad-target")
    assert cloud.requests_seen == 0


# -- 15. TRACE ---------------------------------------------------------------------------------


async def test_trace_gets_method_not_allowed(proxy: RunningProxy, cloud: MockCloud) -> None:
    """TRACE gets 405 (a bad-target problem) and is not forwarded, so no echo can carry the injected token back."""
    reply = await raw_request(
        proxy.url, f"TRACE /api/v1/echo HTTP/1.1\r\nHost: {authority(proxy.url)}\r\nConnection: close"
    )
    assert_problem(reply, 405, "bad-target")
    assert cloud.requests_seen == 0


# -- 16. the non-replayable 401 path -----------------------------------------------------------


async def test_not_replayable_401_with_dead_refresh_token_counts_no_relogin(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A streamed body's 401, passed on as not-replayable while the refresh token is dead, is not counted as a re-login response."""
    proxy = await make_proxy(replay_limit=1024)
    cloud.revoke_access_tokens()
    cloud.revoke_refresh_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=os.urandom(4096))
    assert reply.status == 401
    assert reply.headers["X-Sidecar-Retry"] == "not-replayable"
    assert "X-Sidecar-Error" not in reply.headers
    metrics = await fetch(client, "GET", proxy.url + "/_sidecar/metrics")
    assert metric(metrics.body.decode(), "sidecar_relogin_responses_total") == 0

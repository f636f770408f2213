"""Egress proxies on every outgoing path, through a real forward proxy (tinyproxy, tests/helpers/forward_proxy.py).

What crossed the proxy is read from tinyproxy's own log of request lines;
what reached the upstream is what the upstream recorded.  The mock cloud
here is a WatchedCloud, which notes any Proxy-Authorization it is sent; the
https upstream is a small TLS server with a certificate from a private CA
(tests/helpers/certs.py).  In-process sidecars trust that CA through
SSL_CERT_FILE, which OpenSSL reads whenever a default context is made.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    TIMEOUT,
    FakeClock,
    ProxyFactory,
    Run,
    RunningProxy,
    assert_one_line_failure,
    finish,
    free_port,
    kill_running,
    read_lines_until,
    run_sidecar,
    seed_expired,
    seed_store,
    serving,
    start_sidecar,
    stored,
)
from helpers.certs import PrivateCA, make_ca
from helpers.forward_proxy import ForwardProxy, running_tinyproxy, tls_front
from helpers.serving import running_serve

from sidecar.egress.proxies import parse_proxy
from sidecar.egress.tunnel import ProxyFailed
from sidecar.mockcloud import MockCloud
from sidecar.proxy.upstream import UpstreamPool, UpstreamUnreachable
from sidecar.tokens import TokenPair

USER = "alice"
# tinyproxy's BasicAuth takes letters, digits, "-", "_" and "." only; the URL
# percent-encodes two of them anyway, so the proxy lets a request in only if
# the credentials were decoded before going into Basic.
PASSWORD = "s3cret-proxy.pw"
PASSWORD_IN_URL = "s3cret%2Dproxy%2Epw"
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY")

StartProxy = Callable[..., Awaitable[ForwardProxy]]


class WatchedCloud(MockCloud):
    """The mock cloud, also noting every Proxy-Authorization header that reaches it."""

    def __init__(self, **options: Any) -> None:
        self.proxy_authorizations: list[str] = []
        super().__init__(**options)

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._watch)
        return app

    @web.middleware
    async def _watch(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.proxy_authorizations += request.headers.getall("Proxy-Authorization", [])
        response: web.StreamResponse = await handler(request)
        return response


class TlsUpstream:
    """An https upstream (echo and WebSocket echo) with a private CA's certificate; it records each request's headers."""

    def __init__(self, ca: PrivateCA, *hosts: str) -> None:
        self.ca = ca
        self.hosts = hosts
        self.seen: list[dict[str, str]] = []
        self.port = 0
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.ca.configure_trust(context)
        return context

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/echo", self._echo)
        app.router.add_get("/api/v1/ws", self._ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ca.server_context(*self.hosts))
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _echo(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        return web.json_response({"authorization": request.headers.get("Authorization")})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(dict(request.headers))
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.add(socket)
        try:
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await socket.send_str(message.data)
        finally:
            self._sockets.discard(socket)
        return socket


@pytest.fixture(autouse=True)
def no_inherited_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: no proxy variables from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def cloud(clock: FakeClock) -> AsyncIterator[WatchedCloud]:
    """The mock cloud every conftest fixture here uses, watched for Proxy-Authorization."""
    watched = WatchedCloud(clock=clock)
    async with serving(watched):
        yield watched


@pytest.fixture
async def forward_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Start tinyproxies (``auth=(user, password)``, ``connect_ports=...``); all are stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> ForwardProxy:
            return await stack.enter_async_context(running_tinyproxy(tmp_path, **options))

        yield start


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    return make_ca(tmp_path)


@pytest.fixture
async def tls_upstream(private_ca: PrivateCA) -> AsyncIterator[TlsUpstream]:
    upstream = TlsUpstream(private_ca)
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def trust_private_ca(private_ca: PrivateCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default TLS contexts made from now on in this process trust the private CA (instead of the system's)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(private_ca.pem))


def with_credentials(proxy: ForwardProxy) -> str:
    return f"http://{USER}:{PASSWORD_IN_URL}@127.0.0.1:{proxy.port}"


def logged(proxy: RunningProxy, caplog: pytest.LogCaptureFixture) -> str:
    """Everything the sidecar logged: its access log and every logging record."""
    access_log: str = proxy.log.getvalue()
    return access_log + "\n".join(record.getMessage() for record in caplog.records) + caplog.text


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as response:
        return response.status, await response.json(content_type=None)


# -- forwarding: the lean client ----------------------------------------------------


async def test_http_upstream_is_forwarded_in_absolute_form(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    login: TokenPair,
    client: aiohttp.ClientSession,
    cloud: MockCloud,
) -> None:
    """With ``proxy`` set, requests to an http upstream reach it through the proxy as absolute-form request lines."""
    tinyproxy = await forward_proxy()
    proxy = await make_proxy(proxy=tinyproxy.url)
    for query in ("a=1", "b=2"):
        status, echo = await get_json(client, f"{proxy.url}/api/v1/echo?{query}")
        assert status == 200
        assert echo["authorization"] == f"Bearer {login.access_token}"
    assert await tinyproxy.requests() == [
        f"GET {cloud.base_url}/api/v1/echo?a=1 HTTP/1.1",
        f"GET {cloud.base_url}/api/v1/echo?b=2 HTTP/1.1",
    ]


async def test_https_upstream_goes_through_a_connect_tunnel(
    forward_proxy: StartProxy, tls_upstream: TlsUpstream
) -> None:
    """The pool opens a CONNECT tunnel (credentials on the CONNECT only) and speaks verified TLS to the upstream inside it."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD), connect_ports=(tls_upstream.port,))
    route = parse_proxy(with_credentials(tinyproxy), "proxy")
    pool = UpstreamPool(
        "https",
        "127.0.0.1",
        tls_upstream.port,
        connect_timeout=5.0,
        read_timeout=5.0,
        tls=tls_upstream.client_context(),
        proxy=route,
    )
    try:
        head = b"GET /api/v1/echo HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer t\r\n\r\n" % pool.host_header
        response = await pool.send(head, None, chunked=False, head_only=False)
        body = await response.read_all(5.0)
        response.release()
    finally:
        pool.close()
    assert response.status == 200, body
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"]
    assert tls_upstream.seen[-1].get("Authorization") == "Bearer t"
    assert "Proxy-Authorization" not in tls_upstream.seen[-1]


async def test_tls_inside_the_tunnel_checks_the_upstreams_name(
    forward_proxy: StartProxy, private_ca: PrivateCA
) -> None:
    """A certificate for another name, met through the tunnel, fails the connection as unreachable."""
    upstream = TlsUpstream(private_ca, "elsewhere.test")
    await upstream.start()
    tinyproxy = await forward_proxy()
    pool = UpstreamPool(
        "https",
        "127.0.0.1",
        upstream.port,
        connect_timeout=5.0,
        read_timeout=5.0,
        tls=upstream.client_context(),
        proxy=parse_proxy(tinyproxy.url, "proxy"),
    )
    try:
        with pytest.raises(UpstreamUnreachable):
            await pool.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, chunked=False, head_only=False)
    finally:
        pool.close()
        await upstream.stop()
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1"]
    assert upstream.seen == []


@pytest.mark.usefixtures("trust_private_ca", "login")
async def test_https_forwarding_keeps_proxy_credentials_from_upstream_and_logs(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    tls_upstream: TlsUpstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through an authenticating proxy, the https upstream gets the bearer token but never Proxy-Authorization, and no log has the password."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD), connect_ports=(tls_upstream.port,))
    proxy = await make_proxy(upstream=tls_upstream.url, proxy=with_credentials(tinyproxy), log_level="debug")
    status, echo = await get_json(client, f"{proxy.url}/api/v1/echo")
    assert status == 200, echo
    assert echo["authorization"].startswith("Bearer ")
    assert [headers.get("Proxy-Authorization") for headers in tls_upstream.seen] == [None]
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"]
    text = logged(proxy, caplog)
    assert PASSWORD not in text and PASSWORD_IN_URL not in text


@pytest.mark.parametrize(
    ("auth", "password", "status"),
    # tinyproxy 1.11 answers a CONNECT with wrong credentials 401 (not 407), and one to a port not allowed 403.
    [((USER, PASSWORD), "wrong-password", 401), (None, None, 403)],
    ids=["bad-credentials", "port-not-allowed"],
)
@pytest.mark.usefixtures("trust_private_ca", "login")
async def test_refused_tunnel_is_a_502_naming_the_proxys_status(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    tls_upstream: TlsUpstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    auth: tuple[str, str] | None,
    password: str | None,
    status: int,
) -> None:
    """A proxy refusing CONNECT (bad credentials, port not allowed) makes a 502 upstream-unreachable whose detail names that status, never the password."""
    tinyproxy = await forward_proxy(
        auth=auth, connect_ports=(tls_upstream.port + 1 if auth is None else tls_upstream.port,)
    )
    setting = f"http://{USER}:{password}@127.0.0.1:{tinyproxy.port}" if password else tinyproxy.url
    proxy = await make_proxy(upstream=tls_upstream.url, proxy=setting, log_level="debug")
    code, problem = await get_json(client, f"{proxy.url}/api/v1/echo")
    assert code == 502
    assert problem["detail"].startswith("The upstream could not be reached: the egress proxy")
    assert f"HTTP {status}" in problem["detail"]
    assert tls_upstream.seen == []
    assert "wrong-password" not in problem["detail"] + logged(proxy, caplog)


async def test_pool_names_a_proxy_it_cannot_reach(tls_upstream: TlsUpstream) -> None:
    """A proxy nobody listens on is ProxyFailed naming the proxy (without credentials), not the upstream."""
    pool = UpstreamPool(
        "https",
        "127.0.0.1",
        tls_upstream.port,
        connect_timeout=5.0,
        read_timeout=5.0,
        tls=tls_upstream.client_context(),
        proxy=parse_proxy(f"http://{USER}:{PASSWORD_IN_URL}@127.0.0.1:{free_port()}", "proxy"),
    )
    try:
        with pytest.raises(
            ProxyFailed, match=r"^cannot connect to the egress proxy http://127\.0\.0\.1:\d+ "
        ) as caught:
            await pool.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, chunked=False, head_only=False)
    finally:
        pool.close()
    assert PASSWORD_IN_URL not in str(caught.value) and USER not in str(caught.value)


async def test_https_proxy_is_spoken_to_over_tls(
    forward_proxy: StartProxy, tls_upstream: TlsUpstream, private_ca: PrivateCA, cloud: MockCloud
) -> None:
    """An ``https://`` proxy gets TLS first: a CONNECT tunnel then runs TLS inside TLS, and absolute-form requests go over it."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD))
    client_tls = tls_upstream.client_context()
    async with tls_front(tinyproxy.port, private_ca.server_context()) as port:
        route = parse_proxy(f"https://{USER}:{PASSWORD_IN_URL}@127.0.0.1:{port}", "proxy")
        statuses = []
        for scheme, upstream_port in (("https", tls_upstream.port), ("http", int(cloud.base_url.rpartition(":")[2]))):
            pool = UpstreamPool(
                scheme, "127.0.0.1", upstream_port, connect_timeout=5.0, read_timeout=5.0, tls=client_tls, proxy=route
            )
            try:
                head = b"GET /api/v1/echo HTTP/1.1\r\nHost: %s\r\n\r\n" % pool.host_header
                response = await pool.send(head, None, chunked=False, head_only=False)
                await response.read_all(5.0)
                response.release()
                statuses.append(response.status)
            finally:
                pool.close()
    assert statuses == [200, 401]  # the mock cloud's echo wants a bearer token; it was reached all the same
    assert await tinyproxy.requests() == [
        f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1",
        f"GET {cloud.base_url}/api/v1/echo HTTP/1.1",
    ]


# -- which requests go through it --------------------------------------------------


@pytest.mark.usefixtures("login")
async def test_environment_proxy_is_used_without_a_setting(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    cloud: MockCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY in the environment sends an http upstream's requests through the proxy."""
    tinyproxy = await forward_proxy()
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    proxy = await make_proxy()
    assert (await get_json(client, f"{proxy.url}/api/v1/echo"))[0] == 200
    assert await tinyproxy.requests() == [f"GET {cloud.base_url}/api/v1/echo HTTP/1.1"]


@pytest.mark.parametrize("setting", [None, "proxy"], ids=["environment", "setting"])
async def test_no_proxy_bypasses_the_proxy_for_requests_and_refresh(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    cloud: WatchedCloud,
    store_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
) -> None:
    """NO_PROXY=127.0.0.1 sends requests and refreshes straight to the upstream, whether the proxy came from the environment or the setting, and no Proxy-Authorization goes with them."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD))
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    if setting is None:
        monkeypatch.setenv("HTTP_PROXY", with_credentials(tinyproxy))
    seed_expired(store_path, cloud)
    proxy = await make_proxy(**({"proxy": with_credentials(tinyproxy)} if setting else {}))
    status, echo = await get_json(client, f"{proxy.url}/api/v1/echo")
    assert status == 200
    assert cloud.refresh_calls == 1
    assert await tinyproxy.requests() == []
    assert cloud.proxy_authorizations == []
    assert not any(name.lower() == "proxy-authorization" for name, _ in echo["headers"])


@pytest.mark.usefixtures("login")
async def test_empty_proxy_setting_ignores_the_environment(
    forward_proxy: StartProxy, make_proxy: ProxyFactory, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy = ""`` goes direct even with HTTP_PROXY set."""
    tinyproxy = await forward_proxy()
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    proxy = await make_proxy(proxy="")
    assert (await get_json(client, f"{proxy.url}/api/v1/echo"))[0] == 200
    assert await tinyproxy.requests() == []


# -- refresh and WebSocket -----------------------------------------------------------


async def test_refresh_goes_through_the_proxy(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    cloud: WatchedCloud,
    store_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An expired token is refreshed through the authenticating proxy; the cloud never sees Proxy-Authorization, no log the password."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD))
    seed_expired(store_path, cloud)
    proxy = await make_proxy(proxy=with_credentials(tinyproxy), log_level="debug")
    assert (await get_json(client, f"{proxy.url}/api/v1/echo"))[0] == 200
    assert cloud.refresh_ok == 1
    assert await tinyproxy.requests() == [
        f"POST {cloud.base_url}/api/v1/auth/token/refresh HTTP/1.1",
        f"GET {cloud.base_url}/api/v1/echo HTTP/1.1",
    ]
    assert cloud.proxy_authorizations == []
    assert PASSWORD not in logged(proxy, caplog)


@pytest.mark.usefixtures("trust_private_ca")
async def test_websocket_to_an_https_upstream_goes_through_a_tunnel(
    forward_proxy: StartProxy,
    make_proxy: ProxyFactory,
    tls_upstream: TlsUpstream,
    client: aiohttp.ClientSession,
    login: TokenPair,
) -> None:
    """A WebSocket upgrade to an https upstream is tunnelled with CONNECT; the handshake inside has the bearer token and no proxy credentials."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD), connect_ports=(tls_upstream.port,))
    proxy = await make_proxy(upstream=tls_upstream.url, proxy=with_credentials(tinyproxy))
    async with client.ws_connect(f"{proxy.url}/api/v1/ws") as socket:
        await socket.send_str("through the tunnel")
        message = await socket.receive(timeout=5.0)
    assert message.data == "through the tunnel"
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"]
    assert tls_upstream.seen[-1]["Authorization"] == f"Bearer {login.access_token}"
    assert "Proxy-Authorization" not in tls_upstream.seen[-1]


@pytest.mark.usefixtures("login")
async def test_websocket_to_an_http_upstream_goes_to_the_proxy_in_absolute_form(
    forward_proxy: StartProxy, make_proxy: ProxyFactory, client: aiohttp.ClientSession, cloud: MockCloud
) -> None:
    """An http upstream's WebSocket handshake is sent to the proxy in absolute form (tinyproxy then drops Upgrade: whatever it answers, the request went its way)."""
    tinyproxy = await forward_proxy()
    proxy = await make_proxy(proxy=tinyproxy.url)
    async with client.get(
        f"{proxy.url}/api/v1/ws",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as response:
        await response.read()
    assert await tinyproxy.requests() == [f"GET {cloud.base_url}/api/v1/ws HTTP/1.1"]


# -- the commands, as real subprocesses ----------------------------------------------


def child(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` (conftest's clean child environment) without inherited proxy variables, plus ``extra``."""
    return {**{name: value for name, value in env.items() if name not in PROXY_VARIABLES}, **extra}


def assert_no_password(run: Run) -> None:
    for text in (PASSWORD, PASSWORD_IN_URL):
        assert text not in run.out + run.err


async def test_token_refreshes_through_the_environment_proxy(
    forward_proxy: StartProxy, cloud: WatchedCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``sidecar token`` with HTTP_PROXY (credentials in it) refreshes through the proxy; the cloud never sees them, the output never shows them."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD))
    seed_expired(store_path, cloud)
    run = await run_sidecar(child(env, HTTP_PROXY=with_credentials(tinyproxy)), "token", "--store", str(store_path))
    assert run.code == 0, run
    assert cloud.refresh_ok == 1
    assert await tinyproxy.requests() == [f"POST {cloud.base_url}/api/v1/auth/token/refresh HTTP/1.1"]
    assert cloud.proxy_authorizations == []
    assert_no_password(run)


async def test_status_asks_whoami_through_the_proxy_flag(
    forward_proxy: StartProxy, cloud: WatchedCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``sidecar status --proxy URL`` calls whoami through that proxy and shows the user, never the password."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD))
    seed_store(store_path, cloud)
    run = await run_sidecar(child(env), "status", "--proxy", with_credentials(tinyproxy), "--store", str(store_path))
    assert run.code == 0, run
    assert "alice" in run.out
    assert await tinyproxy.requests() == [f"GET {cloud.base_url}/api/v1/auth/whoami HTTP/1.1"]
    assert cloud.proxy_authorizations == []
    assert_no_password(run)


async def test_commands_honour_no_proxy(
    forward_proxy: StartProxy, cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """With NO_PROXY naming the cloud's host, ``token --force-refresh`` and ``status`` go straight to it."""
    tinyproxy = await forward_proxy()
    seed_store(store_path, cloud)
    variables = child(env, HTTP_PROXY=tinyproxy.url, NO_PROXY="127.0.0.1")
    for args in (("token", "--force-refresh"), ("status",)):
        run = await run_sidecar(variables, *args, "--store", str(store_path))
        assert run.code == 0, run
    assert cloud.refresh_ok == 1
    assert await tinyproxy.requests() == []


async def test_empty_sidecar_proxy_turns_the_environment_proxy_off(
    forward_proxy: StartProxy, cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """SIDECAR_PROXY="" makes ``status`` ignore HTTP_PROXY."""
    tinyproxy = await forward_proxy()
    seed_store(store_path, cloud)
    run = await run_sidecar(
        child(env, HTTP_PROXY=tinyproxy.url, SIDECAR_PROXY=""), "status", "--store", str(store_path)
    )
    assert run.code == 0, run
    assert await tinyproxy.requests() == []


async def test_unusable_proxy_variable_is_a_configuration_error(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """A SOCKS URL in HTTPS_PROXY stops ``token`` with exit 2 and one line naming the variable, not its password."""
    seed_store(store_path, cloud)
    run = await run_sidecar(
        child(env, HTTPS_PROXY=f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080"), "token", "--store", str(store_path)
    )
    assert_one_line_failure(run, 2)
    assert "HTTPS_PROXY" in run.err
    assert_no_password(run)


async def test_poll_login_polls_through_the_proxy(
    forward_proxy: StartProxy, cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``login --flow poll`` polls the cloud through HTTP_PROXY until the code is approved."""
    tinyproxy = await forward_proxy()
    process = await start_sidecar(
        child(env, HTTP_PROXY=tinyproxy.url),
        *("login", "--flow", "poll", "--no-browser", "--upstream", cloud.base_url, "--store", str(store_path)),
    )
    try:
        seen = await read_lines_until(process.stderr, "/cli-login?code=", TIMEOUT, "stderr")
        device_url = next(word for word in seen[-1].split() if "/cli-login?code=" in word)
        async with aiohttp.ClientSession() as browser, browser.get(device_url) as response:
            assert response.status == 200
        run = await finish(process, "".join(seen))
    finally:
        await kill_running([process])
    assert run.code == 0, run
    code = device_url.rpartition("code=")[2]
    polls = await tinyproxy.requests()
    assert polls and set(polls) == {f"GET {cloud.base_url}/api/v1/auth/cli-login/poll?code={code} HTTP/1.1"}
    assert stored(store_path).api_url == cloud.base_url


async def test_serve_tunnels_to_an_https_upstream_and_logs_no_password(
    forward_proxy: StartProxy,
    cloud: MockCloud,
    tls_upstream: TlsUpstream,
    private_ca: PrivateCA,
    store_path: Path,
    env: dict[str, str],
    listen: str,
) -> None:
    """``sidecar serve`` (uvloop's start_tls) forwards to an https upstream through an authenticating proxy; its debug log never has the password."""
    tinyproxy = await forward_proxy(auth=(USER, PASSWORD), connect_ports=(tls_upstream.port,))
    seed_store(store_path, cloud)
    variables = child(env, SSL_CERT_FILE=str(private_ca.pem), SIDECAR_PROXY=with_credentials(tinyproxy))
    args = ("--upstream", tls_upstream.url, "--store", str(store_path), "--log-level", "debug", "--log-format", "json")
    async with running_serve(variables, listen, *args) as served:
        async with served.session() as session, session.get(served.base_url + "/api/v1/echo") as response:
            assert response.status == 200, await response.text()
        assert await served.stop() == 0
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"]
    assert "Proxy-Authorization" not in tls_upstream.seen[-1]
    assert PASSWORD not in served.stderr + served.stdout and PASSWORD_IN_URL not in served.stderr + served.stdout

"""What crosses the proxy (SPEC §4): target, headers, body framing, redirects, streams, WebSockets.

The mock cloud's echo endpoint reports the request exactly as it arrived, so
the assertions are on what the upstream received.  Where even the echo would
hide a difference, a bare recording server stands in as the upstream.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    FakeClock,
    ProxyFactory,
    RunningProxy,
    seed_store,
    serving,
)
from helpers.proxying import assert_problem, authority, fetch, raw_get
from helpers.scripted import OK, Conn, StartUpstream, answer_each
from helpers.wire import raw_request, read_head
from multidict import CIMultiDict

from sidecar.mockcloud import MockCloud
from sidecar.tokens import TokenPair

# Every hop-by-hop header the header test sends, and one named in Connection.
HOP_BY_HOP_SENT = ("Connection", "X-Drop-Me", "Keep-Alive", "TE", "Proxy-Authorization", "Proxy-Connection")


def upstream_headers(echo: dict[str, Any]) -> list[tuple[str, str]]:
    """The echo's raw header list as (lowercased name, value) pairs."""
    return [(name.lower(), value) for name, value in echo["headers"]]


def upstream_header_names(echo: dict[str, Any]) -> list[str]:
    return sorted(name for name, _ in upstream_headers(echo))


class RecordingUpstream:
    """A bare HTTP server that records raw targets, headers and bodies, and answers with fixed headers.

    Unlike the mock cloud it does not decompress request bodies, so it sees
    the bytes on the wire.
    """

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.headers: list[CIMultiDict[str]] = []
        self.bodies: list[bytes] = []
        self.response_headers: list[tuple[str, str]] = []
        self._runner: web.ServerRunner | None = None
        self.base_url = ""

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.targets.append(request.raw_path)
        self.headers.append(CIMultiDict(request.headers))
        self.bodies.append(await request.read())
        return web.Response(body=b"recorded", headers=CIMultiDict(self.response_headers))

    async def start(self) -> None:
        server = web.Server(self._handle, auto_decompress=False)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def prefix_cloud(clock: FakeClock) -> AsyncIterator[MockCloud]:
    """A mock cloud that lives under /cloud."""
    async with serving(MockCloud(clock=clock, prefix="/cloud")) as mock:
        yield mock


@pytest.fixture
async def prefix_proxy(
    prefix_cloud: MockCloud, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory
) -> RunningProxy:
    """A logged-in proxy whose upstream has the path prefix /cloud."""
    seed_store(store_path, prefix_cloud, obtained_at=clock())
    return await make_proxy(upstream=prefix_cloud.base_url)


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingUpstream]:
    """A started recording server."""
    upstream = RecordingUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.fixture
async def recorded_proxy(login: TokenPair, make_proxy: ProxyFactory, recorder: RecordingUpstream) -> RunningProxy:
    """A logged-in proxy whose upstream is the recording server."""
    return await make_proxy(upstream=recorder.base_url)


# -- request target ----------------------------------------------------------


@pytest.mark.parametrize("query", ["a=%2F&b=+&a=2&c=%C3%A9&d=%20&e", "x=%zz&y=a/b?c&z=%2b&=&&"])
async def test_query_string_passes_byte_for_byte(proxy: RunningProxy, query: str) -> None:
    """The query string reaches the upstream exactly as the client wrote it."""
    reply = await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo?" + query))
    assert reply.status == 200
    assert reply.json()["raw_query"] == query


async def test_empty_query_reaches_echo_as_empty(proxy: RunningProxy) -> None:
    """A bare trailing ? gives the upstream an empty query and the same path."""
    reply = await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo?"))
    assert (reply.json()["path"], reply.json()["raw_query"]) == ("/api/v1/echo", "")


async def test_empty_query_keeps_its_question_mark(recorded_proxy: RunningProxy, recorder: RecordingUpstream) -> None:
    """A request target ending in a bare ? reaches the upstream with the ? (byte for byte)."""
    reply = await raw_request(recorded_proxy.url, raw_get(recorded_proxy, "/x?"))
    assert reply.status == 200
    assert recorder.targets == ["/x?"]


async def test_upstream_path_prefix_is_kept(prefix_proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """The upstream's path prefix is put in front of the client's path."""
    reply = await fetch(client, "GET", prefix_proxy.url + "/api/v1/echo/x")
    assert reply.status == 200
    assert reply.json()["path"] == "/cloud/api/v1/echo/x"


async def test_percent_encoded_path_passes_unchanged(proxy: RunningProxy) -> None:
    """Percent-encoded path bytes, an encoded slash included, are neither decoded nor re-encoded."""
    reply = await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo/a%20b%2Fc%7e"))
    assert reply.json()["path"] == "/api/v1/echo/a%20b%2Fc%7e"


# -- headers -------------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_dropped(proxy: RunningProxy) -> None:
    """Hop-by-hop headers and those named in Connection never reach the upstream; end-to-end ones do."""
    head = "\r\n".join(
        [
            "GET /api/v1/echo HTTP/1.1",
            f"Host: {authority(proxy.url)}",
            "Connection: keep-alive, X-Drop-Me",
            "X-Drop-Me: 1",
            "Keep-Alive: 5",
            "TE: trailers",
            "Proxy-Authorization: Basic eDp5",
            "Proxy-Connection: keep-alive",
            "X-Keep-Me: kept",
        ]
    )
    echo = (await raw_request(proxy.url, head)).json()
    names = upstream_header_names(echo)
    assert [name for name in names if name in {h.lower() for h in HOP_BY_HOP_SENT}] == []
    assert ("x-keep-me", "kept") in upstream_headers(echo)


async def test_hop_by_hop_response_headers_are_dropped(
    recorded_proxy: RunningProxy, recorder: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """Hop-by-hop headers of the upstream's response, and those it names in Connection, never reach the client."""
    recorder.response_headers = [
        ("Connection", "X-Resp-Drop"),
        ("X-Resp-Drop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("X-Resp-Keep", "kept"),
    ]
    reply = await fetch(client, "GET", recorded_proxy.url + "/x")
    assert reply.status == 200
    assert reply.headers.get("X-Resp-Keep") == "kept"
    assert [name for name in ("X-Resp-Drop", "Keep-Alive", "Proxy-Authenticate") if name in reply.headers] == []
    assert "x-resp-drop" not in reply.headers.get("Connection", "").lower()


async def test_client_authorization_is_replaced_by_the_bearer_token(proxy: RunningProxy, login: TokenPair) -> None:
    """The client's Authorization is replaced by exactly one Bearer header with the current token."""
    echo = (await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo", "Authorization: Basic Zm9vOmJhcg=="))).json()
    assert [value for name, value in upstream_headers(echo) if name == "authorization"] == [
        f"Bearer {login.access_token}"
    ]


async def test_host_is_the_upstreams(proxy: RunningProxy, cloud: MockCloud) -> None:
    """The upstream sees its own host:port in Host, not the sidecar's."""
    echo = (await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo"))).json()
    assert [value for name, value in upstream_headers(echo) if name == "host"] == [authority(cloud.base_url)]


@pytest.mark.parametrize(
    ("head", "body", "expected"),
    [
        ("GET /api/v1/echo HTTP/1.1", b"", ["authorization", "host"]),
        ("POST /api/v1/echo HTTP/1.1\r\nContent-Length: 5", b"hello", ["authorization", "content-length", "host"]),
        (
            "POST /api/v1/echo HTTP/1.1\r\nTransfer-Encoding: chunked",
            b"5\r\nhello\r\n0\r\n\r\n",
            ["authorization", "host", "transfer-encoding"],
        ),
    ],
    ids=["get", "post-content-length", "post-chunked"],
)
async def test_no_header_is_added_that_the_client_did_not_send(
    proxy: RunningProxy, head: str, body: bytes, expected: list[str]
) -> None:
    """A request with only Host (and its framing) reaches the upstream with no Accept, User-Agent, Accept-Encoding or Content-Type added."""
    method_line, *rest = head.split("\r\n")
    full = "\r\n".join([method_line, f"Host: {authority(proxy.url)}", "Connection: close", *rest])
    echo = (await raw_request(proxy.url, full, body)).json()
    assert upstream_header_names(echo) == expected


@pytest.mark.parametrize("method", ["DELETE", "POST"])
async def test_bodyless_request_gains_no_content_length(proxy: RunningProxy, method: str) -> None:
    """A DELETE or POST sent without a body and without Content-Length reaches the upstream without one."""
    head = "\r\n".join([f"{method} /api/v1/echo HTTP/1.1", f"Host: {authority(proxy.url)}", "Connection: close"])
    echo = (await raw_request(proxy.url, head)).json()
    assert upstream_header_names(echo) == ["authorization", "host"]


@pytest.mark.parametrize("size", [100, 4096], ids=["small", "over-replay-limit"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_keeps_its_framing(login: TokenPair, make_proxy: ProxyFactory, framing: str, size: int) -> None:
    """A Content-Length body stays Content-Length and a chunked one stays chunked, below and above replay_limit."""
    p = await make_proxy(replay_limit=1024)
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    head = raw_get(p, "/api/v1/echo").replace("GET", "POST", 1)
    if framing == "content-length":
        head += f"\r\nContent-Length: {size}"
        wire = body
    else:
        head += "\r\nTransfer-Encoding: chunked"
        wire = (
            b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:700], body[700:]) if piece)
            + b"0\r\n\r\n"
        )
    echo = (await raw_request(p.url, head, wire)).json()
    assert (echo["body_length"], echo["body_sha256"]) == (size, hashlib.sha256(body).hexdigest())
    assert echo["chunked"] is (framing == "chunked")
    names = upstream_header_names(echo)
    assert ("content-length" in names, "transfer-encoding" in names) == (
        framing == "content-length",
        framing == "chunked",
    )


async def test_cookies_reach_the_upstream_unchanged(proxy: RunningProxy) -> None:
    """The Cookie header passes byte for byte, odd quoting and encoding included."""
    cookie = 'a=1; b="x y"; c=%20; d=e=f'
    echo = (await raw_request(proxy.url, raw_get(proxy, "/api/v1/echo", f"Cookie: {cookie}"))).json()
    assert [value for name, value in upstream_headers(echo) if name == "cookie"] == [cookie]


async def test_repeated_response_headers_all_reach_the_client(
    recorded_proxy: RunningProxy, recorder: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """Several Set-Cookie headers from the upstream reach the client, each unchanged."""
    cookies = ["a=1; Path=/; HttpOnly", 'b="x y"; Max-Age=60']
    recorder.response_headers = [("Set-Cookie", cookie) for cookie in cookies]
    reply = await fetch(client, "GET", recorded_proxy.url + "/x")
    assert reply.headers.getall("Set-Cookie") == cookies


async def test_truncated_upstream_body_never_looks_complete(
    login: TokenPair, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """When the upstream dies mid-way through a chunked body, the client sees a broken body, not a short complete one."""

    async def dying_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(dying_upstream, "127.0.0.1", 0)
    try:
        p = await make_proxy(upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch(client, "GET", p.url + "/x")
    finally:
        server.close()
        await server.wait_closed()


# -- redirects -------------------------------------------------------------------


async def test_redirect_inside_the_upstream_points_at_the_sidecar(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """An upstream 302 to itself is passed on, not followed, with Location rewritten to the sidecar."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/redirect", params={"to": "/api/v1/echo?x=1"})
    assert reply.status == 302
    assert reply.headers["Location"] == proxy.url + "/api/v1/echo?x=1"
    assert cloud.requests_seen == 1


async def test_redirect_elsewhere_keeps_its_location(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """An upstream 302 to another site is passed on unchanged and not followed."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/redirect-external")
    assert reply.status == 302
    assert reply.headers["Location"] == "https://elsewhere.example/x"
    assert cloud.requests_seen == 1


async def test_redirect_inside_the_prefix_loses_the_prefix(
    prefix_proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """A Location under the upstream's prefix is rewritten to the sidecar without the prefix."""
    reply = await fetch(client, "GET", prefix_proxy.url + "/api/v1/redirect", params={"to": "/api/v1/echo"})
    assert reply.status == 302
    assert reply.headers["Location"] == prefix_proxy.url + "/api/v1/echo"


# -- streams, encodings, WebSockets ------------------------------------------------


async def test_server_sent_events_are_not_buffered(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """Each event reaches the client when the upstream sends it, not when the stream ends."""
    arrivals: list[float] = []
    async with client.get(proxy.url + "/api/v1/sse?n=3&interval=0.5") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        async for line in response.content:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] > 0.5  # 1 s of intervals upstream; buffering would collapse it to ~0


async def test_gzip_response_passes_compressed(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """A gzip response body reaches the client byte-identical with its Content-Encoding."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/gzip")
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.body == gzip.compress(b"hello gzip " * 100, mtime=0)


async def test_gzip_request_body_passes_compressed(
    recorded_proxy: RunningProxy, recorder: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """A gzip-encoded request body reaches the upstream byte-identical with its Content-Encoding."""
    body = gzip.compress(b"compressed request " * 500)
    reply = await fetch(client, "POST", recorded_proxy.url + "/upload", data=body, headers={"Content-Encoding": "gzip"})
    assert reply.status == 200
    assert recorder.bodies == [body]
    assert recorder.headers[0]["Content-Encoding"] == "gzip"


WS_BUG = "BUG: proxy.py passes skip_auto_headers= to ClientSession.ws_connect(), which raises TypeError: every upgrade gets a 500"


@pytest.mark.parametrize("message", ["hello over ws", b"\x00\xffbinary\x80"], ids=["text", "binary"])
async def test_websocket_echo_through_the_proxy(
    proxy: RunningProxy, client: aiohttp.ClientSession, message: str | bytes
) -> None:
    """Text and binary WebSocket frames cross the proxy both ways unchanged."""
    async with client.ws_connect(proxy.url + "/api/v1/ws") as ws:
        if isinstance(message, str):
            await ws.send_str(message)
        else:
            await ws.send_bytes(message)
        answer = await ws.receive(timeout=5)
    assert answer.data == message
    assert answer.type == (aiohttp.WSMsgType.TEXT if isinstance(message, str) else aiohttp.WSMsgType.BINARY)


async def test_websocket_handshake_with_revoked_token_refreshes_once(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A WebSocket handshake the upstream refuses with 401 is retried after one refresh and succeeds."""
    cloud.revoke_access_tokens()
    async with client.ws_connect(proxy.url + "/api/v1/ws") as ws:
        await ws.send_str("after refresh")
        answer = await ws.receive(timeout=5)
    assert answer.data == "after refresh"
    assert cloud.refresh_calls == 1


async def test_websocket_upstream_handshake_has_the_bearer_and_no_library_defaults(
    login: TokenPair, make_proxy: ProxyFactory
) -> None:
    """The upstream WebSocket handshake carries Bearer <token> and no Accept, Accept-Encoding or User-Agent the client did not send."""
    handshakes: list[CIMultiDict[str]] = []

    async def upstream_ws(request: web.Request) -> web.StreamResponse:
        handshakes.append(CIMultiDict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", upstream_ws)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
        p = await make_proxy(upstream=upstream)
        bare = ("Accept", "Accept-Encoding", "User-Agent")
        async with aiohttp.ClientSession(skip_auto_headers=bare) as session, session.ws_connect(p.url + "/ws") as ws:
            await ws.receive(timeout=5)
        (handshake,) = handshakes
        assert handshake.getall("Authorization") == [f"Bearer {login.access_token}"]
        assert handshake["Host"] == authority(upstream)
        assert [name for name in bare if name in handshake] == []
    finally:
        await runner.cleanup()


class WatchedStreamCloud(MockCloud):
    """The mock cloud, with /api/v1/bytes counting what it wrote and saying when it stopped."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.stream_written = 0
        self.stream_stopped = asyncio.Event()

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        total = int(request.query["n"])
        block = b"x" * 65536
        try:
            await response.prepare(request)
            while self.stream_written < total:
                await response.write(block)
                self.stream_written += len(block)
            await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.stream_stopped.set()
        return response


async def test_client_hang_up_stops_the_upstream_download(
    store_path: Path, clock: FakeClock, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client leaving a 1 GB download makes the proxy drop the upstream stream, and the proxy goes on serving."""
    watched = WatchedStreamCloud(clock=clock)
    await watched.start()
    try:
        seed_store(store_path, watched, obtained_at=clock())
        p = await make_proxy(upstream=watched.base_url)
        response = await client.get(p.url + "/api/v1/bytes?n=1000000000")
        received = 0
        while received < 1_000_000:
            received += len(await response.content.readany())
        response.close()
        await asyncio.wait_for(watched.stream_stopped.wait(), 5)
        assert watched.stream_written < 200_000_000
        assert (await fetch(client, "GET", p.url + "/api/v1/echo")).status == 200
    finally:
        await watched.stop()


# -- request framing, WebSocket handshakes, relayed headers ----------------------


# A WebSocket handshake, minus the Host line.
WS_HANDSHAKE = [
    "GET /api/v1/ws HTTP/1.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]


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


async def test_websocket_handshake_with_a_non_latin1_header_is_upgraded(proxy: RunningProxy) -> None:
    """A WebSocket handshake carrying a UTF-8 header value outside Latin-1 is upgraded, not answered 500."""
    request = "\r\n".join([*WS_HANDSHAKE, f"Host: {authority(proxy.url)}", "X-Name: \u20ac"]).encode() + b"\r\n\r\n"
    head = await read_head(proxy.url, request)
    assert head.startswith(b"HTTP/1.1 101 "), head


async def test_websocket_handshake_refused_by_the_upstream_is_a_problem(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """An upstream refusing the WebSocket handshake with 403 gives the client a 403 upstream-refused-upgrade problem."""
    server = await upstream(answer_each(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"))
    proxy = await make_proxy(upstream=server.url)
    reply = await raw_request(proxy.url, "\r\n".join([*WS_HANDSHAKE, f"Host: {authority(proxy.url)}"]))
    assert_problem(reply, 403, "upstream-refused-upgrade")


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

"""The lean upstream client (sidecar/proxy/upstream.py), directly and through a real proxy.

Every upstream here is a scripted raw server on 127.0.0.1 (tests/helpers/scripted.py):
its handler reads the request bytes off the socket and writes exactly the bytes
a test wants, so framing, keep-alive, closing and stalls are under the test's
control and the assertions can be on the bytes that crossed the wire.  Pool tests drive
UpstreamPool.send/read/read_all/release themselves; proxy tests start a
sidecar (make_proxy) with a seeded login and point its upstream at the script.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import ProxyFactory, RunningProxy
from helpers.scripted import (
    GET,
    GUARD,
    MIB,
    OK,
    Conn,
    Script,
    ScriptedUpstream,
    StartUpstream,
    answer_each,
    answer_in_turn,
    answer_once,
    within,
)
from helpers.wire import exchange

from sidecar.proxy import upstream as upstream_module
from sidecar.proxy.upstream import UpstreamPool, UpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from sidecar.tokens import TokenPair

# The short read timeout the timeout tests configure.
SHORT = 0.3
PoolFactory = Callable[..., UpstreamPool]


@pytest.fixture
async def pool_for() -> AsyncIterator[PoolFactory]:
    """UpstreamPools on a scripted upstream's port; closed at teardown."""
    pools: list[UpstreamPool] = []

    def make(server: ScriptedUpstream, read_timeout: float = 2.0) -> UpstreamPool:
        pool = UpstreamPool("http", "127.0.0.1", server.port, connect_timeout=2.0, read_timeout=read_timeout)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """Unlike conftest's ``client``, one with aiohttp's default connection limit."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def send(
    pool: UpstreamPool, head: bytes = GET, *, head_only: bool = False, seconds: float = GUARD
) -> UpstreamResponse:
    """One bodiless request through ``pool``: the response as send returns it, body unread; a hang past ``seconds`` fails."""
    return await within(pool.send(head, None, chunked=False, head_only=head_only), seconds)


async def get(pool: UpstreamPool, head: bytes = GET, *, head_only: bool = False) -> bytes:
    """One bodiless request through ``pool``; the body read whole, the connection released."""
    response = await send(pool, head, head_only=head_only)
    try:
        return await within(response.read_all(2.0))
    finally:
        response.release()


async def raw_exchange(proxy: RunningProxy, request: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Send ``request`` verbatim to the proxy; return (status line, raw header pairs in order, body) of one response."""
    port = int(proxy.url.rsplit(":", 1)[1])
    return await within(exchange("127.0.0.1", port, request))


def proxy_host(proxy: RunningProxy) -> bytes:
    return proxy.url.removeprefix("http://").encode()


# -- keep-alive ------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Two requests one after the other travel on one kept-alive TCP connection."""
    server = await upstream(answer_each(OK))
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    assert await get(pool) == b"ok"
    assert len(server.conns) == 1
    assert len(server.conns[0].requests) == 2


async def test_connection_close_response_is_not_reused(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """After a response saying Connection: close, the next request opens a new connection, even if the server would carry on."""
    server = await upstream(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"))
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    assert await get(pool) == b"ok"
    assert len(server.conns) == 2


async def test_connection_close_response_closes_the_socket(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Releasing a Connection: close response closes the client's side of the socket."""
    server = await upstream(
        answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", then="eof")
    )
    assert await get(pool_for(server)) == b"ok"
    await within(server.conns[0].eof.wait(), 2)


# -- stale keep-alive connections ------------------------------------------------


async def stale_after_first(conn: Conn) -> None:
    """Connection 0 answers once, then closes on the next request without answering; later connections answer all."""
    await conn.request()
    await conn.send(OK)
    if conn.index == 0:
        await conn.request()
        return  # closes: the race of a server dropping an idle connection as a request arrives
    while True:
        await conn.request()
        await conn.send(OK)


async def test_stale_connection_get_is_retried_on_a_fresh_one(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A GET on a kept-alive connection that the server closed unanswered is sent again on a new connection and succeeds."""
    server = await upstream(stale_after_first)
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    assert await get(pool) == b"ok"
    assert len(server.conns) == 2
    assert server.conns[1].requests == [GET]


async def test_stale_connection_post_is_not_sent_twice(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A POST the upstream read on a kept-alive connection before closing it unanswered is not resent: it may have acted on it."""
    server = await upstream(stale_after_first)
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    post = b"POST /payments HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n"
    with pytest.raises(UpstreamUnreachable, match="a POST is not sent twice"):
        await within(pool.send(post, b"hello", chunked=False, head_only=False))
    assert len(server.conns) == 1
    assert server.conns[0].requests == [GET, post + b"hello"]


@pytest.mark.parametrize("method", [b"PUT", b"DELETE", b"OPTIONS"])
async def test_stale_connection_idempotent_request_is_resent_byte_for_byte(
    upstream: StartUpstream, pool_for: PoolFactory, method: bytes
) -> None:
    """An idempotent request (RFC 9110 §9.2.2) with a bytes body is replayed, body and all, on a fresh connection."""
    server = await upstream(stale_after_first)
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    request = method + b" /p HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n"
    response = await within(pool.send(request, b"hello", chunked=False, head_only=False))
    assert await within(response.read_all(2.0)) == b"ok"
    response.release()
    assert server.conns[1].requests == [request + b"hello"]


async def test_idle_connection_is_closed_after_the_idle_limit(
    upstream: StartUpstream, pool_for: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection left idle past IDLE_SECONDS is closed by the pool (the server sees EOF); the next request opens a new one."""
    monkeypatch.setattr(upstream_module, "IDLE_SECONDS", 0.05)

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK)
        await conn.until_eof()

    server = await upstream(script)
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    await within(server.conns[0].eof.wait())
    assert await get(pool) == b"ok"
    assert len(server.conns) == 2


async def test_connection_reused_within_the_idle_limit(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """With the default limit a connection back in the pool is reused by the next request."""
    server = await upstream(answer_each(OK))
    pool = pool_for(server)
    for _ in range(3):
        assert await get(pool) == b"ok"
    assert len(server.conns) == 1


async def test_stale_connection_streamed_body_is_not_retried(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A request whose body is an async iterator (sent once, gone) fails with UpstreamUnreachable instead of being retried."""
    server = await upstream(stale_after_first)
    pool = pool_for(server)
    assert await get(pool) == b"ok"

    async def body() -> AsyncIterator[bytes]:
        yield b"hel"
        await asyncio.sleep(0.05)  # by now the server has closed the connection
        yield b"lo"

    with pytest.raises(UpstreamUnreachable):
        await within(
            pool.send(
                b"POST /p HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n", body(), chunked=False, head_only=False
            )
        )
    await asyncio.sleep(0.05)
    assert len(server.conns) == 1


async def test_retry_happens_only_once(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """When the fresh connection of a retry also dies unanswered, send gives up with UpstreamUnreachable after two connections."""

    async def script(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(OK)
            await conn.request()
        # every later connection: read the request, close without an answer

    server = await upstream(script)
    pool = pool_for(server)
    assert await get(pool) == b"ok"
    with pytest.raises(UpstreamUnreachable):
        await get(pool)
    await asyncio.sleep(0.05)
    assert len(server.conns) == 2


async def test_idle_connection_closed_by_the_server_is_not_used(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """An idle connection the server closed while it sat in the pool is never handed out: a request that cannot be resent succeeds on a new one.

    The request streams its body, so send() may not retry it on a fresh
    connection: it succeeds only if the pool skipped the dead one.
    """

    released = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK)
        if conn.index == 0:
            await released.wait()
            return  # close the connection the pool now holds idle
        await conn.request()

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"

    server = await upstream(script)
    pool = pool_for(server)
    assert await get(pool) == b"ok"  # released: the connection goes back to the pool
    released.set()
    await asyncio.sleep(0.1)  # the close reaches the pool
    post = b"POST /p HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n"
    response = await within(pool.send(post, body(), chunked=False, head_only=False))
    assert await within(response.read_all(2.0)) == b"ok"
    response.release()
    assert [conn.requests for conn in server.conns] == [[GET], [post + b"hello"]]


# -- bodiless responses and interim responses ------------------------------------


async def test_head_response_with_content_length_completes_without_a_body(
    upstream: StartUpstream, pool_for: PoolFactory
) -> None:
    """A HEAD answer announcing Content-Length: 1000 is complete at its head, with an empty body."""
    server = await upstream(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    pool = pool_for(server)
    response = await within(pool.send(b"HEAD /n HTTP/1.1\r\nHost: up\r\n\r\n", None, chunked=False, head_only=True))
    assert response.complete
    assert (b"Content-Length", b"1000") in response.headers
    assert await within(response.read_all(2.0), 1) == b""
    response.release()


async def test_connection_is_reused_after_a_head_response(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """After a HEAD answer with Content-Length: 1000 and no body, the same connection carries the next GET correctly."""
    server = await upstream(answer_in_turn(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", OK))
    pool = pool_for(server)
    assert await get(pool, b"HEAD /n HTTP/1.1\r\nHost: up\r\n\r\n", head_only=True) == b""
    assert await get(pool) == b"ok"
    assert len(server.conns) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n",
    ],
    ids=["204", "304", "304-with-content-length"],
)
async def test_no_content_responses_complete_and_keep_the_connection(
    upstream: StartUpstream, pool_for: PoolFactory, answer: bytes
) -> None:
    """204 and 304 answers complete with an empty body, and the connection carries the next request."""
    server = await upstream(answer_in_turn(answer, OK))
    pool = pool_for(server)
    assert await get(pool) == b""
    assert await get(pool) == b"ok"
    assert len(server.conns) == 1


async def test_interim_responses_are_skipped_for_the_final_one(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """100 Continue and 103 Early Hints are passed over; send returns the final 200 with its own headers and body."""
    server = await upstream(
        answer_once(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello",
            then="request",
        )
    )
    response = await send(pool_for(server))
    assert (response.status, response.reason) == (200, b"Fine")
    assert response.headers == [(b"Content-Length", b"5"), (b"X-Final", b"yes")]
    assert await within(response.read_all(2.0)) == b"hello"
    response.release()


# -- response body framing -------------------------------------------------------


async def test_chunked_response_body_is_reassembled(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A chunked body, with a chunk extension and split across writes, is read back as the plain bytes."""
    server = await upstream(
        answer_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r\n6\r\n world\r\n",
            b"0\r\n\r\n",
            then="request",
        )
    )
    assert await get(pool_for(server)) == b"hello world"


async def test_chunked_trailer_fields_are_not_merged_into_headers(
    upstream: StartUpstream, pool_for: PoolFactory
) -> None:
    """Trailer fields after the last chunk never show up in the response's header section (RFC 9110 §6.5.1)."""
    server = await upstream(
        answer_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n",
            then="request",
        )
    )
    response = await send(pool_for(server))
    assert await within(response.read_all(2.0)) == b"hello"
    response.release()
    assert response.headers == [(b"Transfer-Encoding", b"chunked")]


async def test_body_without_length_is_read_until_close(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """With neither Content-Length nor chunked, the body is everything up to the server's close, and the connection is not kept."""
    server = await upstream(
        answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ", b"second", then="close")
    )
    response = await send(pool_for(server))
    assert not response.keep_alive
    assert await within(response.read_all(2.0)) == b"first second"
    response.release()


async def test_upstream_close_mid_body_is_unreachable(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Content-Length: 1000 with 10 bytes then a close makes read_all fail with UpstreamUnreachable, not return 10 bytes."""
    server = await upstream(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", then="close"))
    response = await send(pool_for(server))
    with pytest.raises(UpstreamUnreachable):
        await within(response.read_all(2.0))
    response.release()


# -- malformed answers and timeouts ----------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"\x00\xff\xfe\x16\x03\x01"],
    ids=["not-http", "bad-content-length", "binary"],
)
async def test_malformed_response_is_unreachable(
    upstream: StartUpstream, pool_for: PoolFactory, garbage: bytes
) -> None:
    """An answer that is not HTTP/1.1 makes send fail with UpstreamUnreachable."""
    server = await upstream(answer_once(garbage, then="eof"))
    with pytest.raises(UpstreamUnreachable):
        await send(pool_for(server))


async def test_stall_mid_body_times_out(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Headers and 10 body bytes then silence: the next read raises UpstreamTimeout after the read timeout."""
    server = await upstream(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", then="eof"))
    response = await send(pool_for(server, read_timeout=SHORT))
    assert await within(response.read(SHORT)) == b"0123456789"
    with pytest.raises(UpstreamTimeout):
        await within(response.read(SHORT), 2)
    response.release()


async def test_unanswered_request_times_out(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A server that reads the request and never answers makes send raise UpstreamTimeout."""
    server = await upstream(answer_once(then="eof"))
    with pytest.raises(UpstreamTimeout):
        await send(pool_for(server, read_timeout=SHORT), seconds=2)


async def test_upload_the_upstream_never_reads_times_out(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A server that reads only the head of a 16 MiB upload and never answers makes send raise UpstreamTimeout, not hang."""

    async def script(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    server = await upstream(script)
    size = 16 * MIB
    head = b"POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: %d\r\n\r\n" % size
    with pytest.raises(UpstreamTimeout):
        await within(pool_for(server, read_timeout=SHORT).send(head, bytes(size), chunked=False, head_only=False), 1.2)


async def test_early_response_to_an_unread_upload_is_returned(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A server that answers 413 after the head of a 16 MiB upload, without reading the body, gets its 413 returned by send."""

    async def script(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(30)

    server = await upstream(script)
    size = 16 * MIB
    head = b"POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: %d\r\n\r\n" % size
    response = await within(
        pool_for(server, read_timeout=SHORT).send(head, bytes(size), chunked=False, head_only=False), 1.2
    )
    assert response.status == 413
    response.release()


# -- back-pressure ---------------------------------------------------------------


class Firehose:
    """A script that answers with ``size`` bytes as fast as the client takes them, tracking its progress."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.written = 0
        self.draining = False

    async def __call__(self, conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
        block = bytes(256 * 1024)
        while self.written < self.size:
            conn.writer.write(block)
            self.written += len(block)
            self.draining = True
            await conn.writer.drain()
            self.draining = False
        await conn.until_eof()


async def test_slow_consumer_keeps_the_buffer_under_a_mebibyte(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Reading a 50 MiB body slowly, UpstreamResponse.buffered never exceeds 1 MiB."""
    size = 50 * MIB
    server = await upstream(Firehose(size))
    response = await send(pool_for(server))
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(response.buffered)
            await asyncio.sleep(0.001)

    sampler = asyncio.ensure_future(sample())
    received = 0
    next_pause = 0
    try:
        while True:
            samples.append(response.buffered)
            chunk = await within(response.read(2.0))
            if not chunk:
                break
            received += len(chunk)
            if received >= next_pause:
                next_pause += 5 * MIB
                await asyncio.sleep(0.03)  # the slow consumer
    finally:
        sampler.cancel()
        response.release()
    assert received == size
    assert len(samples) > 100
    assert max(samples) <= MIB


async def test_slow_consumer_stalls_the_upstream_writes(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """While the consumer reads nothing, the server's writes stop short of the body and its drain() stays blocked."""
    size = 50 * MIB
    firehose = Firehose(size)
    server = await upstream(firehose)
    response = await send(pool_for(server))
    try:
        assert await within(response.read(2.0))
        last = -1
        for _ in range(40):  # wait until the server stops making progress
            await asyncio.sleep(0.05)
            if firehose.written == last:
                break
            last = firehose.written
        assert firehose.draining
        assert firehose.written == last < size
        assert server.conns[0].writer.transport.get_write_buffer_size() > 0
    finally:
        response.release()


# -- request body framing on the wire --------------------------------------------


async def stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


CHUNKED_HEAD = b"POST /w HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "body", "chunked", "wire"),
    [
        (CHUNKED_HEAD, b"hello", True, b"5\r\nhello\r\n0\r\n\r\n"),
        (CHUNKED_HEAD, b"", True, b"0\r\n\r\n"),
        (CHUNKED_HEAD, "stream", True, b"2\r\nab\r\n4\r\ncdef\r\n0\r\n\r\n"),
        (b"POST /w HTTP/1.1\r\nHost: up\r\nContent-Length: 6\r\n\r\n", "stream", False, b"abcdef"),
        (b"POST /w HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n", b"hello", False, b"hello"),
    ],
    ids=["bytes-chunked", "empty-chunked", "stream-chunked-skips-empty", "stream-raw", "bytes-raw"],
)
async def test_request_body_is_framed_on_the_wire(
    upstream: StartUpstream, pool_for: PoolFactory, head: bytes, body: Any, chunked: bool, wire: bytes
) -> None:
    """The request goes out as the head followed by exactly the framed body bytes."""
    server = await upstream(answer_each(OK))
    payload = stream(b"ab", b"", b"cdef") if body == "stream" else body
    assert await within(read_body(pool_for(server), head, payload, chunked)) == b"ok"
    assert server.conns[0].requests == [head + wire]


async def read_body(pool: UpstreamPool, head: bytes, body: Any, chunked: bool) -> bytes:
    response = await pool.send(head, body, chunked=chunked, head_only=False)
    try:
        return await response.read_all(2.0)
    finally:
        response.release()


# -- through the proxy: failures -------------------------------------------------


async def test_proxy_answers_502_for_a_malformed_response(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """Garbage from the upstream becomes a 502 problem+json with X-Sidecar-Error: upstream-unreachable."""
    server = await upstream(answer_once(b"garbage\r\n\r\n", then="close"))
    proxy = await make_proxy(upstream=server.url)
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 502
        assert response.headers["X-Sidecar-Error"] == "upstream-unreachable"
        assert response.headers["Content-Type"] == "application/problem+json"
        assert (await response.json(content_type=None))["status"] == 502


async def test_proxy_answers_504_when_the_head_never_comes(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """An upstream that never answers becomes a 504 problem+json with X-Sidecar-Error: upstream-timeout."""
    server = await upstream(answer_once(then="eof"))
    proxy = await make_proxy(upstream=server.url, read_timeout=SHORT)
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 504
        assert response.headers["X-Sidecar-Error"] == "upstream-timeout"
        assert response.headers["Content-Type"] == "application/problem+json"


STALLING_HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\n\r\n0123456789",
}


def stall_first(start: bytes) -> Script:
    """Connection 0 sends ``start`` and then nothing; later connections answer normally."""

    async def script(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(start)
            await conn.until_eof()
            return
        await conn.send(OK)
        while True:
            await conn.request()
            await conn.send(OK)

    return script


@pytest.mark.parametrize("framing", list(STALLING_HEADS))
async def test_proxy_cuts_the_client_when_the_body_stalls(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession, framing: str
) -> None:
    """A body stalling past read_timeout cuts the client's connection: a payload error, never a complete-looking short body."""
    server = await upstream(stall_first(STALLING_HEADS[framing]))
    proxy = await make_proxy(upstream=server.url, read_timeout=SHORT)
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await within(response.read())


async def test_proxy_serves_the_next_request_after_a_stalled_body(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """After cutting a client over a stalled upstream body, the proxy answers the next request normally."""
    server = await upstream(stall_first(STALLING_HEADS["content-length"]))
    proxy = await make_proxy(upstream=server.url, read_timeout=SHORT)
    async with client.get(proxy.url + "/x") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await within(response.read())
    async with client.get(proxy.url + "/y") as response:
        assert (response.status, await within(response.read())) == (200, b"ok")


async def test_proxy_client_sees_an_error_when_the_upstream_closes_mid_body(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """Content-Length: 1000, 10 bytes, then the upstream closes: the client gets a payload error, not a 10-byte success."""
    server = await upstream(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", then="close"))
    proxy = await make_proxy(upstream=server.url)
    async with client.get(proxy.url + "/x") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await within(response.read())


async def test_proxy_relays_a_body_delimited_by_close(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """A response with neither Content-Length nor chunked reaches the client whole, however it was split."""
    parts = [bytes([65 + i]) * 100_000 for i in range(5)]

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for part in parts:
            await conn.send(part)
            await asyncio.sleep(0.01)

    server = await upstream(script)
    proxy = await make_proxy(upstream=server.url)
    async with client.get(proxy.url + "/x") as response:
        assert (response.status, await within(response.read())) == (200, b"".join(parts))


async def test_proxy_closes_the_upstream_connection_when_the_client_leaves(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """A client hanging up mid-response makes the proxy close that upstream connection (the server sees EOF) instead of keeping it."""
    sent = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * MIB))
        reading = asyncio.ensure_future(conn.until_eof())
        try:
            block = bytes(64 * 1024)
            for _ in range(1600):
                await conn.send(block)
                sent.set()
                await asyncio.sleep(0.005)
        except ConnectionError:
            pass
        await reading

    server = await upstream(script)
    proxy = await make_proxy(upstream=server.url)
    response = await client.get(proxy.url + "/x")
    assert await within(response.content.readany())
    await within(sent.wait())
    response.close()
    await within(server.conns[0].eof.wait(), 2)


# -- through the proxy: the request head on the wire ------------------------------


CLIENT_HEADERS = [
    b"X-First: 1",
    b"authorization: Basic Y2xpZW50OnNlY3JldA==",
    b"Connection: X-Drop-Me",
    b"x-MiXeD-Case: Value  With  Spaces",
    b"X-Drop-Me: secret",
    b"Keep-Alive: timeout=5",
    b"TE: trailers",
    b"Proxy-Authorization: Basic cHJveHk=",
    b"Proxy-Connection: keep-alive",
    b"Accept: */*",
    b"X-Dup: a",
    b"X-Dup: b",
    b"X-Last: z",
]


async def upstream_head(proxy: RunningProxy, server: ScriptedUpstream, target: bytes = b"/x") -> bytes:
    """The head the upstream received for a raw GET of ``target`` carrying CLIENT_HEADERS and the proxy's Host."""
    request = (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: "
        + proxy_host(proxy)
        + b"\r\n"
        + b"\r\n".join(CLIENT_HEADERS)
        + b"\r\n\r\n"
    )
    status, _, body = await raw_exchange(proxy, request)
    assert (status, body) == ("HTTP/1.1 200 OK", b"ok")
    return server.conns[-1].heads[-1]


def header_lines(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")[1:-2]


async def test_proxy_sends_exactly_one_host_the_upstreams(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """The upstream gets one Host header, naming its own host:port, not the proxy's."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    lines = header_lines(await upstream_head(proxy, server))
    assert [line for line in lines if line.lower().startswith(b"host:")] == [b"Host: 127.0.0.1:%d" % server.port]


async def test_proxy_replaces_the_client_authorization(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """The client's Authorization never reaches the upstream; exactly one Authorization with the bearer token does."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    lines = header_lines(await upstream_head(proxy, server))
    assert [line for line in lines if line.lower().startswith(b"authorization:")] == [
        f"Authorization: Bearer {login.access_token}".encode()
    ]


async def test_proxy_drops_hop_by_hop_request_headers(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Connection, Keep-Alive, TE, Proxy-* and the header Connection names never reach the upstream."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    names = {line.split(b":")[0].lower() for line in header_lines(await upstream_head(proxy, server))}
    assert not names & {b"connection", b"x-drop-me", b"keep-alive", b"te", b"proxy-authorization", b"proxy-connection"}


async def test_proxy_keeps_end_to_end_header_order_and_case(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """The end-to-end headers reach the upstream as the client wrote them: same order, same case, same values, duplicates kept."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    lines = header_lines(await upstream_head(proxy, server))
    kept = [line for line in lines if not line.lower().startswith((b"host:", b"authorization:"))]
    assert kept == [
        b"X-First: 1",
        b"x-MiXeD-Case: Value  With  Spaces",
        b"Accept: */*",
        b"X-Dup: a",
        b"X-Dup: b",
        b"X-Last: z",
    ]


@pytest.mark.parametrize(
    "target",
    [b"/x?", b"/a%2Fb/%7Euser/c%20d?q=%41%2f&e=&p=a+b&&", b"/caf%C3%A9/x%zz?%"],
    ids=["empty-query", "percent-encodings", "odd-escapes"],
)
async def test_proxy_passes_the_request_target_byte_for_byte(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, target: bytes
) -> None:
    """The request line's target reaches the upstream exactly as the client sent it."""
    server = await upstream(answer_each(OK))
    proxy = await make_proxy(upstream=server.url)
    head = await upstream_head(proxy, server, target)
    assert head.split(b"\r\n")[0] == b"GET " + target + b" HTTP/1.1"


# -- through the proxy: response headers and bodies -----------------------------


async def test_proxy_passes_every_set_cookie(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Two Set-Cookie headers from the upstream both reach the client, in order."""
    server = await upstream(
        answer_each(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nContent-Length: 2\r\nSet-Cookie: b=2; HttpOnly\r\n\r\nok"
        )
    )
    proxy = await make_proxy(upstream=server.url)
    _, headers, _ = await raw_exchange(proxy, b"GET /x HTTP/1.1\r\nHost: " + proxy_host(proxy) + b"\r\n\r\n")
    assert [value for name, value in headers if name.lower() == "set-cookie"] == ["a=1; Path=/", "b=2; HttpOnly"]


async def test_proxy_drops_hop_by_hop_response_headers(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Connection, Keep-Alive, Transfer-Encoding, Proxy-Authenticate and the header Connection names never reach the client."""
    server = await upstream(
        answer_each(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic realm=x\r\n"
            b"X-Hop: secret\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
    )
    proxy = await make_proxy(upstream=server.url)
    # HTTP/1.0: the proxy frames the body by closing, so any Transfer-Encoding would be the upstream's.
    status, headers, body = await raw_exchange(proxy, b"GET /x HTTP/1.0\r\nHost: " + proxy_host(proxy) + b"\r\n\r\n")
    assert (status.split(" ")[1], body) == ("200", b"ok")
    names = {name.lower() for name, _ in headers}
    assert "x-kept" in names
    assert not names & {"connection", "keep-alive", "transfer-encoding", "proxy-authenticate", "x-hop"}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_proxy_passes_a_gzip_body_byte_for_byte(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession, framing: str
) -> None:
    """A Content-Encoding: gzip body reaches the client with that header and the very same compressed bytes."""
    compressed = gzip.compress(b"sidecar " * 5000, mtime=0)
    if framing == "chunked":
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(compressed), compressed)
        )
    else:
        answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
            len(compressed),
            compressed,
        )
    server = await upstream(answer_each(answer))
    proxy = await make_proxy(upstream=server.url)
    async with client.get(proxy.url + "/x", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await within(response.read()) == compressed


async def test_proxy_does_not_turn_trailers_into_headers(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """A trailer field the upstream sends after the last chunk does not reach the client as a response header."""
    server = await upstream(
        answer_each(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n")
    )
    proxy = await make_proxy(upstream=server.url)
    _, headers, body = await raw_exchange(proxy, b"GET /x HTTP/1.1\r\nHost: " + proxy_host(proxy) + b"\r\n\r\n")
    assert body == b"ok"
    assert "x-checksum" not in {name.lower() for name, _ in headers}


async def test_proxy_head_keeps_the_upstream_content_length(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """A HEAD through the proxy answers at once with the upstream's Content-Length: 1000 and no body."""
    server = await upstream(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    proxy = await make_proxy(upstream=server.url)
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: " + proxy_host(proxy) + b"\r\nConnection: close\r\n\r\n")
        answer = await within(reader.read())
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 1000" in head
    assert rest == b""

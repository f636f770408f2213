"""The lean upstream client against hostile or broken upstreams (SPEC §4, "Upstream connections").

Every upstream is a scripted raw server on 127.0.0.1 (tests/helpers/scripted.py)
writing exactly the bytes a test wants: oversized heads, invalid status lines,
stray bytes after a complete answer, transfer codings that end at close, and
header bytes that are not ASCII.  Where the effect is the user's, the test goes
through a real proxy (make_proxy) and looks at what a raw client receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiohttp
import pytest
from conftest import ProxyFactory, RunningProxy
from helpers.proxying import assert_problem, fetch
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
    answer_once,
    within,
)
from helpers.wire import RAW_TIMEOUT

from sidecar.proxy.connection import Connection
from sidecar.proxy.upstream import UpstreamPool, UpstreamUnreachable
from sidecar.tokens import TokenPair

KIB = 1024
# The limits SPEC §4 sets on the upstream's response head.
LINE_LIMIT = 8 * KIB
HEAD_LIMIT = 64 * KIB
# A read timeout far above GUARD: a request that waits for it fails the test's own deadline instead.
LONG = 60.0
PoolFactory = Callable[..., UpstreamPool]


@pytest.fixture
async def pool_for() -> AsyncIterator[PoolFactory]:
    """UpstreamPools on a scripted upstream's port; closed at teardown."""
    pools: list[UpstreamPool] = []

    def make(server: ScriptedUpstream, read_timeout: float = LONG) -> UpstreamPool:
        pool = UpstreamPool("http", "127.0.0.1", server.port, connect_timeout=2.0, read_timeout=read_timeout)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


async def get(pool: UpstreamPool) -> tuple[int, bytes]:
    """One GET through ``pool``: the status and the whole body; the connection released."""
    response = await within(pool.send(GET, None, chunked=False, head_only=False))
    try:
        return response.status, await within(response.read_all(GUARD))
    finally:
        response.release()


async def raw(proxy: RunningProxy, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` (it should say ``Connection: close``) to the proxy; the response head and everything after it, as bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), RAW_TIMEOUT)
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def raw_get(proxy: RunningProxy, method: bytes = b"GET") -> bytes:
    return (
        method
        + b" /x HTTP/1.1\r\nHost: "
        + proxy.url.removeprefix("http://").encode()
        + b"\r\nConnection: close\r\n\r\n"
    )


def head_of_size(size: int, status_line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A response head (blank line included) of exactly ``size`` bytes, every line well under 8 KiB, with Content-Length: 2."""
    head = status_line + b"\r\nContent-Length: 2\r\n"
    filler = 0
    while len(head) + 2 < size:
        room = size - len(head) - 2
        # "X-Fill-nnnn: " + value + CRLF; leave at least 20 bytes for a last line.
        value = min(4000, room - 15) if room - 15 <= 4000 or room - 4015 >= 20 else room - 15 - 20
        head += b"X-Fill-%04d: " % filler + b"v" * value + b"\r\n"
        filler += 1
    head += b"\r\n"
    assert len(head) == size
    return head


# -- 4. the response head is limited: 8 KiB a line, 64 KiB in all ----------------


@pytest.mark.parametrize(
    ("head", "fits"),
    [
        (b"HTTP/1.1 200 " + b"R" * (LINE_LIMIT - 13) + b"\r\nContent-Length: 2\r\n\r\n", True),
        (b"HTTP/1.1 200 " + b"R" * (LINE_LIMIT - 12) + b"\r\nContent-Length: 2\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * (LINE_LIMIT - 8) + b"\r\nContent-Length: 2\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * (LINE_LIMIT - 7) + b"\r\nContent-Length: 2\r\n\r\n", False),
        (head_of_size(HEAD_LIMIT), True),
        (head_of_size(HEAD_LIMIT + 1), False),
    ],
    ids=["status-line-8k", "status-line-8k+1", "header-line-8k", "header-line-8k+1", "head-64k", "head-64k+1"],
)
@pytest.mark.parametrize("writes", ["one-write", "small-writes"])
async def test_response_head_limits(
    upstream: StartUpstream, pool_for: PoolFactory, head: bytes, fits: bool, writes: str
) -> None:
    """A head line of up to 8 KiB (CRLF not counted) and a head of up to 64 KiB (all of it) are read; one byte more is UpstreamUnreachable."""
    answer = head + b"ok"
    step = 1000 if writes == "small-writes" else len(answer)

    async def script(conn: Conn) -> None:
        await conn.request()
        for start in range(0, len(answer), step):
            await conn.send(answer[start : start + step])
        await conn.until_eof()

    pool = pool_for(await upstream(script))
    if fits:
        assert await get(pool) == (200, b"ok")
    else:
        with pytest.raises(UpstreamUnreachable, match="head"):
            await get(pool)


class StubTransport:
    """The transport a Connection sees, for feeding it reads split where a test wants."""

    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class StubOwner:
    """The pool, as a Connection sees it: nothing is pooled."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.read_timeout = LONG

    def put_back(self, connection: Connection) -> None: ...

    def forget(self, connection: Connection) -> None: ...


SPLIT_ANSWERS = {
    "plain": (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok", True),
    "interim-first": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "line-8k": (b"HTTP/1.1 200 OK\r\nX-L: " + b"v" * (LINE_LIMIT - 5) + b"\r\nContent-Length: 2\r\n\r\nok", True),
    "line-8k+1": (b"HTTP/1.1 200 OK\r\nX-L: " + b"v" * (LINE_LIMIT - 4) + b"\r\nContent-Length: 2\r\n\r\nok", False),
    "interim-then-line-8k": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-L: "
        + b"v" * (LINE_LIMIT - 5)
        + b"\r\nContent-Length: 2\r\n\r\nok",
        True,
    ),
}


@pytest.mark.parametrize(("answer", "fits"), list(SPLIT_ANSWERS.values()), ids=list(SPLIT_ANSWERS))
async def test_head_limits_hold_wherever_the_reads_split(answer: bytes, fits: bool) -> None:
    """Split into two reads at every possible byte, an answer within the limits parses whole and one over them fails."""
    for split in range(1, len(answer)):
        connection = Connection(StubOwner())
        transport = StubTransport()
        connection.connection_made(cast(asyncio.Transport, transport))
        response = connection.begin(head_only=False)
        connection.data_received(answer[:split])
        connection.data_received(answer[split:])
        if fits:
            assert (response.status, response.complete, response.take_buffered()) == (200, True, b"ok"), split
            assert not transport.closed, split
        else:
            assert transport.closed, split
            with pytest.raises(UpstreamUnreachable, match="8 KiB"):
                await connection.wait(None)


async def test_interim_heads_count_towards_the_head_limit(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """Interim 103 heads are part of the 64 KiB: a stream of them is UpstreamUnreachable, not read forever."""
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"s" * 1000 + b".css>; rel=preload\r\n\r\n"
    server = await upstream(answer_once(early * (HEAD_LIMIT // len(early) + 1) + OK, then="eof"))
    with pytest.raises(UpstreamUnreachable, match="head"):
        await get(pool_for(server))


async def test_interim_heads_within_the_limit_are_skipped(upstream: StartUpstream, pool_for: PoolFactory) -> None:
    """A 100 Continue and a 103 in the same read as the final answer, all within the limits, leave the final answer."""
    server = await upstream(
        answer_once(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, then="eof")
    )
    assert await get(pool_for(server)) == (200, b"ok")


async def test_proxy_answers_502_for_a_24_mib_header_and_stops_reading(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, client: aiohttp.ClientSession
) -> None:
    """A 24 MiB header becomes a 502 upstream-unreachable, and the proxy drops the connection long before the upstream has sent it all."""
    size = 24 * MIB
    sent = 0
    finished = asyncio.Event()

    async def script(conn: Conn) -> None:
        nonlocal sent
        try:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nX-Huge: ")
            block = b"h" * (64 * KIB)
            while sent < size:
                await conn.send(block)
                sent += len(block)
            await conn.send(b"\r\nContent-Length: 2\r\n\r\nok")
            await conn.until_eof()
        finally:
            finished.set()

    server = await upstream(script)
    proxy = await make_proxy(upstream=server.url)
    reply = await within(fetch(client, "GET", proxy.url + "/x"))
    assert_problem(reply, 502, "upstream-unreachable")
    await within(finished.wait())
    # Loopback socket buffers hold a few MiB; a proxy reading on would take all 24.
    assert sent < size // 2


# -- 7. response header bytes pass through unchanged ------------------------------

UTF8_NAME = "résumé.pdf".encode()
OBS_TEXT_NAME = "résumé.pdf".encode("latin-1")


FRAMINGS = {
    "content-length": (b"GET", b"Content-Length: 2\r\n\r\nok", b"ok"),
    "chunked": (b"GET", b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"2\r\nok\r\n0\r\n\r\n"),
    "head-request": (b"HEAD", b"Content-Length: 2\r\n\r\n", b""),
}


@pytest.mark.parametrize("name", [UTF8_NAME, OBS_TEXT_NAME], ids=["utf-8", "obs-text"])
@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_proxy_passes_response_header_bytes_unchanged(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, name: bytes, framing: str
) -> None:
    """A Content-Disposition with a non-ASCII filename reaches the client as the very bytes the upstream sent, the body framed after it."""
    method, rest_of_answer, relayed = FRAMINGS[framing]
    line = b'Content-Disposition: attachment; filename="' + name + b'"'
    server = await upstream(answer_each(b"HTTP/1.1 200 OK\r\n" + line + b"\r\n" + rest_of_answer))
    proxy = await make_proxy(upstream=server.url)
    head, rest = await within(raw(proxy, raw_get(proxy, method)))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\n" + line + b"\r\n" in head
    assert rest == relayed


@pytest.mark.parametrize("reason", ["Très bien".encode(), "Très bien".encode("latin-1")], ids=["utf-8", "obs-text"])
async def test_proxy_passes_the_reason_phrase_bytes_unchanged(
    login: TokenPair, make_proxy: ProxyFactory, upstream: StartUpstream, reason: bytes
) -> None:
    """A reason phrase with non-ASCII bytes reaches the client byte for byte."""
    server = await upstream(answer_each(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await make_proxy(upstream=server.url)
    head, rest = await within(raw(proxy, raw_get(proxy)))
    assert head.startswith(b"HTTP/1.1 200 " + reason + b"\r\n")
    assert rest == b"ok"


# -- 8. a complete answer followed by stray bytes is relayed; the connection closed -


def stray_first(answer: bytes) -> Script:
    """Connection 0 answers with ``answer`` (stray bytes in the same write) and reads on; later connections answer OK."""

    async def script(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(answer)
            await conn.until_eof()
            return
        await conn.send(OK)
        while True:
            await conn.request()
            await conn.send(OK)

    return script


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n{}", 204, b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK", 200, b"ok"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad", 200, b"ok"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nJUNK", 200, b"ok"),
    ],
    ids=["204-with-a-body", "200-then-junk", "200-then-another-response", "chunked-then-junk"],
)
async def test_proxy_relays_a_complete_answer_and_drops_the_connection_after_stray_bytes(
    login: TokenPair,
    make_proxy: ProxyFactory,
    upstream: StartUpstream,
    client: aiohttp.ClientSession,
    answer: bytes,
    status: int,
    body: bytes,
) -> None:
    """Stray bytes after a complete answer: the client gets the answer, that connection is closed, and the next request uses a new one."""
    server = await upstream(stray_first(answer))
    proxy = await make_proxy(upstream=server.url)
    reply = await within(fetch(client, "GET", proxy.url + "/x"))
    assert (reply.status, reply.body) == (status, body)
    await within(server.conns[0].eof.wait())
    reply = await within(fetch(client, "GET", proxy.url + "/y"))
    assert (reply.status, reply.body) == (200, b"ok")
    assert len(server.conns) == 2


async def test_stray_bytes_after_a_head_answer_close_the_connection(
    upstream: StartUpstream, pool_for: PoolFactory
) -> None:
    """Bytes after the head of an answer to HEAD are not its body: the answer stands and the connection is not reused."""
    server = await upstream(stray_first(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    pool = pool_for(server)
    response = await within(pool.send(b"HEAD /n HTTP/1.1\r\nHost: up\r\n\r\n", None, chunked=False, head_only=True))
    assert (response.status, await within(response.read_all(GUARD))) == (200, b"")
    response.release()
    await within(server.conns[0].eof.wait())
    assert await get(pool) == (200, b"ok")
    assert len(server.conns) == 2


# -- 9. an invalid status line or an unsolicited 101 is an immediate 502 ---------

INVALID_STATUS_LINES = {
    "000": b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
    "101-with-upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "600": b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
    "control-in-reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("answer", list(INVALID_STATUS_LINES.values()), ids=list(INVALID_STATUS_LINES))
async def test_invalid_status_line_is_unreachable_at_once(
    upstream: StartUpstream, pool_for: PoolFactory, answer: bytes
) -> None:
    """Status 000, a 101 nobody asked for, a status above 599 or a control byte in the reason fail send at once, long before the read timeout."""
    server = await upstream(answer_once(answer, then="eof"))
    with pytest.raises(UpstreamUnreachable, match="status"):
        await within(pool_for(server, read_timeout=LONG).send(GET, None, chunked=False, head_only=False))


@pytest.mark.parametrize("answer", list(INVALID_STATUS_LINES.values()), ids=list(INVALID_STATUS_LINES))
async def test_proxy_answers_502_at_once_for_an_invalid_status_line(
    login: TokenPair,
    make_proxy: ProxyFactory,
    upstream: StartUpstream,
    client: aiohttp.ClientSession,
    answer: bytes,
) -> None:
    """Through the proxy the same answers become an immediate 502 upstream-unreachable, with read_timeout far away."""
    server = await upstream(answer_once(answer, then="eof"))
    proxy = await make_proxy(upstream=server.url, read_timeout=LONG)
    assert_problem(await within(fetch(client, "GET", proxy.url + "/x")), 502, "upstream-unreachable")


# -- 10. a transfer coding other than a final chunked: the body ends at close ------


@pytest.mark.parametrize(
    "codings",
    [[b"chunked, gzip"], [b"gzip"], [b"Chunked ,GZIP"], [b"chunked", b"gzip"], [b"chunked , "]],
    ids=["chunked-gzip", "gzip", "mixed-case", "two-fields", "trailing-comma"],
)
async def test_proxy_relays_a_body_ending_at_close_when_chunked_is_not_last(
    login: TokenPair,
    make_proxy: ProxyFactory,
    upstream: StartUpstream,
    client: aiohttp.ClientSession,
    codings: list[bytes],
) -> None:
    """With chunked absent or not the final transfer coding the body is everything up to the close (RFC 9112 §6.3), relayed whole."""
    fields = b"".join(b"Transfer-Encoding: " + coding + b"\r\n" for coding in codings)
    # Looks chunked on purpose: a parser that took it for chunked would stop after "first".
    parts = [b"5\r\nfirst\r\n0\r\n\r\n", b"second part ", b"x" * 100_000]
    server = await upstream(answer_once(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n", *parts, then="close"))
    proxy = await make_proxy(upstream=server.url)
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
        assert await within(response.read()) == b"".join(parts)


@pytest.mark.parametrize(
    "codings", [[b"gzip, chunked"], [b"CHUNKED"], [b"gzip", b"chunked"]], ids=["gzip-chunked", "upper", "two-fields"]
)
async def test_final_chunked_coding_frames_the_body(
    upstream: StartUpstream, pool_for: PoolFactory, codings: list[bytes]
) -> None:
    """With chunked as the final coding the body ends at the last chunk, the connection left open and reused."""
    fields = b"".join(b"Transfer-Encoding: " + coding + b"\r\n" for coding in codings)
    server = await upstream(answer_each(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n2\r\nok\r\n0\r\n\r\n"))
    pool = pool_for(server)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert len(server.conns) == 1

"""A scripted raw upstream on 127.0.0.1: each test writes exactly the bytes it wants on the wire.

Its handler reads the request bytes off the socket and writes what the
script says, so framing, keep-alive, closing and stalls are under the test's
control and assertions can be on the bytes that crossed the wire.  The
``upstream`` fixture (conftest.py) starts these and stops them at teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from helpers.wire import read_chunked

T = TypeVar("T")

# A deadline for anything that must not hang; far above every expected wait.
GUARD = 3.0
GET = b"GET /n HTTP/1.1\r\nHost: up\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MIB = 1024 * 1024


async def within(awaitable: Awaitable[T], seconds: float = GUARD) -> T:
    """``awaitable``, or TimeoutError after ``seconds``: a hang fails the test instead of stalling the suite."""
    return await asyncio.wait_for(awaitable, seconds)


# -- the scripted upstream -------------------------------------------------------


class Conn:
    """One accepted upstream connection as the script sees it."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.eof = asyncio.Event()

    async def request(self) -> bytes:
        """Read one whole request (head, then the body as framed on the wire); record and return the raw bytes."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        }
        body = b""
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            body, _ = await read_chunked(self.reader)
        elif b"content-length" in fields:
            body = await self.reader.readexactly(int(fields[b"content-length"]))
        self.requests.append(head + body)
        self.heads.append(head)
        self.bodies.append(body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Read and discard until the peer closes; then set ``eof``."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()


Script = Callable[[Conn], Awaitable[None]]


class ScriptedUpstream:
    """A raw HTTP server on 127.0.0.1 that runs ``script`` on every accepted connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[Conn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


StartUpstream = Callable[[Script], Awaitable[ScriptedUpstream]]


def answer_each(response: bytes) -> Script:
    """A script that answers every request on the connection with ``response``."""

    async def script(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(response)

    return script


def answer_in_turn(*responses: bytes) -> Script:
    """A script that answers the requests it reads with ``responses``, one each, in order."""
    remaining = iter(responses)

    async def script(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(next(remaining))

    return script


def answer_once(*pieces: bytes, then: Literal["request", "eof", "close"], pause: float = 0.02) -> Script:
    """A script that reads one request and writes ``pieces``, ``pause`` seconds apart.

    Then it reads the next request (``"request"``), reads until the client
    closes (``"eof"``), or closes the connection at once (``"close"``).
    """

    async def script(conn: Conn) -> None:
        await conn.request()
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(pause)
            await conn.send(piece)
        if then == "request":
            await conn.request()
        elif then == "eof":
            await conn.until_eof()

    return script

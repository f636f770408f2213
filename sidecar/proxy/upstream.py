"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, streaming both ways.

Why not aiohttp's ClientSession here: on the proxy's hot path it costs more
than everything else sidecar does per request (header merging, default
headers, cookie and redirect machinery the proxy must then switch off).
This module writes the request head the proxy already built, parses the
answer with httptools (llhttp, the parser Node.js uses) and hands the body
over chunk by chunk with back-pressure.  WebSockets and the token endpoint
still go through aiohttp.

Failures are two exceptions, decided here: UpstreamUnreachable (connect
failed, or the connection died before an answer) and UpstreamTimeout.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl as ssl_module
from collections.abc import AsyncIterator

import httptools

# Body bytes buffered from the upstream before reading pauses: enough for a
# few large socket reads, small enough that a slow client costs little memory.
_PAUSE_ABOVE = 512 * 1024
_RESUME_BELOW = 128 * 1024
# Idle keep-alive connections kept per upstream.
_MAX_IDLE = 256


class UpstreamError(Exception):
    """The upstream exchange failed; the message never carries request data."""


class UpstreamUnreachable(UpstreamError):
    """Could not connect, or the connection broke before the answer completed."""


class UpstreamTimeout(UpstreamError):
    """Connecting or waiting for the next bytes took longer than allowed."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._exception: BaseException | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self.response: UpstreamResponse | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._received_any = False
        self.keep_after = True
        # parser scratch
        self._status_reason = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Each request head is one write; Nagle would hold it for an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.complete:
            if response.status and response.until_eof and exc is None:
                response.complete = True  # a body delimited by the connection's end
            elif self._exception is None:
                self._exception = UpstreamUnreachable(
                    "the upstream closed the connection"
                    if self._received_any or exc is None
                    else f"the upstream connection failed ({type(exc).__name__})"
                )
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamUnreachable("the upstream closed the connection"))
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        parser = self._parser
        if parser is None:
            # Bytes nobody asked for: the connection is no longer in a known state.
            self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if self._exception is None:
                self._exception = UpstreamUnreachable("the upstream sent a malformed response")
            self.close()
        self._wake()

    def eof_received(self) -> bool:
        return False

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._status_reason = b""

    def on_status(self, reason: bytes) -> None:
        self._status_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self.response is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # 100 Continue, 103 Early Hints: the real answer follows
        response = self.response
        response.status = status
        response.reason = self._status_reason
        response.headers = self._headers
        response.keep_alive = parser.should_keep_alive()
        response.until_eof = _until_eof(status, self._headers)
        # Trailer fields after a chunked body must not join the headers.
        self._headers = []
        if self._head_only or status in (204, 304):
            response.complete = True
            # Nothing more belongs to this exchange: stop feeding this parser.
            self._parser = None

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            return
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered > _PAUSE_ABOVE and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.status:
            return  # the end of a 1xx
        response.complete = True
        self._parser = None

    # -- used by the pool and the response ------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.response is not None and self.response.status:
            # An answer before the body was all sent: stop sending (RFC 9112 §9.3).
            drain = self._drain_waiter
            if drain is not None and not drain.done():
                drain.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Wait for the parser to make progress (or fail)."""
        if self._exception is not None:
            raise self._exception
        waiter = self._waiter = self._loop.create_future()
        try:
            await _within(self._loop, waiter, timeout)
        finally:
            self._waiter = None
        if self._exception is not None:
            raise self._exception

    def consumed(self) -> None:
        if (
            self._read_paused
            and self.response is not None
            and self.response.buffered < _RESUME_BELOW
            and self.transport is not None
        ):
            self._read_paused = False
            self.transport.resume_reading()

    def begin(self, head_only: bool) -> UpstreamResponse:
        self._exception = None
        self.keep_after = True
        self._received_any = False
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self.response = UpstreamResponse(self)
        return self.response

    @property
    def answered(self) -> bool:
        """The upstream has sent its response head."""
        return self.response is not None and bool(self.response.status)

    async def drain(self) -> None:
        """Wait until the upstream takes more of the body, an answer comes, or time runs out."""
        if self.closed and not self.answered:
            raise UpstreamUnreachable("the upstream closed the connection")
        if self._write_paused and not self.answered:
            waiter = self._drain_waiter = self._loop.create_future()
            try:
                await _within(self._loop, waiter, self._pool.read_timeout)
            finally:
                self._drain_waiter = None

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            if self.answered:
                return  # the answer is in; the rest of the body is moot
            raise UpstreamUnreachable("the upstream closed the connection")
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the upstream did not answer in time"))


async def _within(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Await ``waiter``, failing it with UpstreamTimeout after ``timeout`` seconds.

    One timer handle instead of asyncio.wait_for's extra task: this runs for
    every wait on every request.
    """
    timer = loop.call_later(timeout, _expire, waiter) if timeout else None
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()


def _until_eof(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    if status in (204, 304) or status < 200:
        return False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            return False
    return True


class UpstreamResponse:
    """The upstream's answer: status, raw headers, and the body as it arrives."""

    __slots__ = (
        "_connection",
        "_released",
        "buffered",
        "chunks",
        "complete",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "until_eof",
    )

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.until_eof = False
        self.complete = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self._released = False

    def content_length(self) -> int | None:
        for name, value in self.headers:
            if name.lower() == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def take_buffered(self) -> bytes:
        """Everything received so far (the whole body once ``complete``)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._connection.consumed()
        return data

    async def read(self, timeout: float | None) -> bytes:
        """The next piece of the body; ``b""`` once it is complete."""
        while not self.chunks:
            if self.complete:
                return b""
            await self._connection.wait(timeout)
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        self._connection.consumed()
        return chunk

    async def read_all(self, timeout: float | None) -> bytes:
        while not self.complete:
            await self._connection.wait(timeout)
        return self.take_buffered()

    def release(self) -> None:
        """Give the connection back if the exchange finished cleanly, else close it."""
        if self._released:
            return
        self._released = True
        connection = self._connection
        connection.response = None
        if self.complete and self.keep_alive and connection.keep_after and not self.chunks and not connection.closed:
            connection._parser = None
            connection._pool.put_back(connection)
        else:
            connection.close()


class UpstreamPool:
    """Keep-alive connections to one origin (``http`` or ``https``)."""

    def __init__(self, scheme: str, host: str, port: int, *, connect_timeout: float, read_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if scheme == "https" else None
        self._connect_timeout = connect_timeout or None
        self.read_timeout = read_timeout or None
        self._idle: list[_Connection] = []
        default_port = 443 if scheme == "https" else 80
        authority = f"[{host}]" if ":" in host else host
        self.host_header = (authority if port == default_port else f"{authority}:{port}").encode(
            "idna" if not host.isascii() else "ascii"
        )

    async def _connect(self) -> _Connection:
        connection = _Connection(self)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout("connecting to the upstream timed out") from None
        except (OSError, ssl_module.SSLError) as exc:
            raise UpstreamUnreachable(f"cannot connect to the upstream ({type(exc).__name__})") from None
        return connection

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    def put_back(self, connection: _Connection) -> None:
        if len(self._idle) < _MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def send(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None, *, chunked: bool, head_only: bool
    ) -> UpstreamResponse:
        """Send one request and wait for the response head.

        ``head`` is the request line and headers, ending in a blank line.  A
        reused connection that turns out dead before any answer is retried
        once on a fresh one when the body can be sent again.
        """
        retry_allowed = not (body is not None and not isinstance(body, bytes))
        connection = self._take_idle()
        while True:
            fresh = connection is None
            if connection is None:
                connection = await self._connect()
            response = connection.begin(head_only)
            try:
                await _write_request(connection, head, body, chunked)
                while not response.status:
                    await connection.wait(self.read_timeout)
                return response
            except UpstreamUnreachable:
                connection.close()
                if fresh or not retry_allowed or connection._received_any:
                    raise
                connection = None  # a stale keep-alive connection: try a new one
            except BaseException:
                connection.close()
                raise


async def _write_request(
    connection: _Connection, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool
) -> None:
    if body is None:
        connection.write(head)
        return
    if isinstance(body, bytes):
        if chunked:
            connection.write(head + (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"))
        else:
            connection.write(head + body)
        await connection.drain()
        return
    connection.write(head)
    async for chunk in body:
        if connection.answered:
            # The upstream answered early (413, 401...): the rest is not wanted,
            # and the connection cannot be reused with half a body sent.
            connection.keep_after = False
            return
        if not chunk:
            continue
        connection.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n" if chunked else chunk)
        await connection.drain()
    if connection.answered and not connection.closed:
        connection.keep_after = False
        return
    if chunked:
        connection.write(b"0\r\n\r\n")
    await connection.drain()

"""One pooled keep-alive connection to the upstream: the asyncio protocol, the httptools parser callbacks, the request writer.

Failures are UpstreamUnreachable (connect failed, the connection died before
an answer, or the answer is not one a proxy may relay) and UpstreamTimeout.

Checked as it arrives (SPEC §4): the head keeps to its limits before the
parser sees it; the final status is 2xx-5xx (101 is never asked for); bytes
after a complete answer leave it standing but close the connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Protocol, cast

import httptools

from sidecar.egress.tls import report_tls_failure
from sidecar.proxy.response import (
    HEAD_LIMIT,
    LINE_LIMIT,
    UpstreamResponse,
    body_until_close,
    status_problem,
)

# Body bytes buffered from the upstream before reading pauses: enough for a
# few large socket reads, small enough that a slow client costs little memory.
_PAUSE_ABOVE = 512 * 1024
_RESUME_BELOW = 128 * 1024

RequestBody = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The upstream exchange failed; the message never carries request data."""


class UpstreamUnreachable(UpstreamError):
    """Could not connect, or the connection broke before the answer completed."""


class UpstreamTimeout(UpstreamError):
    """Connecting or waiting for the next bytes took longer than allowed."""


class _Halt(Exception):
    """Raised in a parser callback to stop llhttp; the reason is already recorded."""


class ConnectionOwner(Protocol):
    """The pool, as its connections see it."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def read_timeout(self) -> float | None: ...

    def put_back(self, connection: Connection) -> None:
        """Keep ``connection`` for a later exchange."""

    def forget(self, connection: Connection) -> None:
        """``connection`` is closed: never hand it out again."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, owner: ConnectionOwner) -> None:
        self._owner = owner
        self._loop = owner.loop
        self._read_timeout = owner.read_timeout
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self._exception: BaseException | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._response: UpstreamResponse | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._received_any = self.sent_any = False  # sent: a byte of this exchange's request was written
        self.idle_since = 0.0  # loop time it went back to the pool (the pool's bookkeeping)
        self._keep_after = True
        self._head_bytes = self._line_bytes = 0  # of the head so far, and of its unfinished line
        # parser scratch
        self._status_reason = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection gives a stream protocol a read-write transport;
        # uvloop's does not subclass asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Each request head is one write; Nagle would hold it for an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            if response.status and response.until_eof and exc is None:
                response.complete = True  # a body delimited by the connection's end
            elif self._exception is None:
                self._exception = UpstreamUnreachable(
                    "the upstream closed the connection"
                    if self._received_any or exc is None
                    # TLS 1.3 servers refuse a missing client certificate after the handshake.
                    else report_tls_failure(exc) or f"the upstream connection failed ({type(exc).__name__})"
                )
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamUnreachable("the upstream closed the connection"))
        self._owner.forget(self)

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
        response = self._response
        try:
            if response is not None and not response.status:
                rest = self._feed_head(parser, data, response)
                if rest is None:  # over a limit: nothing past it reaches the parser
                    self.close()
                elif rest:
                    parser.feed_data(rest)
            else:
                parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if response is not None and response.complete:
                pass  # stray bytes after a complete answer: it stands, the connection does not
            elif self._exception is None:
                self._exception = UpstreamUnreachable("the upstream sent a malformed response")
            self.close()
        self._wake()

    def _feed_head(
        self, parser: httptools.HttpResponseParser, data: bytes, response: UpstreamResponse
    ) -> memoryview | bytes | None:
        """Feed the parser ``data`` up to the end of the final head, within the limits; the rest, or None when over one."""
        size = len(data)
        if self._head_bytes + size <= LINE_LIMIT + 2:
            # The usual answer: with 8 KiB in all so far no line and not the head can be over.
            parser.feed_data(data)
            if not response.status:  # the head goes on in the next read
                newline = data.rfind(b"\n")
                self._line_bytes = self._line_bytes + size if newline < 0 else size - newline - 1
                self._head_bytes += size
            return b""
        view = memoryview(data)
        line = self._line_bytes
        fed = pos = 0
        while pos < size:
            newline = data.find(b"\n", pos)
            if newline < 0:
                line += size - pos
                pos = size
                break
            line += newline + 1 - pos
            pos = newline + 1
            if line > LINE_LIMIT + 2:
                break
            if line <= 2:  # the blank line ending a head (the parser checks it is CRLF)
                if self._head_bytes + pos > HEAD_LIMIT:
                    break
                parser.feed_data(view[fed:pos])
                fed = pos
                if response.status:  # the final head: what follows is body
                    return view[pos:]
            line = 0
        # An unfinished line may end in its CR: 8 KiB and one byte is still in bounds.
        if line > LINE_LIMIT + 1:
            self._exception = UpstreamUnreachable("a line of the upstream's response head is over 8 KiB")
        elif self._head_bytes + pos > HEAD_LIMIT:
            self._exception = UpstreamUnreachable("the upstream's response head is over 64 KiB")
        else:
            self._head_bytes += size
            self._line_bytes = line
            return view[fed:]
        return None

    def eof_received(self) -> bool:
        return False

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        if response is not None and response.complete:
            raise _Halt()  # a second message after the answer: stray bytes
        self._headers = []
        self._status_reason = b""

    def on_status(self, reason: bytes) -> None:
        self._status_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self._response is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # 100 Continue, 103 Early Hints: the real answer follows
        problem = status_problem(status, self._status_reason)
        if problem is not None:
            self._exception = UpstreamUnreachable(problem)
            raise _Halt()  # llhttp stops; data_received closes the connection
        response = self._response
        response.status = status
        response.reason = self._status_reason
        response.headers = self._headers
        response.keep_alive = parser.should_keep_alive()
        response.until_eof = body_until_close(status, self._headers)
        # Trailer fields after a chunked body must not join the headers.
        self._headers = []
        if self._head_only or status in (204, 304):
            response.complete = True
            # Nothing more belongs to this exchange: stop feeding this parser.
            self._parser = None

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None or response.complete:
            raise _Halt()  # after the answer to a HEAD, or a 204/304: stray bytes
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered > _PAUSE_ABOVE and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or not response.status:
            return  # the end of a 1xx
        response.complete = True
        self._parser = None

    # -- one exchange: begin, send, wait, end -------------------------------

    @property
    def received_any(self) -> bool:
        """The upstream sent bytes in this exchange: a failure now is not a stale connection's."""
        return self._received_any

    @property
    def answered(self) -> bool:
        """The upstream has sent its response head."""
        return self._response is not None and bool(self._response.status)

    def begin(self, head_only: bool) -> UpstreamResponse:
        """Start an exchange; the response fills in as the answer arrives."""
        self._exception = None
        self._keep_after = True
        self._received_any = self.sent_any = False
        self._head_only = head_only
        self._head_bytes = self._line_bytes = 0
        self._parser = httptools.HttpResponseParser(self)
        self._response = UpstreamResponse(self)
        return self._response

    async def send_request(self, head: bytes, body: RequestBody, chunked: bool) -> None:
        """Write the request: ``head`` (request line and headers, blank line included), then the body framed."""
        if body is None:
            self._write(head)
            return
        if isinstance(body, bytes):
            if chunked:
                self._write(head + (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"))
            else:
                self._write(head + body)
            await self._drain()
            return
        self._write(head)
        async for chunk in body:
            if self.answered:
                # The upstream answered early (413, 401...): the rest is not wanted,
                # and the connection cannot be reused with half a body sent.
                self._keep_after = False
                return
            if not chunk:
                continue
            self._write(b"%x\r\n" % len(chunk) + chunk + b"\r\n" if chunked else chunk)
            await self._drain()
        if self.answered and not self.closed:
            self._keep_after = False
            return
        if chunked:
            self._write(b"0\r\n\r\n")
        await self._drain()

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
            and self._response is not None
            and self._response.buffered < _RESUME_BELOW
            and self._transport is not None
        ):
            self._read_paused = False
            self._transport.resume_reading()

    def end_exchange(self, *, reusable: bool) -> None:
        """Back to the pool if ``reusable`` and the whole request went out on a live connection; else close."""
        self._response = None
        if reusable and self._keep_after and not self.closed:
            self._parser = None
            self._owner.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # -- internals ----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._response is not None and self._response.status:
            # An answer before the body was all sent: stop sending (RFC 9112 §9.3).
            drain = self._drain_waiter
            if drain is not None and not drain.done():
                drain.set_result(None)

    async def _drain(self) -> None:
        """Wait until the upstream takes more of the body, an answer comes, or time runs out."""
        if self.closed and not self.answered:
            raise UpstreamUnreachable("the upstream closed the connection")
        if self._write_paused and not self.answered:
            waiter = self._drain_waiter = self._loop.create_future()
            try:
                await _within(self._loop, waiter, self._read_timeout)
            finally:
                self._drain_waiter = None

    def _write(self, data: bytes) -> None:
        if self.closed or self._transport is None:
            if self.answered:
                return  # the answer is in; the rest of the body is moot
            raise UpstreamUnreachable("the upstream closed the connection")
        self.sent_any = True
        self._transport.write(data)


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

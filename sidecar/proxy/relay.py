"""The upstream's answer, streamed back to the client with its header bytes and framing as they came."""

from __future__ import annotations

import re

import aiohttp
from aiohttp import web

from sidecar.proxy.connection import UpstreamError
from sidecar.proxy.headers import response_headers
from sidecar.proxy.outcome import Outcome
from sidecar.proxy.response import UpstreamResponse
from sidecar.proxy.urls import Upstream

_NO_CONTENT = frozenset({204, 304})
# What no head line may hold (RFC 9110 §5.5): the controls aiohttp's serialiser refuses.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ClientGone(Exception):
    """The client hung up while we were writing to it."""


class _RelayedStreamResponse(web.StreamResponse):
    """A streamed answer: aiohttp adds no Content-Type or Server that the upstream did not send (it adds both by default)."""

    # Set when a header value or the reason is not UTF-8: aiohttp's serialiser
    # writes only UTF-8 (it drops lone surrogates), so the head is written here.
    raw_head = False

    async def _prepare_headers(self) -> None:
        # Two lookups, not a set of names: this runs for every relayed answer.
        headers = self.headers
        had_type = "Content-Type" in headers
        had_server = "Server" in headers
        await super()._prepare_headers()
        if not had_type:
            headers.popall("Content-Type", None)
        if not had_server:
            headers.popall("Server", None)

    async def _write_headers(self) -> None:
        request = self._req
        if not self.raw_head or request is None:
            await super()._write_headers()
            return
        # The surrogates that stand for non-UTF-8 bytes turn back into those bytes.
        version = request.version
        lines = [f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}"]
        lines.extend(f"{name}: {value}" for name, value in self.headers.items())
        if any(_CONTROL.search(line) is not None for line in lines):
            raise ValueError("a control character in the response head")  # as aiohttp's serialiser would
        head = "\r\n".join(lines)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client is gone")
        # Straight to the transport: aiohttp's writer has no public way to take a head as bytes.
        transport.write(head.encode("utf-8", "surrogateescape") + b"\r\n\r\n")


class _RelayedResponse(_RelayedStreamResponse, web.Response):
    """A complete answer, written to the client at once; no defaults added either."""


async def relay(
    request: web.BaseRequest,
    answer: UpstreamResponse,
    upstream: Upstream,
    outcome: Outcome,
    read_timeout: float,
    *,
    retry_header: str | None,
) -> web.StreamResponse:
    """Send the upstream's ``answer`` to the client, streaming its body; the answer is released at the end.

    ``retry_header`` is the ``X-Sidecar-Retry`` value to add (why a 401 was not retried), or None.
    """
    try:
        headers, exact = response_headers(answer.headers)
        location = headers.get("Location")
        if location is not None:
            headers["Location"] = upstream.local_location(location, request.headers.get("Host", "127.0.0.1"))
        if retry_header is not None:
            headers["X-Sidecar-Retry"] = retry_header
        status = answer.status
        try:
            reason = answer.reason.decode() or None
        except UnicodeDecodeError:
            reason = answer.reason.decode("utf-8", "surrogateescape")
            exact = False
        outcome.status = status
        if answer.complete and "Content-Length" in headers:
            # The whole answer is here: one write to the client.
            whole = _RelayedResponse(status=status, reason=reason, headers=headers, body=answer.take_buffered())
            whole.raw_head = not exact
            answer.release()
            return whole
        response = _RelayedStreamResponse(status=status, reason=reason, headers=headers)
        response.raw_head = not exact
        if (
            "Content-Length" not in headers
            and status not in _NO_CONTENT
            and request.method != "HEAD"
            and request.version >= aiohttp.HttpVersion11
        ):
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            timeout = read_timeout or None
            while True:
                try:
                    chunk = await answer.read(timeout)
                except UpstreamError as exc:
                    # Mid-body failure: cut the client's connection so a
                    # truncated body can never look complete.
                    outcome.error = type(exc).__name__
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            raise ClientGone() from None
        return response
    finally:
        answer.release()

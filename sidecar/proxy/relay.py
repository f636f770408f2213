"""The upstream's answer, streamed back to the client with its header bytes and framing as they came."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sidecar.proxy.connection import UpstreamError
from sidecar.proxy.headers import response_headers
from sidecar.proxy.outcome import Outcome
from sidecar.proxy.response import UpstreamResponse
from sidecar.proxy.urls import Upstream

_NO_CONTENT = frozenset({204, 304})


class ClientGone(Exception):
    """The client hung up while we were writing to it."""


class _RelayedStreamResponse(web.StreamResponse):
    """A streamed answer: aiohttp adds no Content-Type or Server that the upstream did not send (it adds both by default)."""

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
        headers = response_headers(answer.headers)
        location = headers.get("Location")
        if location is not None:
            headers["Location"] = upstream.local_location(location, request.headers.get("Host", "127.0.0.1"))
        if retry_header is not None:
            headers["X-Sidecar-Retry"] = retry_header
        status = answer.status
        reason = answer.reason.decode("latin-1") or None
        outcome.status = status
        if answer.complete and "Content-Length" in headers:
            # The whole answer is here: one write to the client.
            whole = _RelayedResponse(status=status, reason=reason, headers=headers, body=answer.take_buffered())
            answer.release()
            return whole
        response = _RelayedStreamResponse(status=status, reason=reason, headers=headers)
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

"""The endpoints a bearer token opens: ``whoami``, and protected test endpoints that misbehave on purpose.

Echo and upload report exactly what arrived; the others produce awkward
answers (huge streams, SSE, gzip, redirects, WebSocket, any status). Without
a live access token every protected endpoint answers 401 with a Bearer
challenge, after reading the body.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from typing import Protocol

from aiohttp import WSMsgType, web

from sidecar.mockcloud.stopping import Pause
from sidecar.mockcloud.wire import Handler, json_response

# One logger for the whole mock cloud, whichever module logs.
log = logging.getLogger("sidecar.mockcloud")

# Big enough that a 1 GiB stream is ~16k writes, small enough to stay cheap.
DEFAULT_CHUNK = 65536


def bearer_token(request: web.Request) -> str | None:
    """The bearer token from ``Authorization``, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def drain_body(request: web.Request) -> tuple[int, str]:
    """Read the request body in chunks; return its length and SHA-256 hex."""
    digest = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_chunked(DEFAULT_CHUNK):
        digest.update(chunk)
        n += len(chunk)
    return n, digest.hexdigest()


def invalid_token_response() -> web.Response:
    """401 with the Bearer challenge, for a missing, expired or revoked access token."""
    return json_response(
        {"error": "invalid_token"},
        401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class ApiHost(Protocol):
    """What these endpoints need from the cloud: token checks, the user, its address, and the echo record."""

    last_echo_body_sha256: str | None

    @property
    def user(self) -> str: ...

    @property
    def email(self) -> str: ...

    def access_token_valid(self, token: str | None) -> bool: ...

    def api_url(self, request: web.Request) -> str: ...


class ApiRoutes:
    """``/api/v1/auth/whoami`` and the protected ``/api/v1/...`` endpoints; owns the open WebSockets.

    ``bytes_handler`` replaces :meth:`stream_bytes` as the ``/api/v1/bytes``
    handler (still behind the bearer check).
    """

    def __init__(self, cloud: ApiHost, pause: Pause, *, bytes_handler: Handler | None = None) -> None:
        self._cloud = cloud
        self._pause = pause
        self._bytes_handler = self.stream_bytes if bytes_handler is None else bytes_handler
        self._websockets: set[web.WebSocketResponse] = set()

    def add_to(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Register whoami and every protected endpoint under ``prefix``."""
        protected: list[tuple[str, str, Handler]] = [
            ("*", "/api/v1/echo", self._echo),
            ("*", "/api/v1/echo/{tail:.*}", self._echo),
            ("GET", "/api/v1/bytes", self._bytes_handler),
            ("POST", "/api/v1/upload", self._upload),
            ("PUT", "/api/v1/upload", self._upload),
            ("GET", "/api/v1/sse", self._sse),
            ("GET", "/api/v1/gzip", self._gzip),
            ("GET", "/api/v1/slow", self._slow),
            ("GET", "/api/v1/redirect", self._redirect),
            ("GET", "/api/v1/redirect-external", self._redirect_external),
            ("GET", "/api/v1/ws", self._ws),
            ("*", "/api/v1/status/{code}", self._status),
        ]
        for method, path, handler in protected:
            router.add_route(method, prefix + path, self._protected(handler))
        router.add_get(prefix + "/api/v1/auth/whoami", self._whoami)

    async def close_websockets(self) -> None:
        """Close every open WebSocket, so stopping does not wait for clients to leave."""
        for ws in list(self._websockets):
            await ws.close()

    def _protected(self, handler: Handler) -> Handler:
        """Wrap ``handler`` so it runs only with a live bearer token."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if self._cloud.access_token_valid(bearer_token(request)):
                return await handler(request)
            if request.can_read_body:
                # Read the body before refusing, so a client still streaming a
                # large upload gets the 401 instead of a reset connection.
                await drain_body(request)
            return invalid_token_response()

        return guarded

    async def _whoami(self, request: web.Request) -> web.StreamResponse:
        """Who the bearer token belongs to."""
        if not self._cloud.access_token_valid(bearer_token(request)):
            return invalid_token_response()
        return json_response({"name": self._cloud.user, "email": self._cloud.email})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        """Report the request exactly as it arrived: raw path, raw query, raw headers, body hash."""
        path, _, raw_query = request.raw_path.partition("?")
        length, digest = await drain_body(request)
        self._cloud.last_echo_body_sha256 = digest
        transfer_encoding = request.headers.get("Transfer-Encoding", "").lower()
        return json_response(
            {
                "method": request.method,
                "path": path,
                "raw_query": raw_query,
                "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers],
                "authorization": request.headers.get("Authorization"),
                "body_sha256": digest,
                "body_length": length,
                "chunked": "chunked" in transfer_encoding,
            }
        )

    async def stream_bytes(self, request: web.Request) -> web.StreamResponse:
        """Stream ``n`` bytes of ``b"x"`` in ``chunk``-sized writes, chunked, never buffered."""
        try:
            n = int(request.query.get("n", "0"))
            chunk = int(request.query.get("chunk", str(DEFAULT_CHUNK)))
        except ValueError:
            return json_response({"error": "invalid_request"}, 400)
        if n < 0 or chunk <= 0:
            return json_response({"error": "invalid_request"}, 400)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"x" * chunk
        remaining = n
        try:
            while remaining > 0:
                piece = block if remaining >= chunk else block[:remaining]
                await resp.write(piece)
                remaining -= len(piece)
            await resp.write_eof()
        except ConnectionError:
            log.debug("mock cloud: client hung up after %d of %d bytes", n - remaining, n)
        return resp

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        """Consume the body in chunks; answer its length and SHA-256."""
        length, digest = await drain_body(request)
        return json_response({"received": length, "sha256": digest})

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``data: event i`` for i in 0..n-1, ``interval`` seconds apart."""
        try:
            n = int(request.query.get("n", "3"))
            interval = float(request.query.get("interval", "0.5"))
        except ValueError:
            return json_response({"error": "invalid_request"}, 400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i in range(n):
                if i and not await self._pause(interval):
                    break
                await resp.write(f"data: event {i}\n\n".encode())
            await resp.write_eof()
        except ConnectionError:
            log.debug("mock cloud: client left the event stream")
        return resp

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        """A gzip-encoded body that must reach the client still compressed."""
        body = gzip.compress(b"hello gzip " * 100, mtime=0)
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        """Answer after ``seconds``."""
        try:
            seconds = float(request.query.get("seconds", "1"))
        except ValueError:
            return json_response({"error": "invalid_request"}, 400)
        await self._pause(seconds)
        return json_response({"slept": seconds})

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        """302 to ``base_url + to``: a redirect that stays inside the upstream."""
        to = request.query.get("to", "/api/v1/echo")
        raise web.HTTPFound(self._cloud.api_url(request) + to)

    async def _redirect_external(self, request: web.Request) -> web.StreamResponse:
        """302 to a host that is not the upstream."""
        raise web.HTTPFound("https://elsewhere.example/x")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        """WebSocket echo for text and binary frames."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._websockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self._websockets.discard(ws)
        return ws

    async def _status(self, request: web.Request) -> web.StreamResponse:
        """Answer with the status named in the path."""
        try:
            code = int(request.match_info["code"])
        except ValueError:
            code = 0
        if not 200 <= code <= 599:
            return json_response({"error": "invalid_request"}, 400)
        if code in (204, 304):
            return web.Response(status=code)
        return json_response({"status": code}, code)

"""WebSocket upgrades: the upstream handshake with our headers, then frames copied both ways.

Policy (which token, what a 401 means) stays in handler.py and retry.py;
this module only speaks the protocol.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from yarl import URL

from sidecar.egress.outbound import proxy_options
from sidecar.egress.proxies import ProxyRoute
from sidecar.egress.tls import report_tls_failure
from sidecar.proxy.headers import websocket_headers

# aiohttp writes these for the upstream handshake itself.
_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions",
)


def requested_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    return tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())


class Handshake:
    """One upstream handshake's answer: the socket (status 101), the status it was refused with, or the error."""

    __slots__ = ("error", "socket", "status")

    def __init__(
        self,
        status: int,
        socket: aiohttp.ClientWebSocketResponse | None = None,
        error: TimeoutError | aiohttp.ClientError | None = None,
    ) -> None:
        self.status = status
        self.socket = socket
        self.error = error

    def release(self) -> None:
        """Nothing to let go of: a refused handshake holds no connection, and an open socket is relayed."""


async def handshake(
    session: aiohttp.ClientSession,
    request: web.BaseRequest,
    url: str,
    authorization: str,
    close_timeout: float,
    proxy: ProxyRoute | None = None,
) -> Handshake:
    """Open the upstream WebSocket (by way of ``proxy`` if given); a refusal or a failure is in the answer, not raised."""
    try:
        socket = await session.ws_connect(
            URL(url, encoded=True),
            **proxy_options(proxy, url, websocket_headers(request.headers, authorization, _HANDSHAKE_HEADERS)),
            protocols=requested_protocols(request),
            autoclose=False,
            autoping=False,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout),
        )
    except aiohttp.WSServerHandshakeError as exc:
        return Handshake(exc.status)
    except (TimeoutError, aiohttp.ClientError) as exc:
        report_tls_failure(exc, where=URL(url, encoded=True).raw_authority)
        return Handshake(0, error=exc)
    return Handshake(101, socket)


async def relay(request: web.BaseRequest, upstream: aiohttp.ClientWebSocketResponse) -> web.WebSocketResponse:
    """Accept the client's upgrade and copy frames until either side closes."""
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False, autoping=False, max_msg_size=0
    )
    try:
        await downstream.prepare(request)
        await _pump(downstream, upstream)
    finally:
        await upstream.close()
    return downstream


async def _pump(downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Copy frames both ways until either side closes."""

    async def copy(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == aiohttp.WSMsgType.PONG:
                await sink.pong(message.data)
        if not sink.closed:
            await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)

    tasks = [asyncio.ensure_future(copy(downstream, upstream)), asyncio.ensure_future(copy(upstream, downstream))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

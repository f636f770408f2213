"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, streaming both ways.

Why not aiohttp's ClientSession here: on the proxy's hot path it costs more
than everything else sidecar does per request (header merging, default
headers, cookie and redirect machinery the proxy must then switch off).
This client writes the request head the proxy already built, parses the
answer with httptools (llhttp, the parser Node.js uses) and hands the body
over chunk by chunk with back-pressure.  WebSockets and the token endpoint
still go through aiohttp.

This module is the pool and the client's public face; one connection's
protocol and parser live in connection.py, the answer in response.py.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable

from sidecar.egress.proxies import ProxyRoute
from sidecar.egress.tls import report_tls_failure
from sidecar.egress.tunnel import absolute_form_connection, through_proxy
from sidecar.proxy.connection import (
    Connection,
    ConnectionOwner,
    RequestBody,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from sidecar.proxy.response import UpstreamResponse

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse", "UpstreamTimeout", "UpstreamUnreachable"]

# Idle keep-alive connections kept per upstream.
_MAX_IDLE = 256
# Seconds a pooled connection may sit idle before it is closed.  Servers close
# theirs too (Node after 5 s): the longer one sits, the likelier a request
# written to it meets the server's close.
IDLE_SECONDS = 15.0
# RFC 9110 §9.2.2: a request with one of these methods may be sent again.
_IDEMPOTENT = (b"GET ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"TRACE ")


class UpstreamPool:
    """Keep-alive connections to one origin (``http`` or ``https``)."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        tls: ssl_module.SSLContext | None = None,
        proxy: ProxyRoute | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._ssl: ssl_module.SSLContext | None = (
            (tls or ssl_module.create_default_context()) if scheme == "https" else None
        )
        self._connect_timeout = connect_timeout or None
        self.read_timeout = read_timeout or None
        self._idle: list[Connection] = []
        self._sweep: asyncio.TimerHandle | None = None
        default_port = 443 if scheme == "https" else 80
        authority = f"[{host}]" if ":" in host else host
        self.host_header = (authority if port == default_port else f"{authority}:{port}").encode(
            "idna" if not host.isascii() else "ascii"
        )
        # The egress proxy is chosen once per pool (per upstream), never per request.
        self._proxy = proxy
        self._proxy_tls = (tls or ssl_module.create_default_context()) if proxy is not None and proxy.tls else None
        self._new_connection: Callable[[ConnectionOwner], Connection] = (
            absolute_form_connection(b"http://" + self.host_header, proxy)
            if proxy is not None and scheme != "https"
            else Connection
        )

    async def _connect(self) -> Connection:
        connection = self._new_connection(self)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
                if self._proxy is None
                else through_proxy(
                    self.loop,
                    lambda: connection,
                    self._proxy,
                    self._host,
                    self._port,
                    tls=self._ssl,
                    proxy_tls=self._proxy_tls,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout("connecting to the upstream timed out") from None
        except (OSError, ssl_module.SSLError) as exc:
            tls_failure = report_tls_failure(exc, where=f"{self._host}:{self._port}")
            raise UpstreamUnreachable(tls_failure or f"cannot connect to the upstream ({type(exc).__name__})") from None
        return connection

    def _take_idle(self) -> Connection | None:
        idle = self._idle
        oldest = self.loop.time() - IDLE_SECONDS
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.idle_since < oldest:
                connection.close()  # the sweep has not come round to it yet
                continue
            return connection
        return None

    def put_back(self, connection: Connection) -> None:
        if len(self._idle) < _MAX_IDLE:
            connection.idle_since = self.loop.time()
            self._idle.append(connection)
            if self._sweep is None:
                self._sweep = self.loop.call_later(IDLE_SECONDS, self._close_long_idle)
        else:
            connection.close()

    def _close_long_idle(self) -> None:
        """Close the connections idle for IDLE_SECONDS; come back while any stay."""
        self._sweep = None
        oldest = self.loop.time() - IDLE_SECONDS
        keep: list[Connection] = []
        for connection in self._idle:
            if connection.closed:
                continue
            if connection.idle_since <= oldest:
                connection.close()
            else:
                keep.append(connection)
        self._idle[:] = keep
        if keep:
            # The list is in put-back order: the first one left is the next due.
            delay = keep[0].idle_since + IDLE_SECONDS - self.loop.time()
            self._sweep = self.loop.call_later(max(delay, 0.0), self._close_long_idle)

    def forget(self, connection: Connection) -> None:
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def send(self, head: bytes, body: RequestBody, *, chunked: bool, head_only: bool) -> UpstreamResponse:
        """Send one request and wait for the response head.

        ``head`` is the request line and headers, ending in a blank line.  A
        reused connection that turns out dead before any answer is retried
        once on a fresh one when the body can be sent again and the request
        cannot have reached the upstream twice: its method is idempotent
        (RFC 9110 §9.2.2), or not one byte of it was written (the connection
        was found closed first).  Otherwise a request the upstream may have
        read and acted on (a POST that charged a card) is not repeated: the
        caller gets UpstreamUnreachable.
        """
        retry_allowed = not (body is not None and not isinstance(body, bytes))
        connection = self._take_idle()
        while True:
            fresh = connection is None
            if connection is None:
                connection = await self._connect()
            response = connection.begin(head_only)
            try:
                await connection.send_request(head, body, chunked)
                while not response.status:
                    await connection.wait(self.read_timeout)
                return response
            except UpstreamUnreachable:
                connection.close()
                if fresh or not retry_allowed or connection.received_any:
                    raise
                if connection.sent_any and not head.startswith(_IDEMPOTENT):
                    method = head[: head.find(b" ")].decode("ascii", "replace")
                    raise UpstreamUnreachable(
                        f"the upstream closed a kept-alive connection after the request was sent; "
                        f"a {method} is not sent twice"
                    ) from None
                connection = None  # a stale keep-alive connection: try a new one
            except BaseException:
                connection.close()
                raise

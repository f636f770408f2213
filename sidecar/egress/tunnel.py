"""The lean forwarding client's way through an egress proxy.

Two shapes (RFC 9110 §9.3.6, RFC 9112 §3.2.2):

- an https upstream: a TCP connection to the proxy, ``CONNECT host:port``,
  the proxy's answer read within limits, then TLS to the upstream inside
  the tunnel (``loop.start_tls``, checked against the upstream's name).
  The proxy's credentials go on the CONNECT request only; nothing inside
  the tunnel carries them.
- an http upstream: a connection to the proxy, and every request line in
  absolute form (``GET http://host:port/path HTTP/1.1``) with
  ``Proxy-Authorization`` after it.  The rewrite is ``absolute_form``, done
  by the connections ``absolute_form_connection`` makes.

Failures are UpstreamUnreachable (ProxyFailed) naming the proxy by its
credential-free URL and, for a refused tunnel, the status it answered.
"""

from __future__ import annotations

import asyncio
import functools
import http
import re
import ssl
from collections.abc import Callable

from sidecar.egress.proxies import ProxyRoute
from sidecar.egress.tls import describe_tls_failure
from sidecar.proxy.connection import Connection, ConnectionOwner, RequestBody, UpstreamUnreachable

# The proxy's answer to CONNECT is held to the limits SPEC §4 sets for an
# upstream's response head.
MAX_LINE = 8 * 1024
MAX_HEAD = 64 * 1024
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")


class ProxyFailed(UpstreamUnreachable):
    """The egress proxy could not be reached, refused the tunnel, or answered CONNECT with nonsense."""


def authority(host: str, port: int) -> bytes:
    """``host:port`` as a request target or Host value: IPv6 in brackets, names in IDNA."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}".encode("ascii" if shown.isascii() else "idna")


def connect_request(host: str, port: int, route: ProxyRoute) -> bytes:
    """The CONNECT request for ``host:port``, with the proxy's credentials when it has some."""
    target = authority(host, port)
    head = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
    if route.authorization:
        head += b"Proxy-Authorization: " + route.authorization.encode("ascii") + b"\r\n"
    return head + b"\r\n"


def connect_status(head: bytes) -> int:
    """The status of the proxy's answer ``head``; raises ProxyFailed if it is not an HTTP/1.x status line."""
    match = _STATUS_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r"))
    if match is None:
        raise ProxyFailed("the egress proxy answered CONNECT with something other than HTTP/1.x")
    return int(match.group(1))


def absolute_form(head: bytes, origin: bytes, proxy_authorization: bytes) -> bytes:
    """``head`` (origin-form request line first) with ``origin`` in front of its target and ``proxy_authorization`` after the line.

    ``proxy_authorization`` is a whole header line (``b"Proxy-Authorization: ...\\r\\n"``) or empty.
    """
    space = head.index(b" ") + 1
    line_end = head.index(b"\r\n", space) + 2
    return b"".join((head[:space], origin, head[space:line_end], proxy_authorization, head[line_end:]))


class _AbsoluteFormConnection(Connection):
    """A connection to a forward proxy for an http upstream: each request goes in absolute form."""

    def __init__(self, owner: ConnectionOwner, origin: bytes, proxy_authorization: bytes) -> None:
        super().__init__(owner)
        self._origin = origin
        self._proxy_authorization = proxy_authorization

    async def send_request(self, head: bytes, body: RequestBody, chunked: bool) -> None:
        await super().send_request(absolute_form(head, self._origin, self._proxy_authorization), body, chunked)


def absolute_form_connection(origin: bytes, route: ProxyRoute) -> Callable[[ConnectionOwner], Connection]:
    """Makes connections that send every request to ``route``'s proxy in absolute form, for the http upstream ``origin``."""
    line = b"Proxy-Authorization: " + route.authorization.encode("ascii") + b"\r\n" if route.authorization else b""
    return functools.partial(_AbsoluteFormConnection, origin=origin, proxy_authorization=line)


async def through_proxy(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    route: ProxyRoute,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    proxy_tls: ssl.SSLContext | None,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Connect ``factory``'s protocol to ``host:port`` by way of ``route``, as ``loop.create_connection`` would.

    ``tls`` set (an https upstream): a CONNECT tunnel with TLS inside it.
    ``tls`` None (an http upstream): a plain connection to the proxy; the
    protocol must write absolute-form requests.  ``proxy_tls`` is for an
    ``https://`` proxy.  The caller bounds the time it all takes.
    """
    if tls is None:
        return await _open(loop, factory, route, proxy_tls)
    answer = _ConnectAnswer(loop)
    transport, _ = await _open(loop, lambda: answer, route, proxy_tls)
    try:
        transport.write(connect_request(host, port, route))
        status = connect_status(await answer.head)
        if not 200 <= status < 300:
            raise ProxyFailed(
                f"the egress proxy {route.url} refused the tunnel to {authority(host, port).decode()}"
                f" (HTTP {status}{_phrase(status)})"
            )
        if answer.trailing:
            raise ProxyFailed("the egress proxy sent data after its answer to CONNECT")
        protocol = factory()
        secure = await loop.start_tls(transport, protocol, tls, server_hostname=host)
    except BaseException:
        transport.close()
        raise
    if secure is None:  # only for a server-side start_tls; here to satisfy the type
        transport.close()
        raise ProxyFailed("TLS through the egress proxy's tunnel did not start")
    protocol.connection_made(secure)
    return secure, protocol


async def _open(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    route: ProxyRoute,
    proxy_tls: ssl.SSLContext | None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """A connection to the proxy itself (TLS to it for an https:// proxy)."""
    context = (proxy_tls or ssl.create_default_context()) if route.tls else None
    try:
        return await loop.create_connection(
            factory, route.host, route.port, ssl=context, server_hostname=route.host if context else None
        )
    except ssl.SSLError as exc:
        reason = describe_tls_failure(exc) or type(exc).__name__
        raise ProxyFailed(f"TLS to the egress proxy {route.url} failed ({reason})") from None
    except OSError as exc:
        raise ProxyFailed(f"cannot connect to the egress proxy {route.url} ({type(exc).__name__})") from None


def _phrase(status: int) -> str:
    # The standard phrase, never the proxy's own text: nothing it sends reaches a log or a client.
    try:
        return " " + http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: its head, held to MAX_LINE and MAX_HEAD."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self._buffer = bytearray()
        self._transport: asyncio.BaseTransport | None = None
        self.trailing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            self._after_head()
            return
        buffer = self._buffer
        buffer += data
        end = _END_OF_HEAD.search(buffer)
        head = bytes(buffer[: end.end()]) if end else bytes(buffer)
        if len(head) > MAX_HEAD or any(len(line) > MAX_LINE for line in head.split(b"\n")):
            self._fail("the egress proxy's answer to CONNECT is over the size limit")
        elif end is not None:
            self.head.set_result(head)
            if end.end() < len(buffer):
                self._after_head()

    def _after_head(self) -> None:
        # After a 2xx a TLS server speaks only once it has the client's hello, so
        # bytes now are not the upstream's; after a refusal they are its error page.
        self.trailing = True
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ProxyFailed("the egress proxy closed the connection before answering CONNECT"))

    def _fail(self, reason: str) -> None:
        if not self.head.done():
            self.head.set_exception(ProxyFailed(reason))
        if self._transport is not None:
            self._transport.close()

"""Which headers cross the proxy, computed once (SPEC §4, RFC 9110 §7.6.1)."""

from __future__ import annotations

from typing import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# Hop-by-hop headers: they describe one connection, never the message.
# Proxy-Authorization/-Authenticate are for a proxy, and this one takes none.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Authenticate",
    )
)
# Dropped from requests as well: Host is the upstream's, Authorization is
# ours, and Expect: 100-continue was answered by the sidecar itself.
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "expect"}
_RESPONSE_DROP = HOP_BY_HOP


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(token.strip().lower() for token in value.split(",") if token.strip())
    return tokens


def _filter(headers: CIMultiDictProxy[str], drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    if "Connection" in headers:
        drop = drop | _connection_tokens(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in drop)


def request_headers(headers: CIMultiDictProxy[str], authorization: str) -> CIMultiDict[str]:
    """The headers to send upstream: the client's, minus hop-by-hop, with our Authorization."""
    out = _filter(headers, _REQUEST_DROP)
    out["Authorization"] = authorization
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones."""
    return _filter(headers, _RESPONSE_DROP)


def websocket_headers(headers: CIMultiDictProxy[str], authorization: str, skip: Iterable[str]) -> CIMultiDict[str]:
    """Headers for the upstream WebSocket handshake; aiohttp writes the handshake ones."""
    out = request_headers(headers, authorization)
    for name in skip:
        out.popall(name, None)
    return out

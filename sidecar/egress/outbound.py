"""How sidecar connects out: one value built from settings, used by every outgoing path.

The lean forwarding client (proxy/upstream.py), the WebSocket path, refresh,
login and whoami all take their TLS context and egress proxy from here, so a
corporate CA or proxy configured once applies everywhere.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

import aiohttp

from sidecar.config import Settings
from sidecar.egress.proxies import ProxyRoute, choose_proxy
from sidecar.egress.tls import tls_context

# aiohttp adds these unless told not to; the client's own pass as sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class Outbound:
    """TLS context and proxy choice for one configuration."""

    __slots__ = ("_env", "_setting", "tls")

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.tls: ssl.SSLContext = tls_context(settings)
        self._setting = settings.proxy
        self._env = dict(os.environ if env is None else env)

    def proxy_for(self, url: str) -> ProxyRoute | None:
        return choose_proxy(url, self._setting, self._env)


def client_session(settings: Settings, outbound: Outbound, *, proxying: bool = False) -> aiohttp.ClientSession:
    """An aiohttp session using ``outbound``'s TLS context and the configured timeouts.

    ``proxying`` is the proxy's own session (WebSocket upgrades and refresh):
    pooled without limit, no cookies kept, no decompression and no default
    headers, so what a client sends passes as sent.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout)
    if not proxying:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=outbound.tls), timeout=timeout, trust_env=False)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=30, ssl=outbound.tls),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # never replay one client's cookies to another
        auto_decompress=False,
        timeout=timeout,
        trust_env=False,
    )

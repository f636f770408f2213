"""How sidecar connects out: one value built from settings, used by every outgoing path.

The lean forwarding client (proxy/upstream.py), the WebSocket path, refresh,
login and whoami all take their TLS context and egress proxy from here, so a
corporate CA or proxy configured once applies everywhere.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import TypedDict

import aiohttp
from multidict import CIMultiDict

from sidecar.config import Settings
from sidecar.egress.proxies import ProxyRoute, choose_proxy, configured_proxies
from sidecar.egress.tls import tls_context

# aiohttp adds these unless told not to; the client's own pass as sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class ProxyOptions(TypedDict, total=False):
    """Keywords for an aiohttp request (or ``ws_connect``) that send it to its target through an egress proxy."""

    headers: CIMultiDict[str]
    proxy: str
    proxy_headers: dict[str, str]


def proxy_options(route: ProxyRoute | None, target: str, headers: Mapping[str, str]) -> ProxyOptions:
    """aiohttp keywords that send a request for ``target`` with ``headers`` by way of ``route`` (None: direct).

    For an https (wss) target the credentials go on the CONNECT request
    (``proxy_headers``), which aiohttp keeps out of the tunnel.  For an http
    (ws) target aiohttp sends the request itself to the proxy, in absolute
    form, and does not copy ``proxy_headers`` into it: there the
    ``Proxy-Authorization`` header joins the request's own headers.
    """
    merged: CIMultiDict[str] = CIMultiDict(headers)
    if route is None:
        return {"headers": merged}
    if route.authorization is None:
        return {"headers": merged, "proxy": route.url}
    if target.partition(":")[0].lower() in ("https", "wss"):
        return {"headers": merged, "proxy": route.url, "proxy_headers": {"Proxy-Authorization": route.authorization}}
    merged["Proxy-Authorization"] = route.authorization
    return {"headers": merged, "proxy": route.url}


class Proxies:
    """The egress proxy choice for one configuration: the ``proxy`` setting and the environment.

    Proxy URLs are checked when this is made, so a bad HTTPS_PROXY fails at
    startup (naming the variable, never its value) rather than on a request.
    """

    __slots__ = ("_env", "_setting")

    def __init__(self, setting: str | None, env: Mapping[str, str] | None = None) -> None:
        self._setting = setting
        self._env = dict(os.environ if env is None else env)
        configured_proxies(setting, self._env)

    def route(self, url: str) -> ProxyRoute | None:
        """The proxy for ``url``, or None to go direct."""
        return choose_proxy(url, self._setting, self._env)

    def options(self, url: str, headers: Mapping[str, str] | None = None) -> ProxyOptions:
        """aiohttp keywords for one request to ``url`` with ``headers``: see ``proxy_options``."""
        return proxy_options(self.route(url), url, headers or {})


class Outbound:
    """TLS context and proxy choice for one configuration."""

    __slots__ = ("proxies", "tls")

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.tls: ssl.SSLContext = tls_context(settings)
        self.proxies = Proxies(settings.proxy, env)

    def proxy_for(self, url: str) -> ProxyRoute | None:
        return self.proxies.route(url)


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

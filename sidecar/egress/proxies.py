"""Which egress proxy (if any) a URL goes through: a pure decision from settings and environment.

The rules, as curl has them where the spec is silent:

- ``https://`` (and ``wss://``) targets use ``https_proxy``, else
  ``HTTPS_PROXY``; ``http://`` (and ``ws://``) targets use ``http_proxy``,
  else ``HTTP_PROXY``.  The lowercase name wins when both are set (curl,
  wget, Python's urllib).  An empty value means unset.  ``ALL_PROXY`` is not
  read: it is usually a SOCKS proxy, which sidecar does not speak.
- The ``proxy`` setting, when given, replaces those variables for both
  schemes; ``proxy = ""`` turns egress proxies off altogether, NO_PROXY and
  all.
- ``no_proxy`` (else ``NO_PROXY``) applies to the environment's proxies and
  to the ``proxy`` setting alike, as curl applies it to ``--proxy``: entries
  separated by commas (or spaces); ``*`` matches every host; a name matches
  itself and every subdomain, with or without a leading dot
  (``example.com`` and ``.example.com`` both match ``api.example.com`` and
  ``example.com``); an IP address matches itself and a CIDR block
  (``10.0.0.0/8``, ``fd00::/8``) the addresses in it; ``host:port`` (or
  ``[v6]:port``) matches that port only.  Names compare case-insensitively;
  a name never matches an IP address, nor the other way round.
- A proxy URL without a scheme is ``http://``; without a port it is the
  scheme's (80, 443); user and password in it are percent-decoded and sent
  as ``Proxy-Authorization: Basic`` (UTF-8), to the proxy only.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
from collections.abc import Mapping
from urllib.parse import SplitResult, unquote, urlsplit

from sidecar.errors import ConfigError

_DEFAULT_PORTS = {"http": 80, "https": 443}
# WebSocket URLs travel like the HTTP scheme they upgrade from.
_TARGET_SCHEMES = {"http": "http", "ws": "http", "https": "https", "wss": "https"}
_VARIABLES = {"http": ("http_proxy", "HTTP_PROXY"), "https": ("https_proxy", "HTTPS_PROXY")}
_NO_PROXY = ("no_proxy", "NO_PROXY")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRoute:
    """The forward proxy for one target, and the ``Proxy-Authorization`` value it needs (never shown).

    ``url`` is the proxy's ``scheme://host:port`` with no credentials in it;
    ``tls`` says the proxy itself is spoken to over TLS (an ``https://`` proxy).
    """

    url: str
    host: str
    port: int
    tls: bool = False
    authorization: str | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:
        shown = "***" if self.authorization else "None"
        return f"ProxyRoute(url={self.url!r}, authorization={shown})"

    __str__ = __repr__


def parse_proxy(value: str, source: str) -> ProxyRoute:
    """The route for proxy URL ``value``; ``source`` names the setting or variable in errors (never the value)."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigError(f"{source}: not a valid proxy URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"{source}: only http:// and https:// proxies are supported, not {scheme}://")
    if not host:
        raise ConfigError(f"{source}: the proxy URL has no host")
    port = port or _DEFAULT_PORTS[scheme]
    shown_host = f"[{host}]" if ":" in host else host
    return ProxyRoute(f"{scheme}://{shown_host}:{port}", host, port, scheme == "https", _authorization(parts))


def _authorization(parts: SplitResult) -> str | None:
    """``Basic`` credentials from the URL's user and password, percent-decoded; None without any."""
    if parts.username is None and parts.password is None:
        return None
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not user and not password:
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of ``names`` set to something non-empty in ``env``, with its value."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def configured_proxies(setting: str | None, env: Mapping[str, str]) -> dict[str, ProxyRoute | None]:
    """The proxy for each target scheme before NO_PROXY, so a bad value fails at startup, naming its source."""
    if setting is not None:
        route = parse_proxy(setting, "proxy") if setting.strip() else None
        return {"http": route, "https": route}
    routes: dict[str, ProxyRoute | None] = {}
    for scheme, names in _VARIABLES.items():
        found = _first(env, names)
        routes[scheme] = parse_proxy(found[1], found[0]) if found else None
    return routes


def choose_proxy(target: str, setting: str | None, env: Mapping[str, str]) -> ProxyRoute | None:
    """The proxy for ``target`` (an http(s) or ws(s) URL), or None to go direct.

    ``setting`` is the ``proxy`` key: None defers to the environment, ""
    means no proxy, anything else is the proxy URL.  Raises ConfigError for a
    proxy URL that cannot be used, or a target that is not a URL.
    """
    if setting is not None and not setting.strip():
        return None
    try:
        parts = urlsplit(target)
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigError("egress: the target is not a valid URL") from None
    scheme = _TARGET_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not host:
        raise ConfigError("egress: the target is not an http(s) URL")
    if setting is not None:
        route: ProxyRoute | None = parse_proxy(setting, "proxy")
    else:
        found = _first(env, _VARIABLES[scheme])
        route = parse_proxy(found[1], found[0]) if found else None
    if route is None:
        return None
    no_proxy = _first(env, _NO_PROXY)
    if no_proxy is not None and bypassed(host, port or _DEFAULT_PORTS[scheme], no_proxy[1]):
        return None
    return route


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``host:port`` is exempt from proxying under the NO_PROXY list ``no_proxy``."""
    name = host.lower().rstrip(".")
    address = _address(name)
    for entry in no_proxy.replace(",", " ").split():
        if entry == "*":
            return True
        pattern, entry_port = _split_port(entry.lower())
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            if _address_matches(address, pattern):
                return True
            continue
        pattern = pattern.strip(".")
        if pattern and _address(pattern) is None and (name == pattern or name.endswith("." + pattern)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """``entry`` without its ``:port`` (``[v6]:port`` too), and the port; a bare IPv6 address has none."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        return inside, _port(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        pattern, _, port = entry.partition(":")
        return pattern, _port(port)
    return entry, None


def _port(text: str) -> int | None:
    # An unusable port makes the entry match no port at all, not every port.
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else -1


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _address_matches(address: IPAddress, pattern: str) -> bool:
    try:
        network = ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None and network.version == 4:
        return address.ipv4_mapped in network
    return address.version == network.version and address in network

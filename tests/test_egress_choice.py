"""Which egress proxy a URL goes through (sidecar/egress/proxies.py): a pure function, tested without sockets."""

from __future__ import annotations

import base64

import pytest
from multidict import CIMultiDict

from sidecar.egress.outbound import Proxies, proxy_options
from sidecar.egress.proxies import ProxyRoute, bypassed, choose_proxy, parse_proxy
from sidecar.errors import ConfigError

CORP = "http://proxy.corp:3128"
OTHER = "http://other.corp:8080"


def url_of(route: ProxyRoute | None) -> str | None:
    return None if route is None else route.url


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- which variable ------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "env", "expected"),
    [
        ("https://api.example/x", {"HTTPS_PROXY": CORP}, CORP),
        ("https://api.example/x", {"https_proxy": CORP}, CORP),
        ("http://api.example/x", {"HTTP_PROXY": CORP}, CORP),
        ("http://api.example/x", {"http_proxy": CORP}, CORP),
        ("wss://api.example/ws", {"HTTPS_PROXY": CORP}, CORP),
        ("ws://api.example/ws", {"HTTP_PROXY": CORP}, CORP),
        ("https://api.example/x", {"HTTP_PROXY": CORP}, None),
        ("http://api.example/x", {"HTTPS_PROXY": CORP}, None),
        ("https://api.example/x", {}, None),
        ("https://api.example/x", {"ALL_PROXY": CORP, "all_proxy": CORP}, None),
    ],
)
def test_the_target_scheme_picks_the_variable(target: str, env: dict[str, str], expected: str | None) -> None:
    """https (and wss) targets read HTTPS_PROXY, http (and ws) targets HTTP_PROXY, in either case; ALL_PROXY is not read."""
    assert url_of(choose_proxy(target, None, env)) == expected


def test_lowercase_variable_wins_over_uppercase() -> None:
    """With https_proxy and HTTPS_PROXY both set, the lowercase one is used (as curl, wget and urllib do)."""
    env = {"https_proxy": CORP, "HTTPS_PROXY": OTHER, "http_proxy": OTHER, "HTTP_PROXY": CORP}
    assert url_of(choose_proxy("https://api.example/", None, env)) == CORP
    assert url_of(choose_proxy("http://api.example/", None, env)) == OTHER


def test_empty_variable_counts_as_unset() -> None:
    """An empty https_proxy falls through to HTTPS_PROXY; both empty means no proxy."""
    assert url_of(choose_proxy("https://api.example/", None, {"https_proxy": "", "HTTPS_PROXY": CORP})) == CORP
    assert choose_proxy("https://api.example/", None, {"https_proxy": " ", "HTTPS_PROXY": ""}) is None


# -- the proxy setting ---------------------------------------------------------


def test_setting_overrides_the_environment_for_both_schemes() -> None:
    """An explicit ``proxy`` replaces HTTPS_PROXY and HTTP_PROXY alike."""
    env = {"HTTPS_PROXY": OTHER, "HTTP_PROXY": OTHER}
    assert url_of(choose_proxy("https://api.example/", CORP, env)) == CORP
    assert url_of(choose_proxy("http://api.example/", CORP, env)) == CORP
    assert url_of(choose_proxy("http://api.example/", CORP, {})) == CORP


def test_empty_setting_turns_proxies_off() -> None:
    """``proxy = ""`` means no proxy whatever the environment says."""
    env = {"HTTPS_PROXY": CORP, "HTTP_PROXY": CORP, "NO_PROXY": ""}
    assert choose_proxy("https://api.example/", "", env) is None
    assert choose_proxy("http://api.example/", "", env) is None


def test_no_proxy_applies_to_the_setting_too() -> None:
    """NO_PROXY exempts a host from an explicit ``proxy`` as well (as curl applies it to --proxy)."""
    assert choose_proxy("https://api.internal/", CORP, {"NO_PROXY": "internal"}) is None
    assert url_of(choose_proxy("https://api.example/", CORP, {"NO_PROXY": "internal"})) == CORP


# -- NO_PROXY -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "no_proxy"),
    [
        ("api.example.com", 443, "*"),
        ("api.example.com", 443, "other.test, *"),
        ("api.example.com", 443, "example.com"),
        ("api.example.com", 443, ".example.com"),
        ("example.com", 443, ".example.com"),
        ("example.com", 443, "example.com"),
        ("API.Example.COM", 443, "example.com"),
        ("api.example.com.", 443, "EXAMPLE.com"),
        ("api.example.com", 443, "a.test,example.com,b.test"),
        ("api.example.com", 443, "a.test example.com"),
        ("api.example.com", 443, " a.test , example.com "),
        ("api.example.com", 8443, "example.com:8443"),
        ("10.1.2.3", 443, "10.1.2.3"),
        ("10.1.2.3", 443, "10.0.0.0/8"),
        ("10.1.2.3", 80, "10.1.2.3:80"),
        ("::1", 443, "::1"),
        ("::1", 443, "[::1]"),
        ("::1", 8080, "[::1]:8080"),
        ("fd00::5", 443, "fd00::/8"),
        ("::ffff:10.1.2.3", 443, "10.0.0.0/8"),
        ("localhost", 80, "localhost"),
    ],
)
def test_no_proxy_entries_that_match(host: str, port: int, no_proxy: str) -> None:
    """curl's rules: ``*``, domain suffixes with or without a dot, exact hosts, IPs and CIDR blocks, optional port."""
    assert bypassed(host, port, no_proxy)


@pytest.mark.parametrize(
    ("host", "port", "no_proxy"),
    [
        ("api.example.com", 443, ""),
        ("badexample.com", 443, "example.com"),
        ("badexample.com", 443, ".example.com"),
        ("example.com.evil.test", 443, "example.com"),
        ("api.example.com", 443, "api.example.com.au"),
        ("api.example.com", 443, "example.com:8443"),
        ("api.example.com", 443, "example.com:notaport"),
        ("10.1.2.3", 443, "10.1.2.4"),
        ("10.1.2.3", 443, "11.0.0.0/8"),
        ("10.1.2.3", 443, "10.1.2.3:80"),
        ("10.1.2.3", 443, "10.1"),
        ("::1", 443, "::2"),
        ("::1", 443, "[::1]:8080"),
        ("fe80::1", 443, "fd00::/8"),
        ("api.example.com", 443, "10.0.0.0/8"),
        ("127.0.0.1", 443, "localhost"),
        ("api.example.com", 443, "*.example.com.invalid"),
    ],
)
def test_no_proxy_entries_that_do_not_match(host: str, port: int, no_proxy: str) -> None:
    """A suffix only matches on a label boundary; ports, addresses and names are compared as what they are."""
    assert not bypassed(host, port, no_proxy)


def test_no_proxy_uses_the_targets_default_port() -> None:
    """``host:443`` in NO_PROXY matches an https URL without a port, not an http one."""
    env = {"HTTPS_PROXY": CORP, "HTTP_PROXY": CORP, "NO_PROXY": "api.example:443"}
    assert choose_proxy("https://api.example/x", None, env) is None
    assert url_of(choose_proxy("http://api.example/x", None, env)) == CORP


def test_lowercase_no_proxy_wins() -> None:
    """no_proxy is read before NO_PROXY, as the proxy variables are."""
    env = {"HTTPS_PROXY": CORP, "no_proxy": "a.test", "NO_PROXY": "api.example"}
    assert url_of(choose_proxy("https://api.example/", None, env)) == CORP
    assert choose_proxy("https://a.test/", None, env) is None


def test_no_proxy_matches_ip_literal_targets() -> None:
    """An IPv6 literal URL is matched by its address, not its bracketed text."""
    env = {"HTTP_PROXY": CORP, "NO_PROXY": "::1,127.0.0.0/8"}
    assert choose_proxy("http://[::1]:8080/", None, env) is None
    assert choose_proxy("http://127.0.0.1:8080/", None, env) is None
    assert url_of(choose_proxy("http://192.0.2.1/", None, env)) == CORP


# -- the route -----------------------------------------------------------------


def test_credentials_become_proxy_authorization_percent_decoded() -> None:
    """user:password in the proxy URL is percent-decoded and sent as Basic; the route's URL carries none of it."""
    route = parse_proxy("http://al%40ice:p%3Ass%2Fw%C3%B6rd@proxy.corp:3128", "proxy")
    assert route.url == "http://proxy.corp:3128"
    assert route.authorization == basic("al@ice", "p:ss/wörd")


def test_user_without_password_still_authenticates() -> None:
    """``http://alice@proxy`` sends ``alice:`` (an empty password), as curl does."""
    assert parse_proxy("http://alice@proxy.corp:3128", "proxy").authorization == basic("alice", "")
    assert parse_proxy("http://proxy.corp:3128", "proxy").authorization is None


def test_route_never_shows_credentials() -> None:
    """repr and str of a route name the proxy but never the user or password."""
    route = parse_proxy("http://alice:s3cret@proxy.corp:3128", "proxy")
    for text in (repr(route), str(route), f"{route}", repr([route])):
        assert "s3cret" not in text
        assert "alice" not in text
        assert route.authorization is not None and route.authorization not in text
        assert "proxy.corp:3128" in text


@pytest.mark.parametrize(
    ("value", "url", "tls"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128", False),
        ("http://proxy.corp", "http://proxy.corp:80", False),
        ("https://proxy.corp", "https://proxy.corp:443", True),
        ("HTTP://Proxy.Corp:3128/ignored/path", "http://proxy.corp:3128", False),
        ("http://[::1]:3128", "http://[::1]:3128", False),
    ],
)
def test_proxy_url_forms(value: str, url: str, tls: bool) -> None:
    """No scheme means http://; no port means the scheme's; a path is ignored; an https proxy is spoken to over TLS."""
    route = parse_proxy(value, "HTTPS_PROXY")
    assert (route.url, route.tls) == (url, tls)


@pytest.mark.parametrize("value", ["socks5://proxy.corp:1080", "http://", "http://proxy.corp:99999", "ftp://p:21"])
def test_unusable_proxy_url_names_its_source_not_its_value(value: str) -> None:
    """A bad proxy variable is a ConfigError naming the variable, without echoing the (maybe secret) value."""
    with pytest.raises(ConfigError, match=r"^HTTPS_PROXY: ") as caught:
        choose_proxy("https://api.example/", None, {"HTTPS_PROXY": value.replace("//", "//bob:pw@", 1)})
    assert "pw" not in str(caught.value)


def test_bad_environment_proxy_fails_when_proxies_are_made() -> None:
    """Proxies checks every configured proxy up front, so a bad one fails at startup, not on a request."""
    with pytest.raises(ConfigError, match=r"^http_proxy: "):
        Proxies(None, {"http_proxy": "socks5://127.0.0.1:1080"})
    Proxies("", {"http_proxy": "socks5://127.0.0.1:1080"})  # turned off: never used, never checked


# -- aiohttp keywords ----------------------------------------------------------


def test_https_target_gets_credentials_on_connect_only() -> None:
    """For an https target Proxy-Authorization goes in proxy_headers (the CONNECT), not among the request's headers."""
    route = parse_proxy("http://alice:s3cret@proxy.corp:3128", "proxy")
    options = proxy_options(route, "https://api.example/x", {"Authorization": "Bearer t"})
    assert options["proxy"] == "http://proxy.corp:3128"
    assert options["proxy_headers"] == {"Proxy-Authorization": basic("alice", "s3cret")}
    assert "Proxy-Authorization" not in options["headers"]
    assert options["headers"]["Authorization"] == "Bearer t"


def test_http_target_carries_credentials_in_its_own_headers() -> None:
    """For an http target (absolute form to the proxy) Proxy-Authorization joins the request's headers."""
    route = parse_proxy("http://alice:s3cret@proxy.corp:3128", "proxy")
    options = proxy_options(route, "ws://api.example/ws", CIMultiDict([("X-A", "1"), ("X-A", "2")]))
    assert options["headers"]["Proxy-Authorization"] == basic("alice", "s3cret")
    assert options["headers"].getall("X-A") == ["1", "2"]
    assert "proxy_headers" not in options


def test_direct_request_gets_no_proxy_keywords() -> None:
    """Without a route the request goes direct: only its own headers."""
    options = proxy_options(None, "https://api.example/", {"Accept": "application/json"})
    assert set(options) == {"headers"}
    assert dict(options["headers"]) == {"Accept": "application/json"}

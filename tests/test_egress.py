"""Egress proxies end to end: a real tinyproxy between the sidecar and the mock cloud.

tinyproxy logs each request line before it forwards it (tests/helpers/forward_proxy.py),
so a test can say exactly what went through it: ``GET http://...`` (absolute form,
an http upstream) or ``CONNECT host:port`` (a tunnel, an https upstream), and
also that nothing did.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    TIMEOUT,
    ProxyFactory,
    child_env,
    finish,
    read_lines_until,
    run_sidecar,
    seed_expired,
    seed_store,
    start_sidecar,
)
from helpers.certs import make_ca
from helpers.forward_proxy import ForwardProxy, running_tinyproxy

from sidecar.mockcloud import MockCloud

USER, PASSWORD = "egress-user", "pr0xy-s3cret-pw"


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[ForwardProxy]:
    async with running_tinyproxy(tmp_path) as proxy:
        yield proxy


@pytest.fixture
async def tinyproxy_with_auth(tmp_path: Path) -> AsyncIterator[ForwardProxy]:
    async with running_tinyproxy(tmp_path, auth=(USER, PASSWORD)) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own proxy variables must not decide these tests."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].split("/", 1)[0]


async def _echo(client: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with client.get(f"{base}/api/v1/echo?x=1") as response:
        assert response.status == 200, await response.text()
        answer: dict[str, object] = await response.json()
        return answer


async def test_http_upstream_goes_through_the_proxy_setting_in_absolute_form(
    cloud: MockCloud, store_path: Path, make_proxy: ProxyFactory, client: aiohttp.ClientSession, tinyproxy: ForwardProxy
) -> None:
    seed_store(store_path, cloud)
    sidecar = await make_proxy(proxy=tinyproxy.url)
    await _echo(client, sidecar.url)
    assert f"GET http://127.0.0.1:{_port(cloud.base_url)}/api/v1/echo?x=1 HTTP/1.1" in await tinyproxy.requests()


async def test_http_proxy_variable_is_honoured_and_no_proxy_bypasses_it(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_store(store_path, cloud)
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    through = await make_proxy()
    await _echo(client, through.url)
    assert len(await tinyproxy.requests()) == 1
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    bypassing = await make_proxy()
    await _echo(client, bypassing.url)
    assert len(await tinyproxy.requests()) == 1  # nothing more went through the proxy


async def test_empty_proxy_setting_turns_the_variables_off(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_store(store_path, cloud)
    monkeypatch.setenv("http_proxy", tinyproxy.url)
    sidecar = await make_proxy(proxy="")
    await _echo(client, sidecar.url)
    assert await tinyproxy.requests() == []


async def test_refresh_goes_through_the_proxy(
    cloud: MockCloud, store_path: Path, make_proxy: ProxyFactory, client: aiohttp.ClientSession, tinyproxy: ForwardProxy
) -> None:
    seed_expired(store_path, cloud)
    sidecar = await make_proxy(proxy=tinyproxy.url)
    await _echo(client, sidecar.url)
    assert cloud.refresh_calls == 1
    lines = await tinyproxy.requests()
    assert any(line.startswith("POST http://") and "/auth/token/refresh" in line for line in lines), lines


async def test_https_upstream_goes_through_a_connect_tunnel(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy: ForwardProxy,
    tmp_path: Path,
) -> None:
    """TLS runs inside the tunnel: the upstream's certificate is checked against ca_file, the proxy sees only CONNECT."""
    private = make_ca(tmp_path)
    https_base = await cloud.add_listener(ssl_context=private.server_context())
    seed_store(store_path, cloud)
    sidecar = await make_proxy(upstream=https_base, proxy=tinyproxy.url, ca_file=str(private.pem))
    answer = await _echo(client, sidecar.url)
    assert answer["path"] == "/api/v1/echo"
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{_port(https_base)} HTTP/1.1"]


async def test_websocket_goes_through_a_connect_tunnel(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy: ForwardProxy,
    tmp_path: Path,
) -> None:
    """A wss upstream's handshake goes through CONNECT, as for plain requests."""
    private = make_ca(tmp_path)
    https_base = await cloud.add_listener(ssl_context=private.server_context())
    seed_store(store_path, cloud)
    sidecar = await make_proxy(upstream=https_base, proxy=tinyproxy.url, ca_file=str(private.pem))
    async with client.ws_connect(f"{sidecar.url}/api/v1/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
    assert await tinyproxy.requests() == [f"CONNECT 127.0.0.1:{_port(https_base)} HTTP/1.1"]


async def test_proxy_credentials_reach_the_proxy_only(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy_with_auth: ForwardProxy,
) -> None:
    """tinyproxy demands Basic auth (so it got it); the upstream never sees Proxy-Authorization; no log line has the password."""
    seed_expired(store_path, cloud)
    sidecar = await make_proxy(proxy=tinyproxy_with_auth.url_with_credentials)
    answer = await _echo(client, sidecar.url)
    headers = answer["headers"]
    assert isinstance(headers, list)
    names = [name.lower() for name, _ in headers]
    assert "proxy-authorization" not in names
    assert cloud.refresh_calls == 1
    assert len(await tinyproxy_with_auth.requests()) == 2  # the refresh and the request
    assert PASSWORD not in sidecar.log.getvalue()


async def test_refused_tunnel_is_a_502_naming_the_proxy_status(
    cloud: MockCloud,
    store_path: Path,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tinyproxy_with_auth: ForwardProxy,
    tmp_path: Path,
) -> None:
    private = make_ca(tmp_path)
    https_base = await cloud.add_listener(ssl_context=private.server_context())
    seed_store(store_path, cloud)
    wrong = tinyproxy_with_auth.url.replace("http://", f"http://{USER}:wrong-password@")
    sidecar = await make_proxy(upstream=https_base, proxy=wrong, ca_file=str(private.pem))
    async with client.get(f"{sidecar.url}/api/v1/echo") as response:
        body = await response.text()
        assert response.status == 502
        assert response.headers["X-Sidecar-Error"] == "upstream-unreachable"
    # tinyproxy 1.11 refuses with 401 where RFC 9110 says 407; either way the status is named.
    assert "refused the tunnel" in body and ("(HTTP 407" in body or "(HTTP 401" in body)
    assert "wrong-password" not in body and "wrong-password" not in sidecar.log.getvalue()


async def test_cli_token_and_status_go_through_the_proxy_variables(
    cloud: MockCloud, tmp_path: Path, tinyproxy_with_auth: ForwardProxy
) -> None:
    """`sidecar token` refreshes and `sidecar status` asks whoami through HTTP_PROXY; neither prints the password."""
    xdg = tmp_path / "xdg"
    store = xdg / "sidecar" / "tokens.json"
    store.parent.mkdir(parents=True)
    seed_expired(store, cloud)
    env = child_env(xdg, HTTP_PROXY=tinyproxy_with_auth.url_with_credentials)
    token = await run_sidecar(env, "token")
    assert token.code == 0, token.err
    status = await run_sidecar(env, "status", "--json")
    assert status.code == 0, status.err
    report = json.loads(status.out)
    assert report["loggedIn"] is True
    lines = await tinyproxy_with_auth.requests()
    assert any("/auth/token/refresh" in line for line in lines), lines
    assert any("/auth/whoami" in line for line in lines), lines
    for run in (token, status):
        assert PASSWORD not in run.out + run.err
    assert cloud.refresh_calls == 1
    assert os.environ.get("HTTP_PROXY") is None


async def test_cli_poll_login_goes_through_the_proxy_setting(
    cloud: MockCloud, tmp_path: Path, tinyproxy: ForwardProxy
) -> None:
    """`sidecar login --flow poll --proxy URL` polls the cloud through the proxy and stores the pair."""
    xdg = tmp_path / "xdg"
    store = tmp_path / "tokens.json"
    process = await start_sidecar(
        child_env(xdg),
        "login",
        "--flow",
        "poll",
        "--upstream",
        cloud.base_url,
        "--store",
        str(store),
        "--proxy",
        tinyproxy.url,
    )
    seen = await read_lines_until(process.stderr, "/cli-login?code=", TIMEOUT, "stderr")
    url = next(word for word in seen[-1].split() if "/cli-login?code=" in word)
    async with aiohttp.ClientSession() as browser, browser.get(url) as response:  # the user's browser: direct
        assert response.status == 200
    run = await finish(process, "".join(seen))
    assert run.code == 0, run.err
    assert store.exists()
    lines = await tinyproxy.requests()
    assert lines and all(line.startswith(("POST http://", "GET http://")) for line in lines), lines

"""The proxy against the contract of SPEC §4: problem responses, guards and the token paths.

Every test runs a real sidecar on loopback in front of the mock cloud (the
``make_proxy`` fixture) and talks to it with a real client, or with a raw
socket where the exact bytes on the wire matter.  Expiry is driven by the
fake clock the proxy and the cloud share, never by sleeping.

Forwarding (paths, headers, framing, streams) is in test_proxy_forwarding.py;
local endpoints, metrics and the access log in test_proxy_local.py.  The
helpers are in tests/helpers/proxying.py; the ``client``, ``login`` and
``proxy`` fixtures are in conftest.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    FakeClock,
    ProxyFactory,
    RunningProxy,
    poll_until,
    seed_store,
    stored,
)
from helpers.proxying import (
    PAST_EXPIRY,
    assert_problem,
    authority,
    fetch,
    raw_get,
    stored_tokens,
    wait_for_log_lines,
)
from helpers.wire import Reply, raw_request

from sidecar.config import Settings
from sidecar.mockcloud import MockCloud
from sidecar.server.app import running_sidecar
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair

# -- the problem responses of SPEC §4 ---------------------------------------


async def test_without_a_login_requests_get_relogin_required(
    cloud: MockCloud, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With no token store every request gets 511 relogin-required naming the login command, and the upstream sees nothing."""
    p = await make_proxy()
    reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    document = assert_problem(reply, 511, "relogin-required")
    assert document["login"] == f"sidecar login --upstream {cloud.base_url}"
    assert cloud.requests_seen == 0


async def test_dead_refresh_token_gets_relogin_required(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """An expired token whose refresh token is rejected gets 511 relogin-required after one refresh call and nothing else upstream."""
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    document = assert_problem(reply, 511, "relogin-required")
    assert document["login"] == f"sidecar login --upstream {cloud.base_url}"
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 1  # the refresh call only


async def test_relogin_hint_names_the_stores_upstream_after_it_is_cleared(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """With the upstream taken from the store's apiUrl, the 511 after a dead refresh token still names that upstream."""
    p = await make_proxy(upstream=None)
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    document = assert_problem(await fetch(client, "GET", p.url + "/api/v1/echo"), 511, "relogin-required")
    assert document["login"] == f"sidecar login --upstream {cloud.base_url}"


async def test_relogin_status_setting_replaces_511(
    cloud: MockCloud, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """relogin_status=401 makes the re-login response a 401, still relogin-required."""
    p = await make_proxy(relogin_status=401)
    reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    document = assert_problem(reply, 401, "relogin-required")
    assert document["login"] == f"sidecar login --upstream {cloud.base_url}"
    assert cloud.requests_seen == 0


async def test_transient_refresh_failure_after_401_gets_refresh_unavailable(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A 401 from the upstream while the token endpoint fails gets 503 refresh-unavailable with Retry-After."""
    cloud.revoke_access_tokens()
    cloud.fail_next_refreshes(1)
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    assert_problem(reply, 503, "refresh-unavailable")
    assert int(reply.headers["Retry-After"]) >= 1
    assert cloud.refresh_calls == 1


async def test_401s_while_backing_off_do_not_call_the_token_endpoint(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """After a failed refresh, further 401s get 503 refresh-unavailable without another refresh call until the backoff ends."""
    cloud.revoke_access_tokens()
    cloud.fail_next_refreshes(1)
    for _ in range(5):
        assert_problem(await fetch(client, "GET", proxy.url + "/api/v1/echo"), 503, "refresh-unavailable")
    assert cloud.refresh_calls == 1


async def test_after_the_backoff_a_401_refreshes_and_succeeds(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """Once the backoff after a failed refresh has passed, the next 401 refreshes and the request succeeds."""
    cloud.revoke_access_tokens()
    cloud.fail_next_refreshes(1)
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 503
    clock.advance(2)  # the first backoff is 1 s +- 20 %
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 200
    assert cloud.refresh_calls == 2


async def test_no_access_token_and_failing_refresh_gets_refresh_unavailable(
    store_path: Path, cloud: MockCloud, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A store holding only a refresh token, while the token endpoint fails, gets 503 refresh-unavailable with Retry-After."""
    grant = cloud.issue_pair()
    TokenFile(store_path).write(
        TokenPair(access_token=None, refresh_token=grant["refreshToken"], api_url=cloud.base_url)
    )
    cloud.fail_next_refreshes(1)
    p = await make_proxy()
    reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    assert_problem(reply, 503, "refresh-unavailable")
    assert int(reply.headers["Retry-After"]) >= 1
    assert (cloud.refresh_calls, cloud.requests_seen) == (1, 1)  # the refresh only


async def test_unreachable_upstream_gets_upstream_unreachable(
    login: TokenPair, cloud: MockCloud, make_proxy: ProxyFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    """An upstream port nobody listens on gets 502 upstream-unreachable."""
    p = await make_proxy(upstream=f"http://127.0.0.1:{unused_tcp_port}")
    reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    assert_problem(reply, 502, "upstream-unreachable")
    assert cloud.requests_seen == 0


async def test_slow_upstream_gets_upstream_timeout(
    login: TokenPair, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An upstream that answers after read_timeout gets 504 upstream-timeout, without waiting for it."""
    p = await make_proxy(read_timeout=0.3)
    started = asyncio.get_running_loop().time()
    reply = await fetch(client, "GET", p.url + "/api/v1/slow?seconds=5")
    assert_problem(reply, 504, "upstream-timeout")
    assert asyncio.get_running_loop().time() - started < 3


# -- local guards -------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8787", "localhost.evil.example", "127.0.0.2"])
async def test_foreign_host_header_gets_host_not_allowed(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession, host: str
) -> None:
    """A Host outside allowed_hosts (DNS rebinding) gets 403 host-not-allowed and is not forwarded."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo", headers={"Host": host})
    assert_problem(reply, 403, "host-not-allowed")
    assert cloud.requests_seen == 0


async def test_localhost_with_any_port_is_an_allowed_host(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """Host: localhost with another port passes the Host guard."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo", headers={"Host": "localhost:1234"})
    assert reply.status == 200


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}],
    ids=["foreign-origin", "null-origin", "sec-fetch-site"],
)
async def test_cross_site_request_gets_origin_not_allowed(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A cross-site browser request gets 403 origin-not-allowed and is not forwarded."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo", headers=headers)
    assert_problem(reply, 403, "origin-not-allowed")
    assert cloud.requests_seen == 0


async def test_cross_site_fetch_is_refused_even_with_own_origin(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """Sec-Fetch-Site: cross-site wins over an Origin that looks like the sidecar's own."""
    reply = await fetch(
        client, "GET", proxy.url + "/api/v1/echo", headers={"Origin": proxy.url, "Sec-Fetch-Site": "cross-site"}
    )
    assert_problem(reply, 403, "origin-not-allowed")
    assert cloud.requests_seen == 0


async def test_listed_origin_is_allowed(
    login: TokenPair, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An Origin in allowed_origins is forwarded."""
    p = await make_proxy(allowed_origins=("http://app.example",))
    reply = await fetch(
        client, "GET", p.url + "/api/v1/echo", headers={"Origin": "http://app.example", "Sec-Fetch-Site": "same-site"}
    )
    assert reply.status == 200


async def test_own_origin_is_allowed(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """A page served by the sidecar's own origin may call it."""
    reply = await fetch(
        client, "GET", proxy.url + "/api/v1/echo", headers={"Origin": proxy.url, "Sec-Fetch-Site": "same-origin"}
    )
    assert reply.status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/api/../x",
        "/api/%2e%2e/x",
        "/api/%252e%252e/x",
        "/a/..%2fb",
        "/api/v1/echo/%2E%2E",
        "/api/./x",
        "/api/v1/echo/..%5c..%5cx",
    ],
)
async def test_dot_segment_target_gets_bad_target(proxy: RunningProxy, cloud: MockCloud, target: str) -> None:
    """A path with a dot-segment, encoded once or twice, gets 400 bad-target and is not forwarded."""
    reply = await raw_request(proxy.url, raw_get(proxy, target))
    assert_problem(reply, 400, "bad-target")
    assert cloud.requests_seen == 0


@pytest.mark.parametrize("where", ["elsewhere", "the-upstream"])
async def test_absolute_form_target_gets_bad_target(proxy: RunningProxy, cloud: MockCloud, where: str) -> None:
    """An absolute-form request target gets 400 bad-target, even one naming the upstream."""
    target = "http://example.com/" if where == "elsewhere" else cloud.base_url + "/api/v1/echo"
    reply = await raw_request(proxy.url, raw_get(proxy, target))
    assert_problem(reply, 400, "bad-target")
    assert cloud.requests_seen == 0


async def test_connect_gets_method_not_allowed(proxy: RunningProxy, cloud: MockCloud) -> None:
    """CONNECT gets 405 (a bad-target problem) and opens no tunnel."""
    upstream = authority(cloud.base_url)
    reply = await raw_request(proxy.url, f"CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}")
    assert_problem(reply, 405, "bad-target")
    assert "CONNECT" not in reply.headers["Allow"]
    assert cloud.requests_seen == 0


# -- refreshing and the 401 path (SPEC §3) ----------------------------------


async def test_requests_at_expiry_share_one_refresh(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession, store_path: Path
) -> None:
    """200 concurrent requests at expiry cause exactly one refresh call and all succeed with the new token."""
    clock.advance(PAST_EXPIRY)
    replies = await asyncio.gather(*(fetch(client, "GET", proxy.url + "/api/v1/echo") for _ in range(200)))
    assert [reply.status for reply in replies] == [200] * 200
    assert cloud.refresh_calls == 1
    current = json.loads(store_path.read_text())["accessToken"]
    assert {reply.json()["authorization"] for reply in replies} == {f"Bearer {current}"}


async def test_revoked_token_is_refreshed_and_the_body_replayed(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """After a server-side revocation a 100 KiB POST succeeds after one refresh, with identical bytes upstream."""
    body = os.urandom(100 * 1024)
    cloud.revoke_access_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=body)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert reply.json()["body_length"] == len(body)
    assert cloud.refresh_calls == 1


async def test_replayed_request_is_logged_as_retried_and_refreshed(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """The access-log line of a request replayed after a 401 says retried and refreshed."""
    cloud.revoke_access_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=b"x" * 1000)
    assert reply.status == 200
    (line,) = await wait_for_log_lines(proxy, 1)
    assert (line["status"], line["upstream_status"], line["retried"], line["refreshed"]) == (200, 200, True, True)


async def _chunks(data: bytes, size: int = 512) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_replay_limit_gets_the_401_marked_not_replayable(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession, framing: str
) -> None:
    """A body over replay_limit is not replayed: the client gets the 401 with X-Sidecar-Retry, the refresh still happens."""
    p = await make_proxy(replay_limit=1024)
    body = os.urandom(4096)
    cloud.revoke_access_tokens()
    data = body if framing == "content-length" else _chunks(body)
    reply = await fetch(client, "POST", p.url + "/api/v1/echo", data=data)
    assert reply.status == 401
    assert reply.headers["X-Sidecar-Retry"] == "not-replayable"
    assert cloud.refresh_calls == 1
    again = await fetch(client, "POST", p.url + "/api/v1/echo", data=body)
    assert again.status == 200
    assert cloud.refresh_calls == 1


async def test_concurrent_401s_with_one_token_share_one_refresh(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """Ten requests rejected with the same revoked token cause one refresh and all succeed."""
    cloud.revoke_access_tokens()
    replies = await asyncio.gather(*(fetch(client, "GET", proxy.url + "/api/v1/echo") for _ in range(10)))
    assert [reply.status for reply in replies] == [200] * 10
    assert cloud.refresh_calls == 1


async def test_401_for_a_token_already_replaced_retries_without_refreshing(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A 401 for a token another process already replaced is retried with the replacement, not refreshed again."""
    first = await make_proxy()
    second = await make_proxy()
    assert (await fetch(client, "GET", second.url + "/api/v1/echo")).status == 200  # second now holds the old token
    cloud.revoke_access_tokens()
    refreshed = await fetch(client, "GET", first.url + "/api/v1/echo")
    assert cloud.refresh_calls == 1
    reply = await fetch(client, "GET", second.url + "/api/v1/echo")
    assert reply.status == 200
    assert reply.json()["authorization"] == refreshed.json()["authorization"]
    assert cloud.refresh_calls == 1
    lines = await wait_for_log_lines(second, 2)
    assert lines[-1]["retried"] is True


async def test_persistent_401_is_passed_on_after_one_retry(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """An upstream that keeps answering 401 gets one refresh and one retry, then the client sees its 401."""
    reply = await fetch(client, "GET", proxy.url + "/api/v1/status/401")
    assert reply.status == 401
    assert "X-Sidecar-Error" not in reply.headers
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 3  # the request, the refresh, the one retry


# -- no refresh storms from 401s (SPEC §3) ----------------------------------

# An endpoint of the mock cloud that answers 401 to a valid token, as one
# would with insufficient_scope: refreshing never cures it.
UNCURED_401 = "/api/v1/status/401"


async def start_cooldown(proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession) -> None:
    """Send one request to the uncured 401: it forces one refresh, is retried, and its retry's 401 starts the cooldown."""
    reply = await fetch(client, "GET", proxy.url + UNCURED_401)
    assert reply.status == 401
    assert "X-Sidecar-Retry" not in reply.headers
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 3  # the request, the refresh, the one retry


async def test_a_401_that_a_refresh_did_not_cure_stops_forcing_refreshes(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """After a retry with a freshly forced token is rejected again, 20 more 401s force no refresh and reach the client marked not-retried."""
    await start_cooldown(proxy, cloud, client)
    # One after another, as the storm came: concurrent 401s would share one refresh anyway.
    replies = [await fetch(client, "GET", proxy.url + UNCURED_401) for _ in range(20)]
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 3 + 20  # each sent once, never retried
    assert [reply.status for reply in replies] == [401] * 20
    assert {reply.headers.get("X-Sidecar-Retry") for reply in replies} == {"not-retried"}
    assert {reply.json()["status"] for reply in replies} == {401}  # the upstream's 401, as it came


async def test_after_the_cooldown_a_401_forces_a_refresh_again(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """29 s into the cooldown a 401 still forces no refresh; at 30 s it forces one again and is retried."""
    await start_cooldown(proxy, cloud, client)
    clock.advance(29)
    held = await fetch(client, "GET", proxy.url + UNCURED_401)
    assert cloud.refresh_calls == 1
    assert held.headers.get("X-Sidecar-Retry") == "not-retried"
    clock.advance(1)
    retried = await fetch(client, "GET", proxy.url + UNCURED_401)
    assert retried.status == 401
    assert "X-Sidecar-Retry" not in retried.headers
    assert cloud.refresh_calls == 2
    assert cloud.requests_seen == 3 + 1 + 3


async def test_during_the_cooldown_a_revoked_token_is_passed_on_without_a_refresh(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """The cooldown covers every 401 to the current token, on any endpoint: a revoked token's 401 is passed on too, not-retried."""
    await start_cooldown(proxy, cloud, client)
    cloud.revoke_access_tokens()
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    assert cloud.refresh_calls == 1
    assert reply.status == 401
    assert reply.headers.get("X-Sidecar-Retry") == "not-retried"


async def test_during_the_cooldown_a_body_over_replay_limit_forces_no_refresh(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A request that could not be replayed anyway forces no refresh during the cooldown either, and is marked not-retried."""
    p = await make_proxy(replay_limit=1024)
    await start_cooldown(p, cloud, client)
    reply = await fetch(client, "POST", p.url + UNCURED_401, data=os.urandom(4096))
    assert cloud.refresh_calls == 1
    assert reply.status == 401
    assert reply.headers.get("X-Sidecar-Retry") == "not-retried"


async def test_a_websocket_handshake_401_that_a_refresh_did_not_cure_stops_forcing_refreshes(
    proxy: RunningProxy, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """WebSocket handshakes follow the same cooldown: the second refused handshake forces no refresh and says not-retried."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as first:
        await client.ws_connect(proxy.url + UNCURED_401)
    assert first.value.status == 401
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 3
    with pytest.raises(aiohttp.WSServerHandshakeError) as second:
        await client.ws_connect(proxy.url + UNCURED_401)
    assert cloud.refresh_calls == 1
    assert cloud.requests_seen == 4
    assert second.value.status == 401
    assert second.value.headers is not None
    assert second.value.headers.get("X-Sidecar-Retry") == "not-retried"


# -- a refresh token that dies mid-traffic ---------------------------------


async def lose_login_mid_traffic(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> list[Reply]:
    """Serve some requests, then kill the refresh token and expire the access token; 20 concurrent requests' replies."""
    for _ in range(5):
        assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 200
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    return await asyncio.gather(*(fetch(client, "GET", proxy.url + "/api/v1/echo") for _ in range(20)))


async def test_dead_refresh_token_mid_traffic_gives_every_client_relogin_required(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """When the refresh token dies, every concurrent request gets 511 after a single refresh call."""
    replies = await lose_login_mid_traffic(proxy, cloud, clock, client)
    for reply in replies:
        assert_problem(reply, 511, "relogin-required")
    assert cloud.refresh_calls == 1


async def test_after_a_dead_refresh_token_the_upstream_is_left_alone(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """Once the refresh token is dead, further requests get 511 without reaching the cloud."""
    await lose_login_mid_traffic(proxy, cloud, clock, client)
    seen = cloud.requests_seen
    for _ in range(10):
        assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 511
    assert cloud.requests_seen == seen


async def test_dead_refresh_token_deletes_the_store(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession, store_path: Path
) -> None:
    """A dead refresh token clears the token store file."""
    await lose_login_mid_traffic(proxy, cloud, clock, client)
    assert not store_path.exists()


async def test_new_login_is_used_without_a_restart(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession, store_path: Path
) -> None:
    """After a dead refresh token, a new pair landing in the store is used by the very next request."""
    await lose_login_mid_traffic(proxy, cloud, clock, client)
    fresh = seed_store(store_path, cloud, obtained_at=clock())
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    assert reply.status == 200
    assert reply.json()["authorization"] == f"Bearer {fresh.access_token}"


# -- secrets never reach the logs -------------------------------------------


async def test_no_token_value_is_ever_logged(
    store_path: Path,
    cloud: MockCloud,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through refreshes, a 401 retry, a failing refresh and a dead refresh token, no token value appears in any log."""
    caplog.set_level(logging.DEBUG)
    first = seed_store(store_path, cloud, obtained_at=clock())
    tokens = {first.access_token, first.refresh_token}
    p = await make_proxy()
    url = p.url + "/api/v1/echo"
    assert (await fetch(client, "GET", url)).status == 200
    cloud.revoke_access_tokens()
    assert (await fetch(client, "POST", url, data=b"replayed")).status == 200
    tokens |= stored_tokens(store_path)
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", url)).status == 200
    tokens |= stored_tokens(store_path)
    cloud.revoke_access_tokens()
    cloud.fail_next_refreshes(1)
    assert (await fetch(client, "GET", url)).status == 503
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", url)).status == 511
    await wait_for_log_lines(p, 5)
    assert len(tokens) == 6 and None not in tokens
    logged = p.log.getvalue() + caplog.text
    assert "refresh" in caplog.text  # the manager did log: the check below is not vacuous
    assert [token for token in tokens if token in logged] == []


async def test_client_secrets_are_never_logged(
    proxy: RunningProxy, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's Authorization, cookies and query string stay out of the access log and the logs."""
    caplog.set_level(logging.DEBUG)
    secrets = {"authorization": "Bearer client-authz-4711", "cookie": "session=cookie-4712", "query": "query-4713"}
    reply = await fetch(
        client,
        "GET",
        proxy.url + f"/api/v1/echo?access_token={secrets['query']}",
        headers={"Authorization": secrets["authorization"], "Cookie": secrets["cookie"]},
    )
    assert reply.status == 200
    await wait_for_log_lines(proxy, 1)
    logged = proxy.log.getvalue() + caplog.text
    assert [secret for secret in secrets.values() if secret in logged] == []


# -- refresh beside traffic, large replays, shutdown, path and method refusals ---


MIB = 1024 * 1024
# Inside the default 120 s leeway of a mock-cloud token (it lives a day), still valid.
INTO_LEEWAY = 86400.0 - 60.0


async def test_shutdown_waits_for_a_refresh_in_flight_to_save_its_pair(
    login: TokenPair, cloud: MockCloud, store_path: Path, clock: FakeClock
) -> None:
    """Leaving the running sidecar while a refresh is in flight lets it finish and write the rotated pair to the store."""
    settings = Settings(upstream=cloud.base_url, store=str(store_path), read_timeout=5.0, log_format="json")
    cloud.hang_next_refreshes(1, seconds=0.3)
    async with running_sidecar(settings, log_stream=io.StringIO(), clock=clock, proactive=False) as sidecar:
        refresh = asyncio.ensure_future(sidecar.manager.force_refresh())
        await poll_until(lambda: cloud.refresh_calls == 1, 2, "the refresh reaching the token endpoint")
    assert refresh.done()
    token = await refresh
    rotated = stored(store_path)
    assert rotated.refresh_token != login.refresh_token
    assert rotated.access_token == token
    assert cloud.access_token_valid(token)


async def test_due_but_valid_token_is_used_while_the_refresh_runs(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """A request with the token inside the leeway but still valid is answered at once with that token while the refresh runs beside it."""
    proxy = await make_proxy()
    clock.advance(INTO_LEEWAY)
    cloud.hang_next_refreshes(1, seconds=1.5)
    started = time.monotonic()
    reply = await fetch(client, "GET", proxy.url + "/api/v1/echo")
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert reply.json()["authorization"] == f"Bearer {login.access_token}"
    assert elapsed < 0.5
    await poll_until(lambda: cloud.refresh_calls == 1, 1, "the background refresh reaching the token endpoint")


async def test_body_over_1_mib_within_replay_limit_is_forwarded(
    login: TokenPair, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With replay_limit 4 MiB, a 2 MiB POST reaches the upstream whole instead of hitting aiohttp's 1 MiB limit."""
    proxy = await make_proxy(replay_limit=4 * MIB)
    body = os.urandom(2 * MIB)
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=body)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_body_over_1_mib_within_replay_limit_is_replayed_after_a_401(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """With replay_limit 4 MiB, a 2 MiB POST rejected with 401 is replayed after the refresh and succeeds."""
    proxy = await make_proxy(replay_limit=4 * MIB)
    body = os.urandom(2 * MIB)
    cloud.revoke_access_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=body)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert cloud.refresh_calls == 1
    (line,) = await wait_for_log_lines(proxy, 1)
    assert line["retried"] is True


@pytest.mark.parametrize("target", ["/api/..;/x", "/api/%2e%2e;jsessionid=1/x"])
async def test_dot_dot_segment_with_path_parameter_gets_bad_target(
    proxy: RunningProxy, cloud: MockCloud, target: str
) -> None:
    """A ".." segment carrying a ;path-parameter (plain or encoded) gets 400 bad-target and is not forwarded."""
    reply = await raw_request(proxy.url, raw_get(proxy, target))
    assert_problem(reply, 400, "bad-target")
    assert cloud.requests_seen == 0


async def test_trace_gets_method_not_allowed(proxy: RunningProxy, cloud: MockCloud) -> None:
    """TRACE gets 405 (a bad-target problem) and is not forwarded, so no echo can carry the injected token back."""
    reply = await raw_request(
        proxy.url, f"TRACE /api/v1/echo HTTP/1.1\r\nHost: {authority(proxy.url)}\r\nConnection: close"
    )
    assert_problem(reply, 405, "bad-target")
    assert cloud.requests_seen == 0

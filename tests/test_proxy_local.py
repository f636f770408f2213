"""The sidecar's own endpoints under /_sidecar/, its metrics and its access log (SPEC §4)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    ACCESS_LOG_KEYS,
    FakeClock,
    ProxyFactory,
    RunningProxy,
)
from helpers.proxying import PAST_EXPIRY, assert_problem, fetch, raw_get, stored_tokens, wait_for_log_lines
from helpers.wire import raw_request
from prometheus_client.parser import text_string_to_metric_families

from sidecar.mockcloud import MockCloud
from sidecar.tokens import TokenPair, format_timestamp, parse_timestamp


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, by sample name and labels."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


# -- health, ready, status -----------------------------------------------------


async def test_health_answers_200(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """/_sidecar/health is 200 while the proxy runs."""
    assert (await fetch(client, "GET", proxy.url + "/_sidecar/health")).status == 200


async def test_health_answers_200_when_logged_out(make_proxy: ProxyFactory, client: aiohttp.ClientSession) -> None:
    """/_sidecar/health says nothing about the login: 200 without a store too."""
    p = await make_proxy()
    assert (await fetch(client, "GET", p.url + "/_sidecar/health")).status == 200


async def test_ready_with_a_fresh_token(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """/_sidecar/ready is 200 while a usable token is held."""
    assert (await fetch(client, "GET", proxy.url + "/_sidecar/ready")).status == 200


async def test_not_ready_without_a_store(make_proxy: ProxyFactory, client: aiohttp.ClientSession) -> None:
    """/_sidecar/ready is 503 when there is no login."""
    p = await make_proxy()
    assert (await fetch(client, "GET", p.url + "/_sidecar/ready")).status == 503


async def test_status_describes_the_login_after_a_refresh(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession, store_path: Path
) -> None:
    """/_sidecar/status reports login, expiry, refresh counts and the next refresh after one refresh."""
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 200
    status = (await fetch(client, "GET", proxy.url + "/_sidecar/status")).json()
    expires_at = parse_timestamp(status["expiresAt"])
    assert expires_at is not None
    assert status["loggedIn"] is True
    assert status["apiUrl"] == cloud.base_url
    assert status["secondsToExpiry"] == pytest.approx(expires_at - clock(), abs=0.1)
    assert status["secondsToExpiry"] == pytest.approx(86400, abs=1)
    assert status["refreshes"] == {"ok": 1, "dead": 0, "transient": 0}
    assert parse_timestamp(status["lastRefreshAt"]) == pytest.approx(clock(), abs=0.01)
    assert status["lastError"] is None
    assert status["nextRefreshAt"] == format_timestamp(expires_at - 120)


async def test_status_when_logged_out(make_proxy: ProxyFactory, client: aiohttp.ClientSession) -> None:
    """/_sidecar/status says loggedIn false and explains why, with no expiry."""
    p = await make_proxy()
    status = (await fetch(client, "GET", p.url + "/_sidecar/status")).json()
    assert (status["loggedIn"], status["expiresAt"], status["secondsToExpiry"], status["nextRefreshAt"]) == (
        False,
        None,
        None,
        None,
    )
    assert status["lastError"]


async def test_status_after_a_dead_refresh_token_counts_it(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """After a dead refresh token the status is logged out with refreshes.dead 1 and the reason."""
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 511
    status = (await fetch(client, "GET", proxy.url + "/_sidecar/status")).json()
    assert status["loggedIn"] is False
    assert status["refreshes"] == {"ok": 0, "dead": 1, "transient": 0}
    assert status["lastError"]


@pytest.mark.parametrize("name", ["health", "ready", "status", "metrics", "nope"])
async def test_local_endpoints_never_show_a_token(
    proxy: RunningProxy,
    cloud: MockCloud,
    clock: FakeClock,
    client: aiohttp.ClientSession,
    store_path: Path,
    login: TokenPair,
    name: str,
) -> None:
    """No /_sidecar/ answer contains an access or refresh token, old or current."""
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 200
    tokens = {token for token in (login.access_token, login.refresh_token) if token} | stored_tokens(store_path)
    reply = await fetch(client, "GET", proxy.url + "/_sidecar/" + name)
    text = reply.body.decode() + "".join(f"{key}: {value}\n" for key, value in reply.headers.items())
    assert [token for token in tokens if token in text] == []


@pytest.mark.parametrize("name", ["health", "ready", "status", "metrics", "x", "../api/v1/echo"])
async def test_local_paths_are_never_forwarded(proxy: RunningProxy, cloud: MockCloud, name: str) -> None:
    """Requests under /_sidecar/, dot-segments included, are answered by the sidecar and never reach the upstream."""
    await raw_request(proxy.url, raw_get(proxy, "/_sidecar/" + name))
    assert cloud.requests_seen == 0


async def test_unknown_local_endpoint_is_404(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """An unknown /_sidecar/ name gets a 404 problem."""
    reply = await fetch(client, "GET", proxy.url + "/_sidecar/x")
    assert_problem(reply, 404, "not-found")


# -- metrics ---------------------------------------------------------------------


async def test_metrics_are_prometheus_text(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """/_sidecar/metrics is Prometheus text with the request, latency, refresh, retry and re-login series."""
    assert (await fetch(client, "GET", proxy.url + "/api/v1/echo")).status == 200
    reply = await fetch(client, "GET", proxy.url + "/_sidecar/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    for name in (
        "sidecar_requests_total",
        "sidecar_upstream_latency_seconds_bucket",
        "sidecar_refreshes_total",
        "sidecar_retries_total",
        "sidecar_relogin_responses_total",
    ):
        assert f"\n{name}" in text


async def test_metrics_count_refreshes_retries_and_relogins(
    proxy: RunningProxy, cloud: MockCloud, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """After a refresh at expiry, a 401 retry and a dead refresh token, the counters say 2 ok, 1 dead, 1 retry, 1 re-login."""
    url = proxy.url + "/api/v1/echo"
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", url)).status == 200
    cloud.revoke_access_tokens()
    assert (await fetch(client, "GET", url)).status == 200
    cloud.revoke_refresh_tokens()
    clock.advance(PAST_EXPIRY)
    assert (await fetch(client, "GET", url)).status == 511
    text = (await fetch(client, "GET", proxy.url + "/_sidecar/metrics")).body.decode()
    assert metric(text, "sidecar_refreshes_total", outcome="ok") == 2
    assert metric(text, "sidecar_refreshes_total", outcome="dead") == 1
    assert metric(text, "sidecar_refreshes_total", outcome="transient") == 0
    assert metric(text, "sidecar_retries_total") == 1
    assert metric(text, "sidecar_relogin_responses_total") == 1
    assert metric(text, "sidecar_requests_total", status_class="2xx") == 2
    assert metric(text, "sidecar_requests_total", status_class="5xx") == 1
    assert metric(text, "sidecar_upstream_latency_seconds_count") == 2
    assert metric(text, "sidecar_upstream_latency_seconds_bucket", le="+Inf") == 2


# -- access log -----------------------------------------------------------------


async def test_access_log_has_one_line_per_request_with_the_spec_keys(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """Every request, forwarded, refused or local, writes exactly one JSON line with exactly the SPEC's keys."""
    await fetch(client, "GET", proxy.url + "/api/v1/echo")
    await fetch(client, "POST", proxy.url + "/api/v1/echo", data=b"body")
    await fetch(client, "GET", proxy.url + "/api/v1/echo", headers={"Host": "evil.example"})
    await fetch(client, "GET", proxy.url + "/_sidecar/health")
    lines = await wait_for_log_lines(proxy, 4)
    assert len(lines) == 4
    assert [set(line) for line in lines] == [ACCESS_LOG_KEYS] * 4
    assert [(line["method"], line["status"], line["upstream_status"]) for line in lines] == [
        ("GET", 200, 200),
        ("POST", 200, 200),
        ("GET", 403, None),
        ("GET", 200, None),
    ]
    assert all(isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0 for line in lines)
    assert all(line["retried"] is False and line["refreshed"] is False for line in lines)


async def test_access_log_path_has_no_query_string(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    """The logged path stops before the query string."""
    await fetch(client, "GET", proxy.url + "/api/v1/echo/a?token=secret&b=1")
    (line,) = await wait_for_log_lines(proxy, 1)
    assert line["path"] == "/api/v1/echo/a"


async def test_access_log_marks_a_refresh_at_expiry(
    proxy: RunningProxy, clock: FakeClock, client: aiohttp.ClientSession
) -> None:
    """A request that waited for a refresh at expiry is logged refreshed but not retried."""
    clock.advance(PAST_EXPIRY)
    await fetch(client, "GET", proxy.url + "/api/v1/echo")
    (line,) = await wait_for_log_lines(proxy, 1)
    assert (line["refreshed"], line["retried"]) == (True, False)


# -- metrics of the non-replayable 401 path --------------------------------------


async def test_not_replayable_401_with_dead_refresh_token_counts_no_relogin(
    login: TokenPair, make_proxy: ProxyFactory, cloud: MockCloud, client: aiohttp.ClientSession
) -> None:
    """A streamed body's 401, passed on as not-replayable while the refresh token is dead, is not counted as a re-login response."""
    proxy = await make_proxy(replay_limit=1024)
    cloud.revoke_access_tokens()
    cloud.revoke_refresh_tokens()
    reply = await fetch(client, "POST", proxy.url + "/api/v1/echo", data=os.urandom(4096))
    assert reply.status == 401
    assert reply.headers["X-Sidecar-Retry"] == "not-replayable"
    assert "X-Sidecar-Error" not in reply.headers
    metrics = await fetch(client, "GET", proxy.url + "/_sidecar/metrics")
    assert metric(metrics.body.decode(), "sidecar_relogin_responses_total") == 0

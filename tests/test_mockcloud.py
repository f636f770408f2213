"""The mock cloud speaks SPEC §1 and its test switches do what they say."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import FakeClock, serving
from yarl import URL

from sidecar.mockcloud import MockCloud

REFRESH = "/api/v1/auth/token/refresh"
ECHO = "/api/v1/echo"


@pytest.fixture
def clock() -> FakeClock:
    """A fixed moment, so expiry timestamps here do not depend on the wall clock."""
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def cloud(clock: FakeClock) -> AsyncIterator[MockCloud]:
    """The mock cloud with short TTLs; its tokens are not part of the teardown leak check."""
    async with serving(MockCloud(access_ttl=3600.0, refresh_ttl=7200.0, clock=clock)) as mock:
        yield mock


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def refresh(session: aiohttp.ClientSession, cloud: MockCloud, rt: str) -> tuple[int, dict[str, Any]]:
    async with session.post(cloud.base_url + REFRESH, json={"refreshToken": rt}) as resp:
        return resp.status, await resp.json()


async def echo_status(session: aiohttp.ClientSession, cloud: MockCloud, at: str) -> int:
    async with session.get(cloud.base_url + ECHO, headers=bearer(at)) as resp:
        await resp.read()
        return resp.status


async def stats(session: aiohttp.ClientSession, cloud: MockCloud) -> dict[str, int]:
    async with session.get(cloud.base_url + "/_mock/stats") as resp:
        stats: dict[str, int] = await resp.json()
        return stats


# -- refresh --------------------------------------------------------------


async def test_refresh_rotates_and_spends_old_token(
    cloud: MockCloud, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A refresh returns a new pair expiring access_ttl from now, and the old refresh token no longer works."""
    pair = cloud.issue_pair()
    clock.now += 100
    status, body = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert body["refreshToken"] != pair["refreshToken"]
    assert body["accessToken"].startswith("at_") and body["refreshToken"].startswith("rt_")
    expires = datetime.fromisoformat(body["accessTokenExpiresAt"]).timestamp()
    assert expires == pytest.approx(clock.now + 3600.0, abs=0.001)
    assert body["accessTokenExpiresAt"].endswith("Z")
    assert await echo_status(session, cloud, body["accessToken"]) == 200
    assert await echo_status(session, cloud, pair["accessToken"]) == 200
    assert (cloud.refresh_calls, cloud.refresh_ok) == (1, 1)


async def test_reused_refresh_token_revokes_whole_family(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Presenting a spent refresh token answers 403 invalid_grant and kills every token of that login."""
    pair = cloud.issue_pair()
    other = cloud.issue_pair()
    _, rotated = await refresh(session, cloud, pair["refreshToken"])
    status, body = await refresh(session, cloud, pair["refreshToken"])
    assert (status, body) == (403, {"error": "invalid_grant"})
    assert cloud.chain_revocations == 1
    status, _ = await refresh(session, cloud, rotated["refreshToken"])
    assert status == 403
    assert await echo_status(session, cloud, rotated["accessToken"]) == 401
    assert await echo_status(session, cloud, other["accessToken"]) == 200
    assert cloud.chain_revocations == 1


async def test_a_reuse_grace_honours_a_spent_token_for_a_while_then_revokes(
    cloud: MockCloud, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Like Auth0's reuse interval: a second use within the grace buys a pair too; after it, reuse detection."""
    cloud.refresh_reuse_grace = 30.0
    pair = cloud.issue_pair()
    _, first = await refresh(session, cloud, pair["refreshToken"])
    clock.advance(20)
    status, second = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200 and second["refreshToken"] != first["refreshToken"]
    assert cloud.chain_revocations == 0
    assert await echo_status(session, cloud, first["accessToken"]) == 200
    clock.advance(11)  # 31 s after the first use
    status, _ = await refresh(session, cloud, pair["refreshToken"])
    assert status == 403 and cloud.chain_revocations == 1
    assert await echo_status(session, cloud, second["accessToken"]) == 401


async def test_rotations_stay_in_their_login_and_two_logins_are_apart(
    cloud: MockCloud, session: aiohttp.ClientSession
) -> None:
    """same_login: a rotated refresh token belongs to the login it came from, never to another one."""
    one, other = cloud.issue_pair(), cloud.issue_pair()
    _, rotated = await refresh(session, cloud, one["refreshToken"])
    assert cloud.same_login(rotated["refreshToken"], one["refreshToken"])
    assert not cloud.same_login(rotated["refreshToken"], other["refreshToken"])
    assert not cloud.same_login("rt_nope", one["refreshToken"])


async def test_unknown_refresh_token_is_invalid_grant(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A refresh token the cloud never issued answers 403 invalid_grant."""
    assert await refresh(session, cloud, "rt_nope") == (403, {"error": "invalid_grant"})


async def test_refresh_without_token_field_is_invalid_request(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A refresh body that is not JSON with a refreshToken answers 400 invalid_request."""
    async with session.post(cloud.base_url + REFRESH, data=b"{nope") as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "invalid_request"})
    async with session.post(cloud.base_url + REFRESH, json={"refresh_token": "x"}) as resp:
        assert resp.status == 400


async def test_fail_switch_answers_status_and_keeps_token(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """fail_next_refreshes answers the given status n times and leaves the refresh token live."""
    pair = cloud.issue_pair()
    cloud.fail_next_refreshes(2, status=429)
    for _ in range(2):
        assert await refresh(session, cloud, pair["refreshToken"]) == (429, {"error": "server_error"})
    status, _ = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert (cloud.refresh_calls, cloud.refresh_ok) == (3, 1)


async def test_hang_switch_stalls_until_client_gives_up(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """hang_next_refreshes stalls the call; a client that gives up has not spent its refresh token."""
    pair = cloud.issue_pair()
    cloud.hang_next_refreshes(1)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            cloud.base_url + REFRESH,
            json={"refreshToken": pair["refreshToken"]},
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    status, _ = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert (cloud.refresh_calls, cloud.refresh_ok) == (2, 1)


async def test_short_hang_then_answers_normally(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A hang shorter than the client's patience only delays a normal answer."""
    pair = cloud.issue_pair()
    cloud.hang_next_refreshes(1, seconds=0.1)
    started = time.monotonic()
    status, _ = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert time.monotonic() - started >= 0.09


async def test_stop_does_not_wait_for_hanging_refresh(clock: FakeClock) -> None:
    """stop() returns promptly while a refresh call is hanging for an hour."""
    mock = MockCloud(clock=clock)
    await mock.start()
    pair = mock.issue_pair()
    mock.hang_next_refreshes(1)
    async with aiohttp.ClientSession() as s:
        call = asyncio.ensure_future(refresh(s, mock, pair["refreshToken"]))
        while mock.refresh_calls == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await mock.stop()
        assert time.monotonic() - started < 2.0
        try:
            await call
        except aiohttp.ClientError:
            pass


async def test_reject_switch_answers_invalid_grant_and_revokes_chain(
    cloud: MockCloud, session: aiohttp.ClientSession
) -> None:
    """reject_next_refreshes answers 403 invalid_grant and revokes the presented login."""
    pair = cloud.issue_pair()
    cloud.reject_next_refreshes(1)
    assert await refresh(session, cloud, pair["refreshToken"]) == (403, {"error": "invalid_grant"})
    status, _ = await refresh(session, cloud, pair["refreshToken"])
    assert status == 403
    assert await echo_status(session, cloud, pair["accessToken"]) == 401
    assert cloud.chain_revocations == 0


async def test_revoke_access_tokens_makes_protected_endpoints_401(
    cloud: MockCloud, session: aiohttp.ClientSession
) -> None:
    """After revoke_access_tokens a live token gets 401 with a Bearer challenge."""
    pair = cloud.issue_pair()
    cloud.revoke_access_tokens()
    async with session.get(cloud.base_url + ECHO, headers=bearer(pair["accessToken"])) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert await resp.json() == {"error": "invalid_token"}
    status, body = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert await echo_status(session, cloud, body["accessToken"]) == 200


async def test_revoke_refresh_tokens_kills_refresh(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """After revoke_refresh_tokens every refresh answers 403 invalid_grant."""
    pair = cloud.issue_pair()
    cloud.revoke_refresh_tokens()
    assert await refresh(session, cloud, pair["refreshToken"]) == (403, {"error": "invalid_grant"})


async def test_access_token_expires_by_injected_clock(
    cloud: MockCloud, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """An access token works until the injected clock reaches its expiry."""
    pair = cloud.issue_pair(access_ttl=10.0)
    clock.now += 9.9
    assert await echo_status(session, cloud, pair["accessToken"]) == 200
    clock.now += 0.1
    assert await echo_status(session, cloud, pair["accessToken"]) == 401


async def test_refresh_token_expires_by_injected_clock(
    cloud: MockCloud, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A refresh token older than refresh_ttl answers 403 invalid_grant."""
    pair = cloud.issue_pair()
    clock.now += 7200.0
    assert await refresh(session, cloud, pair["refreshToken"]) == (403, {"error": "invalid_grant"})


@pytest.mark.parametrize(
    ("style", "keys"),
    [
        ("snake", {"access_token", "refresh_token", "access_token_expires_at"}),
        ("expires_in", {"accessToken", "refreshToken", "expires_in"}),
        ("no_rotation", {"accessToken", "accessTokenExpiresAt"}),
    ],
)
async def test_refresh_response_styles(
    cloud: MockCloud, session: aiohttp.ClientSession, style: str, keys: set[str]
) -> None:
    """refresh_response_style switches the refresh answer to the named shape."""
    cloud.refresh_response_style = style
    pair = cloud.issue_pair()
    status, body = await refresh(session, cloud, pair["refreshToken"])
    assert status == 200
    assert set(body) == keys
    if style == "expires_in":
        assert body["expires_in"] == 3600


async def test_no_rotation_keeps_old_refresh_token_live(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Without rotation the same refresh token keeps working."""
    cloud.refresh_response_style = "no_rotation"
    pair = cloud.issue_pair()
    for _ in range(3):
        status, _ = await refresh(session, cloud, pair["refreshToken"])
        assert status == 200
    assert cloud.chain_revocations == 0


# -- login ----------------------------------------------------------------


async def login(
    session: aiohttp.ClientSession, cloud: MockCloud, redirect_uri: str, state: str = "s-1"
) -> aiohttp.ClientResponse:
    async with session.get(
        cloud.base_url + "/api/v1/cli/login",
        params={"redirect_uri": redirect_uri, "state": state},
        allow_redirects=False,
    ) as resp:
        await resp.read()
        return resp


async def test_login_redirect_carries_tokens_and_state(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Browser login redirects to the loopback callback with state, a working pair, expiry and api_url."""
    resp = await login(session, cloud, "http://127.0.0.1:5555/callback")
    assert resp.status == 302
    target = URL(resp.headers["Location"])
    assert (target.host, target.port, target.path) == ("127.0.0.1", 5555, "/callback")
    q = target.query
    assert q["state"] == "s-1"
    assert q["api_url"] == cloud.base_url
    datetime.fromisoformat(q["access_token_expires_at"])
    assert await echo_status(session, cloud, q["access_token"]) == 200
    status, _ = await refresh(session, cloud, q["refresh_token"])
    assert status == 200


async def test_login_error_switch_redirects_with_error(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """With login_error set the redirect carries error and state and no tokens."""
    cloud.login_error = "access_denied"
    resp = await login(session, cloud, "http://localhost:5555/callback")
    q = URL(resp.headers["Location"]).query
    assert dict(q) == {"error": "access_denied", "state": "s-1"}


async def test_login_omit_expiry_switch(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """With login_omit_expiry set the redirect has tokens but no access_token_expires_at."""
    cloud.login_omit_expiry = True
    resp = await login(session, cloud, "http://127.0.0.1:5555/callback")
    q = URL(resp.headers["Location"]).query
    assert "access_token" in q and "access_token_expires_at" not in q


async def test_login_refuses_non_loopback_redirect(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A redirect_uri that is not http on loopback answers 400 instead of redirecting."""
    for uri in ("https://127.0.0.1:5555/callback", "http://evil.example/callback", "nonsense"):
        resp = await login(session, cloud, uri)
        assert resp.status == 400


async def test_poll_flow_pending_then_approved_once(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Polling is pending until the page is opened, then brings a pair exactly once."""
    poll_url = cloud.base_url + "/api/v1/auth/cli-login/poll"
    code = "c_test-code"
    async with session.get(poll_url, params={"code": code}) as resp:
        assert (resp.status, await resp.json()) == (202, {"status": "pending"})
    async with session.get(cloud.base_url + "/cli-login", params={"code": code}) as resp:
        assert resp.status == 200
        assert "approved" in (await resp.text()).lower()
    async with session.get(poll_url, params={"code": code}) as resp:
        assert resp.status == 200
        pair = await resp.json()
    assert set(pair) == {"accessToken", "refreshToken", "accessTokenExpiresAt"}
    assert await echo_status(session, cloud, pair["accessToken"]) == 200
    async with session.get(poll_url, params={"code": code}) as resp:
        assert (resp.status, await resp.json()) == (410, {"error": "expired_code"})


async def test_poll_error_switch(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """With poll_error set the poll answers 400 with that error."""
    cloud.poll_error = "access_denied"
    async with session.get(cloud.base_url + "/api/v1/auth/cli-login/poll", params={"code": "c_x"}) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "access_denied"})


async def test_whoami(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """whoami names the user for a live token and answers 401 without one."""
    pair = cloud.issue_pair()
    async with session.get(cloud.base_url + "/api/v1/auth/whoami", headers=bearer(pair["accessToken"])) as resp:
        assert await resp.json() == {"name": "alice", "email": "alice@example.test"}
    async with session.get(cloud.base_url + "/api/v1/auth/whoami") as resp:
        assert (resp.status, await resp.json()) == (401, {"error": "invalid_token"})


# -- oauth2 ---------------------------------------------------------------


async def test_oauth_refresh_with_basic_client_credentials(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The RFC 6749 endpoint accepts client credentials via HTTP Basic and rotates the pair."""
    cloud.oauth_client = ("cli", "s3cret")
    pair = cloud.issue_pair()
    form = {"grant_type": "refresh_token", "refresh_token": pair["refreshToken"], "scope": "api"}
    async with session.post(cloud.base_url + "/oauth/token", data=form, headers=basic("cli", "s3cret")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["refresh_token"] != pair["refreshToken"]
    assert await echo_status(session, cloud, body["access_token"]) == 200
    assert cloud.last_oauth_form["scope"] == "api"
    assert cloud.last_oauth_basic == ("cli", "s3cret")


async def test_oauth_refresh_with_form_client_credentials(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Client credentials in the form body are accepted too."""
    cloud.oauth_client = ("cli", "s3cret")
    pair = cloud.issue_pair()
    form = {
        "grant_type": "refresh_token",
        "refresh_token": pair["refreshToken"],
        "client_id": "cli",
        "client_secret": "s3cret",
    }
    async with session.post(cloud.base_url + "/oauth/token", data=form) as resp:
        assert resp.status == 200


async def test_oauth_wrong_client_is_invalid_client(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Wrong client credentials answer 401 invalid_client and do not spend the refresh token."""
    cloud.oauth_client = ("cli", "s3cret")
    pair = cloud.issue_pair()
    form = {"grant_type": "refresh_token", "refresh_token": pair["refreshToken"]}
    async with session.post(cloud.base_url + "/oauth/token", data=form, headers=basic("cli", "wrong")) as resp:
        assert (resp.status, await resp.json()) == (401, {"error": "invalid_client"})
    async with session.post(cloud.base_url + "/oauth/token", data=form, headers=basic("cli", "s3cret")) as resp:
        assert resp.status == 200


async def test_oauth_errors(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A wrong grant_type is unsupported_grant_type and a spent refresh token is 400 invalid_grant."""
    pair = cloud.issue_pair()
    url = cloud.base_url + "/oauth/token"
    async with session.post(url, data={"grant_type": "password"}) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "unsupported_grant_type"})
    form = {"grant_type": "refresh_token", "refresh_token": pair["refreshToken"]}
    async with session.post(url, data=form) as resp:
        assert resp.status == 200
    async with session.post(url, data=form) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "invalid_grant"})
    assert cloud.chain_revocations == 1
    assert cloud.refresh_calls == 3


# -- protected test endpoints ---------------------------------------------


async def test_echo_reports_raw_query_byte_for_byte(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Echo reports the query exactly as sent, without decoding or reordering."""
    pair = cloud.issue_pair()
    query = "a=%2F&b=+&a=2&c=%C3%A9"
    url = URL(cloud.base_url + "/api/v1/echo/some%2Fthing?" + query, encoded=True)
    async with session.get(url, headers=bearer(pair["accessToken"])) as resp:
        body = await resp.json()
    assert body["raw_query"] == query
    assert body["path"] == "/api/v1/echo/some%2Fthing"
    assert body["authorization"] == "Bearer " + pair["accessToken"]


async def test_echo_reports_raw_headers_in_order_and_case(cloud: MockCloud) -> None:
    """Echo lists the request headers exactly as they arrived on the wire."""
    pair = cloud.issue_pair()
    host, port = "127.0.0.1", int(URL(cloud.base_url).port or 0)
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST /api/v1/echo?x=1 HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "X-Zeta: last-first\r\n"
        "x-lower: v\r\n"
        f"Authorization: Bearer {pair['accessToken']}\r\n"
        "Content-Length: 5\r\n"
        "Connection: close\r\n"
        "\r\nhello"
    )
    writer.write(request.encode())
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    body = orjson.loads(payload)
    assert body["headers"] == [
        ["Host", f"{host}:{port}"],
        ["X-Zeta", "last-first"],
        ["x-lower", "v"],
        ["Authorization", f"Bearer {pair['accessToken']}"],
        ["Content-Length", "5"],
        ["Connection", "close"],
    ]
    assert body["method"] == "POST" and body["raw_query"] == "x=1"
    assert body["body_length"] == 5 and body["chunked"] is False
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert cloud.last_echo_body_sha256 == body["body_sha256"]


async def test_echo_reports_chunked_body(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A chunked request body is hashed whole and reported as chunked."""
    pair = cloud.issue_pair()
    parts = [b"a" * 1000, b"b" * 70000, b"c"]

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with session.put(cloud.base_url + ECHO, data=gen(), headers=bearer(pair["accessToken"])) as resp:
        body = await resp.json()
    assert body["chunked"] is True
    assert body["body_length"] == 71001
    assert body["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_upload_counts_and_hashes(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Upload answers the received length and SHA-256."""
    pair = cloud.issue_pair()
    data = b"0123456789" * 50000
    async with session.post(cloud.base_url + "/api/v1/upload", data=data, headers=bearer(pair["accessToken"])) as resp:
        assert await resp.json() == {"received": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_bytes_streams_chunked(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The bytes endpoint streams exactly n bytes with chunked framing."""
    pair = cloud.issue_pair()
    async with session.get(
        cloud.base_url + "/api/v1/bytes",
        params={"n": "200001", "chunk": "65536"},
        headers=bearer(pair["accessToken"]),
    ) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.headers["Content-Type"] == "application/octet-stream"
        data = await resp.read()
    assert data == b"x" * 200001


async def test_client_hanging_up_mid_stream_logs_no_traceback(
    cloud: MockCloud, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves in the middle of a 1 GiB stream leaves no error in the logs."""
    pair = cloud.issue_pair()
    caplog.set_level(logging.DEBUG)
    resp = await session.get(
        cloud.base_url + "/api/v1/bytes",
        params={"n": str(1 << 30)},
        headers=bearer(pair["accessToken"]),
    )
    await resp.content.readexactly(1 << 20)
    resp.close()
    await asyncio.sleep(0.1)
    assert await echo_status(session, cloud, pair["accessToken"]) == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_sse_events_arrive_one_by_one(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Server-sent events arrive as separate writes, spaced by the interval."""
    pair = cloud.issue_pair()
    async with session.get(
        cloud.base_url + "/api/v1/sse",
        params={"n": "3", "interval": "0.05"},
        headers=bearer(pair["accessToken"]),
    ) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await resp.content.readuntil(b"\n\n")
        rest = await resp.read()
    assert first == b"data: event 0\n\n"
    assert rest == b"data: event 1\n\ndata: event 2\n\n"


async def test_gzip_arrives_compressed(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The gzip endpoint sends a gzip body with Content-Encoding: gzip."""
    pair = cloud.issue_pair()
    async with session.get(
        cloud.base_url + "/api/v1/gzip",
        headers=bearer(pair["accessToken"]),
        auto_decompress=False,
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == b"hello gzip " * 100


async def test_slow_sleeps(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The slow endpoint answers after the requested time."""
    pair = cloud.issue_pair()
    async with session.get(
        cloud.base_url + "/api/v1/slow",
        params={"seconds": "0.05"},
        headers=bearer(pair["accessToken"]),
    ) as resp:
        assert await resp.json() == {"slept": 0.05}


async def test_redirects(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Redirects point inside the upstream (absolute) or at another host."""
    headers = bearer(cloud.issue_pair()["accessToken"])
    async with session.get(
        cloud.base_url + "/api/v1/redirect",
        params={"to": "/api/v1/echo?q=1"},
        headers=headers,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == cloud.base_url + "/api/v1/echo?q=1"
    async with session.get(
        cloud.base_url + "/api/v1/redirect-external", headers=headers, allow_redirects=False
    ) as resp:
        assert resp.headers["Location"] == "https://elsewhere.example/x"


async def test_status_endpoint(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The status endpoint answers the status it names."""
    headers = bearer(cloud.issue_pair()["accessToken"])
    for code in (201, 204, 418, 503):
        async with session.get(cloud.base_url + f"/api/v1/status/{code}", headers=headers) as resp:
            assert resp.status == code


async def test_websocket_echo_requires_bearer(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The WebSocket endpoint refuses a handshake without a token and echoes text and binary with one."""
    url = cloud.base_url + "/api/v1/ws"
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session.ws_connect(url)
    assert err.value.status == 401
    async with session.ws_connect(url, headers=bearer(cloud.issue_pair()["accessToken"])) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes() == b"\x00\x01"


async def test_unauthenticated_upload_gets_401_after_body(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """A large unauthenticated upload is read and answered 401, not reset."""
    async with session.post(cloud.base_url + "/api/v1/upload", data=io.BytesIO(b"z" * (4 << 20))) as resp:
        assert resp.status == 401


# -- prefix and control endpoints -----------------------------------------


async def test_prefix_puts_every_route_under_it(clock: FakeClock, session: aiohttp.ClientSession) -> None:
    """With prefix /cloud every route lives under it and base_url carries it."""
    mock = MockCloud(prefix="/cloud", clock=clock)
    base = await mock.start()
    try:
        assert base.endswith("/cloud")
        pair = mock.issue_pair()
        status, _ = await refresh(session, mock, pair["refreshToken"])
        assert status == 200
        async with session.get(base + ECHO + "?k=v", headers=bearer(pair["accessToken"])) as resp:
            assert (await resp.json())["path"] == "/cloud/api/v1/echo"
        root = base.removesuffix("/cloud")
        async with session.get(root + ECHO, headers=bearer(pair["accessToken"])) as resp:
            assert resp.status == 404
        assert (await stats(session, mock))["refresh_calls"] == 1
    finally:
        await mock.stop()


async def test_stats_endpoint_does_not_count_itself(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """Reading /_mock/stats leaves requests_seen unchanged, while other requests count."""
    assert (await stats(session, cloud))["requests_seen"] == 0
    assert (await stats(session, cloud))["requests_seen"] == 0
    async with session.get(cloud.base_url + "/nowhere") as resp:
        assert resp.status == 404
    assert await stats(session, cloud) == {
        "refresh_calls": 0,
        "refresh_ok": 0,
        "requests_seen": 1,
        "chain_revocations": 0,
    }


async def test_control_endpoints_drive_switches(cloud: MockCloud, session: aiohttp.ClientSession) -> None:
    """The /_mock/ control endpoints flip the same switches as the methods."""
    pair = cloud.issue_pair()
    async with session.post(cloud.base_url + "/_mock/fail-refresh?n=1&status=502") as resp:
        assert resp.status == 200
    assert (await refresh(session, cloud, pair["refreshToken"]))[0] == 502
    async with session.post(cloud.base_url + "/_mock/revoke-access") as resp:
        assert resp.status == 200
    assert await echo_status(session, cloud, pair["accessToken"]) == 401
    async with session.post(cloud.base_url + "/_mock/revoke-refresh") as resp:
        assert resp.status == 200
    assert (await refresh(session, cloud, pair["refreshToken"]))[0] == 403
    pair = cloud.issue_pair()
    async with session.post(cloud.base_url + "/_mock/reject-refresh?n=1") as resp:
        assert resp.status == 200
    assert (await refresh(session, cloud, pair["refreshToken"]))[0] == 403
    assert cloud.requests_seen == 4

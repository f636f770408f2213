"""The token manager against the mock cloud: the original fix's cases and the 401 path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import FakeClock, ManagerFactory, pair_from_cloud, seed_store

from sidecar.errors import NotLoggedIn, RefreshDead, RefreshTransient
from sidecar.mockcloud import MockCloud
from sidecar.refreshing import BACKOFF_MAX, backoff_delay
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair


async def test_token_not_near_expiry_is_returned_without_refresh(
    cloud: MockCloud, store_path: Path, make_manager: ManagerFactory
) -> None:
    """A token with a day left is handed out as stored, with no refresh call."""
    pair = seed_store(store_path, cloud)
    manager = await make_manager()
    assert await manager.access_token() == pair.access_token
    assert cloud.refresh_calls == 0


async def test_near_expiry_refreshes_once_and_persists_rotated_pair(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Inside the leeway one refresh happens and the rotated pair with its new expiry is on disk."""
    old = seed_store(store_path, cloud)
    manager = await make_manager()
    clock.advance(86400 - 60)
    token = await manager.access_token()
    assert cloud.refresh_calls == 1
    assert token != old.access_token
    stored = TokenFile(store_path).read().pair
    assert stored is not None
    assert stored.access_token == token
    assert stored.refresh_token != old.refresh_token
    assert stored.expires_at == pytest.approx(clock.now + 86400, abs=1)
    assert stored.obtained_at == pytest.approx(clock.now, abs=0.01)


async def test_invalid_grant_clears_store_and_stops_calling_upstream(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A 403 invalid_grant deletes the store and later calls fail without network traffic."""
    seed_store(store_path, cloud)
    manager = await make_manager()
    clock.advance(86400)
    cloud.reject_next_refreshes(1)
    with pytest.raises(NotLoggedIn):
        await manager.access_token()
    assert not store_path.exists()
    seen = cloud.requests_seen
    with pytest.raises(NotLoggedIn):
        await manager.access_token()
    assert cloud.requests_seen == seen
    assert manager.stats.dead == 1


async def test_transient_5xx_keeps_store_and_returns_stale_token(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A 503 from the token endpoint leaves the file byte for byte and hands out the old token."""
    old = seed_store(store_path, cloud)
    before = store_path.read_bytes()
    manager = await make_manager()
    clock.advance(86400 - 60)
    cloud.fail_next_refreshes(1, status=503)
    assert await manager.access_token() == old.access_token
    assert store_path.read_bytes() == before
    assert manager.stats.transient == 1


async def test_transient_failure_backs_off_before_next_attempt(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """After a failure no call reaches the token endpoint until the backoff has passed."""
    seed_store(store_path, cloud)
    manager = await make_manager()
    clock.advance(86400 - 60)
    cloud.fail_next_refreshes(2, status=502)
    await manager.access_token()
    await manager.access_token()
    assert cloud.refresh_calls == 1
    clock.advance(backoff_delay(1, 0.5) + 0.01)
    await manager.access_token()
    assert cloud.refresh_calls == 2
    clock.advance(backoff_delay(1, 0.5) + 0.01)  # second backoff is twice as long
    await manager.access_token()
    assert cloud.refresh_calls == 2
    clock.advance(backoff_delay(2, 0.5))
    await manager.access_token()
    assert cloud.refresh_calls == 3
    assert manager.stats.ok == 1


def test_backoff_doubles_from_one_second_to_sixty_with_jitter() -> None:
    """Backoff is 1, 2, 4 ... seconds capped at 60, jittered by at most 20 %."""
    assert [backoff_delay(n, 0.5) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(1, 0.0) == pytest.approx(0.8)
    assert backoff_delay(3, 0.999) == pytest.approx(4.8, abs=0.01)
    assert backoff_delay(50, 0.999) == BACKOFF_MAX


async def test_concurrent_callers_share_one_refresh(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Fifty callers at expiry cause exactly one refresh call and all get its token."""
    seed_store(store_path, cloud)
    manager = await make_manager()
    clock.advance(86400)
    tokens = await asyncio.gather(*(manager.access_token() for _ in range(50)))
    assert cloud.refresh_calls == 1
    assert len(set(tokens)) == 1


async def test_store_without_expiry_refreshes_on_first_use(
    cloud: MockCloud, store_path: Path, make_manager: ManagerFactory
) -> None:
    """A pair written before expiry was captured is treated as expired."""
    grant = cloud.issue_pair()
    TokenFile(store_path).write(
        TokenPair(access_token=grant["accessToken"], refresh_token=grant["refreshToken"], api_url=cloud.base_url)
    )
    manager = await make_manager()
    token = await manager.access_token()
    assert cloud.refresh_calls == 1
    assert token != grant["accessToken"]
    stored = TokenFile(store_path).read().pair
    assert stored is not None and stored.expires_at is not None


async def test_short_lived_token_is_not_refreshed_on_every_call(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A 10 s token under a 120 s leeway refreshes once at half-life, not on each use."""
    seed_store(store_path, cloud, obtained_at=clock.now, access_ttl=10)
    manager = await make_manager(leeway=120)
    for _ in range(4):
        await manager.access_token()
        clock.advance(1)
    assert cloud.refresh_calls == 0
    clock.advance(1.5)  # 5.5 s in: past half of the lifetime
    for _ in range(3):
        await manager.access_token()
    assert cloud.refresh_calls == 1


async def test_dead_refresh_adopts_pair_another_process_wrote(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """On invalid_grant the store is re-read and a different pair found there is used, not cleared."""
    seed_store(store_path, cloud)
    winner = pair_from_cloud(cloud.issue_pair(), cloud.base_url)

    class LosingRefresher:
        """Another process rotates the pair while this refresh is on the wire."""

        async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
            TokenFile(store_path).write(winner)
            raise RefreshDead("token endpoint rejected the refresh token: HTTP 403 (invalid_grant)")

    manager = await make_manager(refresher=LosingRefresher())
    clock.advance(86400)
    assert await manager.access_token() == winner.access_token
    assert store_path.exists()
    assert manager.stats.dead == 0


async def test_waiting_for_lock_uses_pair_rotated_meanwhile(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A manager whose in-memory pair is stale adopts the fresher pair on disk instead of refreshing."""
    seed_store(store_path, cloud)
    first = await make_manager()
    second = await make_manager()
    clock.advance(86400)
    token = await first.access_token()
    assert await second.access_token() == token
    assert cloud.refresh_calls == 1
    assert cloud.chain_revocations == 0


async def test_rejected_token_that_is_no_longer_current_retries_with_current(
    cloud: MockCloud, store_path: Path, make_manager: ManagerFactory
) -> None:
    """A 401 for an old token is answered with the current token, without refreshing."""
    pair = seed_store(store_path, cloud)
    manager = await make_manager()
    assert await manager.token_rejected("at_old_token") == pair.access_token
    assert cloud.refresh_calls == 0


async def test_rejected_current_token_forces_one_shared_refresh(
    cloud: MockCloud, store_path: Path, make_manager: ManagerFactory
) -> None:
    """Twenty callers rejected with the current token share one forced refresh."""
    pair = seed_store(store_path, cloud)
    manager = await make_manager()
    tokens = await asyncio.gather(*(manager.token_rejected(pair.access_token) for _ in range(20)))  # type: ignore[arg-type]
    assert cloud.refresh_calls == 1
    assert set(tokens) == {manager.pair.access_token} != {pair.access_token}  # type: ignore[union-attr]


async def test_rejected_token_during_backoff_reports_retry_after(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """While the token endpoint is failing a 401 yields RefreshTransient with the wait left."""
    pair = seed_store(store_path, cloud)
    manager = await make_manager()
    cloud.fail_next_refreshes(1, status=503)
    with pytest.raises(RefreshTransient) as first:
        await manager.token_rejected(pair.access_token)  # type: ignore[arg-type]
    assert first.value.retry_after == pytest.approx(backoff_delay(1, 0.5))
    clock.advance(0.5)
    with pytest.raises(RefreshTransient) as second:
        await manager.token_rejected(pair.access_token)  # type: ignore[arg-type]
    assert second.value.retry_after == pytest.approx(backoff_delay(1, 0.5) - 0.5)
    assert cloud.refresh_calls == 1


async def test_oauth2_flavor_refreshes_with_form_and_basic_auth(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """The oauth2 flavor posts grant_type=refresh_token with client credentials in HTTP Basic."""
    old = seed_store(store_path, cloud)
    cloud.oauth_client = ("cli", "s3cret")
    manager = await make_manager(
        flavor="oauth2", token_url=cloud.base_url + "/oauth/token", client_id="cli", client_secret="s3cret", scope="api"
    )
    clock.advance(86400)
    token = await manager.access_token()
    assert token != old.access_token
    assert cloud.last_oauth_form["grant_type"] == "refresh_token"
    assert cloud.last_oauth_form["scope"] == "api"
    stored = TokenFile(store_path).read().pair
    assert stored is not None and stored.refresh_token != old.refresh_token
    assert stored.expires_at == pytest.approx(clock.now + 86400, abs=1)


async def test_oauth2_invalid_grant_is_dead(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A 400 invalid_grant from an RFC 6749 endpoint clears the store."""
    seed_store(store_path, cloud)
    cloud.revoke_refresh_tokens()
    manager = await make_manager(flavor="oauth2", token_url=cloud.base_url + "/oauth/token")
    clock.advance(86400)
    with pytest.raises(NotLoggedIn):
        await manager.access_token()
    assert not store_path.exists()


@pytest.mark.parametrize("style", ["snake", "expires_in", "no_rotation"])
async def test_refresh_response_shapes_are_accepted(
    style: str, cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """snake_case names, expires_in and a response without a new refresh token all work."""
    old = seed_store(store_path, cloud)
    cloud.refresh_response_style = style
    manager = await make_manager()
    clock.advance(86400)
    token = await manager.access_token()
    stored = TokenFile(store_path).read().pair
    assert stored is not None and stored.access_token == token != old.access_token
    assert stored.expires_at == pytest.approx(clock.now + 86400, abs=1)
    if style == "no_rotation":
        assert stored.refresh_token == old.refresh_token
    else:
        assert stored.refresh_token != old.refresh_token


async def test_hung_token_endpoint_is_transient(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A token endpoint that never answers times out and the stored pair stays."""
    old = seed_store(store_path, cloud)
    before = store_path.read_bytes()
    cloud.hang_next_refreshes(1)
    manager = await make_manager(read_timeout=0.2)
    clock.advance(86400 - 60)
    assert await manager.access_token() == old.access_token
    assert manager.stats.transient == 1
    assert store_path.read_bytes() == before


async def test_unreachable_token_endpoint_is_transient(
    store_path: Path, clock: FakeClock, make_manager: ManagerFactory, unused_tcp_port: int
) -> None:
    """A refused connection keeps the pair and hands out the stale token."""
    old = TokenPair(
        access_token="at_x",
        refresh_token="rt_x",
        api_url=f"http://127.0.0.1:{unused_tcp_port}",
        expires_at=clock.now + 30,
        obtained_at=clock.now - 1000,
    )
    TokenFile(store_path).write(old)
    before = store_path.read_bytes()
    manager = await make_manager(upstream=None)
    assert await manager.access_token() == "at_x"
    assert manager.stats.transient == 1
    assert store_path.read_bytes() == before


async def test_manager_follows_logout_and_login_by_other_processes(
    cloud: MockCloud, store_path: Path, monotonic: FakeClock, make_manager: ManagerFactory
) -> None:
    """A deleted store means logged out and a newly written one is used, without a restart."""
    seed_store(store_path, cloud)
    manager = await make_manager()
    await manager.access_token()
    TokenFile(store_path).clear()
    monotonic.advance(2)
    with pytest.raises(NotLoggedIn):
        await manager.access_token()
    fresh = seed_store(store_path, cloud)
    assert await manager.access_token() == fresh.access_token


async def test_proactive_loop_refreshes_at_expiry_minus_leeway(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """The background loop refreshes once when expiry minus leeway arrives, not before."""
    seed_store(store_path, cloud, obtained_at=clock.now)
    start = clock.now
    refreshed_at: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        clock.advance(seconds)
        if cloud.refresh_ok and not refreshed_at:
            refreshed_at.append(clock.now)
        await asyncio.sleep(0)

    manager = await make_manager(leeway=120, sleep=fake_sleep)
    clock.advance(86400 - 120 - 5)  # the loop's steps are at most a second: start close
    task = asyncio.create_task(manager.run_proactive())
    try:
        for _ in range(200):
            if refreshed_at:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert cloud.refresh_ok == 1
    assert refreshed_at[0] - start == pytest.approx(86400 - 120, abs=1.5)

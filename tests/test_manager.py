"""The token manager against the mock cloud: the original fix's cases and the 401 path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import (
    FakeClock,
    ManagerFactory,
    pair_from_cloud,
    seed_expired,
    seed_store,
    stored,
)

from sidecar.auth.refresh import make_refresher
from sidecar.config import Settings
from sidecar.errors import NotLoggedIn, RefreshDead, RefreshTransient, StoreError
from sidecar.manager import TokenManager
from sidecar.mockcloud import MockCloud
from sidecar.refreshing import (
    BACKOFF_MAX,
    MIN_REFRESH_INTERVAL,
    REJECTION_COOLDOWN,
    Refresher,
    backoff_delay,
    cooldown_until,
    withholds_retry,
)
from sidecar.store.file import FileStore, TokenFile
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
    rejected = seed_store(store_path, cloud).access_token
    assert rejected is not None
    manager = await make_manager()
    tokens = await asyncio.gather(*(manager.token_rejected(rejected) for _ in range(20)))
    assert cloud.refresh_calls == 1
    current = manager.pair
    assert current is not None
    assert set(tokens) == {current.access_token} != {rejected}


async def test_rejected_token_during_backoff_reports_retry_after(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """While the token endpoint is failing a 401 yields RefreshTransient with the wait left."""
    rejected = seed_store(store_path, cloud).access_token
    assert rejected is not None
    manager = await make_manager()
    cloud.fail_next_refreshes(1, status=503)
    with pytest.raises(RefreshTransient) as first:
        await manager.token_rejected(rejected)
    assert first.value.retry_after == pytest.approx(backoff_delay(1, 0.5))
    clock.advance(0.5)
    with pytest.raises(RefreshTransient) as second:
        await manager.token_rejected(rejected)
    assert second.value.retry_after == pytest.approx(backoff_delay(1, 0.5) - 0.5)
    assert cloud.refresh_calls == 1


# -- no refresh storms from 401s (SPEC §3) ----------------------------------


def test_withholds_retry_only_during_the_cooldown_and_for_the_current_token() -> None:
    """A 401 is withheld only before the cooldown ends and only when retrying would force a refresh (it rejected the current token)."""
    assert withholds_retry("current", "current", 100.0, quiet_until=130.0)
    assert not withholds_retry("current", "current", 130.0, quiet_until=130.0)  # the cooldown is over
    assert not withholds_retry("current", "current", 100.0, quiet_until=0.0)  # no cooldown ever started
    assert not withholds_retry("older", "current", 100.0, quiet_until=130.0)  # retried with the current one, no refresh
    assert not withholds_retry("older", None, 100.0, quiet_until=130.0)  # no access token: refreshed anyway


def test_cooldown_until_starts_only_after_the_forced_token_and_is_not_extended() -> None:
    """Only a retry with the token a 401 forced, rejected again outside a cooldown, starts one of REJECTION_COOLDOWN seconds."""
    assert cooldown_until("forced", "forced", 100.0, quiet_until=0.0) == 100.0 + REJECTION_COOLDOWN
    assert cooldown_until("other", "forced", 100.0, quiet_until=0.0) is None  # no refresh was spent on it
    assert cooldown_until("forced", None, 100.0, quiet_until=0.0) is None  # no 401 forced a refresh
    assert cooldown_until("forced", "forced", 100.0, quiet_until=120.0) is None  # under way: not extended
    assert REJECTION_COOLDOWN == 30.0  # SPEC §3


async def forced_and_rejected_again(cloud: MockCloud, store_path: Path, manager: TokenManager) -> str:
    """A 401 forces a refresh, and the retry with its token is rejected again; the token it forced."""
    rejected = stored(store_path).access_token
    assert rejected is not None
    forced = await manager.token_rejected(rejected)
    assert forced != rejected
    assert cloud.refresh_calls == 1
    assert not manager.rejections.withholds_retry(forced)
    manager.rejections.rejected_again(forced)
    return forced


async def test_a_forced_token_rejected_again_withholds_401s_for_thirty_seconds(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Once the token a 401 forced draws a 401 again, 401s to it are withheld until 30 s later, then force a refresh again."""
    seed_store(store_path, cloud, obtained_at=clock())
    manager = await make_manager()
    forced = await forced_and_rejected_again(cloud, store_path, manager)
    assert manager.rejections.withholds_retry(forced)
    clock.advance(REJECTION_COOLDOWN - 0.1)
    assert manager.rejections.withholds_retry(forced)
    clock.advance(0.1)
    assert not manager.rejections.withholds_retry(forced)
    assert await manager.token_rejected(forced) != forced
    assert cloud.refresh_calls == 2


async def test_during_the_cooldown_an_older_token_is_retried_with_the_current_one(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A 401 to a token that is no longer current is not withheld: it is retried with the current token, which costs no refresh."""
    first = seed_store(store_path, cloud, obtained_at=clock()).access_token
    assert first is not None
    manager = await make_manager()
    forced = await forced_and_rejected_again(cloud, store_path, manager)
    assert not manager.rejections.withholds_retry(first)
    assert await manager.token_rejected(first) == forced
    assert cloud.refresh_calls == 1


async def test_a_rejected_retry_with_a_token_no_401_forced_starts_no_cooldown(
    cloud: MockCloud, store_path: Path, make_manager: ManagerFactory
) -> None:
    """A retry with the already-current token (no refresh spent) that draws a 401 again is no evidence: the next 401 still forces a refresh."""
    current = seed_store(store_path, cloud).access_token
    assert current is not None
    manager = await make_manager()
    assert await manager.token_rejected("at_old_token") == current
    manager.rejections.rejected_again(current)
    assert not manager.rejections.withholds_retry(current)
    assert await manager.token_rejected(current) != current
    assert cloud.refresh_calls == 1


async def test_the_cooldown_outlasts_a_scheduled_refresh(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Scheduled refreshes go on during the cooldown, and a 401 to the token one of them brought is still withheld."""
    cloud.access_ttl = 40.0  # due at half its life: 20 s, inside the cooldown
    seed_store(store_path, cloud, obtained_at=clock())
    manager = await make_manager()
    forced = await forced_and_rejected_again(cloud, store_path, manager)
    clock.advance(20)
    scheduled = await manager.access_token()
    assert scheduled != forced
    assert cloud.refresh_calls == 2
    assert manager.rejections.withholds_retry(scheduled)


async def test_the_cooldown_outlasts_a_new_login(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A new login landing in the store during the cooldown does not end it: a 401 to its token is withheld too."""
    seed_store(store_path, cloud, obtained_at=clock())
    manager = await make_manager()
    await forced_and_rejected_again(cloud, store_path, manager)
    login = seed_store(store_path, cloud, obtained_at=clock()).access_token
    assert login is not None
    await manager.load()
    assert await manager.access_token() == login
    assert manager.rejections.withholds_retry(login)


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


# -- grants without expiry, unsaved pairs, refresher errors ----------------------


# Inside the default 120 s leeway of a mock-cloud token (it lives a day), still valid.
INTO_LEEWAY = 86400.0 - 60.0


class NoExpiryEndpoint:
    """A token endpoint that grants a new pair without any expiry, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        self.calls += 1
        return TokenPair(
            access_token=f"at_noexpiry_{self.calls}",
            refresh_token=f"rt_noexpiry_{self.calls}",
            api_url=pair.api_url,
            expires_at=None,
            obtained_at=now,
        )


class EnoughSleeps(Exception):
    """Ends a proactive loop after the sleeps a test wanted to see."""


class LoopSpinning(BaseException):
    """Stops a proactive loop that keeps refreshing without sleeping (a BaseException: the loop catches Exception)."""


class CountingRefresher:
    """Passes refreshes to ``inner``, counting the attempts; raises LoopSpinning past ``guard`` of them."""

    def __init__(self, inner: Refresher, guard: int = 5) -> None:
        self.inner = inner
        self.guard = guard
        self.calls = 0

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        self.calls += 1
        if self.calls > self.guard:
            raise LoopSpinning()
        return await self.inner.refresh(pair, now)


class _FailingWrite:
    """A prepared write whose commit fails as on a full disk."""

    async def commit(self, pair: TokenPair) -> object:
        raise StoreError("cannot write token store: No space left on device")

    async def abort(self) -> None:
        pass


class StoreFailingOneCommit(FileStore):
    """A file store whose first refresh commit fails, as on a full disk; later writes work."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures_left = 1

    async def begin_write(self, expected: object) -> Any:
        if self.failures_left:
            self.failures_left -= 1
            return _FailingWrite()
        return await super().begin_write(expected)


def seed_without_api_url(store_path: Path, clock: FakeClock) -> TokenPair:
    """A store holding an expired pair without apiUrl (so with no upstream configured the refresher has no URL)."""
    pair = TokenPair(
        access_token="at_local_stale",
        refresh_token="rt_local_unknown",
        api_url=None,
        expires_at=clock() - 10,
        obtained_at=clock() - 100,
    )
    TokenFile(store_path).write(pair)
    return pair


async def test_grant_without_expiry_is_not_refreshed_on_every_use(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """After a grant with no expiry, 20 uses make one refresh call and the next refresh waits the minimum interval."""
    seed_expired(store_path, cloud)
    endpoint = NoExpiryEndpoint()
    manager = await make_manager(refresher=endpoint)
    tokens = [await manager.access_token() for _ in range(20)]
    assert endpoint.calls == 1
    assert set(tokens) == {"at_noexpiry_1"}
    next_refresh = manager.next_refresh_at()
    assert next_refresh is not None and next_refresh >= clock() + MIN_REFRESH_INTERVAL


async def test_unsaved_refreshed_pair_is_not_overridden_by_the_spent_one(
    cloud: MockCloud, store_path: Path, clock: FakeClock, monotonic: FakeClock
) -> None:
    """When the rotated pair could not be saved, the next refresh spends its refresh token, not the spent one still on disk, and saves the newest pair."""
    first = seed_store(store_path, cloud, obtained_at=clock())
    async with aiohttp.ClientSession() as session:
        settings = Settings(upstream=cloud.base_url, store=str(store_path), read_timeout=5.0)
        manager = TokenManager(
            StoreFailingOneCommit(store_path),
            make_refresher(session, settings),
            clock=clock,
            monotonic=monotonic,
            random=lambda: 0.5,
        )
        clock.advance(INTO_LEEWAY)
        unsaved = await manager.access_token()
        assert unsaved != first.access_token
        assert stored(store_path).refresh_token == first.refresh_token  # the file still holds the spent pair
        clock.advance(INTO_LEEWAY)
        newest = await manager.access_token()
    assert cloud.chain_revocations == 0
    assert cloud.refresh_calls == 2
    assert newest not in (first.access_token, unsaved)
    assert cloud.access_token_valid(newest)
    assert stored(store_path).access_token == newest


class _SlowWrite:
    """A prepared write that commits only once ``release`` is set, and sets ``writing`` while it waits."""

    def __init__(self, write: Any, writing: asyncio.Event, release: asyncio.Event) -> None:
        self._write, self._writing, self._release = write, writing, release

    async def commit(self, pair: TokenPair) -> object:
        self._writing.set()
        await self._release.wait()
        return await self._write.commit(pair)

    async def abort(self) -> None:
        await self._write.abort()


class StoreWithSlowCommit(FileStore):
    """A file store whose pair writes wait for ``release`` (a slow disk): ``writing`` is set while one waits."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writing, self.release = asyncio.Event(), asyncio.Event()

    async def begin_write(self, expected: object) -> Any:
        return _SlowWrite(await super().begin_write(expected), self.writing, self.release)


async def test_no_caller_gets_the_new_token_before_its_pair_is_saved(
    cloud: MockCloud, store_path: Path, clock: FakeClock, monotonic: FakeClock
) -> None:
    """While the rotated pair is being written, callers wait for the write: a token in use is always one the store has.

    (A kill in that moment loses the rotated refresh token either way; before this, a caller
    could be served with the new access token while the store still held the spent one.)
    """
    seed_expired(store_path, cloud)
    store = StoreWithSlowCommit(store_path)
    async with aiohttp.ClientSession() as session:
        settings = Settings(upstream=cloud.base_url, store=str(store_path), read_timeout=5.0)
        manager = TokenManager(store, make_refresher(session, settings), clock=clock, monotonic=monotonic)
        first = asyncio.ensure_future(manager.access_token())
        await asyncio.wait_for(store.writing.wait(), 5)
        second = asyncio.ensure_future(manager.access_token())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not first.done() and not second.done()
        store.release.set()
        tokens = await asyncio.gather(first, second)
    assert cloud.refresh_calls == 1
    assert tokens[0] == tokens[1] == stored(store_path).access_token


async def test_oauth2_wrong_client_secret_is_transient_not_dead(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """An oauth2 token endpoint refusing the client (401 invalid_client) keeps the store and the stale token, counting a transient failure."""
    old = seed_store(store_path, cloud)
    cloud.oauth_client = ("cli", "right")
    manager = await make_manager(
        flavor="oauth2", token_url=cloud.base_url + "/oauth/token", client_id="cli", client_secret="typo"
    )
    clock.advance(INTO_LEEWAY)
    assert await manager.access_token() == old.access_token
    assert cloud.refresh_calls == 1
    assert stored(store_path).refresh_token == old.refresh_token
    assert (manager.stats.transient, manager.stats.dead) == (1, 0)


async def test_refresher_config_error_is_transient_with_backoff(
    store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """With no upstream anywhere the refresh fails as transient: the stale token is handed out and a second use makes no second attempt."""
    stale = seed_without_api_url(store_path, clock)
    async with aiohttp.ClientSession() as session:
        refresher = CountingRefresher(make_refresher(session, Settings(store=str(store_path))))
        manager = await make_manager(refresher=refresher)
        assert [await manager.access_token(), await manager.access_token()] == [stale.access_token] * 2
    assert refresher.calls == 1
    assert manager.stats.transient == 1


async def test_proactive_loop_backs_off_after_a_refresher_config_error(
    store_path: Path, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """The proactive loop sleeps through the backoff after a configuration error instead of retrying at once."""
    seed_without_api_url(store_path, clock)
    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        clock.advance(0.01)  # 20 sleeps stay well inside the first backoff (1 s)
        if sleeps >= 20:
            raise EnoughSleeps()
        await asyncio.sleep(0)

    async with aiohttp.ClientSession() as session:
        refresher = CountingRefresher(make_refresher(session, Settings(store=str(store_path))))
        manager = await make_manager(refresher=refresher, sleep=sleep)
        with pytest.raises(EnoughSleeps):
            await asyncio.wait_for(manager.run_proactive(), 5)
    assert refresher.calls == 1
    assert sleeps == 20


@pytest.mark.parametrize(
    ("error", "hint"), [("invalid_scope", "check scope"), ("unauthorized_client", "refresh_token grant")]
)
async def test_oauth2_configuration_errors_are_transient_with_a_hint(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    store_path: Path,
    cloud: MockCloud,
    clock: FakeClock,
    make_manager: ManagerFactory,
    caplog: pytest.LogCaptureFixture,
    error: str,
    hint: str,
) -> None:
    """invalid_scope and unauthorized_client leave the refresh token unspent: transient, logged and reported with a hint."""

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"error": error}, status=400)

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    old = seed_store(store_path, cloud)
    manager = await make_manager(flavor="oauth2", token_url=str(server.make_url("/token")), client_id="cli")
    clock.advance(INTO_LEEWAY)
    assert await manager.access_token() == old.access_token
    assert (manager.stats.transient, manager.stats.dead) == (1, 0)
    assert error in (manager.stats.last_error or "") and hint in (manager.stats.last_error or "")
    assert "ERROR" in [r.levelname for r in caplog.records if hint in r.getMessage()]
    assert TokenFile(store_path).read().pair == old

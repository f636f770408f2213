"""The Redis store (SPEC §7) on a real redis-server: URLs, the CAS, the lock, events, outages, the CLI.

The behaviour every store shares is in test_store_contract.py; here is what
only a shared store has: other hosts writing, holders that stall past their
TTL, a Redis that goes away and comes back empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import child_env, free_port, pair_from_cloud, run_sidecar, start_sidecar
from helpers.redis_server import RedisServer, redis_server
from helpers.serving import running_serve, status_of

from sidecar.errors import ConfigError, StoreConflict, StoreError, StoreLockTimeout
from sidecar.mockcloud import MockCloud
from sidecar.store.interface import StoreSnapshot, TokenStore, write_pair
from sidecar.store.redis_store import RedisStore
from sidecar.store.redis_url import parse_redis_url
from sidecar.tokens import TokenPair

__all__ = ["redis_server"]  # the fixture, imported for pytest

PAIR = TokenPair("at-1", "rt-1", "https://cloud.example", 2_000_000_000.0, 1_999_990_000.0)
OTHER = TokenPair("at-2", "rt-2", "https://cloud.example", 2_000_000_500.0, 1_999_990_500.0)
SECRET = "hunter2-redis-pw"


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[RedisStore]]:
    """Stores opened on one login, as separate sidecars would; closed at the end."""
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        await store.aclose()


def open_on(
    server: RedisServer, opened: list[RedisStore], *, lock_ttl: float = 10.0, key: str | None = None
) -> RedisStore:
    store = RedisStore(parse_redis_url(server.url(key)), lock_ttl=lock_ttl)
    opened.append(store)
    return store


async def put(store: TokenStore, pair: TokenPair) -> None:
    snapshot = await store.read()
    await (await store.begin_write(snapshot.version)).commit(pair)


# -- URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0?key=team", "team", "redis://:***@127.0.0.1:6379/0 (login team)"),
        ("rediss://user:pw@redis.example:6380", "default", "rediss://user:***@redis.example:6380"),
        ("unix:///run/redis.sock?key=a", "a", "unix:///run/redis.sock (login a)"),
    ],
)
def test_redis_urls_name_the_login_and_never_show_the_password(url: str, name: str, shown: str) -> None:
    location = parse_redis_url(url)
    assert (location.name, location.shown) == (name, shown)
    assert "pw" not in repr(location)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+foo://h:1", "unknown Redis URL scheme"),
        ("redis://:pw@h:99999", "not a valid Redis URL"),
        ("redis://h:1/abc", "must be a database number"),
        ("redis://h:1?key=a%20b", "key must be"),
        ("redis://:pw@h:1?lock_ttl=0.1", "lock_ttl must be"),
        ("redis://:pw@h:1?lock_ttl=soon", "lock_ttl must be"),
        ("redis://:pw@h:1?replicas=-1", "replicas must be"),
    ],
)
def test_malformed_redis_urls_are_config_errors_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_redis_url(url)
    assert "pw" not in str(caught.value)


async def test_cli_exits_2_for_a_malformed_redis_url(tmp_path: Path) -> None:
    run = await run_sidecar(child_env(tmp_path, SIDECAR_STORE="redis://:s3cret@h:99999"), "status")
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1 and "s3cret" not in run.err


# -- records and the compare-and-set --------------------------------------


async def test_records_are_exactly_the_named_keys_in_one_hash_slot(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    store = open_on(redis_server, stores, key="team")
    async with store.refresh_lock(2.0):
        await put(store, PAIR)
        keys = sorted(redis_server.command("KEYS", "*").decode().split("\r\n")[2::2])
    assert keys == ["sidecar:{team}:lock", "sidecar:{team}:pair"]
    assert redis_server.command("HGET", "sidecar:{team}:pair", "refreshToken").endswith(b"rt-1\r\n")


async def test_a_write_over_a_stale_generation_is_refused(redis_server: RedisServer, stores: list[RedisStore]) -> None:
    """Two sidecars read generation G; the first write wins, the second (a spent refresh token's successor) is refused."""
    one, two = open_on(redis_server, stores), open_on(redis_server, stores)
    await put(one, PAIR)
    seen_by_two = (await two.read()).version
    await put(one, OTHER)
    with pytest.raises(StoreConflict):
        await (await two.begin_write(seen_by_two)).commit(PAIR)
    assert (await two.read()).pair == OTHER


async def test_a_new_record_starts_at_a_time_based_generation(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    """A Redis that came back empty never repeats an old generation (no ABA for a late writer)."""
    store = open_on(redis_server, stores)
    before = int(time.time() * 1000)
    await put(store, PAIR)
    first = int(str((await store.read()).version))
    await put(store, OTHER)
    assert first >= before and int(str((await store.read()).version)) == first + 1


def test_lock_ttl_is_a_url_parameter_kept_out_of_the_server_url() -> None:
    location = parse_redis_url("redis://:pw@127.0.0.1:6379/0?key=team&lock_ttl=2.5")
    assert location.lock_ttl == 2.5 and "lock_ttl" not in location.url and "key=" not in location.url
    assert parse_redis_url("redis://127.0.0.1").lock_ttl == 10.0


async def test_the_client_key_field_survives_writes_and_a_clear_and_is_no_pair(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    store = open_on(redis_server, stores)
    key = await store.client_key("k" * 43)
    assert key == "k" * 43 and await store.client_key("other" * 9) == key  # made once
    assert await store.read() == StoreSnapshot(None, None, None)  # only the key: nothing stored
    await put(store, PAIR)
    await put(store, OTHER)
    assert (await store.read()).pair == OTHER and await store.current_client_key() == key
    assert await store.clear() is True
    assert await store.read() == StoreSnapshot(None, None, None)
    assert await store.current_client_key() == key
    assert await store.clear() is False


# -- the lock ------------------------------------------------------------


async def test_a_holder_past_its_ttl_loses_the_lock_and_its_late_write_is_refused(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    """A stalled holder (its lock key with a short TTL and no watchdog): another takes over at the published deadline."""
    one, two = open_on(redis_server, stores), open_on(redis_server, stores)
    await put(one, PAIR)
    stale = (await one.read()).version
    deadline_ms = int(time.time() * 1000) + 200
    redis_server.command("SET", two.lock_key, f"stalled {deadline_ms}", "PX", "200")
    started = time.monotonic()
    async with two.refresh_lock(5.0):
        waited = time.monotonic() - started
        await put(two, OTHER)
    assert 0.1 < waited < 2.0
    with pytest.raises(StoreConflict):
        await (await one.begin_write(stale)).commit(PAIR)  # the stalled holder wakes and writes: refused
    assert (await one.read()).pair == OTHER


async def test_a_holder_whose_lock_was_taken_over_is_stopped_before_it_spends(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    """The fence in begin_write: a holder that stalled past its TTL learns it before spending the refresh token."""
    one, two = open_on(redis_server, stores, lock_ttl=0.3), open_on(redis_server, stores)
    await put(one, PAIR)
    async with one.refresh_lock(2.0):
        version = (await one.read()).version
        redis_server.command("SET", one.lock_key, "someone-else 0", "PX", "200")  # its TTL passed; another took it
        with pytest.raises(StoreConflict, match="taken over"):
            await one.begin_write(version)
    async with two.refresh_lock(2.0):
        stale = (await two.read()).version
        await put(one, OTHER)  # a write outside this holder's read
        with pytest.raises(StoreConflict, match="changed since it was read"):
            await two.begin_write(stale)
        assert await two.begin_write((await two.read()).version) is not None


async def test_the_watchdog_keeps_a_live_holders_lock_past_its_ttl(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    holder = open_on(redis_server, stores, lock_ttl=0.3)
    waiter = open_on(redis_server, stores, lock_ttl=0.3)
    async with holder.refresh_lock(2.0):
        with pytest.raises(StoreLockTimeout):
            async with waiter.refresh_lock(0.8):  # well past the 0.3 s TTL
                pass
    async with waiter.refresh_lock(2.0):  # released: at once
        pass


async def test_a_waiter_is_woken_by_the_release(redis_server: RedisServer, stores: list[RedisStore]) -> None:
    """The holder publishes 'unlocked': a waiter does not sit out the holder's 10 s deadline."""
    holder, waiter = open_on(redis_server, stores), open_on(redis_server, stores)
    await waiter.changed_since(None)  # its subscription is up
    release = asyncio.Event()

    async def hold() -> None:
        async with holder.refresh_lock(2.0):
            await release.wait()

    task = asyncio.create_task(hold())
    await asyncio.sleep(0)
    while await asyncio.to_thread(redis_server.command, "EXISTS", holder.lock_key) != b":1\r\n":
        await asyncio.sleep(0.01)
    started = time.monotonic()
    asyncio.get_running_loop().call_later(0.1, release.set)
    async with waiter.refresh_lock(5.0):
        assert time.monotonic() - started < 2.0
    await task


# -- events, outages ------------------------------------------------------


async def test_changed_since_follows_another_hosts_write_without_a_round_trip(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    reader, writer = open_on(redis_server, stores), open_on(redis_server, stores)
    await put(writer, PAIR)
    version = (await reader.read()).version
    assert not await reader.changed_since(version)
    for _ in range(200):
        if reader.following_events:
            break
        await asyncio.sleep(0.01)
    assert reader.following_events
    calls_before = redis_server.command("INFO", "commandstats")
    for _ in range(50):
        assert not await reader.changed_since(version)
    assert _hget_calls(redis_server.command("INFO", "commandstats")) == _hget_calls(calls_before)
    await put(writer, OTHER)
    for _ in range(200):
        if await reader.changed_since(version):
            break
        await asyncio.sleep(0.01)
    assert await reader.changed_since(version)


def _hget_calls(info: bytes) -> int:
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_hget:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_redis_down_is_a_one_line_store_error_and_an_empty_restart_is_logged_out(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, password=SECRET)
    server.start()
    store = RedisStore(parse_redis_url(server.url()))
    try:
        await put(store, PAIR)
        server.stop()
        with pytest.raises(StoreError) as caught:
            await store.read()
        message = str(caught.value)
        assert "cannot connect to Redis" in message and "***" in message and SECRET not in message
        assert "\n" not in message
        with pytest.raises(StoreError):
            await store.begin_write(None)  # found out before any refresh token is spent
        server.start()  # without its data
        snapshot = await store.read()
        assert snapshot.pair is None and snapshot.version is None
    finally:
        await store.aclose()
        server.stop()


async def test_a_wrong_password_is_a_one_line_store_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password=SECRET)
    server.start()
    store = RedisStore(parse_redis_url(server.url(password="wrong-pw")))
    try:
        with pytest.raises(StoreError, match="Redis refused the credentials") as caught:
            await store.read()
        assert "wrong-pw" not in str(caught.value)
    finally:
        await store.aclose()
        server.stop()


async def test_replicas_waits_for_a_replica_and_says_when_none_had_the_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``?replicas=1``: WAIT after each write of the pair; fewer acknowledgements than asked is a warning."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port)
    store = RedisStore(parse_redis_url(primary.url() + "?replicas=1"))
    try:
        await put(store, PAIR)  # no replica yet
        assert any("0 of 1 replicas had the new pair" in record.getMessage() for record in caplog.records)
        replica.start()
        for _ in range(500):
            if primary.replica_acknowledges():
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the replica never caught up with the primary")
        # WAIT gives a replica 500 ms; a loaded machine may need a second write to see it answer in time.
        for attempt in range(5):
            caplog.clear()
            written = (OTHER, PAIR)[attempt % 2]
            await put(store, written)
            if not [record for record in caplog.records if "replicas" in record.getMessage()]:
                break
        else:
            pytest.fail("not one of 5 writes was acknowledged by the replica within 500 ms")
        answer = replica.command("HGET", store.pair_key, "refreshToken")
        assert answer.endswith(written.refresh_token.encode() + b"\r\n")
    finally:
        await store.aclose()
        replica.stop()
        primary.stop()


# -- commands on a Redis store ------------------------------------------------


async def test_commands_work_on_a_redis_store_and_never_print_the_password(cloud: MockCloud, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password=SECRET)
    server.start()
    try:
        env = child_env(tmp_path / "xdg", SIDECAR_STORE=server.url())
        grant = cloud.issue_pair()
        imported = await run_sidecar(
            {**env, "SIDECAR_REFRESH_TOKEN": grant["refreshToken"], "SIDECAR_UPSTREAM": cloud.base_url}, "import"
        )
        assert imported.code == 0, imported.err
        token = await run_sidecar(env, "token")
        assert token.code == 0, token.err
        assert cloud.access_token_valid(token.out.strip())
        status = await run_sidecar(env, "status", "--json")
        assert status.code == 0 and json.loads(status.out)["loggedIn"] is True
        logout = await run_sidecar(env, "logout")
        assert logout.code == 0
        after = await run_sidecar(env, "status")
        assert after.code == 1
        for run in (imported, token, status, logout, after):
            assert SECRET not in run.out + run.err
        assert "***" in status.out
    finally:
        server.stop()


async def test_concurrent_token_commands_on_one_expired_redis_login_refresh_once(
    cloud: MockCloud, redis_server: RedisServer, stores: list[RedisStore], tmp_path: Path
) -> None:
    store = open_on(redis_server, stores)
    expired = dataclasses.replace(pair_from_cloud(cloud.issue_pair(), cloud.base_url), expires_at=time.time() - 10)
    await write_pair(store, lambda _: expired)
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=redis_server.url())
    processes = [await start_sidecar(env, "token") for _ in range(8)]
    results = await asyncio.gather(*(process.communicate() for process in processes))
    assert all(process.returncode == 0 for process in processes), [err for _, err in results]
    assert cloud.refresh_calls == 1
    assert len({out for out, _ in results}) == 1


# -- several serves, one login --------------------------------------------------


async def test_four_serves_on_one_expired_redis_login_refresh_once_for_200_requests(
    cloud: MockCloud, redis_server: RedisServer, stores: list[RedisStore], tmp_path: Path
) -> None:
    """Exactly one refresh call at the cloud, no reuse detection, all 200 — and a forced rotation reaches every serve."""
    store = open_on(redis_server, stores)
    expired = dataclasses.replace(pair_from_cloud(cloud.issue_pair(), cloud.base_url), expires_at=time.time() - 10)
    await write_pair(store, lambda _: expired)
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=redis_server.url(), SIDECAR_LOG_LEVEL="warning")
    async with contextlib.AsyncExitStack() as stack:
        served = [
            await stack.enter_async_context(running_serve(env, f"127.0.0.1:{free_port()}", ready=False))
            for _ in range(4)
        ]
        await asyncio.gather(*(one.wait_ready() for one in served))
        sessions = [await stack.enter_async_context(one.session()) for one in served]
        statuses = await asyncio.gather(*(status_of(served[i % 4], sessions[i % 4]) for i in range(200)))
        assert statuses == [200] * 200
        assert cloud.refresh_calls == 1
        assert cloud.chain_revocations == 0
        rotated = await run_sidecar(env, "token", "--force-refresh")
        assert rotated.code == 0, rotated.err
        new_token = rotated.out.strip()
        # Every serve adopts the new pair (events, else the once-a-second look) and uses it.
        for one, session in zip(served, sessions, strict=True):
            for _ in range(100):
                async with session.get(one.base_url + "/api/v1/echo") as response:
                    answer = await response.json()
                if answer["authorization"] == f"Bearer {new_token}":
                    break
                await asyncio.sleep(0.02)
            assert answer["authorization"] == f"Bearer {new_token}"
        assert cloud.refresh_calls == 2

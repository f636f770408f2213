"""The store interface's contract, run against every store.

Each test is written once against ``TokenStore`` and runs on the file store
(real files) and the memory store; a new backend joins by adding a case to
the ``store`` fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.redis_server import RedisServer

from sidecar.errors import StoreConflict, StoreLockTimeout
from sidecar.store.file import FileStore
from sidecar.store.interface import TokenStore, clear_store, write_pair
from sidecar.store.location import open_store
from sidecar.store.memory import MemoryStore
from sidecar.tokens import TokenPair

PAIR = TokenPair("at-1", "rt-1", "https://cloud.example", 2_000_000_000.0, 1_999_990_000.0)
OTHER = TokenPair("at-2", "rt-2", "https://cloud.example", 2_000_000_500.0, 1_999_990_500.0)


@pytest.fixture(params=["file", "memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    """One empty store of each kind (the Redis one on a real redis-server)."""
    if request.param == "file":
        yield FileStore(tmp_path / "tokens.json")
    elif request.param == "memory":
        yield MemoryStore()
    else:
        directory = tmp_path / "redis"
        directory.mkdir()
        server = RedisServer(directory)
        server.start()
        store = open_store(server.url())
        try:
            yield store
        finally:
            await store.aclose()  # type: ignore[attr-defined]
            server.stop()


async def put(store: TokenStore, pair: TokenPair) -> None:
    snapshot = await store.read()
    pending = await store.begin_write(snapshot.version)
    await pending.commit(pair)


async def test_empty_store_reads_as_no_pair_and_no_version(store: TokenStore) -> None:
    """A store nobody wrote holds no pair, names no problem and has no version."""
    snapshot = await store.read()
    assert (snapshot.pair, snapshot.problem, snapshot.version) == (None, None, None)


async def test_committed_pair_reads_back_equal(store: TokenStore) -> None:
    """What a commit stored is what the next read returns, field for field."""
    await put(store, PAIR)
    snapshot = await store.read()
    assert snapshot.pair == PAIR
    assert snapshot.version is not None


async def test_commit_returns_the_version_a_read_then_reports(store: TokenStore) -> None:
    """The version commit returns is the one the store is at afterwards."""
    pending = await store.begin_write(None)
    version = await pending.commit(PAIR)
    assert (await store.read()).version == version
    assert not await store.changed_since(version)


async def test_commit_over_a_stale_version_is_refused_and_keeps_the_newer_pair(store: TokenStore) -> None:
    """A write based on an old read raises StoreConflict and leaves what was written since."""
    await put(store, PAIR)
    stale = (await store.read()).version
    late = await store.begin_write(stale)
    await put(store, OTHER)  # a login lands while the refresh runs
    with pytest.raises(StoreConflict):
        await late.commit(TokenPair("at-late", "rt-late"))
    assert (await store.read()).pair == OTHER


async def test_write_expecting_empty_is_refused_once_a_pair_exists(store: TokenStore) -> None:
    """begin_write(None) means "the store was empty": a pair that appeared since wins."""
    pending = await store.begin_write(None)
    await put(store, PAIR)
    with pytest.raises(StoreConflict):
        await pending.commit(OTHER)
    assert (await store.read()).pair == PAIR


async def test_aborted_write_leaves_the_store_as_it_was(store: TokenStore) -> None:
    """abort() drops a prepared write; the stored pair and version stay."""
    await put(store, PAIR)
    before = await store.read()
    pending = await store.begin_write(before.version)
    await pending.abort()
    after = await store.read()
    assert (after.pair, after.version) == (PAIR, before.version)


async def test_changed_since_sees_every_write_and_clear(store: TokenStore) -> None:
    """changed_since is False for the current version and True after any write or clear."""
    await put(store, PAIR)
    version = (await store.read()).version
    assert not await store.changed_since(version)
    await put(store, OTHER)
    assert await store.changed_since(version)
    version = (await store.read()).version
    await store.clear()
    assert await store.changed_since(version)
    assert not await store.changed_since(None)


async def test_clear_forgets_the_pair_and_says_whether_there_was_one(store: TokenStore) -> None:
    """clear() returns True once, then False; the store reads empty."""
    await put(store, PAIR)
    assert await store.clear() is True
    assert await store.clear() is False
    assert (await store.read()).pair is None


async def test_refresh_lock_is_exclusive(store: TokenStore) -> None:
    """While one holder has the lock, a second waits for it and gets it once released."""
    order: list[str] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with store.refresh_lock(5.0):
            order.append("first in")
            held.set()
            await release.wait()
            order.append("first out")

    async def second() -> None:
        await held.wait()
        async with store.refresh_lock(5.0):
            order.append("second in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await held.wait()
    await asyncio.sleep(0.05)  # give the second a chance to (wrongly) get in
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["first in", "first out", "second in"]


async def test_refresh_lock_not_had_in_time_raises_lock_timeout(store: TokenStore) -> None:
    """A lock held past the waiter's deadline is StoreLockTimeout, never an endless wait."""
    async with store.refresh_lock(5.0):
        with pytest.raises(StoreLockTimeout):
            async with store.refresh_lock(0.1):
                pytest.fail("got a lock that was held")


async def test_refresh_lock_is_released_when_the_body_raises(store: TokenStore) -> None:
    """An exception inside the lock releases it for the next caller."""
    with pytest.raises(RuntimeError):
        async with store.refresh_lock(1.0):
            raise RuntimeError("refresh blew up")
    async with store.refresh_lock(0.5):
        pass


async def test_write_pair_builds_from_what_is_stored(store: TokenStore) -> None:
    """write_pair hands the current snapshot to its builder and stores the result."""
    await put(store, PAIR)
    seen: list[TokenPair | None] = []

    def build(snapshot: object) -> TokenPair:
        seen.append(getattr(snapshot, "pair", None))
        return OTHER

    assert await write_pair(store, build) == OTHER
    assert seen == [PAIR]
    assert (await store.read()).pair == OTHER


async def test_clear_store_takes_the_lock(store: TokenStore) -> None:
    """clear_store waits for the refresh lock: a logout never lands mid-refresh."""
    await put(store, PAIR)
    async with store.refresh_lock(5.0):
        with pytest.raises(StoreLockTimeout):
            await clear_store(store, lock_timeout=0.1)
    assert (await store.read()).pair == PAIR
    assert await clear_store(store) is True

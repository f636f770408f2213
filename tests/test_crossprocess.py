"""Several real ``sidecar token`` processes sharing one store: the lock, the re-read, crash safety.

The mock cloud serves from this test's event loop while the children run;
it counts refresh calls and chain revocations (a spent refresh token
presented twice), which is what "two processes must never both spend the
same refresh token" looks like from the cloud's side.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import signal
import stat
from pathlib import Path

import aiohttp
from conftest import (
    TIMEOUT,
    FakeClock,
    ManagerFactory,
    Run,
    finish,
    kill_running,
    poll_until,
    seed_expired,
    seed_store,
    start_sidecar,
    stored,
)

from sidecar.mockcloud import MockCloud
from sidecar.store.file import TokenFile

PROCESSES = 8
CRASH_ITERATIONS = 30
# Startup is ~0.2 s and a whole forced refresh ~0.25 s here, so kills in this
# window land before, during and after the refresh and the store write.
CRASH_MAX_DELAY = 0.4
CRASH_SEED = 20240229
WHOAMI = "/api/v1/auth/whoami"
REFRESH = "/api/v1/auth/token/refresh"


async def run_many(env: dict[str, str], count: int, *args: str) -> list[Run]:
    """Start ``count`` copies of ``sidecar ARGS`` at once and wait for all of them."""
    processes = [await start_sidecar(env, *args) for _ in range(count)]
    try:
        return list(await asyncio.gather(*(finish(process) for process in processes)))
    finally:
        await kill_running(processes)


async def whoami_status(cloud: MockCloud, access_token: str) -> int:
    """The cloud's answer to whoami with ``access_token``; 200 means it is live."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(cloud.base_url + WHOAMI, headers={"Authorization": f"Bearer {access_token}"}) as response,
    ):
        return response.status


async def refresh_status(cloud: MockCloud, refresh_token: str) -> int:
    """Spend ``refresh_token`` at the cloud; 200 means it was live and unspent."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(cloud.base_url + REFRESH, json={"refreshToken": refresh_token}) as response,
    ):
        return response.status


async def test_concurrent_token_processes_share_one_refresh(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """Eight ``sidecar token`` processes on one expired store cause exactly one refresh and all print its token."""
    old = seed_expired(store_path, cloud)
    runs = await run_many(env, PROCESSES, "token", "--store", str(store_path))
    assert [run.code for run in runs] == [0] * PROCESSES, runs
    assert cloud.refresh_calls == 1
    assert cloud.chain_revocations == 0
    new = stored(store_path)
    assert new.refresh_token != old.refresh_token
    assert {run.out for run in runs} == {f"{new.access_token}\n"}


async def test_concurrent_force_refreshes_serialise_on_the_lock(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """Eight ``token --force-refresh`` processes each refresh once, in turn, from the pair the previous one wrote.

    --force-refresh means "refresh once I hold the lock", so the count is
    exactly one per process; what the lock must rule out is two of them
    spending the same refresh token (a chain revocation).
    """
    seed_store(store_path, cloud)
    runs = await run_many(env, PROCESSES, "token", "--force-refresh", "--store", str(store_path))
    assert [run.code for run in runs] == [0] * PROCESSES, runs
    assert cloud.refresh_calls == PROCESSES
    assert cloud.chain_revocations == 0
    printed = [run.out.strip() for run in runs]
    assert len(set(printed)) == PROCESSES
    final = stored(store_path)
    assert final.access_token in printed
    assert final.access_token is not None
    assert await whoami_status(cloud, final.access_token) == 200
    assert await refresh_status(cloud, final.refresh_token) == 200


def _store_directory_files(store_path: Path) -> tuple[set[str], list[Path]]:
    """(names other than the store, its lock and temp files; the temp files)."""
    directory = store_path.parent
    temps = sorted(directory.glob(f".{store_path.name}.*.tmp"))
    others = (
        {entry.name for entry in directory.iterdir()}
        - {store_path.name, store_path.name + ".lock"}
        - {t.name for t in temps}
    )
    return others, temps


async def test_sigkill_at_any_moment_leaves_old_or_new_pair(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """SIGKILL at a random instant of ``token --force-refresh`` leaves the seeded pair or its rotated successor, never a torn file."""
    schedule = random.Random(CRASH_SEED)
    outcomes = {"untouched": 0, "spent-not-saved": 0, "rotated": 0}
    for _ in range(CRASH_ITERATIONS):
        seeded = seed_expired(store_path, cloud)
        seeded_bytes = store_path.read_bytes()
        rotations = cloud.refresh_ok
        process = await start_sidecar(env, "token", "--force-refresh", "--store", str(store_path))
        await asyncio.sleep(schedule.uniform(0.0, CRASH_MAX_DELAY))
        try:
            process.kill()
        except ProcessLookupError:
            pass  # it already finished
        await finish(process)

        snapshot = TokenFile(store_path).read()
        assert snapshot.problem is None
        assert snapshot.pair is not None
        if store_path.read_bytes() == seeded_bytes:
            outcomes["untouched" if cloud.refresh_ok == rotations else "spent-not-saved"] += 1
        else:
            pair = snapshot.pair
            assert cloud.refresh_ok > rotations
            assert pair.refresh_token != seeded.refresh_token
            assert pair.access_token is not None
            assert await whoami_status(cloud, pair.access_token) == 200
            # Live and unspent: the successor the cloud issued for the seeded token.
            assert await refresh_status(cloud, pair.refresh_token) == 200
            outcomes["rotated"] += 1
        others, temps = _store_directory_files(store_path)
        assert others == set()
        for temp in temps:
            assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    assert cloud.chain_revocations == 0
    assert sum(outcomes.values()) == CRASH_ITERATIONS
    _, temps = _store_directory_files(store_path)
    print(f"crash outcomes: {outcomes}; temp files left behind: {len(temps)}")


def lock_is_free(store_path: Path) -> bool:
    """Whether nobody holds the exclusive lock on ``<store>.lock`` right now."""
    fd = os.open(TokenFile(store_path).lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return True


async def test_sigkill_during_hung_refresh_releases_the_lock(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """A process killed while holding the lock and waiting on a hung token endpoint does not block the next one."""
    seeded = seed_store(store_path, cloud)
    seeded_bytes = store_path.read_bytes()
    cloud.hang_next_refreshes(1)
    hung = await start_sidecar(env, "token", "--force-refresh", "--store", str(store_path))
    try:
        await poll_until(
            lambda: cloud.refresh_calls == 1, TIMEOUT, "the hung refresh reaching the cloud", interval=0.01
        )
        assert not lock_is_free(store_path)
    finally:
        hung.kill()
        await finish(hung)
    assert hung.returncode == -9
    assert lock_is_free(store_path)
    assert store_path.read_bytes() == seeded_bytes
    # The temp file is opened before the network call, so this kill leaves
    # one behind; it must hold nothing yet and be private.
    others, temps = _store_directory_files(store_path)
    assert others == set()
    for temp in temps:
        assert temp.stat().st_size == 0
        assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    print(f"temp files left by the hung process: {len(temps)}")

    process = await start_sidecar(env, "token", "--force-refresh", "--store", str(store_path))
    run = await finish(process)
    assert run.code == 0, run
    new = stored(store_path)
    assert new.refresh_token != seeded.refresh_token
    assert run.out == f"{new.access_token}\n"
    assert cloud.refresh_calls == 2
    assert cloud.chain_revocations == 0


async def test_lock_held_by_a_stopped_process_makes_refreshes_transient_not_endless(
    cloud: MockCloud, store_path: Path, env: dict[str, str], clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A ``sidecar token`` stopped (SIGSTOP, as by Ctrl-Z) while it holds the lock costs others lock_timeout, then a stale token."""
    seeded = seed_store(store_path, cloud)
    cloud.hang_next_refreshes(1)
    holder = await start_sidecar(env, "token", "--force-refresh", "--store", str(store_path))
    try:
        await poll_until(lambda: cloud.refresh_calls == 1, TIMEOUT, "the holder's refresh reaching the cloud")
        holder.send_signal(signal.SIGSTOP)
        manager = await make_manager()
        manager.lock_timeout = 0.5
        clock.advance(86400)
        token = await asyncio.wait_for(manager.access_token(), TIMEOUT)
        assert token == seeded.access_token  # the stale token, as on any transient failure
        assert manager.stats.transient == 1
        assert "held by another process" in (manager.stats.last_error or "")
        assert cloud.refresh_calls == 1  # only the stalled holder's
    finally:
        holder.kill()
        await finish(holder)
    clock.advance(120)  # past the backoff
    assert await asyncio.wait_for(manager.access_token(), TIMEOUT) != seeded.access_token
    assert manager.stats.ok == 1

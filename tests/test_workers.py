"""``serve --workers N``: several processes on one port, one store, one refresh per expiry."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
from conftest import (
    assert_one_line_failure,
    run_sidecar,
    seed_expired,
)
from helpers.serving import Served, running_serve, status_of

from sidecar.mockcloud import MockCloud

WORKERS = 2
REQUESTS = 100


def worker_pids(parent: int) -> set[int]:
    """The live children of ``parent`` (Linux /proc)."""
    children: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.add(int(entry))
    return children


async def burst(served: Served, count: int) -> list[int]:
    # A fresh connection per request, so the kernel spreads them over the workers.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        return list(await asyncio.gather(*(status_of(served, session) for _ in range(count))))


async def test_workers_share_one_refresh_per_expiry(
    cloud: MockCloud, store_path: Path, env: dict[str, str], listen: str
) -> None:
    """Two workers on an expired store serve 100 concurrent requests with exactly one refresh call."""
    seed_expired(store_path, cloud)
    async with running_serve(
        env, listen, "--store", str(store_path), "--upstream", cloud.base_url, "--workers", str(WORKERS)
    ) as served:
        assert len(worker_pids(served.pid)) == WORKERS
        statuses = await burst(served, REQUESTS)
    assert statuses == [200] * REQUESTS
    assert cloud.refresh_calls == 1
    assert cloud.chain_revocations == 0


async def test_sigterm_stops_all_workers_with_exit_0(
    cloud: MockCloud, store_path: Path, env: dict[str, str], listen: str
) -> None:
    """SIGTERM to the parent stops every worker and the parent exits 0."""
    seed_expired(store_path, cloud)
    async with running_serve(
        env, listen, "--store", str(store_path), "--upstream", cloud.base_url, "--workers", str(WORKERS)
    ) as served:
        workers = worker_pids(served.pid)
        assert len(workers) == WORKERS
        assert await served.stop(signal.SIGTERM) == 0
    assert all(
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2] for pid in workers
    )


async def test_a_killed_worker_is_replaced(
    cloud: MockCloud, store_path: Path, env: dict[str, str], listen: str
) -> None:
    """A worker that dies is restarted and the proxy keeps answering."""
    seed_expired(store_path, cloud)
    async with running_serve(
        env, listen, "--store", str(store_path), "--upstream", cloud.base_url, "--workers", str(WORKERS)
    ) as served:
        # Not mid-refresh: a SIGKILL there can lose the rotated token (the crash tests cover that window).
        assert await burst(served, 4) == [200] * 4
        victim = min(worker_pids(served.pid))
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            pids = worker_pids(served.pid)
            if len(pids) == WORKERS and victim not in pids:
                break
            await asyncio.sleep(0.05)
        assert len(worker_pids(served.pid)) == WORKERS and victim not in worker_pids(served.pid)
        assert await burst(served, 20) == [200] * 20


async def test_workers_stop_when_the_parent_is_killed(
    cloud: MockCloud, store_path: Path, env: dict[str, str], listen: str
) -> None:
    """SIGKILL to the parent takes its workers down too: no orphan keeps serving the login."""
    seed_expired(store_path, cloud)
    async with running_serve(
        env, listen, "--store", str(store_path), "--upstream", cloud.base_url, "--workers", str(WORKERS)
    ) as served:
        workers = worker_pids(served.pid)
        served.process.kill()
        await served.process.wait()
        for _ in range(100):
            if not any(Path(f"/proc/{pid}").exists() for pid in workers):
                break
            await asyncio.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


async def test_workers_with_unix_socket_is_a_config_error(
    cloud: MockCloud, store_path: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """--workers 2 with a unix socket exits 2 with one line naming workers."""
    run = await run_sidecar(
        env,
        "serve",
        "--workers",
        "2",
        "--listen",
        f"unix:{tmp_path}/s.sock",
        "--store",
        str(store_path),
        "--upstream",
        cloud.base_url,
    )
    assert run.code == 2
    assert run.err.strip().count("\n") == 0 and "workers" in run.err


# -- startup failures ------------------------------------------------------------


# How long a subprocess that must fail at once may take; a hang fails the test.
FAIL_FAST = 6.0


async def test_workers_on_a_busy_port_exit_2_at_once(env: dict[str, str], store_path: Path) -> None:
    """serve --workers 2 on a port someone else holds exits 2 at once with one stderr line about listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = await run_sidecar(
            env,
            "serve",
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            str(store_path),
            "--upstream",
            "http://127.0.0.1:9",
            timeout=FAIL_FAST,
        )
    assert_one_line_failure(run, 2)
    assert "listen" in run.err

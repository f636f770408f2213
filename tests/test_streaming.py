"""One gibibyte each way through a real ``sidecar serve``, in bounded memory.

The serve child's resident set is sampled from ``/proc/<pid>/status`` by a
thread (the test's event loop is busy moving the bytes: it is both the mock
cloud and the client), so a proxy that buffered a body would show up as a
jump of hundreds of MiB. Throughput is printed (``pytest -s`` shows it); the
mock cloud shares a process with the client, so it is a floor, not the
proxy's ceiling.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Self

import aiohttp
import pytest
from conftest import seed_store
from helpers.serving import ECHO, Served, running_serve

from sidecar.mockcloud import MockCloud

pytestmark = pytest.mark.slow

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
# Well above what a streaming proxy needs (a few 256 KiB buffers per side)
# and far below what buffering even a tenth of the body would cost.
MAX_RSS_GROWTH = 64 * MIB
# The proxy reads and writes 256 KiB at a time; the client does the same.
CHUNK = 256 * 1024
# Often enough to catch a buffer that fills and drains within a second.
SAMPLE_INTERVAL = 0.01
# At the slowest speed seen on a loaded 2-core box (~50 MB/s) 1 GiB takes ~20 s.
TRANSFER = aiohttp.ClientTimeout(total=40.0)


def rss_bytes(pid: int) -> int:
    """The resident set size of ``pid``, from VmRSS in /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class RssSampler:
    """Samples a process's RSS from a thread until stopped; ``peak`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                rss = rss_bytes(self._pid)
            except (OSError, AssertionError):
                return  # the process is gone
            self.peak = max(self.peak, rss)
            self.samples += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def warm_up(served: Served) -> None:
    """One small request first, so lazily created pools and buffers count in the baseline."""
    async with served.session() as session, session.post(served.base_url + ECHO, data=b"warm-up") as response:
        assert response.status == 200
        await response.read()


def report(direction: str, count: int, seconds: float, sampler: RssSampler) -> None:
    print(
        f"\n{direction}: {count / MIB:.0f} MiB in {seconds:.2f} s = {count / 1e6 / seconds:.0f} MB/s; "
        f"serve RSS {sampler.baseline / MIB:.1f} MiB -> peak {sampler.peak / MIB:.1f} MiB "
        f"(+{sampler.growth / MIB:.1f} MiB, {sampler.samples} samples)"
    )


async def test_one_gib_download_streams_in_bounded_memory(
    cloud: MockCloud, store_path: Path, env: dict[str, str], unused_tcp_port: int
) -> None:
    """A 1 GiB response arrives complete while serve's RSS grows by less than 64 MiB."""
    seed_store(store_path, cloud)
    async with running_serve(
        env, f"127.0.0.1:{unused_tcp_port}", "--store", str(store_path), "--upstream", cloud.base_url
    ) as served:
        await warm_up(served)
        count = 0
        async with served.session(read_bufsize=CHUNK) as session:
            with RssSampler(served.pid) as sampler:
                started = time.perf_counter()
                async with session.get(f"{served.base_url}/api/v1/bytes?n={GIB}", timeout=TRANSFER) as response:
                    assert response.status == 200
                    async for chunk in response.content.iter_any():
                        count += len(chunk)
                seconds = time.perf_counter() - started
    report("download", count, seconds, sampler)
    assert count == GIB
    assert sampler.growth < MAX_RSS_GROWTH, f"serve grew by {sampler.growth / MIB:.1f} MiB"


async def test_one_gib_upload_streams_in_bounded_memory(
    cloud: MockCloud, store_path: Path, env: dict[str, str], unused_tcp_port: int
) -> None:
    """A 1 GiB request body with Content-Length (too big to replay) reaches the upstream whole while serve's RSS grows by less than 64 MiB."""
    seed_store(store_path, cloud)
    block = b"u" * CHUNK
    blocks = GIB // CHUNK
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(blocks):
            yield block

    async with running_serve(
        env, f"127.0.0.1:{unused_tcp_port}", "--store", str(store_path), "--upstream", cloud.base_url
    ) as served:
        await warm_up(served)
        async with served.session() as session:
            with RssSampler(served.pid) as sampler:
                started = time.perf_counter()
                headers = {"Content-Length": str(GIB), "Content-Type": "application/octet-stream"}
                async with session.post(
                    served.base_url + "/api/v1/upload", data=body(), headers=headers, timeout=TRANSFER
                ) as response:
                    assert response.status == 200
                    answer = await response.json()
                seconds = time.perf_counter() - started
    report("upload", answer["received"], seconds, sampler)
    assert answer["received"] == GIB
    assert answer["sha256"] == digest.hexdigest()
    assert sampler.growth < MAX_RSS_GROWTH, f"serve grew by {sampler.growth / MIB:.1f} MiB"

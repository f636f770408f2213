"""``sidecar serve`` as a real subprocess: start it, wait until it is healthy, read what it wrote, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, kill_running, start_sidecar

from sidecar.mockcloud import MockCloud

# How long a starting serve may take to answer /_sidecar/health.
READY_TIMEOUT = 10.0
# Between polls of something a child is about to do: short, since each poll is cheap.
POLL_INTERVAL = 0.05
ECHO = "/api/v1/echo"


class Served:
    """A running ``sidecar serve`` child, its captured output, and how to reach it."""

    def __init__(self, process: asyncio.subprocess.Process, base_url: str, unix_path: str | None) -> None:
        self.process = process
        self.base_url = base_url
        self.unix_path = unix_path
        self._out = bytearray()
        self._err = bytearray()
        assert process.stdout is not None and process.stderr is not None
        # Drained all the time, so a chatty child never blocks on a full pipe.
        self._readers = [
            asyncio.ensure_future(_drain(process.stdout, self._out)),
            asyncio.ensure_future(_drain(process.stderr, self._err)),
        ]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def session(self, **options: Any) -> aiohttp.ClientSession:
        """A client session that reaches this serve (over its unix socket if it has one)."""
        connector = aiohttp.UnixConnector(path=self.unix_path) if self.unix_path else aiohttp.TCPConnector()
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT), **options)

    async def wait_ready(self) -> None:
        """Poll /_sidecar/health until it answers 200; fail if the child dies or takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        async with self.session() as session:
            while True:
                if self.process.returncode is not None:
                    await self.finish()
                    pytest.fail(f"serve exited {self.process.returncode} before it was ready:\n{self.stderr}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(self.base_url + "/_sidecar/health") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    pytest.fail(f"serve did not answer /_sidecar/health within {READY_TIMEOUT} s:\n{self.stderr}")
                await asyncio.sleep(POLL_INTERVAL)

    async def wait_for_stderr(self, text: str) -> None:
        """Wait until ``text`` shows up on the child's stderr."""
        deadline = time.monotonic() + READY_TIMEOUT
        while text not in self.stderr:
            if time.monotonic() > deadline:
                pytest.fail(f"serve never wrote {text!r} to stderr:\n{self.stderr}")
            await asyncio.sleep(POLL_INTERVAL)

    async def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the child to exit and its output to be read; its exit code."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"serve {self.pid} did not exit within {timeout} s:\n{self.stderr}")
        await asyncio.gather(*self._readers)
        return code

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and wait for the exit code."""
        self.process.send_signal(signum)
        return await self.finish()

    async def kill(self) -> None:
        """Kill the child if it still runs, and stop reading its output."""
        await kill_running([self.process])
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def _drain(stream: asyncio.StreamReader, sink: bytearray) -> None:
    while chunk := await stream.read(65536):
        sink += chunk


@contextlib.asynccontextmanager
async def running_serve(env: dict[str, str], listen: str, *args: str, ready: bool = True) -> AsyncIterator[Served]:
    """Start ``sidecar serve --listen LISTEN ARGS``, wait until healthy, and always kill it afterwards."""
    if listen.startswith("unix:"):
        base_url, unix_path = "http://localhost", listen[len("unix:") :]
    else:
        # Traffic goes to loopback only, even when serve binds 0.0.0.0.
        base_url, unix_path = f"http://127.0.0.1:{listen.rpartition(':')[2]}", None
    served = Served(await start_sidecar(env, "serve", "--listen", listen, *args), base_url, unix_path)
    try:
        if ready:
            await served.wait_ready()
        yield served
    finally:
        await served.kill()


def access_lines(stderr: str) -> list[dict[str, Any]]:
    """The access-log records among the child's JSON log lines."""
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return [record for record in records if "method" in record]


def seed_env(env: dict[str, str], cloud: MockCloud, refresh_token: str) -> dict[str, str]:
    """``env`` plus the variables a container would carry on its first start."""
    return {**env, "SIDECAR_REFRESH_TOKEN": refresh_token, "SIDECAR_UPSTREAM": cloud.base_url}


async def status_of(served: Served, session: aiohttp.ClientSession) -> int:
    """The status of one GET of the echo endpoint through ``served``."""
    async with session.get(served.base_url + ECHO) as response:
        await response.read()
        return response.status

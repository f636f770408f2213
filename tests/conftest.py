"""Shared fixtures and helpers: a fake clock, the mock cloud on loopback, a token store in tmp_path, sidecar subprocesses.

Test modules import the plain helpers with ``from conftest import ...``; helpers that
belong to one family (raw HTTP, the scripted upstream, serve subprocesses) are in
tests/helpers/.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.scripted import Script, ScriptedUpstream, StartUpstream

from sidecar.auth.refresh import make_refresher
from sidecar.config import Settings
from sidecar.manager import TokenManager
from sidecar.mockcloud import MockCloud
from sidecar.store.file import FileStore, TokenFile
from sidecar.tokens import TokenPair, parse_timestamp

# The sidecar command as a subprocess, from this interpreter.
SIDECAR = [sys.executable, "-m", "sidecar"]
# Generous for a cold interpreter on a loaded CI box; a hang still fails fast.
TIMEOUT = 20.0
# The keys of every access log line (SPEC §4).
ACCESS_LOG_KEYS = {"ts", "method", "path", "status", "upstream_status", "duration_ms", "retried", "refreshed"}


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock(1000.0)


_clouds: list[MockCloud] = []
_logs: list[Any] = []


@pytest.fixture(autouse=True)
def no_token_leaks(caplog: pytest.LogCaptureFixture) -> Any:
    """After every test: no token the mock cloud minted appears in any log line.

    Covers everything logged through ``logging`` (at every level) and every
    in-process proxy's access log; subprocess tests check their own stderr.
    """
    caplog.set_level(logging.DEBUG)
    _clouds.clear()
    _logs.clear()
    yield
    tokens = set().union(*(cloud.minted for cloud in _clouds)) if _clouds else set()
    if not tokens:
        return
    formatter = logging.Formatter("%(message)s %(exc_text)s")
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    texts = [*(formatter.format(record) for record in records), *(log.getvalue() for log in _logs)]
    leaked = [token for token in tokens if any(token in text for text in texts)]
    assert not leaked, f"{len(leaked)} token value(s) appeared in log output"


@contextlib.asynccontextmanager
async def serving(mock: MockCloud) -> AsyncIterator[MockCloud]:
    """Run ``mock`` on loopback for the block; the tokens it mints are looked for in the logs at teardown."""
    _clouds.append(mock)
    await mock.start()
    try:
        yield mock
    finally:
        await mock.stop()


@pytest.fixture
async def cloud(clock: FakeClock) -> AsyncIterator[MockCloud]:
    async with serving(MockCloud(clock=clock)) as mock:
        yield mock


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "tokens.json"


def pair_from_cloud(grant: dict[str, Any], api_url: str, obtained_at: float | None = None) -> TokenPair:
    return TokenPair(
        access_token=grant["accessToken"],
        refresh_token=grant["refreshToken"],
        api_url=api_url,
        expires_at=parse_timestamp(grant["accessTokenExpiresAt"]),
        obtained_at=obtained_at,
    )


def seed_store(
    path: Path, cloud: MockCloud, *, obtained_at: float | None = None, access_ttl: float | None = None
) -> TokenPair:
    """Log in at the mock cloud and write that pair to the store file."""
    pair = pair_from_cloud(cloud.issue_pair(access_ttl=access_ttl), cloud.base_url, obtained_at)
    TokenFile(path).write(pair)
    return pair


def seed_expired(path: Path, cloud: MockCloud) -> TokenPair:
    """Write a new login from the cloud, with its access token already expired on disk."""
    pair = dataclasses.replace(pair_from_cloud(cloud.issue_pair(), cloud.base_url), expires_at=time.time() - 10)
    TokenFile(path).write(pair)
    return pair


def stored(path: Path) -> TokenPair:
    """The pair in the store file; fails the test if there is none."""
    snapshot = TokenFile(path).read()
    assert snapshot.problem is None
    assert snapshot.pair is not None
    return snapshot.pair


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without SIDECAR_* variables, plus ``extra``.

    Python children dump every thread's stack on SIGABRT (faulthandler): ``finish`` shows where a hung one was.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("SIDECAR_")}
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


def child_env(xdg: Path, **extra: str) -> dict[str, str]:
    """A child environment without SIDECAR_*, without a display (no browser opens), with ``xdg`` as XDG config home, plus ``extra``."""
    child = clean_env(XDG_CONFIG_HOME=str(xdg), **extra)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        child.pop(name, None)
    return child


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A child environment without SIDECAR_*, without a display (no browser opens), with an empty XDG config home."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(exist_ok=True)
    return child_env(xdg)


@pytest.fixture
def listen(unused_tcp_port: int) -> str:
    """A free loopback ``HOST:PORT`` for ``--listen``."""
    return f"127.0.0.1:{unused_tcp_port}"


def free_port() -> int:
    """A loopback port that was free a moment ago: nothing listens on it now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- subprocesses -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """What one finished process did."""

    code: int
    out: str
    err: str


async def start_sidecar(
    env: dict[str, str], *args: str, stderr: Any = subprocess.PIPE, umask: int = -1
) -> asyncio.subprocess.Process:
    """Start ``sidecar ARGS`` with ``env`` and no stdin; stdout is a pipe, and so is stderr unless ``stderr`` says otherwise."""
    return await asyncio.create_subprocess_exec(
        *SIDECAR, *args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, umask=umask
    )


async def finish(
    process: asyncio.subprocess.Process, already: str = "", *, timeout: float = TIMEOUT, what: str | None = None
) -> Run:
    """Wait for ``process`` and read the rest of its output (``already``: stderr read before, put in front).

    Fails the test if it outlives ``timeout``, with its stderr and the stacks it dumps on SIGABRT
    (``clean_env`` turns faulthandler on); ``what`` names it in that failure.
    """
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        pytest.fail(
            f"{what or f'sidecar process {process.pid}'} did not finish within {timeout} s:\n" + await abort(process)
        )
    assert process.returncode is not None
    return Run(process.returncode, (out or b"").decode(), already + (err or b"").decode())


async def abort(process: asyncio.subprocess.Process) -> str:
    """Stop a hung child with SIGABRT (its stacks, if it has faulthandler on), then SIGKILL; the end of its stderr."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGABRT)
    err = b""
    with contextlib.suppress(TimeoutError):
        _, err = await asyncio.wait_for(process.communicate(), 5)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
    return (err or b"").decode(errors="replace")[-4000:]


async def run_sidecar(env: dict[str, str], *args: str, timeout: float = TIMEOUT, umask: int = -1) -> Run:
    """Run ``sidecar ARGS`` to completion; kill it and fail if it outlives ``timeout``."""
    process = await start_sidecar(env, *args, umask=umask)
    return await finish(process, timeout=timeout, what=f"sidecar {' '.join(args)}")


async def kill_running(processes: Iterable[asyncio.subprocess.Process]) -> None:
    """Kill and reap each of ``processes`` that still runs."""
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_lines_until(stream: asyncio.StreamReader | None, mark: str, timeout: float, what: str) -> list[str]:
    """Read lines from ``stream`` (``what``, for failures) until one contains ``mark``; every line read, that one last.

    Fails the test if ``timeout`` passes or the stream ends first.
    """
    assert stream is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no line containing {mark!r} on {what} within {timeout} s; {what} so far: {''.join(seen)!r}")
        try:
            raw = await asyncio.wait_for(stream.readline(), remaining)
        except TimeoutError:
            continue
        if not raw:
            pytest.fail(f"{what} closed before a line containing {mark!r}; {what}: {''.join(seen)!r}")
        seen.append(raw.decode())
        if mark in seen[-1]:
            return seen


async def poll_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> None:
    """Call ``condition`` (plain or async) every ``interval`` seconds until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(interval)


def assert_one_line_failure(run: Run, code: int) -> None:
    """``run`` exited ``code`` with exactly one non-empty stderr line and no traceback on stdout or stderr."""
    assert run.code == code, run
    assert "Traceback" not in run.out + run.err, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err


ManagerFactory = Callable[..., Awaitable[TokenManager]]


@pytest.fixture
async def make_manager(
    cloud: MockCloud, store_path: Path, clock: FakeClock, monotonic: FakeClock
) -> AsyncIterator[ManagerFactory]:
    """Build TokenManagers on the test's store, clock and mock cloud."""
    sessions: list[aiohttp.ClientSession] = []

    async def factory(
        *, leeway: float = 120.0, sleep: Any = None, refresher: Any = None, **overrides: Any
    ) -> TokenManager:
        session = aiohttp.ClientSession()
        sessions.append(session)
        settings = Settings(**{"upstream": cloud.base_url, "store": str(store_path), "read_timeout": 5.0, **overrides})
        extra = {"sleep": sleep} if sleep is not None else {}
        return TokenManager(
            FileStore(store_path),
            refresher or make_refresher(session, settings),
            leeway=leeway,
            clock=clock,
            monotonic=monotonic,
            random=lambda: 0.5,
            **extra,
        )

    yield factory
    for session in sessions:
        await session.close()


class RunningProxy:
    """A real listening sidecar proxy in this event loop."""

    def __init__(self, url: str, sidecar: Any, log: Any) -> None:
        self.url = url
        self.sidecar = sidecar
        self.log = log

    @property
    def manager(self) -> TokenManager:
        manager: TokenManager = self.sidecar.manager
        return manager


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(cloud: MockCloud, store_path: Path, clock: FakeClock) -> AsyncIterator[ProxyFactory]:
    """Start proxies (upstream: the mock cloud) on 127.0.0.1; each logs JSON into a StringIO.

    Keyword arguments override Settings; ``proactive`` turns the background
    refresh loop on (off by default so tests control every refresh).
    """
    import io

    from aiohttp import web

    from sidecar.server.app import running_sidecar
    from sidecar.server.listen import ListenAddress, open_site

    stack = contextlib.AsyncExitStack()

    async def factory(*, proactive: bool = False, **overrides: Any) -> RunningProxy:
        settings = Settings(
            **{
                "upstream": cloud.base_url,
                "store": str(store_path),
                "read_timeout": 5.0,
                "log_format": "json",
                **overrides,
            }
        )
        log = io.StringIO()
        _logs.append(log)
        sidecar = await stack.enter_async_context(
            running_sidecar(settings, log_stream=log, clock=clock, proactive=proactive)
        )
        runner = web.ServerRunner(sidecar.server, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        url = await open_site(runner, ListenAddress(host="127.0.0.1", port=0))
        return RunningProxy(url, sidecar, log)

    async with stack:
        yield factory


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no connection limit that never decompresses."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:
        yield session


@pytest.fixture
def login(store_path: Path, cloud: MockCloud, clock: FakeClock) -> TokenPair:
    """A fresh login at the mock cloud, in the store."""
    return seed_store(store_path, cloud, obtained_at=clock())


@pytest.fixture
async def proxy(login: TokenPair, make_proxy: ProxyFactory) -> RunningProxy:
    """A proxy in front of the mock cloud, logged in."""
    return await make_proxy()


@pytest.fixture
async def upstream() -> AsyncIterator[StartUpstream]:
    """Start scripted raw upstreams (tests/helpers/scripted.py); all are stopped (handlers cancelled) at teardown."""
    started: list[ScriptedUpstream] = []

    async def start(script: Script) -> ScriptedUpstream:
        server = ScriptedUpstream(script)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()

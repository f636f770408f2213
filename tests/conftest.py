"""Shared fixtures: a fake clock, the mock cloud on loopback, a token store in tmp_path."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from sidecar.config import Settings
from sidecar.manager import TokenManager
from sidecar.mockcloud import MockCloud
from sidecar.refresh import make_refresher
from sidecar.store import TokenStore
from sidecar.tokens import TokenPair, parse_timestamp

# The sidecar command as a subprocess, from this interpreter.
SIDECAR = [sys.executable, "-m", "sidecar"]


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


@pytest.fixture
async def cloud(clock: FakeClock) -> AsyncIterator[MockCloud]:
    mock = MockCloud(clock=clock)
    _clouds.append(mock)
    await mock.start()
    try:
        yield mock
    finally:
        await mock.stop()


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


def seed_store(path: Path, cloud: MockCloud, *, obtained_at: float | None = None, access_ttl: float | None = None) -> TokenPair:
    """Log in at the mock cloud and write that pair to the store file."""
    pair = pair_from_cloud(cloud.issue_pair(access_ttl=access_ttl), cloud.base_url, obtained_at)
    TokenStore(path).write(pair)
    return pair


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without SIDECAR_* variables, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SIDECAR_")}
    env.update(extra)
    return env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A child environment without SIDECAR_*, without a display (no browser opens), with an empty XDG config home."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(exist_ok=True)
    child = clean_env(XDG_CONFIG_HOME=str(xdg))
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        child.pop(name, None)
    return child


@pytest.fixture
def listen(unused_tcp_port: int) -> str:
    """A free loopback ``HOST:PORT`` for ``--listen``."""
    return f"127.0.0.1:{unused_tcp_port}"


ManagerFactory = Callable[..., Awaitable[TokenManager]]


@pytest.fixture
async def make_manager(cloud: MockCloud, store_path: Path, clock: FakeClock, monotonic: FakeClock) -> AsyncIterator[ManagerFactory]:
    """Build TokenManagers on the test's store, clock and mock cloud."""
    sessions: list[aiohttp.ClientSession] = []

    async def factory(*, leeway: float = 120.0, sleep: Any = None, refresher: Any = None, **overrides: Any) -> TokenManager:
        session = aiohttp.ClientSession()
        sessions.append(session)
        settings = Settings(**{"upstream": cloud.base_url, "store": str(store_path), "read_timeout": 5.0, **overrides})
        extra = {"sleep": sleep} if sleep is not None else {}
        return TokenManager(
            TokenStore(store_path),
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
        return self.sidecar.manager


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(cloud: MockCloud, store_path: Path, clock: FakeClock) -> AsyncIterator[ProxyFactory]:
    """Start proxies (upstream: the mock cloud) on 127.0.0.1; each logs JSON into a StringIO.

    Keyword arguments override Settings; ``proactive`` turns the background
    refresh loop on (off by default so tests control every refresh).
    """
    import contextlib
    import io

    from aiohttp import web

    from sidecar.app import running_sidecar
    from sidecar.serve import ListenAddress, open_site

    stack = contextlib.AsyncExitStack()

    async def factory(*, proactive: bool = False, **overrides: Any) -> RunningProxy:
        settings = Settings(**{"upstream": cloud.base_url, "store": str(store_path), "read_timeout": 5.0, "log_format": "json", **overrides})
        log = io.StringIO()
        _logs.append(log)
        sidecar = await stack.enter_async_context(running_sidecar(settings, log_stream=log, clock=clock, proactive=proactive))
        runner = web.ServerRunner(sidecar.server, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        url = await open_site(runner, ListenAddress(host="127.0.0.1", port=0))
        return RunningProxy(url, sidecar, log)

    async with stack:
        yield factory

"""``sidecar demo``: its own mock cloud, a real login, the proxy, and the curl lines it prints.

Each test starts the demo as a real process on a free loopback port, waits
for its instructions on stdout, and talks to it the way the printed curl
lines do.  The demo's stderr (JSON access logs) goes to a file so the pipe
never fills.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import child_env, finish, free_port, kill_running, read_lines_until, start_sidecar

# A cold start (interpreter, mock cloud, login, proxy) takes about a second here.
START_TIMEOUT = 15.0
# Shutdown waits for requests in flight; none are, so this is generous.
STOP_TIMEOUT = 10.0
# With --access-ttl 2 the first proactive refresh is due after half the lifetime.
REFRESH_WAIT = 5.0
READY_MARK = "Press Ctrl-C"


@dataclasses.dataclass(slots=True)
class Demo:
    """A running ``sidecar demo`` process and what its instructions said."""

    process: asyncio.subprocess.Process
    port: int
    out: str
    stderr_path: Path
    proxy_url: str
    cloud_url: str
    store: Path

    def curl_lines(self) -> list[str]:
        return [line.strip() for line in self.out.splitlines() if line.strip().startswith("curl ")]


@pytest.fixture
def xdg(tmp_path: Path) -> Path:
    """An empty XDG config home for the demo process."""
    path = tmp_path / "xdg"
    path.mkdir()
    return path


def _field(out: str, label: str) -> str:
    match = re.search(rf"^\s*{label}\s*:\s*(\S+)", out, re.MULTILINE)
    assert match, f"no {label!r} line in the demo's output: {out!r}"
    return match.group(1)


async def read_until_ready(process: asyncio.subprocess.Process, timeout: float = START_TIMEOUT) -> str:
    """Read stdout until the line saying Ctrl-C stops the demo; return all of it."""
    return "".join(await read_lines_until(process.stdout, READY_MARK, timeout, "the demo's stdout"))


DemoFactory = Callable[..., Awaitable[Demo]]


@pytest.fixture
def demo_tmp(tmp_path: Path) -> Path:
    """TMPDIR for the demo process, so its throwaway store lands where the test can see it."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


Spawn = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, Path]]]


@pytest.fixture
async def spawn_demo(tmp_path: Path, xdg: Path, demo_tmp: Path) -> AsyncIterator[Spawn]:
    """Start ``sidecar demo --listen 127.0.0.1:PORT ARGS``; returns it and its stderr file; kills any still running at teardown."""
    started: list[asyncio.subprocess.Process] = []
    files: list[Any] = []

    async def factory(port: int, *args: str) -> tuple[asyncio.subprocess.Process, Path]:
        stderr_path = tmp_path / f"demo-{len(started)}.stderr"
        stderr = open(stderr_path, "wb")  # noqa: SIM115 - a local file, closed at teardown after the process is gone
        files.append(stderr)
        env = child_env(xdg, TMPDIR=str(demo_tmp))
        process = await start_sidecar(env, "demo", "--listen", f"127.0.0.1:{port}", *args, stderr=stderr)
        started.append(process)
        return process, stderr_path

    try:
        yield factory
    finally:
        await kill_running(started)
        for file in files:
            file.close()


@pytest.fixture
def start_demo(spawn_demo: Spawn) -> DemoFactory:
    """Start a demo on a free port and wait until it prints its instructions."""

    async def factory(*args: str) -> Demo:
        port = free_port()
        process, stderr_path = await spawn_demo(port, *args)
        out = await read_until_ready(process)
        return Demo(
            process,
            port,
            out,
            stderr_path,
            _field(out, "proxy"),
            _field(out, "mock cloud"),
            Path(_field(out, "token store")),
        )

    return factory


async def stop(demo: Demo, signum: int = signal.SIGINT) -> tuple[int, str]:
    """Signal the demo; return its exit code and the rest of its stdout (fail if it outlives STOP_TIMEOUT)."""
    demo.process.send_signal(signum)
    run = await finish(demo.process, timeout=STOP_TIMEOUT, what=f"the demo, sent signal {signum},")
    return run.code, run.out


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return response.status, orjson.loads(await response.read())


async def test_demo_proxy_answers_whoami_as_alice(start_demo: DemoFactory) -> None:
    """A plain GET through the demo's proxy to whoami gets 200 for alice: the proxy injected the token."""
    demo = await start_demo()
    status, body = await get_json(demo.proxy_url + "/api/v1/auth/whoami")
    assert status == 200
    assert body["name"] == "alice"


async def test_demo_status_shows_logged_in(start_demo: DemoFactory) -> None:
    """The demo's /_sidecar/status reports loggedIn true against its own mock cloud."""
    demo = await start_demo()
    status, body = await get_json(demo.proxy_url + "/_sidecar/status")
    assert status == 200
    assert body["loggedIn"] is True
    assert body["apiUrl"] == demo.cloud_url


async def test_demo_prints_proxy_url_on_the_listen_port(start_demo: DemoFactory) -> None:
    """The printed proxy URL is the --listen address and every curl line that goes through the proxy uses it."""
    demo = await start_demo()
    assert demo.proxy_url == f"http://127.0.0.1:{demo.port}"
    proxied = [line for line in demo.curl_lines() if demo.cloud_url not in line]
    assert proxied
    assert all(demo.proxy_url in line for line in proxied)


async def test_demo_prints_status_and_revoke_curl_lines(start_demo: DemoFactory) -> None:
    """The printed curl lines include the proxy's /_sidecar/status and the cloud's /_mock/revoke-refresh."""
    demo = await start_demo()
    lines = demo.curl_lines()
    assert any(f"{demo.proxy_url}/_sidecar/status" in line for line in lines), lines
    assert any(f"{demo.cloud_url}/_mock/revoke-refresh" in line and "-X POST" in line for line in lines), lines


def tried_commands(out: str) -> list[str]:
    """The shell commands under "Try, in another terminal:", continuation lines joined."""
    block = out.split("Try, in another terminal:", 1)[1].split(READY_MARK, 1)[0]
    joined = re.sub(r"\\\n", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip()]


async def run_shell(shell: list[str], command: str, cwd: Path) -> tuple[int, str, str]:
    """Run one printed command the way a user pasting it would; bounded."""
    process = await asyncio.create_subprocess_exec(
        *shell, command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run = await finish(process, timeout=START_TIMEOUT, what=repr(command))
    return run.code, run.out, run.err


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_demo_printed_commands_run_in_sh(start_demo: DemoFactory, tmp_path: Path) -> None:
    """Each printed command, pasted into sh, exits 0; whoami answers alice and the last one gets the 511."""
    demo = await start_demo()
    commands = tried_commands(demo.out)
    assert len(commands) == 4, commands
    results = [await run_shell(["sh", "-c"], command, tmp_path) for command in commands]
    assert [code for code, _, _ in results] == [0] * len(commands), results
    assert '"alice"' in results[0][1]
    assert "511" in results[-1][1].splitlines()[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_demo_printed_commands_survive_strict_globbing(start_demo: DemoFactory, tmp_path: Path) -> None:
    """Each printed command also runs where an unmatched glob is an error (bash -O failglob, like zsh's default)."""
    demo = await start_demo()
    for command in tried_commands(demo.out):
        code, _, err = await run_shell(["bash", "-O", "failglob", "-c"], command, tmp_path)
        assert code == 0, (command, err)


async def test_demo_revoke_lines_then_request_gets_511(start_demo: DemoFactory) -> None:
    """Running the printed revoke POSTs against the cloud makes the next proxied request a 511 re-login problem."""
    demo = await start_demo()
    posts = [url.strip("'") for url in re.findall(r"curl -s -X POST (\S+)", demo.out)]
    assert any(url.endswith("/_mock/revoke-refresh") for url in posts), demo.out
    async with aiohttp.ClientSession() as client:
        for url in posts:
            assert url.startswith(demo.cloud_url)
            async with client.post(url) as response:
                assert response.status == 200
        async with client.get(demo.proxy_url + "/api/v1/echo") as response:
            assert response.status == 511
            assert response.headers.get("X-Sidecar-Error") == "relogin-required"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_signal_exits_0_and_removes_its_temp_store(start_demo: DemoFactory, signum: signal.Signals) -> None:
    """SIGINT or SIGTERM stops the demo with exit 0 and deletes the temporary directory holding its token store."""
    demo = await start_demo()
    assert demo.store.parent.is_dir()
    code, rest = await stop(demo, signum)
    assert code == 0, rest
    assert "demo stopped" in rest
    assert not demo.store.parent.exists()


async def test_demo_busy_port_exits_2_and_removes_its_temp_store(spawn_demo: Spawn, demo_tmp: Path) -> None:
    """A --listen port already in use ends the demo with exit 2, one error line naming listen, and no temp directory left."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        process, stderr_path = await spawn_demo(busy.getsockname()[1])
        try:
            out, _ = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"the demo did not give up on a busy port within {START_TIMEOUT} s")
    assert process.returncode == 2, out
    assert READY_MARK not in out.decode()
    errors = [line for line in stderr_path.read_text().splitlines() if "error" in line]
    assert len(errors) == 1 and "listen" in errors[0], errors
    assert list(demo_tmp.iterdir()) == []


async def test_demo_never_prints_its_tokens(start_demo: DemoFactory) -> None:
    """The tokens in the demo's store appear in neither its stdout nor its stderr."""
    demo = await start_demo()
    document = orjson.loads(demo.store.read_bytes())
    await get_json(demo.proxy_url + "/api/v1/auth/whoami")
    code, rest = await stop(demo)
    assert code == 0
    output = demo.out + rest + demo.stderr_path.read_text()
    for secret in (document["accessToken"], document["refreshToken"]):
        assert secret not in output


async def test_demo_leaves_the_users_store_alone(start_demo: DemoFactory, xdg: Path, demo_tmp: Path) -> None:
    """The demo logs in to a throwaway store under TMPDIR; the user's default store stays byte for byte as it was."""
    users = xdg / "sidecar" / "tokens.json"
    users.parent.mkdir(mode=0o700)
    users.write_bytes(
        orjson.dumps({"accessToken": "at_user", "refreshToken": "rt_user", "apiUrl": "http://127.0.0.1:9"})
    )
    before = users.read_bytes()
    demo = await start_demo()
    assert demo.store.is_relative_to(demo_tmp)
    code, _ = await stop(demo)
    assert code == 0
    assert users.read_bytes() == before


async def test_demo_short_tokens_refresh_proactively(start_demo: DemoFactory) -> None:
    """With --access-ttl 2 the background refresh runs without any request: refreshes.ok reaches 1 within seconds."""
    demo = await start_demo("--access-ttl", "2")
    deadline = time.monotonic() + REFRESH_WAIT
    body: Any = None
    while time.monotonic() < deadline:
        _, body = await get_json(demo.proxy_url + "/_sidecar/status")
        if body["refreshes"]["ok"] >= 1:
            break
        await asyncio.sleep(0.2)
    assert body is not None and body["refreshes"]["ok"] >= 1, body
    assert body["loggedIn"] is True

"""Who may use the login (SPEC §9), end to end: a real second user, real serves, the mock cloud counting what reaches it.

The other user is ``sidecar-other`` (``.ci/run`` creates it; these tests
create it too when they run as root, and are skipped otherwise).  Its
programs are a small stdlib client run with ``setpriv``; the serve is a real
subprocess, or an in-process one where a test injects the clock or the
uid lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import FakeClock, _logs, run_sidecar, start_sidecar
from helpers.serving import ECHO, Served

from sidecar.callers import peer
from sidecar.callers.gate import CallerGate, build_gate
from sidecar.callers.keys import KEY_SUFFIX, RECHECK_SECONDS, KeyFile
from sidecar.config import Settings
from sidecar.mockcloud import MockCloud
from sidecar.server.app import running_sidecar
from sidecar.server.listen import ListenAddress, open_site
from sidecar.tokens import TokenPair

OTHER = "sidecar-other"
# What a client of the other user may take to answer (a cold interpreter under setpriv).
CLIENT_TIMEOUT = 20.0

# The other user's program: one or two GETs over one connection, then whether the server closed it.
# Stdlib only, since it may run on another interpreter than the tests'.
CLIENT = r"""
import json, socket, sys
kind, target, path, headers, twice = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5] == "1"
if kind == "unix":
    sock, address, host = socket.socket(socket.AF_UNIX), target, "localhost"
elif kind == "tcp6":
    sock, address, host = socket.socket(socket.AF_INET6), ("::1", int(target)), "[::1]:" + target
elif kind == "mapped":  # an AF_INET6 socket reaching an IPv4 listener through an IPv4-mapped address
    sock, address, host = socket.socket(socket.AF_INET6), ("::ffff:127.0.0.1", int(target)), "127.0.0.1:" + target
else:
    sock, address, host = socket.socket(socket.AF_INET), ("127.0.0.1", int(target)), "127.0.0.1:" + target
sock.settimeout(10)
try:
    sock.connect(address)
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno}))
    sys.exit(0)
buffer = b""
def more():
    global buffer
    chunk = sock.recv(65536)
    buffer += chunk
    return bool(chunk)
def until(mark):
    global buffer
    while mark not in buffer:
        if not more():
            raise EOFError
    head, _, buffer = buffer.partition(mark)
    return head
def exactly(n):
    global buffer
    while len(buffer) < n:
        if not more():
            raise EOFError
    data, buffer = buffer[:n], buffer[n:]
    return data
def get():
    lines = ["GET " + path + " HTTP/1.1", "Host: " + host] + [k + ": " + v for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = until(b"\r\n\r\n").decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(until(b"\r\n").split(b";")[0], 16)
            if not size:
                until(b"\r\n")
                break
            body += exactly(size)
            exactly(2)
    else:
        body = exactly(int(fields.get("content-length", "0")))
    return {"status": int(head[0].split()[1]), "headers": fields, "body": body.decode("latin-1")}
answers = [get()]
if twice:
    answers.append(get())
sock.settimeout(0.5)
try:
    closed = not more()
except ConnectionResetError:
    closed = True
except socket.timeout:
    closed = False
print(json.dumps({"answers": answers, "closed": closed}))
"""


# -- the other user ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    python: str  # an interpreter this user can run


def _runnable_by(user: pwd.struct_passwd, python: str) -> bool:
    probe = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", python, "-c", "pass"]
    try:
        return subprocess.run(probe, cwd="/", capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def other_user() -> User:
    """``sidecar-other``, made if missing; skipped unless the tests run as root (creating users and setpriv need it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates a second user and runs a client as that user")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run a client as another user")
    try:
        entry = pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", OTHER], check=True, capture_output=True)
        entry = pwd.getpwnam(OTHER)
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python) and _runnable_by(entry, python):
            return User(OTHER, entry.pw_uid, entry.pw_gid, python)
    pytest.skip(f"no Python interpreter that {OTHER} may run (the tests' own is under a private directory)")


async def run_client(
    user: User | None,
    kind: str,
    target: str,
    path: str = ECHO,
    headers: dict[str, str] | None = None,
    *,
    twice: bool = False,
    python: str | None = None,
) -> dict[str, Any]:
    """Run CLIENT as ``user`` (None: as this process's uid) and return what it printed."""
    interpreter = user.python if user is not None else python or sys.executable
    argv = [interpreter, "-c", CLIENT, kind, target, path, json.dumps(headers or {}), "1" if twice else "0"]
    if user is not None:
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv]
    process = await asyncio.create_subprocess_exec(
        *argv, cwd="/", env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the client ({kind}) did not finish within {CLIENT_TIMEOUT} s")
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def assert_refused(result: dict[str, Any], uid: int, cloud: MockCloud, seen_before: int) -> None:
    """403 caller-not-allowed naming ``uid``, the connection closed, nothing forwarded, no token in the answer."""
    [answer] = result["answers"]
    assert answer["status"] == 403, answer
    assert answer["headers"]["x-sidecar-error"] == "caller-not-allowed"
    assert answer["headers"]["content-type"] == "application/problem+json"
    problem = json.loads(answer["body"])
    assert problem["type"].endswith(":caller-not-allowed")
    assert f"uid {uid}" in problem["detail"]
    assert result["closed"], "the connection of a refused caller must be closed after the answer"
    assert cloud.requests_seen == seen_before, "a refused request reached the upstream"
    answer_text = json.dumps(answer)
    assert not any(token in answer_text for token in cloud.minted)


def assert_served(result: dict[str, Any], cloud: MockCloud, login: TokenPair, seen_before: int) -> None:
    """200s from the cloud's echo with the real token, over a connection kept alive."""
    for answer in result["answers"]:
        assert answer["status"] == 200, answer
        assert json.loads(answer["body"])["authorization"] == f"Bearer {login.access_token}"
    assert cloud.requests_seen == seen_before + len(result["answers"])
    assert not result["closed"]


# -- real serves ----------------------------------------------------------------------


def free_port_on(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def public_dir() -> Any:
    """A directory under /tmp that other users may traverse (for a unix socket they are to reach)."""
    path = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve_env(env: dict[str, str], cloud: MockCloud, store_path: Path, login: TokenPair) -> dict[str, str]:
    """A child environment for a logged-in serve in front of the mock cloud, logging JSON."""
    return {
        **env,
        "SIDECAR_STORE": str(store_path),
        "SIDECAR_UPSTREAM": cloud.base_url,
        "SIDECAR_LOG_FORMAT": "json",
    }


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], listen: str, *args: str) -> AsyncIterator[Served]:
    """``sidecar serve --listen LISTEN ARGS`` until healthy (over the listen address itself); always killed after."""
    if listen.startswith("unix:"):
        base_url, unix_path = "http://localhost", listen[len("unix:") :]
    else:
        base_url, unix_path = f"http://{listen}", None
    served = Served(await start_sidecar(env, "serve", "--listen", listen, *args), base_url, unix_path)
    try:
        await served.wait_ready()
        yield served
    finally:
        await served.kill()


def _listen_for(kind: str, public_dir: Path) -> tuple[str, str]:
    """(``--listen`` value, the client's target) for one transport."""
    if kind == "unix":
        path = str(public_dir / "s.sock")
        return f"unix:{path}", path
    if kind == "tcp6":
        port = free_port_on("::1")
        return f"[::1]:{port}", str(port)
    port = free_port_on("127.0.0.1")
    return f"127.0.0.1:{port}", str(port)


TRANSPORTS = ["tcp4", "tcp6", "mapped", "unix"]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_default_serve_refuses_another_users_program_and_serves_its_own(
    kind: str,
    other_user: User,
    serve_env: dict[str, str],
    cloud: MockCloud,
    login: TokenPair,
    public_dir: Path,
) -> None:
    """Default serve: the other user's client gets 403 caller-not-allowed and nothing is forwarded; the same uid gets 200, unchanged."""
    listen, target = _listen_for(kind, public_dir)
    async with serving(serve_env, listen) as served:
        if kind == "unix":
            # The socket's 0600 mode alone keeps the other user out; open it up to reach the peer check behind it.
            assert (await run_client(other_user, kind, target))["connect_error"] == 13  # EACCES
            os.chmod(target, 0o666)
        seen = cloud.requests_seen
        assert_refused(await run_client(other_user, kind, target), other_user.uid, cloud, seen)
        assert_served(await run_client(None, kind, target, twice=True), cloud, login, seen)
        await served.stop()
    lines = [json.loads(line) for line in served.stderr.splitlines() if line.strip()]
    refusals = [line for line in lines if "refused a connection" in line.get("message", "")]
    assert len(refusals) == 1 and f"uid {other_user.uid}" in refusals[0]["message"]
    assert not any(token in served.stderr for token in cloud.minted)


@pytest.mark.parametrize("kind", ["tcp4", "unix"])
@pytest.mark.parametrize("allow_users", ["any", OTHER])
async def test_allow_users_any_or_the_users_name_lets_it_in(
    kind: str,
    allow_users: str,
    other_user: User,
    serve_env: dict[str, str],
    cloud: MockCloud,
    login: TokenPair,
    public_dir: Path,
) -> None:
    """With ``allow_users = any`` or the other user's name, its client is served like the owner's."""
    listen, target = _listen_for(kind, public_dir)
    async with serving({**serve_env, "SIDECAR_ALLOW_USERS": allow_users}, listen):
        if kind == "unix":
            os.chmod(target, 0o666)
        seen = cloud.requests_seen
        assert_served(await run_client(other_user, kind, target, twice=True), cloud, login, seen)
        assert_served(await run_client(None, kind, target), cloud, login, seen + 2)


async def test_allow_users_by_uid_and_the_refusal_names_another(
    other_user: User, serve_env: dict[str, str], cloud: MockCloud, login: TokenPair, public_dir: Path
) -> None:
    """A numeric uid in allow_users admits that uid; the serving uid stays admitted beside it."""
    listen, target = _listen_for("tcp4", public_dir)
    async with serving({**serve_env, "SIDECAR_ALLOW_USERS": str(other_user.uid)}, listen):
        seen = cloud.requests_seen
        assert_served(await run_client(other_user, "tcp4", target), cloud, login, seen)
        assert_served(await run_client(None, "tcp4", target), cloud, login, seen + 1)


async def test_an_unknown_user_in_allow_users_is_exit_2(serve_env: dict[str, str]) -> None:
    """``allow_users = nobody-such`` stops serve at startup with one line naming the entry."""
    run = await run_sidecar(
        {**serve_env, "SIDECAR_ALLOW_USERS": "self,nobody-such"}, "serve", "--listen", "127.0.0.1:0"
    )
    assert run.code == 2
    assert "allow_users: no user named 'nobody-such'" in run.err
    assert "Traceback" not in run.err


# -- in-process serves (injected lookups and clocks) ---------------------------------------


@dataclasses.dataclass
class Running:
    url: str
    port: int
    gate: CallerGate
    log: io.StringIO


StartProxy = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_proxy(
    cloud: MockCloud, store_path: Path, clock: FakeClock, login: TokenPair
) -> AsyncIterator[StartProxy]:
    """Start in-process proxies in front of the mock cloud with a gate built from ``env``, ``tcp`` and ``monotonic``.

    ``sock`` serves on a socket the test made (a dual-stack one); otherwise 127.0.0.1 on a free port.
    """
    stack = contextlib.AsyncExitStack()

    async def start(
        *,
        env: dict[str, str] | None = None,
        tcp: Any = "auto",
        monotonic: Callable[[], float] = time.monotonic,
        sock: socket.socket | None = None,
        **overrides: Any,
    ) -> Running:
        settings = Settings(
            upstream=cloud.base_url, store=str(store_path), read_timeout=5.0, log_format="json", **overrides
        )
        gate = build_gate(settings, env or {}, monotonic=monotonic, tcp=tcp)
        log = io.StringIO()
        _logs.append(log)  # the token leak check of conftest reads it
        sidecar = await stack.enter_async_context(
            running_sidecar(settings, log_stream=log, clock=clock, proactive=False, callers=gate)
        )
        runner = web.ServerRunner(sidecar.server, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if sock is not None:
            site = web.SockSite(runner, sock)
            await site.start()
            port = sock.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
        else:
            url = await open_site(runner, ListenAddress(host="127.0.0.1", port=0))
            port = int(url.rpartition(":")[2])
        return Running(url, port, gate, log)

    async with stack:
        yield start


class CountingLookup:
    """A TCP uid lookup that answers a fixed uid (None: unknown) and counts its calls."""

    name = "counting"

    def __init__(self, uid: int | None) -> None:
        self.answer = uid
        self.calls = 0

    def uid(self, pair: peer.AddressPair) -> peer.PeerUid:
        self.calls += 1
        return peer.PeerUid(self.answer, "" if self.answer is not None else "the test's lookup knows nobody")


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a new connection and read until the server closes it (fails if it does not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_the_uid_is_looked_up_once_per_connection(start_proxy: StartProxy, cloud: MockCloud) -> None:
    """Keep-alive requests reuse the connection's verdict; a new connection is looked up again; none is kept after close."""
    lookup = CountingLookup(os.geteuid())
    running = await start_proxy(tcp=lookup)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(5):
            async with session.get(running.url + ECHO) as response:
                assert response.status == 200
    assert lookup.calls == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + ECHO) as response:
            assert response.status == 200
    assert lookup.calls == 2
    await asyncio.sleep(0.05)  # let the server see the connections go
    assert running.gate.connections == 0


async def test_a_refused_connection_is_answered_once_and_closed(start_proxy: StartProxy, cloud: MockCloud) -> None:
    """A pipelined second request on a refused connection gets nothing: 403, then the server closes."""
    lookup = CountingLookup(4242)
    running = await start_proxy(tcp=lookup)
    request = f"GET {ECHO} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    seen = cloud.requests_seen
    answer = await raw_exchange(running.port, request * 2)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert b"uid 4242" in answer and b"X-Sidecar-Error: caller-not-allowed" in answer
    assert cloud.requests_seen == seen


async def test_an_unknown_uid_is_refused_unless_any(start_proxy: StartProxy, cloud: MockCloud) -> None:
    """Fail closed: when no uid can be found the answer is 403 with the reason; ``any`` never looks."""
    unknown = CountingLookup(None)
    refusing = await start_proxy(tcp=unknown)
    answer = await raw_exchange(refusing.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ") and b"the test's lookup knows nobody" in answer
    never = CountingLookup(None)
    everyone = await start_proxy(tcp=never, allow_users=("any",))
    async with aiohttp.ClientSession() as session:
        async with session.get(everyone.url + ECHO) as response:
            assert response.status == 200
    assert never.calls == 0


async def test_refusals_are_logged_at_most_once_a_minute_per_uid(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Many refused connections of one uid give one log line, and another after 60 s (injected clock)."""
    monotonic = FakeClock(1000.0)
    running = await start_proxy(tcp=CountingLookup(4242), monotonic=monotonic)
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def lines() -> int:
        return sum("refused a connection from uid 4242" in record.getMessage() for record in caplog.records)

    for _ in range(5):
        await raw_exchange(running.port, request)
    assert lines() == 1
    monotonic.advance(60.0)
    await raw_exchange(running.port, request)
    assert lines() == 2


@pytest.mark.parametrize("lookup", [peer.SockDiag, peer.ProcNet])
async def test_a_dual_stack_listener_checks_ipv4_mapped_peers(
    lookup: type[peer.TcpLookup], other_user: User, start_proxy: StartProxy, cloud: MockCloud, login: TokenPair
) -> None:
    """On a ``::`` socket taking IPv4 too, the peer ``::ffff:127.0.0.1`` is looked up as IPv4: the other user refused, the owner served."""
    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dual.bind(("::", 0))
    running = await start_proxy(tcp=lookup(), sock=dual)
    seen = cloud.requests_seen
    assert_refused(await run_client(other_user, "tcp4", str(running.port)), other_user.uid, cloud, seen)
    assert_served(await run_client(None, "tcp4", str(running.port)), cloud, login, seen)


@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "mapped"])
def test_both_tcp_lookups_find_the_connecting_uid(kind: str) -> None:
    """sock_diag and /proc/net agree on this process's own loopback connections, IPv4, IPv6 and IPv4-mapped."""
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind(("::1" if kind == "tcp6" else "127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket(socket.AF_INET if kind == "tcp4" else socket.AF_INET6)
        host = {"tcp4": "127.0.0.1", "tcp6": "::1", "mapped": "::ffff:127.0.0.1"}[kind]
        with client:
            client.connect((host, listener.getsockname()[1]))
            accepted, _ = listener.accept()
            with accepted:
                for lookup in (peer.SockDiag(), peer.ProcNet()):
                    found = peer.tcp_peer_uid(lookup, accepted.getpeername(), accepted.getsockname())
                    assert found == peer.PeerUid(os.geteuid()), (lookup.name, found)


def test_sock_diag_is_chosen_where_it_works() -> None:
    """On Linux the self-test picks sock_diag; a lookup that finds nobody is passed over for the next."""
    assert peer.tcp_lookup() is not None
    chosen = peer.tcp_lookup([CountingLookup(None), peer.ProcNet()])
    assert chosen is not None and chosen.name == peer.TCP_PROC_NET
    assert peer.tcp_lookup([CountingLookup(None)]) is None


# -- client keys ----------------------------------------------------------------------------


def key_of(store_path: Path) -> str:
    return KeyFile(Path(str(store_path) + KEY_SUFFIX)).ensure().decode()


async def echo(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + ECHO, headers=headers) as response:
            return response.status, await response.json(content_type=None)


def assert_key_refused(status: int, body: dict[str, Any]) -> None:
    assert status == 403
    assert body["type"].endswith(":client-key-required")


def upstream_saw(body: dict[str, Any]) -> str:
    """Every header the mock cloud received, as one text."""
    return "\n".join(f"{name}: {value}" for name, value in body["headers"])


def assert_no_key_in_logs(key: str, caplog: pytest.LogCaptureFixture, *logs: io.StringIO) -> None:
    texts = [record.getMessage() for record in caplog.records] + [log.getvalue() for log in logs]
    assert not any(key in text for text in texts), "the client key appeared in a log"


async def test_required_refuses_a_missing_or_wrong_key_without_reaching_the_upstream(
    start_proxy: StartProxy, cloud: MockCloud, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``client_key = required``: no key, a wrong X-Sidecar-Key or a wrong Bearer is 403 client-key-required, nothing forwarded."""
    running = await start_proxy(client_key="required")
    key = key_of(store_path)
    seen = cloud.requests_seen
    for headers in ({}, {"X-Sidecar-Key": "x" * 43}, {"Authorization": "Bearer " + "y" * 43}):
        status, body = await echo(running.url, headers)
        assert_key_refused(status, body)
        assert key not in json.dumps(body)
    assert cloud.requests_seen == seen
    assert_no_key_in_logs(key, caplog, running.log)


async def test_the_key_as_x_sidecar_key_is_stripped_before_the_upstream(
    start_proxy: StartProxy, cloud: MockCloud, store_path: Path, login: TokenPair, caplog: pytest.LogCaptureFixture
) -> None:
    """The right X-Sidecar-Key passes; the upstream gets the real token and never the key header or its value."""
    running = await start_proxy(client_key="required")
    key = key_of(store_path)
    status, body = await echo(running.url, {"X-Sidecar-Key": key, "Authorization": "Bearer sk-sdk-placeholder"})
    assert status == 200
    assert body["authorization"] == f"Bearer {login.access_token}"
    received = upstream_saw(body)
    assert key not in received and "x-sidecar-key" not in received.lower() and "sk-sdk-placeholder" not in received
    assert_no_key_in_logs(key, caplog, running.log)


async def test_the_key_as_bearer_is_replaced_by_the_real_token(
    start_proxy: StartProxy, cloud: MockCloud, store_path: Path, login: TokenPair, caplog: pytest.LogCaptureFixture
) -> None:
    """``Authorization: Bearer <key>`` (an SDK's api_key) passes and reaches the upstream as the real token."""
    running = await start_proxy(client_key="required")
    key = key_of(store_path)
    status, body = await echo(running.url, {"Authorization": f"Bearer {key}"})
    assert status == 200
    assert body["authorization"] == f"Bearer {login.access_token}"
    assert key not in upstream_saw(body)
    assert_no_key_in_logs(key, caplog, running.log)


async def test_optional_checks_a_key_only_when_one_is_sent(
    start_proxy: StartProxy, cloud: MockCloud, store_path: Path
) -> None:
    """``optional``: no key passes, the right one passes (stripped), a wrong one is refused."""
    running = await start_proxy(client_key="optional")
    key = key_of(store_path)
    assert (await echo(running.url, {}))[0] == 200
    status, body = await echo(running.url, {"X-Sidecar-Key": key})
    assert status == 200 and key not in upstream_saw(body)
    assert_key_refused(*await echo(running.url, {"X-Sidecar-Key": "z" * 43}))


async def test_off_never_asks_and_still_never_forwards_the_header(
    start_proxy: StartProxy, cloud: MockCloud, store_path: Path
) -> None:
    """``off`` (the default): no key file is made, any X-Sidecar-Key passes and is dropped before the upstream."""
    running = await start_proxy()
    status, body = await echo(running.url, {"X-Sidecar-Key": "anything-at-all"})
    assert status == 200
    assert "anything-at-all" not in upstream_saw(body)
    assert not Path(str(store_path) + KEY_SUFFIX).exists()
    assert running.gate.key_mode == "off"


async def test_local_endpoints_need_no_key_and_status_shows_the_policy_not_the_key(
    start_proxy: StartProxy, store_path: Path
) -> None:
    """Health and status answer without the key (probes have none); status names the policy and never the key."""
    running = await start_proxy(client_key="required", allow_users=("self", "0"))
    key = key_of(store_path)
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + "/_sidecar/health") as response:
            assert response.status == 200
        async with session.get(running.url + "/_sidecar/status") as response:
            text = await response.text()
    assert key not in text
    callers = json.loads(text)["callers"]
    assert callers == {
        "allowUsers": ["self", "0"],
        "allowedUids": sorted({os.geteuid(), 0}),
        "peerCheck": peer.TCP_SOCK_DIAG,
        "unknownPeers": "refused",
        "clientKey": "required",
        "clientKeyFile": str(store_path) + KEY_SUFFIX,
    }


async def test_a_websocket_upgrade_needs_the_key_too(start_proxy: StartProxy, store_path: Path) -> None:
    """The key rule covers WebSocket handshakes: without it the upgrade is a 403."""
    running = await start_proxy(client_key="required")
    key_of(store_path)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(running.url + "/api/v1/ws")
    assert refused.value.status == 403


async def test_rotation_reaches_a_running_serve_within_a_second(
    start_proxy: StartProxy, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After ``rotate`` the old key works until the next look (at most a second later, injected clock), then only the new one."""
    monotonic = FakeClock(100.0)
    running = await start_proxy(client_key="required", monotonic=monotonic)
    file = KeyFile(Path(str(store_path) + KEY_SUFFIX))
    old = file.ensure().decode()
    assert (await echo(running.url, {"X-Sidecar-Key": old}))[0] == 200
    new = file.rotate().decode()
    monotonic.advance(RECHECK_SECONDS)
    assert_key_refused(*await echo(running.url, {"X-Sidecar-Key": old}))
    assert (await echo(running.url, {"X-Sidecar-Key": new}))[0] == 200
    assert_no_key_in_logs(old, caplog, running.log)
    assert_no_key_in_logs(new, caplog, running.log)


# -- the commands ------------------------------------------------------------------------------


async def test_client_key_command_prints_the_key_serve_uses_and_rotate_takes_effect(
    serve_env: dict[str, str], store_path: Path, cloud: MockCloud, login: TokenPair, public_dir: Path
) -> None:
    """``sidecar client-key`` prints serve's key; ``--rotate`` makes a running serve refuse the old one within about a second."""
    env = {**serve_env, "SIDECAR_CLIENT_KEY": "required"}
    listen, target = _listen_for("tcp4", public_dir)
    async with serving(env, listen) as served:
        printed = await run_sidecar(env, "client-key")
        assert printed.code == 0
        old = printed.out.strip()
        assert old == key_of(store_path)
        assert stat.S_IMODE(os.stat(str(store_path) + KEY_SUFFIX).st_mode) == 0o600
        result = await run_client(None, "tcp4", target, headers={"X-Sidecar-Key": old})
        assert result["answers"][0]["status"] == 200
        rotated = await run_sidecar(env, "client-key", "--rotate")
        assert rotated.code == 0 and rotated.out.strip() != old
        new = rotated.out.strip()
        assert old not in rotated.err and new not in rotated.err
        deadline = time.monotonic() + RECHECK_SECONDS + 1.0  # the second, plus slack for a loaded machine
        while True:
            answer = (await run_client(None, "tcp4", target, headers={"X-Sidecar-Key": old}))["answers"][0]
            if answer["status"] == 403:
                break
            assert time.monotonic() < deadline, "the old key still worked more than a second after --rotate"
            await asyncio.sleep(0.1)
        assert json.loads(answer["body"])["type"].endswith(":client-key-required")
        assert (await run_client(None, "tcp4", target, headers={"X-Sidecar-Key": new}))["answers"][0]["status"] == 200
        await served.stop()
    assert old not in served.stderr and new not in served.stderr


async def test_client_key_command_notes_when_serve_does_not_ask_for_it(serve_env: dict[str, str]) -> None:
    """With ``client_key = off`` the key is still made and printed, with a note on stderr that serve does not ask for it."""
    run = await run_sidecar(serve_env, "client-key")
    assert run.code == 0 and len(run.out.strip()) >= 43
    assert "client_key is off" in run.err and run.out.strip() not in run.err


async def test_status_shows_the_caller_policy(serve_env: dict[str, str], store_path: Path) -> None:
    """``sidecar status`` (text and JSON) says who may connect, how it is checked and the key mode, never the key."""
    env = {**serve_env, "SIDECAR_CLIENT_KEY": "required", "SIDECAR_LISTEN": "unix:/tmp/sidecar-status-test.sock"}
    key = key_of(store_path)
    text = await run_sidecar(env, "status")
    assert (
        f"Callers: uid {os.geteuid()} (allow_users = self), checked by unix-peercred; client key required" in text.out
    )
    as_json = await run_sidecar(env, "status", "--json")
    callers = json.loads(as_json.out)["callers"]
    assert callers["peerCheck"] == "unix-peercred" and callers["clientKey"] == "required"
    assert key not in text.out + text.err + as_json.out + as_json.err
    tcp = await run_sidecar({**serve_env, "SIDECAR_ALLOW_USERS": "any"}, "status", "--json")
    assert json.loads(tcp.out)["callers"]["peerCheck"] == "off"

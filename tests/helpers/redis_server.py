"""A real redis-server on a free loopback port, in a temp dir, stopped by PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep its port (and, with ``appendonly``, its data)."""

    def __init__(
        self, directory: Path, password: str | None = None, *, appendonly: bool = False, replica_of: int | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run installs it)")
        self.binary = binary
        self.directory = directory
        self.password = password
        self.appendonly = appendonly
        self.replica_of = replica_of
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, key: str | None = None, *, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0" + (f"?key={key}" if key else "")

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        argv += ["--save", "", "--daemonize", "no", "--loglevel", "warning", "--repl-diskless-sync-delay", "0"]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def command(self, *words: str) -> bytes:
        """Send one command (RESP, so words may hold spaces) with a plain socket; the raw answer."""
        with socket.create_connection(("127.0.0.1", self.port), 2) as sock:
            if self.password:
                sock.sendall(_resp("AUTH", self.password))
                sock.recv(64)
            sock.sendall(_resp(*words))
            return sock.recv(65536)

    def replica_acknowledges(self) -> bool:
        """A write here, then WAIT 1 on the same connection: whether a replica had it within 100 ms."""
        with socket.create_connection(("127.0.0.1", self.port), 2) as sock:
            sock.sendall(_resp("SET", "replication-probe", "1") + _resp("WAIT", "1", "100"))
            answer = b""
            while answer.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
            return answer.endswith(b":1\r\n")


def _resp(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()

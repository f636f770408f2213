"""tinyproxy, a real forward proxy, on 127.0.0.1 for the egress tests.

Each one runs in the foreground (``-d``) from a config written for it:
listening on loopback only, clients from 127.0.0.1 only, optionally
``BasicAuth`` and ``ConnectPort`` limits.  tinyproxy logs every request
line (``GET http://host:port/path HTTP/1.1``, ``CONNECT host:port
HTTP/1.1``) to stdout before it forwards anything, and a reader task keeps
those lines.  ``requests()`` first sends a marker request of its own and
waits for its line, so every line logged before it has been read: a test can
assert that a request did *not* go through the proxy without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import TIMEOUT, free_port

# tinyproxy's line for each request it reads, whatever it does with it next.
_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (.*\S)")
# Its last startup line: from here on it accepts connections.
_READY = "Accepting connections"
# Marker requests name this path on a port nothing listens on, so tinyproxy answers them at once.
_MARKER = "/sidecar-test-marker-"
_markers = itertools.count(1)


class ForwardProxy:
    """A running tinyproxy: its address, its credentials, and the request lines it has logged."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, auth: tuple[str, str] | None) -> None:
        self.process = process
        self.port = port
        self.auth = auth
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader: asyncio.Future[None] | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, without credentials."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        """The proxy's URL with its user and password in it (percent-encoded as given)."""
        assert self.auth is not None, "this proxy takes no credentials"
        return f"http://{self.auth[0]}:{self.auth[1]}@127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        """Read startup lines until tinyproxy accepts connections; fail with its output if it exits first."""
        stream = self.process.stdout
        assert stream is not None
        seen: list[str] = []
        while True:
            raw = await asyncio.wait_for(stream.readline(), TIMEOUT)
            if not raw:
                pytest.fail(f"tinyproxy exited while starting: {''.join(seen)}")
            seen.append(raw.decode(errors="replace"))
            if _READY in seen[-1]:
                break
        self._reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace"))
            self._changed.set()

    async def requests(self) -> list[str]:
        """Every request line tinyproxy has logged up to now (markers left out), e.g. ``CONNECT 127.0.0.1:443 HTTP/1.1``."""
        marker = f"{_MARKER}{next(_markers)}"
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET http://127.0.0.1:1{marker} HTTP/1.0\r\nHost: 127.0.0.1:1\r\n\r\n".encode())
            await writer.drain()
            await self._wait_for(marker)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        found = (_REQUEST_LINE.search(line) for line in self.lines)
        return [match.group(1) for match in found if match and _MARKER not in match.group(1)]

    async def _wait_for(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(text in line for line in self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.returncode is not None:
                pytest.fail(f"tinyproxy never logged {text!r}; its log: {''.join(self.lines)}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def tinyproxy_config(port: int, *, auth: tuple[str, str] | None, connect_ports: Iterable[int]) -> str:
    """A config for one test's tinyproxy: loopback only; no ConnectPort line means CONNECT to any port."""
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        "Timeout 30",
        # Info: the request lines, and the startup line wait_ready looks for.
        "LogLevel Info",
        "MaxClients 64",
    ]
    lines += [f"ConnectPort {connect_port}" for connect_port in connect_ports]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    return "\n".join(lines) + "\n"


def tinyproxy_binary() -> str:
    found = shutil.which("tinyproxy") or next(
        (path for path in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if Path(path).exists()), None
    )
    if found is None:
        pytest.fail("tinyproxy is not installed: apt-get install -y tinyproxy (.ci/run installs it)")
    return found


@contextlib.asynccontextmanager
async def running_tinyproxy(
    directory: Path, *, auth: tuple[str, str] | None = None, connect_ports: Iterable[int] = ()
) -> AsyncIterator[ForwardProxy]:
    """A tinyproxy on a free loopback port for the block; its config is written into ``directory``."""
    binary = tinyproxy_binary()
    port = free_port()
    config = directory / f"tinyproxy-{port}.conf"
    config.write_text(tinyproxy_config(port, auth=auth, connect_ports=connect_ports))
    process = await asyncio.create_subprocess_exec(
        binary,
        "-d",
        "-c",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    proxy = ForwardProxy(process, port, auth)
    try:
        await proxy.wait_ready()
        yield proxy
    finally:
        await proxy.stop()


@contextlib.asynccontextmanager
async def tls_front(port: int, context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS listener on loopback relaying bytes to ``127.0.0.1:port``: tinyproxy as an ``https://`` proxy; yields its port."""
    relays: set[asyncio.Future[Any]] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner_reader, inner_writer = await asyncio.open_connection("127.0.0.1", port)
        both = asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer), return_exceptions=True)
        relays.add(both)
        await both

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for both in relays:
            both.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

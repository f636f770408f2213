"""Where ``serve`` listens: parsing ``--listen``, the loopback rule, and opening the site.

A unix socket is born 0600 and a stale one left by a dead process is
replaced; a TCP address that is not loopback needs ``allow_remote``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import stat
from collections.abc import Collection, Iterable
from typing import Any

from aiohttp import web

from sidecar.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str, allow_remote: bool) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path``; non-loopback needs allow_remote."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise ConfigError("listen: unix: needs a socket path, e.g. unix:/run/sidecar.sock")
        return ListenAddress(unix_path=os.path.expanduser(path))
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen: expected HOST:PORT or unix:/path, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"listen: port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen: port out of range: {port}")
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"listen: {host} is not a loopback address; other machines could use your login through it (pass --allow-remote to accept that)"
        )
    return ListenAddress(host=host, port=port)


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"listen: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a process that died
        return
    finally:
        probe.close()
    raise ConfigError(f"listen: {path} is in use by another process")


async def open_site(runner: web.BaseRunner, address: ListenAddress, *, reuse_port: bool = False) -> str:
    """Start listening; returns the base URL (or unix:path)."""
    if address.unix_path is not None:
        _remove_stale_socket(address.unix_path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            site: web.BaseSite = web.UnixSite(runner, address.unix_path)
            await site.start()
        finally:
            os.umask(old_umask)
        os.chmod(address.unix_path, 0o600)
        return f"unix:{address.unix_path}"
    before = set(map(tuple, runner.addresses))
    site = web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"listen: cannot listen on {address.host}:{address.port}: {exc.strerror}") from None
    return str(dataclasses.replace(address, port=bound_port(runner.addresses, before) or address.port))


def bound_port(addresses: Iterable[Any], before: Collection[tuple[Any, ...]] = ()) -> int | None:
    """The port of the first socket address not in ``before`` (port 0 asks the kernel for one)."""
    for address in addresses:
        if isinstance(address, tuple) and tuple(address) not in before and len(address) >= 2:
            return int(address[1])
    return None

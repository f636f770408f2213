"""``sidecar serve``: listen, seed the store from the environment once, run until a signal.

SIGTERM and SIGINT stop accepting new connections, give in-flight requests
up to ``shutdown_timeout`` seconds, and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import stat
import time
from typing import Callable, Mapping

from aiohttp import web

from sidecar.app import Sidecar, running_sidecar
from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.store import TokenStore

log = logging.getLogger("sidecar.serve")


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
        path = value[len("unix:"):]
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
        raise ConfigError(f"listen: {host} is not a loopback address; other machines could use your login through it (pass --allow-remote to accept that)")
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
    site = web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"listen: cannot listen on {address.host}:{address.port}: {exc.strerror}") from None
    server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor for the bound port
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else address.port  # type: ignore[union-attr]
    return str(dataclasses.replace(address, port=port))


# After the drain, what is still running gets this long to react to cancellation.
_CUT_OFF_SECONDS = 0.05


async def _drain(runner: web.BaseRunner, sidecar: Sidecar, timeout: float) -> None:
    """Stop accepting, close idle keep-alive connections, wait for requests in flight."""
    for site in list(runner.sites):
        await site.stop()
    sidecar.server.pre_shutdown()
    if not await sidecar.proxy.drained(timeout):
        log.warning("%d request(s) still in flight after %g s; cutting them off", sidecar.proxy.in_flight, timeout)


async def serve(settings: Settings, address: ListenAddress, *, ready: Callable[[str, Sidecar], None] | None = None, reuse_port: bool = False) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_sidecar(settings) as sidecar:
        # The drain is ours (see _drain): aiohttp's own would wait twice the
        # timeout and treats 0 as "forever".
        runner = web.ServerRunner(sidecar.server, handle_signals=False, shutdown_timeout=_CUT_OFF_SECONDS)
        await runner.setup()
        try:
            url = await open_site(runner, address, reuse_port=reuse_port)
            log.info("listening on %s, forwarding to %s", url, settings.upstream or "the store's apiUrl")
            if sidecar.manager.pair is None:
                log.warning("%s: requests get %d until a login lands in %s", sidecar.manager.problem or "not logged in", settings.relogin_status, settings.store)
            if ready is not None:
                ready(url, sidecar)
            await stop.wait()
            log.info("shutting down; waiting up to %g s for requests in flight", settings.shutdown_timeout)
            await _drain(runner, sidecar, settings.shutdown_timeout)
        finally:
            await runner.cleanup()
        if address.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(address.unix_path)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)


def seed_from_env(settings: Settings, env: Mapping[str, str], clock: Callable[[], float] = time.time) -> bool:
    """On an empty store, import SIDECAR_REFRESH_TOKEN (a container's first start).

    Afterwards the store wins: the seeded refresh token is spent by then.
    """
    if not env.get("SIDECAR_REFRESH_TOKEN"):
        return False
    from sidecar.commands import pair_from_import

    store = TokenStore(settings.store)
    fd = store.acquire_lock()
    try:
        if store.path.exists():
            return False
        store.write(pair_from_import(settings, {}, env, clock()))
    finally:
        store.release_lock(fd)
    log.info("seeded the token store from SIDECAR_REFRESH_TOKEN")
    return True


def install_uvloop() -> bool:
    """Use uvloop where it is installed; asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def serve_command(settings: Settings, env: Mapping[str, str]) -> int:
    address = parse_listen(settings.listen, settings.allow_remote)
    # Until the loop installs its handlers, SIGTERM must still mean "exit 0",
    # e.g. while seeding waits for another process's store lock.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        seed_from_env(settings, env)
        if settings.workers > 1:
            return _serve_workers(settings, address)
        install_uvloop()
        asyncio.run(serve(settings, address))
    return 0


def _serve_workers(settings: Settings, address: ListenAddress) -> int:
    from sidecar.workers import reserve_port, run_workers

    address, holder = reserve_port(address)

    def worker() -> int:
        if holder is not None:
            holder.close()
        install_uvloop()
        asyncio.run(serve(settings, address, reuse_port=True))
        return 0

    log.info("starting %d workers on %s", settings.workers, address)
    try:
        return run_workers(settings.workers, worker)
    finally:
        if holder is not None:
            holder.close()

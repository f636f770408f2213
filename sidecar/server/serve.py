"""``sidecar serve``: listen, seed the store from the environment once, run until a signal.

SIGTERM and SIGINT stop accepting new connections, give in-flight requests
up to ``shutdown_timeout`` seconds, and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping

from aiohttp import web

from sidecar.auth.imported import seed_from_env
from sidecar.callers.gate import check_settings, describe_line
from sidecar.callers.peer import NO_CHECK
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound
from sidecar.server.app import Sidecar, running_sidecar
from sidecar.server.listen import ListenAddress, open_site, parse_listen
from sidecar.server.workers import reserve_port, run_workers

log = logging.getLogger("sidecar.serve")


# After the drain, what is still running gets this long to react to cancellation.
_CUT_OFF_SECONDS = 0.05


async def _drain(runner: web.BaseRunner, sidecar: Sidecar, timeout: float) -> None:
    """Stop accepting, close idle keep-alive connections, wait for requests in flight."""
    for site in list(runner.sites):
        await site.stop()
    sidecar.server.pre_shutdown()
    if not await sidecar.proxy.drained(timeout):
        log.warning("%d request(s) still in flight after %g s; cutting them off", sidecar.proxy.in_flight, timeout)


async def serve(
    settings: Settings,
    address: ListenAddress,
    *,
    ready: Callable[[str, Sidecar], None] | None = None,
    reuse_port: bool = False,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_sidecar(settings, env=env) as sidecar:
        # The drain is ours (see _drain): aiohttp's own would wait twice the
        # timeout and treats 0 as "forever".
        runner = web.ServerRunner(sidecar.server, handle_signals=False, shutdown_timeout=_CUT_OFF_SECONDS)
        await runner.setup()
        try:
            url = await open_site(runner, address, reuse_port=reuse_port)
            log.info("listening on %s, forwarding to %s", url, settings.upstream or "the store's apiUrl")
            if sidecar.callers is not None:
                policy = sidecar.callers.describe(str(address))
                # No way to find callers' uids here: say so loudly, every connection will be refused.
                level = logging.WARNING if policy["peerCheck"] == NO_CHECK else logging.INFO
                log.log(level, "callers: %s", describe_line(policy))
            if sidecar.manager.pair is None:
                log.warning(
                    "%s: requests get %d until a login lands in %s",
                    sidecar.manager.problem or "not logged in",
                    settings.relogin_status,
                    settings.store,
                )
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
    # A bad ca_file or client certificate is exit 2 once, before the store is
    # seeded or workers fork (each would fail the same way).
    Outbound(settings, env)
    # The same for allow_users and the client key file (made here on first use).
    check_settings(settings, env)
    # Until the loop installs its handlers, SIGTERM must still mean "exit 0",
    # e.g. while seeding waits for another process's store lock.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(seed_from_env(settings, env))
        if settings.workers > 1:
            return _serve_workers(settings, address, env)
        install_uvloop()
        asyncio.run(serve(settings, address, env=env))
    return 0


def _serve_workers(settings: Settings, address: ListenAddress, env: Mapping[str, str]) -> int:
    address, holder = reserve_port(address)

    def worker() -> int:
        if holder is not None:
            holder.close()
        install_uvloop()
        asyncio.run(serve(settings, address, reuse_port=True, env=env))
        return 0

    log.info("starting %d workers on %s", settings.workers, address)
    try:
        return run_workers(settings.workers, worker)
    finally:
        if holder is not None:
            holder.close()

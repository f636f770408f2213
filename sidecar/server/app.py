"""Wiring: one ClientSession, one TokenManager, the proxy and its local endpoints.

``running_sidecar`` is the lifecycle as one async context: set up before the
``yield``, torn down after.  The low-level ``web.Server`` is used instead of a
``web.Application`` because every path is the proxy's: there is nothing to
route, and skipping the router is measurably faster per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TextIO

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar.auth.refresh import make_refresher
from sidecar.callers.gate import CallerGate, build_gate
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound, client_session
from sidecar.manager import TokenManager
from sidecar.proxy.handler import Outcome, Proxy
from sidecar.server.accesslog import AccessLog
from sidecar.server.admin import LocalEndpoints
from sidecar.server.metrics import Metrics
from sidecar.store.location import open_store

log = logging.getLogger("sidecar.app")


# At shutdown a refresh in flight gets at least this long to finish and save.
SAVE_REFRESH_SECONDS = 5.0


@dataclasses.dataclass(slots=True)
class Sidecar:
    """The running parts of one proxy that its host (serve, a test) drives."""

    manager: TokenManager
    server: web.Server
    proxy: Proxy
    callers: CallerGate | None = None


class _Server(web.Server):
    """``web.Server`` that tells the caller gate when a connection is gone, so no verdict outlives its connection."""

    def __init__(self, handler: Any, *, gate: CallerGate, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._gate.forget(handler)
        super().connection_lost(handler, exc)


def _recorder(metrics: Metrics, access_log: AccessLog) -> Callable[[web.BaseRequest, Outcome, float], None]:
    def record(request: web.BaseRequest, outcome: Outcome, seconds: float) -> None:
        metrics.request(outcome.status, outcome.upstream_seconds, outcome.retried, outcome.error == "relogin-required")
        if access_log.enabled:
            raw = request.raw_path
            mark = raw.find("?")
            access_log.write(
                request.method,
                raw if mark < 0 else raw[:mark],
                outcome.status,
                outcome.upstream_status,
                seconds * 1000,
                outcome.retried,
                outcome.refreshed,
            )

    return record


@contextlib.asynccontextmanager
async def running_sidecar(
    settings: Settings,
    *,
    log_stream: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    proactive: bool = True,
    env: Mapping[str, str] | None = None,
    callers: CallerGate | None = None,
) -> AsyncIterator[Sidecar]:
    """Everything ``serve`` runs, minus the listening sockets.

    ``callers`` is the caller policy (SPEC §9), built from ``settings`` and
    ``env`` (the process environment by default) unless a test passes one.
    """
    gate = callers if callers is not None else build_gate(settings, os.environ if env is None else env)
    if callers is None:
        await gate.start()
    outbound = Outbound(settings)
    session = client_session(settings, outbound, proxying=True)
    metrics = Metrics()
    manager = TokenManager(
        open_store(settings.store),
        make_refresher(session, settings),
        leeway=settings.leeway,
        clock=clock,
        observer=metrics.refresh,
        refresh_in_background=True,
    )
    await manager.load()
    access_log = AccessLog(log_stream, settings.log_format, enabled=settings.log_level in ("debug", "info"))
    proxy = Proxy(
        settings,
        manager,
        session,
        outbound,
        LocalEndpoints(manager, settings, metrics, clock, gate),
        _recorder(metrics, access_log),
        gate,
    )
    server = _Server(proxy.handle, gate=gate, handler_cancellation=True, auto_decompress=False, access_log=None)
    background = asyncio.get_running_loop().create_task(manager.run_proactive()) if proactive else None
    try:
        yield Sidecar(manager, server, proxy, gate)
    finally:
        proxy.close()
        if callers is None:
            await gate.aclose()  # ours; a test's gate is the test's
        if background is not None:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        # A refresh in flight has spent the old token: let it save the new one.
        await manager.aclose(max(settings.shutdown_timeout, SAVE_REFRESH_SECONDS))
        await session.close()

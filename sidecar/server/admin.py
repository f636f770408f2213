"""The sidecar's own endpoints under ``/_sidecar/``: health, ready, status, metrics.

None of them ever shows a token; they describe the login, not its secrets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from sidecar.callers.gate import CallerGate
from sidecar.config import Settings
from sidecar.manager import TokenManager
from sidecar.proxy import problems
from sidecar.server.metrics import Metrics
from sidecar.tokens import TokenState, format_timestamp, token_state

_NO_STORE = {"Cache-Control": "no-store"}


def status_document(
    manager: TokenManager, settings: Settings, now: float, callers: CallerGate | None = None
) -> dict[str, Any]:
    """The JSON of ``/_sidecar/status`` (SPEC §4), with the caller policy (SPEC §9, never the key)."""
    pair = manager.pair
    stats = manager.stats
    expires_at = pair.expires_at if pair is not None else None
    next_refresh = manager.next_refresh_at()
    return {
        "loggedIn": pair is not None,
        "apiUrl": settings.upstream or manager.api_url,
        "expiresAt": format_timestamp(expires_at) if expires_at is not None else None,
        "secondsToExpiry": round(expires_at - now, 1) if expires_at is not None else None,
        "refreshes": {"ok": stats.ok, "dead": stats.dead, "transient": stats.transient},
        "lastRefreshAt": format_timestamp(stats.last_refresh_at) if stats.last_refresh_at else None,
        "lastError": stats.last_error or manager.problem,
        "nextRefreshAt": format_timestamp(next_refresh) if next_refresh is not None else None,
        "callers": callers.describe(settings.listen) if callers is not None else None,
        "storeError": manager.store_problem,
    }


def token_usable(manager: TokenManager, leeway: float, now: float) -> bool:
    """True when an access token is held that has not expired (fresh, or due and still valid)."""
    pair = manager.pair
    return pair is not None and token_state(pair, now, leeway) is not TokenState.EXPIRED


class LocalEndpoints:
    """Answers ``/_sidecar/<name>``."""

    def __init__(
        self,
        manager: TokenManager,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        callers: CallerGate | None = None,
    ) -> None:
        self._callers = callers
        self._manager = manager
        self._settings = settings
        self._metrics = metrics
        self._clock = clock

    async def __call__(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return problems.problem_response(
                problems.METHOD_NOT_ALLOWED, "Sidecar endpoints answer GET only.", headers={"Allow": "GET, HEAD"}
            )
        if name == "health":
            return web.json_response({"status": "ok"}, headers=_NO_STORE)
        if name == "ready":
            return self._ready()
        if name == "status":
            document = status_document(self._manager, self._settings, self._clock(), self._callers)
            return web.Response(body=orjson.dumps(document), content_type="application/json", headers=_NO_STORE)
        if name == "metrics":
            return web.Response(
                body=self._metrics.render(), headers={"Content-Type": self._metrics.content_type, **_NO_STORE}
            )
        return problems.problem_response(
            problems.NOT_FOUND, "Known endpoints: /_sidecar/health, ready, status, metrics."
        )

    def _ready(self) -> web.Response:
        """200 while a usable token is held; the body says why not, and whether the store answers."""
        manager = self._manager
        ready = token_usable(manager, self._settings.leeway, self._clock())
        document: dict[str, Any] = {"ready": ready}
        if not ready:
            document["reason"] = manager.problem or manager.stats.last_error or "the access token has expired"
        if manager.store_problem is not None:
            document["storeError"] = manager.store_problem
        return web.json_response(document, status=200 if ready else 503, headers=_NO_STORE)

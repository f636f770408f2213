"""The responses sidecar makes itself: RFC 9457 problem+json, one per case of SPEC §4."""

from __future__ import annotations

import dataclasses
import math

import orjson
from aiohttp import web

PROBLEM_TYPE_BASE = "urn:sidecar:problem:"


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One case of the table: its status, X-Sidecar-Error code and title."""

    status: int
    code: str
    title: str


RELOGIN_REQUIRED = Problem(511, "relogin-required", "Login required")
REFRESH_UNAVAILABLE = Problem(503, "refresh-unavailable", "Token refresh unavailable")
UPSTREAM_UNREACHABLE = Problem(502, "upstream-unreachable", "Upstream unreachable")
UPSTREAM_TIMEOUT = Problem(504, "upstream-timeout", "Upstream timed out")
HOST_NOT_ALLOWED = Problem(403, "host-not-allowed", "Host not allowed")
ORIGIN_NOT_ALLOWED = Problem(403, "origin-not-allowed", "Cross-site request refused")
BAD_TARGET = Problem(400, "bad-target", "Bad request target")
METHOD_NOT_ALLOWED = Problem(405, "bad-target", "Method not allowed")
NOT_FOUND = Problem(404, "not-found", "No such sidecar endpoint")
UPSTREAM_REFUSED_UPGRADE = Problem(502, "upstream-refused-upgrade", "Upstream refused the WebSocket upgrade")
CALLER_NOT_ALLOWED = Problem(403, "caller-not-allowed", "Caller not allowed")
CLIENT_KEY_REQUIRED = Problem(403, "client-key-required", "Client key required")
INTERNAL = Problem(500, "internal-error", "Sidecar internal error")


def problem_response(
    problem: Problem,
    detail: str,
    *,
    status: int | None = None,
    retry_after: float | None = None,
    extra: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A problem+json response with ``Cache-Control: no-store`` and ``X-Sidecar-Error``.

    ``status`` overrides the case's status (the configurable re-login status).
    ``detail`` must never contain a secret.
    """
    code = status or problem.status
    body: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + problem.code,
        "title": problem.title,
        "status": code,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    response_headers = {
        "Content-Type": "application/problem+json",
        "Cache-Control": "no-store",
        "X-Sidecar-Error": problem.code,
    }
    if retry_after is not None:
        response_headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if headers:
        response_headers.update(headers)
    return web.Response(status=code, body=orjson.dumps(body), headers=response_headers)

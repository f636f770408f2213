"""The ``/_mock/`` control endpoints: HTTP twins of MockCloud's test hooks, for subprocess users.

Each flips the same switch as the method it names; none of them counts as a
request the cloud has seen.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from sidecar.mockcloud.wire import json_response

# Every control path starts here, under the cloud's prefix.
CONTROL_ROOT = "/_mock/"


def is_control_path(path: str, prefix: str) -> bool:
    """Whether ``path`` is a control endpoint of a cloud mounted at ``prefix``."""
    return path.startswith(prefix + CONTROL_ROOT)


def int_arg(request: web.Request, name: str, default: int) -> int:
    """An integer query parameter, or a 400."""
    try:
        return int(request.query.get(name, str(default)))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None


class ControlHost(Protocol):
    """The test hooks the control endpoints call."""

    def revoke_refresh_tokens(self) -> None: ...

    def revoke_access_tokens(self) -> None: ...

    def fail_next_refreshes(self, n: int, status: int) -> None: ...

    def hang_next_refreshes(self, n: int, seconds: float) -> None: ...

    def reject_next_refreshes(self, n: int) -> None: ...

    def stats(self) -> dict[str, int]: ...


class ControlRoutes:
    """``/_mock/revoke-refresh``, ``revoke-access``, ``fail-refresh``, ``hang-refresh``, ``reject-refresh`` and ``stats``."""

    def __init__(self, cloud: ControlHost) -> None:
        self._cloud = cloud

    def add_to(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Register the control endpoints under ``prefix``."""
        root = prefix + CONTROL_ROOT
        router.add_post(root + "revoke-refresh", self._revoke_refresh)
        router.add_post(root + "revoke-access", self._revoke_access)
        router.add_post(root + "fail-refresh", self._fail_refresh)
        router.add_post(root + "hang-refresh", self._hang_refresh)
        router.add_post(root + "reject-refresh", self._reject_refresh)
        router.add_get(root + "stats", self._stats)

    async def _revoke_refresh(self, request: web.Request) -> web.StreamResponse:
        """HTTP twin of revoke_refresh_tokens()."""
        self._cloud.revoke_refresh_tokens()
        return json_response({"ok": True})

    async def _revoke_access(self, request: web.Request) -> web.StreamResponse:
        """HTTP twin of revoke_access_tokens()."""
        self._cloud.revoke_access_tokens()
        return json_response({"ok": True})

    async def _fail_refresh(self, request: web.Request) -> web.StreamResponse:
        """HTTP twin of fail_next_refreshes()."""
        self._cloud.fail_next_refreshes(int_arg(request, "n", 1), int_arg(request, "status", 503))
        return json_response({"ok": True})

    async def _hang_refresh(self, request: web.Request) -> web.StreamResponse:
        """HTTP twin of hang_next_refreshes()."""
        try:
            seconds = float(request.query.get("seconds", "3600"))
        except ValueError:
            raise web.HTTPBadRequest(text="seconds must be a number\n") from None
        self._cloud.hang_next_refreshes(int_arg(request, "n", 1), seconds)
        return json_response({"ok": True})

    async def _reject_refresh(self, request: web.Request) -> web.StreamResponse:
        """HTTP twin of reject_next_refreshes()."""
        self._cloud.reject_next_refreshes(int_arg(request, "n", 1))
        return json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        """The counters; this request is not counted."""
        return json_response(self._cloud.stats())

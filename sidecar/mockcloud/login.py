"""Logging in at the mock cloud: the browser redirect, and the headless approve-then-poll flow."""

from __future__ import annotations

import html
from typing import Protocol

from aiohttp import web
from yarl import URL

from sidecar.mockcloud.wire import json_response

# Hosts a browser-login redirect may point at: the login command's loopback
# listener, never anywhere else (an open redirect would leak the tokens).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class LoginHost(Protocol):
    """What the login routes need from the cloud: its login switches, new pairs, and its address."""

    @property
    def login_error(self) -> str | None: ...

    @property
    def login_omit_expiry(self) -> bool: ...

    @property
    def poll_error(self) -> str | None: ...

    def issue_pair(self) -> dict[str, str]: ...

    def api_url(self, request: web.Request) -> str: ...


class LoginRoutes:
    """``/api/v1/cli/login``, ``/cli-login`` and the poll; owns the headless login codes."""

    def __init__(self, cloud: LoginHost) -> None:
        self._cloud = cloud
        self._codes: dict[str, str] = {}  # code -> "approved" | "consumed"

    def add_to(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Register the login routes under ``prefix``."""
        router.add_get(prefix + "/api/v1/cli/login", self._login)
        router.add_get(prefix + "/cli-login", self._approve_page)
        router.add_get(prefix + "/api/v1/auth/cli-login/poll", self._poll)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        """Browser login: redirect to the loopback ``redirect_uri`` with a new pair or an error."""
        redirect_uri = request.query.get("redirect_uri", "")
        state = request.query.get("state", "")
        try:
            target = URL(redirect_uri)
        except ValueError:
            target = URL()
        if target.scheme != "http" or target.host not in LOOPBACK_HOSTS:
            return json_response({"error": "invalid_request", "detail": "redirect_uri must be loopback"}, 400)
        if self._cloud.login_error is not None:
            raise web.HTTPFound(str(target.extend_query(error=self._cloud.login_error, state=state)))
        pair = self._cloud.issue_pair()
        query = {
            "state": state,
            "access_token": pair["accessToken"],
            "refresh_token": pair["refreshToken"],
            "access_token_expires_at": pair["accessTokenExpiresAt"],
            "api_url": self._cloud.api_url(request),
        }
        if self._cloud.login_omit_expiry:
            del query["access_token_expires_at"]
        raise web.HTTPFound(str(target.extend_query(query)))

    async def _approve_page(self, request: web.Request) -> web.StreamResponse:
        """Headless login, the user's side: opening the page approves the code."""
        code = request.query.get("code", "")
        if not code:
            return web.Response(status=400, text="missing code\n")
        if self._codes.get(code) != "consumed":
            self._codes[code] = "approved"
        page = (
            "<!doctype html><title>sidecar login</title>"
            f"<p>Approved. Code <code>{html.escape(code)}</code>; "
            "you can close this page and return to the terminal.</p>\n"
        )
        return web.Response(text=page, content_type="text/html")

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        """Headless login, the CLI's side: pending until approved, then the pair exactly once."""
        if self._cloud.poll_error is not None:
            return json_response({"error": self._cloud.poll_error}, 400)
        code = request.query.get("code", "")
        if not code:
            return json_response({"error": "invalid_request"}, 400)
        state = self._codes.get(code)
        if state == "consumed":
            return json_response({"error": "expired_code"}, 410)
        if state != "approved":
            # Unknown codes are pending: the CLI polls before the user opens the page.
            return json_response({"status": "pending"}, 202)
        self._codes[code] = "consumed"
        return json_response(self._cloud.issue_pair())

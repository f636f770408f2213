"""``MockCloud``: the test hooks and counters, the app that wires the routes together, start and stop.

Tokens live in ``ledger``, the refresh switches in ``switches``, and each
family of routes in its own module (``api``, ``login``, ``refresh``,
``control``), which reaches the cloud only through a small protocol of the
attributes and hooks it uses.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sidecar.mockcloud.api import ApiRoutes
from sidecar.mockcloud.control import ControlRoutes, is_control_path
from sidecar.mockcloud.ledger import TokenLedger
from sidecar.mockcloud.login import LoginRoutes
from sidecar.mockcloud.oidc import OidcRoutes
from sidecar.mockcloud.refresh import RefreshRoutes
from sidecar.mockcloud.stopping import StopSignal
from sidecar.mockcloud.switches import Countdown, RefreshSwitches
from sidecar.mockcloud.wire import Handler, iso_timestamp

__all__ = ["DEFAULT_ACCESS_TTL", "DEFAULT_REFRESH_TTL", "MockCloud", "run_mock_cloud"]

# One logger for the whole mock cloud, whichever module logs.
log = logging.getLogger("sidecar.mockcloud")

# The desktop app's cloud: access tokens live one day, refresh tokens a week.
DEFAULT_ACCESS_TTL = 86400.0
DEFAULT_REFRESH_TTL = 7 * 86400.0

# In-flight handlers get this long to finish on stop(); the hang switches are
# woken explicitly, so this only bounds stragglers such as open streams.
_SHUTDOWN_TIMEOUT = 0.5


def _normalize_prefix(prefix: str) -> str:
    """``""`` or ``"/cloud"``: a leading slash and no trailing one."""
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


class MockCloud:
    """An in-process cloud with rotating single-use refresh tokens and test switches.

    Counters (``refresh_calls``, ``refresh_ok``, ``requests_seen``,
    ``chain_revocations``) and switches (``login_error``,
    ``login_omit_expiry``, ``poll_error``, ``refresh_response_style``,
    ``oauth_client``) are plain attributes. All expiry checks use ``clock``.
    """

    def __init__(
        self,
        *,
        access_ttl: float = DEFAULT_ACCESS_TTL,
        refresh_ttl: float = DEFAULT_REFRESH_TTL,
        prefix: str = "",
        clock: Callable[[], float] = time.time,
        user: str = "alice",
        email: str = "alice@example.test",
    ) -> None:
        self._ledger = TokenLedger(access_ttl=access_ttl, refresh_ttl=refresh_ttl, clock=clock)
        self.prefix = _normalize_prefix(prefix)
        self.user = user
        self.email = email
        self.base_url = ""

        self.refresh_calls = 0
        self.refresh_ok = 0
        self.requests_seen = 0
        self.last_echo_body_sha256: str | None = None
        self.last_oauth_form: dict[str, str] = {}
        self.last_oauth_basic: tuple[str, str] | None = None

        self.login_error: str | None = None
        self.login_omit_expiry = False
        self.poll_error: str | None = None
        self.refresh_response_style = "camel"
        self.oauth_client: tuple[str, str] | None = None

        self._refresh_switches = RefreshSwitches()
        self._stop_signal = StopSignal()
        self._api = ApiRoutes(self, self._stop_signal.pause, bytes_handler=self._bytes)
        self._login = LoginRoutes(self)
        # The OIDC provider: its clients, switches and test hooks are reached as cloud.oidc.
        self.oidc = OidcRoutes(self, self._ledger)
        self._refresh = RefreshRoutes(
            self, self._ledger, self._refresh_switches, self._stop_signal.pause, other_grants=self.oidc.grants()
        )
        self._control = ControlRoutes(self)
        self._runner: web.AppRunner | None = None
        self.app = self.make_app()

    # -- the ledger's settings and counters, read and set as plain attributes

    @property
    def access_ttl(self) -> float:
        """Seconds a new access token lives."""
        return self._ledger.access_ttl

    @access_ttl.setter
    def access_ttl(self, value: float) -> None:
        self._ledger.access_ttl = value

    @property
    def refresh_ttl(self) -> float:
        """Seconds a new refresh token lives."""
        return self._ledger.refresh_ttl

    @refresh_ttl.setter
    def refresh_ttl(self, value: float) -> None:
        self._ledger.refresh_ttl = value

    @property
    def refresh_reuse_grace(self) -> float:
        """Seconds a spent refresh token may be redeemed again without revoking its login (0: never)."""
        return self._ledger.reuse_grace

    @refresh_reuse_grace.setter
    def refresh_reuse_grace(self, value: float) -> None:
        self._ledger.reuse_grace = value

    @property
    def clock(self) -> Callable[[], float]:
        """The epoch-seconds clock every expiry check uses."""
        return self._ledger.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self._ledger.clock = value

    @property
    def minted(self) -> set[str]:
        """Every token value ever handed out, for leak checks in tests."""
        return self._ledger.minted

    @minted.setter
    def minted(self, value: set[str]) -> None:
        self._ledger.minted = value

    @property
    def chain_revocations(self) -> int:
        """How many login families a reused refresh token revoked."""
        return self._ledger.chain_revocations

    @chain_revocations.setter
    def chain_revocations(self, value: int) -> None:
        self._ledger.chain_revocations = value

    # -- tokens -----------------------------------------------------------

    def issue_pair(self, *, access_ttl: float | None = None) -> dict[str, str]:
        """Start a new login family; return ``accessToken``, ``refreshToken``, ``accessTokenExpiresAt``."""
        pair = self._ledger.issue_pair(access_ttl=access_ttl)
        return {
            "accessToken": pair.access_token,
            "refreshToken": pair.refresh_token,
            "accessTokenExpiresAt": iso_timestamp(pair.expires_at),
        }

    def register_refresh_token(self, token: str) -> None:
        """Accept ``token`` as the refresh token of a new login (seeding containers in examples)."""
        self._ledger.register_refresh_token(token)

    def access_token_valid(self, token: str | None) -> bool:
        """Whether ``token`` is a live access token right now."""
        return self._ledger.access_token_valid(token)

    def same_login(self, refresh_token: str, other: str) -> bool:
        """Whether two refresh tokens belong to one login (one family of rotations)."""
        return self._ledger.same_family(refresh_token, other)

    # -- test switches ----------------------------------------------------

    def fail_next_refreshes(self, n: int, status: int = 503) -> None:
        """The next ``n`` refresh calls answer ``status`` with ``{"error": "server_error"}``."""
        self._refresh_switches.fail = Countdown(n, status=status)

    def hang_next_refreshes(self, n: int, seconds: float = 3600) -> None:
        """The next ``n`` refresh calls wait ``seconds`` (or until stop()) before answering."""
        self._refresh_switches.hang = Countdown(n, seconds=seconds)

    def reject_next_refreshes(self, n: int) -> None:
        """The next ``n`` refresh calls answer invalid_grant and revoke the presented chain."""
        self._refresh_switches.reject = Countdown(n)

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far stops working."""
        self._ledger.revoke_access_tokens()

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far stops working."""
        self._ledger.revoke_refresh_tokens()

    def stats(self) -> dict[str, int]:
        """The counters, as ``GET /_mock/stats`` reports them."""
        return {
            "refresh_calls": self.refresh_calls,
            "refresh_ok": self.refresh_ok,
            "requests_seen": self.requests_seen,
            "chain_revocations": self.chain_revocations,
        }

    # -- app --------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application with every route under ``prefix``."""
        app = web.Application(middlewares=[self._count_requests])
        p = self.prefix
        self._api.add_to(app.router, p)
        self._login.add_to(app.router, p)
        self._refresh.add_to(app.router, p)
        self.oidc.add_to(app.router, p)
        self._control.add_to(app.router, p)
        return app

    @web.middleware
    async def _count_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count every request except the control endpoints, and hide client hang-ups."""
        if not is_control_path(request.path, self.prefix):
            self.requests_seen += 1
        try:
            return await handler(request)
        except ConnectionError:
            # The client left (a reset and aiohttp's "Connection lost" are both
            # ConnectionError). Nobody is there to read an answer; this one
            # only keeps aiohttp from logging a traceback, and its write fails
            # quietly.
            log.debug("mock cloud: client hung up on %s", request.path)
            return web.Response(status=400)

    def api_url(self, request: web.Request) -> str:
        """The base URL clients should use: ``base_url`` once started, else what the request says."""
        return self.base_url or f"{request.scheme}://{request.host}{self.prefix}"

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/bytes``, behind the bearer check.

        It stays a MockCloud method so a subclass can override it, as
        tests/test_proxy_forwarding.py does to watch the stream it writes.
        """
        return await self._api.stream_bytes(request)

    # -- lifecycle --------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on ``host:port`` (0 picks a free port); return ``base_url``.

        With ``ssl_context`` it serves https (tests of sidecar's TLS trust).
        """
        self._stop_signal.reset()
        runner = web.AppRunner(
            self.app,
            access_log=None,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            # A client that hangs up cancels its handler: a hung refresh then
            # never spends a token behind the back of a caller that gave up.
            handler_cancellation=True,
            # Echo and upload hash the bytes on the wire, compressed or not.
            auto_decompress=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        self._runner = runner
        self.base_url = self._url(runner.addresses[0], ssl_context)
        log.info("mock cloud listening on %s", self.base_url)
        return self.base_url

    async def add_listener(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """One more address for the started cloud (same tokens, same counters); its base URL.

        Tests use it to reach one cloud through two certificates.
        """
        if self._runner is None:
            raise RuntimeError("start the mock cloud first")
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        return self._url(self._runner.addresses[-1], ssl_context)

    def _url(self, address: Any, ssl_context: ssl.SSLContext | None) -> str:
        bound_host, bound_port = address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if ssl_context is not None else "http"
        return f"{scheme}://{shown}:{bound_port}{self.prefix}"

    async def stop(self) -> None:
        """Stop listening; wake hanging handlers and close WebSockets first."""
        self._stop_signal.stop()
        await self._api.close_websockets()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


async def run_mock_cloud(
    *,
    host: str = "127.0.0.1",
    port: int = 8788,
    access_ttl: float = DEFAULT_ACCESS_TTL,
    refresh_ttl: float = DEFAULT_REFRESH_TTL,
    prefix: str = "",
    known_refresh_tokens: tuple[str, ...] = (),
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve a MockCloud until cancelled; call ``ready(base_url)`` once listening."""
    cloud = MockCloud(access_ttl=access_ttl, refresh_ttl=refresh_ttl, prefix=prefix)
    for token in known_refresh_tokens:
        cloud.register_refresh_token(token)
    base_url = await cloud.start(host, port)
    try:
        if ready is not None:
            ready(base_url)
        await asyncio.Event().wait()
    finally:
        await cloud.stop()

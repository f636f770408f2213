"""The request handler: forward to the upstream with a fresh bearer token.

Per request: refuse a caller that may not use the login (callers/, SPEC
§9: the peer's uid once per connection, the client key per forwarded
request), refuse what must not be forwarded (targets, Host, Origin, dot
segments), take a token from the manager, send the request upstream with
hop-by-hop headers dropped and the body framed as the client framed it,
replay it once after a 401 if it was small enough to buffer, and stream the
answer back.  Everything the sidecar answers itself is problem+json.

This module decides and wires; the parts live beside it: the 401 rule in
retry.py, the body in body.py, the answer's way back in relay.py, the
upstream client in upstream.py, WebSocket frames in websocket.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from sidecar.auth.hint import login_hint
from sidecar.callers.gate import CallerGate
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound
from sidecar.egress.tls import describe_tls_failure
from sidecar.errors import ConfigError, NotLoggedIn, RefreshTransient
from sidecar.manager import TokenManager
from sidecar.proxy import problems, retry, websocket
from sidecar.proxy.body import request_body
from sidecar.proxy.guards import host_allowed, origin_allowed, path_escapes, split_target
from sidecar.proxy.headers import request_head
from sidecar.proxy.outcome import Outcome
from sidecar.proxy.relay import ClientGone, relay
from sidecar.proxy.response import UpstreamResponse
from sidecar.proxy.upstream import UpstreamPool, UpstreamTimeout, UpstreamUnreachable
from sidecar.proxy.urls import Upstream

__all__ = ["LOCAL_PREFIX", "LocalHandler", "Outcome", "Proxy", "Recorder", "Upstream"]

LOCAL_PREFIX = "/_sidecar/"
_REFUSED_METHODS = {
    "CONNECT": "CONNECT is not supported: this is a reverse proxy to one upstream.",
    # An upstream that echoes TRACE would hand the injected token to the client.
    "TRACE": "TRACE is not forwarded: the echo would contain the injected token.",
}
log = logging.getLogger("sidecar.proxy")


LocalHandler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
Recorder = Callable[[web.BaseRequest, Outcome, float], None]


class Proxy:
    """Forwards requests to the upstream; one instance per server."""

    def __init__(
        self,
        settings: Settings,
        manager: TokenManager,
        session: aiohttp.ClientSession,
        outbound: Outbound,
        local: LocalHandler,
        record: Recorder,
        callers: CallerGate | None = None,
    ) -> None:
        self._settings = settings
        self._callers = callers
        self._manager = manager
        self._session = session
        self._outbound = outbound
        self._local = local
        self._record = record
        self._allowed_hosts = tuple(host.lower() for host in settings.allowed_hosts)
        self._upstream_cache: Upstream | None = None
        self._pools: dict[str, UpstreamPool] = {}
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- entry point --------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = Outcome()
        self.in_flight += 1
        self._idle.clear()
        try:
            response = await self._dispatch(request, outcome)
        except (ConfigError, ValueError, UnicodeError) as exc:
            # Never aiohttp's 500 with a traceback: its text may quote the request.
            log.error("request failed: %s", type(exc).__name__)
            response = self._problem(
                outcome, problems.INTERNAL, "The sidecar could not handle this request; see its log."
            )
        except ClientGone:
            outcome.status = outcome.status or 499
            outcome.error = "client-gone"
            raise asyncio.CancelledError() from None
        except asyncio.CancelledError:
            # The client hung up, or shutdown cut the request off.
            outcome.status = outcome.status or 499
            outcome.error = outcome.error or "cancelled"
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            self._record(request, outcome, time.perf_counter() - started)
        return response

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for requests in flight to finish; True if they did."""
        if timeout <= 0:
            return not self.in_flight
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _dispatch(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        callers = self._callers
        if callers is not None and callers.checks_peers:
            # Looked up on a connection's first request only; then one dict lookup (SPEC §9).
            caller = callers.caller(request.protocol, request.transport)
            if not caller.allowed:
                refused = self._problem(outcome, problems.CALLER_NOT_ALLOWED, caller.detail())
                refused.force_close()
                return refused
        target = split_target(request.raw_path)
        refusal = self._refusal(request, target)
        if refusal is not None:
            outcome.status = refusal.status
            outcome.error = refusal.headers.get("X-Sidecar-Error")
            return refusal
        assert target is not None  # _refusal checked it
        path, query = target
        if path.startswith(LOCAL_PREFIX):
            response = await self._local(request, path[len(LOCAL_PREFIX) :])
            outcome.status = response.status
            return response
        if callers is not None and callers.checks_keys:
            verdict = callers.key_verdict(request.raw_headers)
            if not verdict.ok:
                return self._problem(
                    outcome,
                    problems.CLIENT_KEY_REQUIRED,
                    f"This sidecar needs its client key and {verdict.reason}: send it as X-Sidecar-Key "
                    "or Authorization: Bearer <key> (sidecar client-key prints it).",
                )
        if path_escapes(path):
            return self._problem(
                outcome,
                problems.BAD_TARGET,
                "The path has a dot-segment or an encoded one; it could leave the upstream's prefix.",
            )
        try:
            upstream = self._upstream()
        except ConfigError:
            return self._relogin(outcome)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, upstream.base + path + query, outcome)
        return await self._forward(request, upstream, path + query, outcome)

    def _refusal(self, request: web.BaseRequest, target: tuple[str, str] | None) -> web.Response | None:
        """A problem response for requests that must not go anywhere, else None."""
        headers = request.headers
        if request.method in _REFUSED_METHODS:
            return problems.problem_response(
                problems.METHOD_NOT_ALLOWED,
                _REFUSED_METHODS[request.method],
                headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"},
            )
        if target is None:
            return problems.problem_response(
                problems.BAD_TARGET, "Only origin-form request targets (/path?query) are accepted."
            )
        host = headers.get("Host")
        if not host_allowed(host, self._allowed_hosts):
            return problems.problem_response(problems.HOST_NOT_ALLOWED, "The Host header is not one of allowed_hosts.")
        if not origin_allowed(
            headers.get("Origin"), headers.get("Sec-Fetch-Site"), host, self._settings.allowed_origins
        ):
            return problems.problem_response(
                problems.ORIGIN_NOT_ALLOWED,
                "Cross-site browser requests are refused; add the origin to allowed_origins to allow it.",
            )
        return None

    # -- upstream -----------------------------------------------------------

    def _upstream(self) -> Upstream:
        """The upstream (settings, else the store's apiUrl), parsed once per value."""
        url = self._settings.upstream or self._manager.api_url
        if not url:
            raise ConfigError("upstream: not configured and not in the token store")
        cached = self._upstream_cache
        if cached is None or cached.url != url:
            cached = Upstream.parse(url)
            self._upstream_cache = cached
        return cached

    def _pool(self, upstream: Upstream) -> UpstreamPool:
        pool = self._pools.get(upstream.origin)
        if pool is None:
            pool = UpstreamPool(
                upstream.scheme,
                upstream.host,
                upstream.port,
                connect_timeout=self._settings.connect_timeout,
                read_timeout=self._settings.read_timeout,
                tls=self._outbound.tls,
                proxy=self._outbound.proxy_for(upstream.url),
            )
            self._pools[upstream.origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def _token(self, outcome: Outcome) -> str | web.Response:
        manager = self._manager
        before = manager.stats.ok
        try:
            token = await manager.access_token()
        except NotLoggedIn:
            return self._relogin(outcome)
        except RefreshTransient as exc:
            return self._problem(
                outcome,
                problems.REFRESH_UNAVAILABLE,
                "No access token yet and the token endpoint is failing; retry later.",
                retry_after=exc.retry_after,
            )
        if manager.stats.ok != before:
            outcome.refreshed = True
        return token

    def _renewal_problem(self, exc: NotLoggedIn | RefreshTransient, outcome: Outcome) -> web.Response:
        """The answer when the upstream rejected the token and no other one can be had."""
        if isinstance(exc, NotLoggedIn):
            return self._relogin(outcome)
        return self._problem(
            outcome,
            problems.REFRESH_UNAVAILABLE,
            "The upstream rejected the token and refreshing it is failing; retry later.",
            retry_after=exc.retry_after,
        )

    async def _forward(
        self, request: web.BaseRequest, upstream: Upstream, target: str, outcome: Outcome
    ) -> web.StreamResponse:
        token = await self._token(outcome)
        if isinstance(token, web.Response):
            return token
        body, chunked, replayable = await request_body(request, self._settings.replay_limit)
        pool = self._pool(upstream)
        target_bytes = upstream.prefix_bytes + target.encode("utf-8", "surrogateescape")
        head_only = request.method == "HEAD"

        async def send(token: str) -> UpstreamResponse:
            head = request_head(
                request.method,
                target_bytes,
                pool.host_header,
                request.raw_headers,
                b"Bearer " + token.encode("latin-1"),
                chunked,
            )
            sent = time.perf_counter()
            response = await pool.send(head, body, chunked=chunked, head_only=head_only)
            outcome.upstream_status = response.status
            outcome.upstream_seconds = time.perf_counter() - sent
            return response

        try:
            ending, response = await retry.drive(
                retry.after_401(token, replayable=replayable), send, self._manager, outcome
            )
        except UpstreamTimeout:
            return self._problem(outcome, problems.UPSTREAM_TIMEOUT, "The upstream did not answer in time.")
        except UpstreamUnreachable as exc:
            return self._problem(outcome, problems.UPSTREAM_UNREACHABLE, f"The upstream could not be reached: {exc}.")
        except retry.RENEWAL_FAILURES as exc:
            return self._renewal_problem(exc, outcome)
        return await relay(
            request,
            response,
            upstream,
            outcome,
            self._settings.read_timeout,
            retry_header=ending.retry_header,
        )

    async def _websocket(self, request: web.BaseRequest, url: str, outcome: Outcome) -> web.StreamResponse:
        token = await self._token(outcome)
        if isinstance(token, web.Response):
            return token
        proxy = self._outbound.proxy_for(url)

        async def send(token: str) -> websocket.Handshake:
            answer = await websocket.handshake(
                self._session, request, url, "Bearer " + token, self._settings.read_timeout, proxy
            )
            if answer.error is None:
                outcome.upstream_status = answer.status
            return answer

        try:
            ending, answer = await retry.drive(retry.after_401(token, replayable=True), send, self._manager, outcome)
        except retry.RENEWAL_FAILURES as exc:
            return self._renewal_problem(exc, outcome)
        if isinstance(answer.error, TimeoutError):
            return self._problem(
                outcome, problems.UPSTREAM_TIMEOUT, "The upstream did not answer the WebSocket handshake in time."
            )
        if answer.error is not None:
            tls_failure = describe_tls_failure(answer.error)
            return self._problem(
                outcome,
                problems.UPSTREAM_UNREACHABLE,
                f"The upstream could not be reached: {tls_failure}."
                if tls_failure
                else f"The upstream could not be reached ({type(answer.error).__name__}).",
            )
        if answer.socket is None:
            refused = self._problem(
                outcome,
                problems.UPSTREAM_REFUSED_UPGRADE,
                f"The upstream answered the WebSocket handshake with HTTP {answer.status}.",
                status=answer.status if 400 <= answer.status <= 599 else 502,
            )
            if ending.retry_header is not None:
                refused.headers["X-Sidecar-Retry"] = ending.retry_header
            return refused
        outcome.status = 101
        return await websocket.relay(request, answer.socket)

    # -- problems -----------------------------------------------------------

    def _problem(
        self,
        outcome: Outcome,
        problem: problems.Problem,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        extra: dict[str, object] | None = None,
    ) -> web.Response:
        response = problems.problem_response(problem, detail, status=status, retry_after=retry_after, extra=extra)
        outcome.status = response.status
        outcome.error = problem.code
        return response

    def _relogin(self, outcome: Outcome) -> web.Response:
        hint = login_hint(self._settings, self._manager.api_url)
        reason = self._manager.problem or "not logged in"
        return self._problem(
            outcome,
            problems.RELOGIN_REQUIRED,
            f"{reason[0].upper()}{reason[1:]}. Run: {hint}",
            status=self._settings.relogin_status,
            extra={"login": hint},
        )

"""The request handler: forward to the upstream with a fresh bearer token.

Per request: refuse what must not be forwarded (targets, Host, Origin, dot
segments), take a token from the manager, send the request upstream with
hop-by-hop headers dropped and the body framed as the client framed it,
replay it once after a 401 if it was small enough to buffer, and stream the
answer back.  Everything the sidecar answers itself is problem+json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import Settings
from sidecar.errors import ConfigError, NotLoggedIn, RefreshTransient
from sidecar.manager import TokenManager
from sidecar.proxy import problems, websocket
from sidecar.proxy.guards import host_allowed, origin_allowed, path_escapes, split_target
from sidecar.proxy.headers import request_head, response_headers
from sidecar.proxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout, UpstreamUnreachable

LOCAL_PREFIX = "/_sidecar/"
_REFUSED_METHODS = {
    "CONNECT": "CONNECT is not supported: this is a reverse proxy to one upstream.",
    # An upstream that echoes TRACE would hand the injected token to the client.
    "TRACE": "TRACE is not forwarded: the echo would contain the injected token.",
}
log = logging.getLogger("sidecar.proxy")
_NO_CONTENT = frozenset({204, 304})


@dataclasses.dataclass(slots=True)
class Outcome:
    """What happened to one request, for the access log and metrics."""

    status: int = 0
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    retried: bool = False
    refreshed: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """The configured upstream URL, split once: origin, path prefix, pool key."""

    url: str
    base: str
    origin: str
    scheme: str
    host: str
    port: int
    prefix: str
    prefix_bytes: bytes

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"upstream: expected an http:// or https:// URL, got {url!r}")
        base = url.rstrip("/")
        origin = str(parsed.origin())
        prefix = base[len(origin) :] if base.startswith(origin) else parsed.raw_path.rstrip("/")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return cls(url, base, origin, parsed.scheme, parsed.host, port, prefix, prefix.encode())


class _Verbatim:
    """Mixin: keep aiohttp from adding Content-Type or Server the upstream did not send."""

    _headers: CIMultiDict[str]

    async def _prepare_headers(self) -> None:
        had = {name for name in _AIOHTTP_DEFAULTS if name in self._headers}
        await super()._prepare_headers()  # type: ignore[misc]
        for name in _AIOHTTP_DEFAULTS:
            if name not in had:
                self._headers.popall(name, None)


_AIOHTTP_DEFAULTS = ("Content-Type", "Server")


class _RelayedResponse(_Verbatim, web.Response):
    pass


class _RelayedStreamResponse(_Verbatim, web.StreamResponse):
    pass


class _ClientGone(Exception):
    """The client hung up while we were writing to it."""


LocalHandler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
Recorder = Callable[[web.BaseRequest, Outcome, float], None]


class Proxy:
    """Forwards requests to the upstream; one instance per server."""

    def __init__(
        self,
        settings: Settings,
        manager: TokenManager,
        session: aiohttp.ClientSession,
        local: LocalHandler,
        record: Recorder,
    ) -> None:
        self._settings = settings
        self._manager = manager
        self._session = session
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
        except _ClientGone:
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
            )
            self._pools[upstream.origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _rewrite_location(self, location: str, request: web.BaseRequest, upstream: Upstream) -> str:
        """Point a redirect inside the upstream at the sidecar instead."""
        base, prefix = upstream.base, upstream.prefix
        if location.startswith(base + "/") or location == base:
            rest = location[len(base) :] or "/"
        elif (
            location.startswith("/")
            and not location.startswith("//")
            and prefix
            and (location.startswith(prefix + "/") or location == prefix)
        ):
            rest = location[len(prefix) :] or "/"
        else:
            return location
        return f"http://{request.headers.get('Host', '127.0.0.1')}{rest}"

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

    async def _token_after_401(self, rejected: str, outcome: Outcome) -> str | web.Response:
        outcome.refreshed = True
        try:
            return await self._manager.token_rejected(rejected)
        except NotLoggedIn:
            return self._relogin(outcome)
        except RefreshTransient as exc:
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
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, chunked, replayable = await self._request_body(request)
        pool = self._pool(upstream)
        target_bytes = upstream.prefix_bytes + target.encode("utf-8", "surrogateescape")
        head_only = request.method == "HEAD"
        while True:
            head = request_head(
                request.method,
                target_bytes,
                pool.host_header,
                request.raw_headers,
                b"Bearer " + token.encode("latin-1"),
                chunked,
            )
            sent = time.perf_counter()
            try:
                response = await pool.send(head, body, chunked=chunked, head_only=head_only)
            except UpstreamTimeout:
                return self._problem(outcome, problems.UPSTREAM_TIMEOUT, "The upstream did not answer in time.")
            except UpstreamUnreachable as exc:
                return self._problem(
                    outcome, problems.UPSTREAM_UNREACHABLE, f"The upstream could not be reached: {exc}."
                )
            outcome.upstream_status = response.status
            outcome.upstream_seconds = time.perf_counter() - sent
            if response.status != 401 or outcome.retried:
                break
            if not replayable:
                # The body is gone: refresh for the next request, pass the 401 on.
                try:
                    await self._token_after_401(token, outcome)
                except BaseException:
                    response.release()
                    raise
                outcome.error = None  # the client gets the upstream's 401, not our problem
                return await self._relay(request, response, upstream, outcome, not_replayable=True)
            response.release()
            fresh = await self._token_after_401(token, outcome)
            if isinstance(fresh, web.Response):
                return fresh
            token = fresh
            outcome.retried = True
        return await self._relay(request, response, upstream, outcome, not_replayable=False)

    async def _request_body(self, request: web.BaseRequest) -> tuple[bytes | AsyncIterator[bytes] | None, bool, bool]:
        """``(body, chunked, replayable)`` keeping the client's framing.

        Bodies up to replay_limit are buffered so a 401 can replay them byte
        for byte; larger ones stream with back-pressure and are not replayed.
        """
        if not request.body_exists:
            return None, False, True
        limit = self._settings.replay_limit
        length = request.content_length
        if length is not None:
            if length <= limit:
                # Not request.read(): it enforces aiohttp's 1 MiB client_max_size.
                return await _read_up_to(request.content, length), False, True
            return _stream(b"", request.content), False, False
        prefix = await _read_up_to(request.content, limit + 1)
        if len(prefix) <= limit:
            return prefix, True, True
        return _stream(prefix, request.content), True, False

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream_response: UpstreamResponse,
        upstream: Upstream,
        outcome: Outcome,
        *,
        not_replayable: bool,
    ) -> web.StreamResponse:
        """Send the upstream's response to the client, streaming its body."""
        try:
            headers = response_headers(upstream_response.headers)
            location = headers.get("Location")
            if location is not None:
                headers["Location"] = self._rewrite_location(location, request, upstream)
            if not_replayable:
                headers["X-Sidecar-Retry"] = "not-replayable"
            status = upstream_response.status
            reason = upstream_response.reason.decode("latin-1") or None
            outcome.status = status
            timeout = self._settings.read_timeout or None
            if upstream_response.complete and "Content-Length" in headers:
                # The whole answer is here: one write to the client.
                response = _RelayedResponse(
                    status=status, reason=reason, headers=headers, body=upstream_response.take_buffered()
                )
                upstream_response.release()
                return response
            response = _RelayedStreamResponse(status=status, reason=reason, headers=headers)
            if (
                "Content-Length" not in headers
                and status not in _NO_CONTENT
                and request.method != "HEAD"
                and request.version >= aiohttp.HttpVersion11
            ):
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                while True:
                    try:
                        chunk = await upstream_response.read(timeout)
                    except UpstreamError as exc:
                        # Mid-body failure: cut the client's connection so a
                        # truncated body can never look complete.
                        outcome.error = type(exc).__name__
                        if request.transport is not None:
                            request.transport.close()
                        return response
                    if not chunk:
                        break
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                raise _ClientGone() from None
            return response
        finally:
            upstream_response.release()

    # -- websocket ----------------------------------------------------------

    async def _websocket(self, request: web.BaseRequest, url: str, outcome: Outcome) -> web.StreamResponse:
        token = await self._token(outcome)
        if isinstance(token, web.Response):
            return token
        while True:
            try:
                upstream = await websocket.connect(
                    self._session, request, url, "Bearer " + token, self._settings.read_timeout
                )
            except aiohttp.WSServerHandshakeError as exc:
                outcome.upstream_status = exc.status
                if exc.status == 401 and not outcome.retried:
                    fresh = await self._token_after_401(token, outcome)
                    if isinstance(fresh, web.Response):
                        return fresh
                    token = fresh
                    outcome.retried = True
                    continue
                status = exc.status if 400 <= exc.status <= 599 else 502
                return self._problem(
                    outcome,
                    problems.UPSTREAM_REFUSED_UPGRADE,
                    f"The upstream answered the WebSocket handshake with HTTP {exc.status}.",
                    status=status,
                )
            except TimeoutError:
                return self._problem(
                    outcome, problems.UPSTREAM_TIMEOUT, "The upstream did not answer the WebSocket handshake in time."
                )
            except aiohttp.ClientError as exc:
                return self._problem(
                    outcome, problems.UPSTREAM_UNREACHABLE, f"The upstream could not be reached ({type(exc).__name__})."
                )
            break
        outcome.upstream_status = outcome.status = 101
        return await websocket.relay(request, upstream)

    # -- problems -----------------------------------------------------------

    def _problem(self, outcome: Outcome, problem: problems.Problem, detail: str, **options: object) -> web.Response:
        response = problems.problem_response(problem, detail, **options)  # type: ignore[arg-type]
        outcome.status = response.status
        outcome.error = problem.code
        return response

    def _relogin(self, outcome: Outcome) -> web.Response:
        upstream = self._settings.upstream or self._manager.api_url
        hint = f"sidecar login --upstream {upstream or '<API>'}"
        reason = self._manager.problem or "not logged in"
        return self._problem(
            outcome,
            problems.RELOGIN_REQUIRED,
            f"{reason[0].upper()}{reason[1:]}. Run: {hint}",
            status=self._settings.relogin_status,
            extra={"login": hint},
        )


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def _stream(prefix: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk

"""The token manager: one fresh access token for every caller, one refresh at a time.

Single flight inside the process (one shared task, awaited through
``asyncio.shield``) and across processes (an fcntl lock on ``<store>.lock``,
then a re-read: if another process already rotated the pair, use it).  Dead
refresh tokens clear the store after a re-read; transient failures keep the
pair, hand out the stale token and back off.  No HTTP server glue lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from typing import AsyncIterator, Awaitable, Callable

from sidecar.errors import ConfigError, NotLoggedIn, RefreshDead, RefreshTransient, StoreError
from sidecar.refresh import Refresher
from sidecar.store import Signature, StoreSnapshot, TokenStore
from sidecar.tokens import TokenPair, needs_refresh, refresh_due_at

log = logging.getLogger("sidecar.manager")

# Backoff after a transient failure: 1 s doubling to 60 s (SPEC §3), with
# +-20 % jitter so that several sidecars sharing a cloud do not retry in step.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.2
# How often a logged-in manager looks at the store file for other processes'
# logins, logouts and rotations: one stat() per second is free.
STORE_CHECK_INTERVAL = 1.0
# The proactive loop never sleeps longer than this, so it notices a new login
# or a changed expiry soon.
PROACTIVE_MAX_SLEEP = 1.0

# A refreshed token counts as still valid for the background refresh only
# while at least this much of it is left.
STILL_VALID_MARGIN = 5.0
# The shortest time between two refreshes when the grant carries no usable
# expiry: such a token would otherwise be refreshed on every use.
MIN_REFRESH_INTERVAL = 60.0

DEAD_REASON = "the refresh token was rejected; log in again"
NOT_LOGGED_IN = "not logged in"


def backoff_delay(failures: int, jitter: float) -> float:
    """Seconds to wait after ``failures`` consecutive transient failures.

    ``jitter`` is a number in [0, 1) from the random source.
    """
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))
    return min(BACKOFF_MAX, base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * jitter))


@dataclasses.dataclass(slots=True)
class RefreshStats:
    """Counts and times for the status endpoint and metrics; no secrets."""

    ok: int = 0
    dead: int = 0
    transient: int = 0
    last_refresh_at: float | None = None
    last_error: str | None = None


Observer = Callable[[str], None]


class TokenManager:
    """Hands out access tokens from ``store``, refreshing through ``refresher``.

    ``clock`` gives epoch seconds (token expiry), ``monotonic`` paces store
    checks, ``random`` feeds backoff jitter, ``sleep`` paces the proactive
    loop: tests inject all four.  ``observer`` is called with "ok", "dead" or
    "transient" after every refresh call that reached the network.
    """

    def __init__(
        self,
        store: TokenStore,
        refresher: Refresher,
        *,
        leeway: float = 120.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observer: Observer | None = None,
        refresh_in_background: bool = False,
    ) -> None:
        self.store = store
        self.refresher = refresher
        self.leeway = leeway
        self.stats = RefreshStats()
        self._clock = clock
        self._monotonic = monotonic
        self._random = random
        self._sleep = sleep
        self._observer = observer
        self._pair: TokenPair | None = None
        self._last_api_url: str | None = None
        self._problem: str | None = None
        self._signature: Signature | None = None
        self._checked_at = float("-inf")
        self._failures = 0
        self._backoff_until = 0.0
        self._inflight: asyncio.Task[TokenPair] | None = None
        self._background = refresh_in_background
        # A refreshed pair the store could not take, and the refresh token it
        # replaced: the file still holds that spent token, so it must not win.
        self._unsaved: TokenPair | None = None
        self._spent_refresh_token: str | None = None
        self._adopt(store.read())

    # -- what callers use -------------------------------------------------

    @property
    def pair(self) -> TokenPair | None:
        """The pair in memory (callers must not print its tokens)."""
        self._check_store()
        return self._pair

    @property
    def api_url(self) -> str | None:
        """The apiUrl of the current pair, or of the last one (for re-login hints)."""
        return self._pair.api_url if self._pair is not None and self._pair.api_url else self._last_api_url

    @property
    def problem(self) -> str | None:
        """Why there is no usable pair, if there is none."""
        return self._problem if self._pair is None else None

    async def access_token(self) -> str:
        """A usable access token, refreshing first if it is near expiry.

        Raises NotLoggedIn when there is no pair or its refresh token is
        dead.  On a transient failure the stale token is returned if there is
        one; otherwise RefreshTransient is raised.
        """
        self._check_store()
        pair = self._pair
        if pair is None:
            raise NotLoggedIn(self._problem or NOT_LOGGED_IN)
        now = self._clock()
        if not needs_refresh(pair, now, self.leeway):
            return pair.access_token  # type: ignore[return-value]
        if self._inflight is None and now < self._backoff_until:
            return self._stale_or_raise(pair, now)
        if self._background and pair.access_token is not None and pair.expires_at is not None and now < pair.expires_at - STILL_VALID_MARGIN:
            # Still valid: refresh beside the traffic instead of in front of it.
            if self._inflight is None:
                self._start_refresh(rejected=None, force=False)
            return pair.access_token
        try:
            pair = await self._shared_refresh(rejected=None, force=False)
        except RefreshTransient:
            return self._stale_or_raise(self._pair or pair, self._clock())
        return pair.access_token  # type: ignore[return-value]

    async def token_rejected(self, token: str) -> str:
        """The token to retry with after the upstream answered 401 to ``token``.

        If the current token is already another one, that one; otherwise one
        forced refresh shared by every caller that was rejected with
        ``token``.  Raises NotLoggedIn, or RefreshTransient (with
        ``retry_after``) while the token endpoint is failing.
        """
        self._check_store()
        for _ in range(2):
            pair = self._pair
            if pair is None:
                raise NotLoggedIn(self._problem or NOT_LOGGED_IN)
            if pair.access_token is not None and pair.access_token != token:
                return pair.access_token
            now = self._clock()
            if self._inflight is None and now < self._backoff_until:
                raise RefreshTransient(self.stats.last_error or "refresh failing", self._backoff_until - now)
            await self._shared_refresh(rejected=token, force=True)
        assert self._pair is not None and self._pair.access_token is not None
        return self._pair.access_token

    async def force_refresh(self) -> str:
        """Refresh now, whatever the expiry (``sidecar token --force-refresh``)."""
        self._check_store()
        if self._pair is None:
            raise NotLoggedIn(self._problem or NOT_LOGGED_IN)
        pair = await self._shared_refresh(rejected=None, force=True)
        return pair.access_token  # type: ignore[return-value]

    def next_refresh_at(self) -> float | None:
        """When the proactive loop will next refresh, in epoch seconds."""
        if self._pair is None:
            return None
        due = refresh_due_at(self._pair, self.leeway)
        due = self._clock() if due is None else due
        return max(due, self._backoff_until)

    async def run_proactive(self) -> None:
        """Refresh at expiry minus leeway for as long as it runs (until cancelled)."""
        while True:
            self._check_store(always=True)
            delay = PROACTIVE_MAX_SLEEP
            due = self.next_refresh_at()
            if due is not None:
                now = self._clock()
                if now >= due:
                    try:
                        await self._shared_refresh(rejected=None, force=False)
                    except (NotLoggedIn, RefreshDead, RefreshTransient, StoreError):
                        pass  # recorded in stats and logs; the loop goes on
                    except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                        # Type only: an exception's text may quote a response.
                        log.error("proactive refresh failed unexpectedly (%s)", type(exc).__name__)
                        await self._sleep(PROACTIVE_MAX_SLEEP)
                    continue
                delay = min(delay, due - now)
            await self._sleep(delay)

    # -- the refresh itself -----------------------------------------------

    def _stale_or_raise(self, pair: TokenPair, now: float) -> str:
        if pair.access_token is None:
            raise RefreshTransient(self.stats.last_error or "refresh failing", max(0.0, self._backoff_until - now))
        return pair.access_token

    def _start_refresh(self, *, rejected: str | None, force: bool) -> asyncio.Task[TokenPair]:
        task = asyncio.get_running_loop().create_task(self._refresh_locked(rejected, force))
        self._inflight = task
        task.add_done_callback(self._refresh_done)
        return task

    async def _shared_refresh(self, *, rejected: str | None, force: bool) -> TokenPair:
        task = self._inflight or self._start_refresh(rejected=rejected, force=force)
        # shield: one caller hanging up must not cancel everyone's refresh.
        return await asyncio.shield(task)

    async def aclose(self, timeout: float) -> None:
        """Let a refresh in flight finish (up to ``timeout``): its rotated pair must reach the store."""
        task = self._inflight
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=timeout)

    def _refresh_done(self, task: asyncio.Task[TokenPair]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it themselves

    async def _refresh_locked(self, rejected: str | None, force: bool) -> TokenPair:
        async with self._file_lock():
            snapshot = self.store.read()
            self._adopt(snapshot)
            pair = self._pair if self._unsaved is not None else snapshot.pair
            if self._unsaved is not None:
                self._save_unsaved()
            if pair is None:
                raise NotLoggedIn(self._problem or NOT_LOGGED_IN)
            now = self._clock()
            if not needs_refresh(pair, now, self.leeway):
                # Another process rotated the pair while we waited for the lock.
                if not force or (rejected is not None and pair.access_token != rejected):
                    return pair
            return await self._refresh_with(pair, now)

    async def _refresh_with(self, pair: TokenPair, now: float) -> TokenPair:
        try:
            pending = self.store.begin_write()
        except StoreError as exc:
            # Spending the refresh token now would lose its successor.
            self._record_transient(str(exc))
            raise RefreshTransient(str(exc), self._backoff_until - now) from None
        try:
            new_pair = await self.refresher.refresh(pair, now)
        except ConfigError as exc:
            pending.abort()
            self._record_transient(str(exc))
            raise RefreshTransient(str(exc), self._backoff_until - now) from None
        except RefreshDead as exc:
            pending.abort()
            return self._handle_dead(pair, str(exc))
        except RefreshTransient as exc:
            pending.abort()
            self._record_transient(exc.reason)
            exc.retry_after = self._backoff_until - now
            raise
        except BaseException:
            pending.abort()
            raise
        try:
            pending.commit(new_pair)
            self.stats.last_error = None
        except StoreError as exc:
            # The old refresh token is spent: keep the new pair in memory,
            # never let the stale file override it, and retry the save on
            # the next refresh.
            log.error("refreshed, but %s; the new login lives only in memory until it can be saved", exc)
            self.stats.last_error = str(exc)
            self._unsaved = new_pair
            self._spent_refresh_token = pair.refresh_token
        self._pair = new_pair
        self._problem = None
        self._signature = self.store.signature()
        self._failures = 0
        self._backoff_until = 0.0
        after = self._clock()
        if needs_refresh(new_pair, after, self.leeway):
            # A grant without a usable expiry (or already expired, by a
            # skewed clock) would be refreshed again at once, forever.
            self._backoff_until = after + MIN_REFRESH_INTERVAL
            log.warning("the token endpoint granted a token that is already due for refresh (no or past expiry); next refresh in %.0f s", MIN_REFRESH_INTERVAL)
        self.stats.ok += 1
        self.stats.last_refresh_at = self._clock()
        self._notify("ok")
        log.info("access token refreshed")
        return new_pair

    def _handle_dead(self, pair: TokenPair, reason: str) -> TokenPair:
        snapshot = self.store.read()
        if snapshot.pair is not None and snapshot.pair.refresh_token != pair.refresh_token:
            # A login, an import or another process landed while we refreshed.
            self._adopt(snapshot)
            return snapshot.pair
        self.stats.dead += 1
        self.stats.last_error = reason
        self._notify("dead")
        log.warning("%s; clearing the token store", reason)
        try:
            self.store.clear()
        except StoreError as exc:
            log.error("%s", exc)
        self._pair = None
        self._problem = DEAD_REASON
        self._signature = None
        raise NotLoggedIn(DEAD_REASON)

    def _record_transient(self, reason: str) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures, self._random())
        self._backoff_until = self._clock() + delay
        self.stats.transient += 1
        self.stats.last_error = reason
        self._notify("transient")
        log.warning("refresh failed (%s); retrying in %.1f s", reason, delay)

    def _notify(self, outcome: str) -> None:
        if self._observer is not None:
            self._observer(outcome)

    # -- following the store ----------------------------------------------

    def _save_unsaved(self) -> None:
        try:
            self.store.write(self._unsaved)  # type: ignore[arg-type]
        except StoreError as exc:
            log.error("%s; the refreshed login still lives only in memory", exc)
            return
        log.info("saved the refreshed login that could not be written before")
        self._unsaved = None
        self._spent_refresh_token = None
        self._signature = self.store.signature()

    def _adopt(self, snapshot: StoreSnapshot) -> None:
        if self._unsaved is not None:
            if snapshot.pair is not None and snapshot.pair.refresh_token == self._spent_refresh_token:
                return  # the file still holds the token we spent: ours is newer
            # A login, import or logout happened since: it wins.
            self._unsaved = None
            self._spent_refresh_token = None
        self._signature = snapshot.signature
        if snapshot.pair is None:
            self._pair = None
            if snapshot.problem is not None:
                if snapshot.problem != self._problem:
                    log.warning("%s; treating as logged out", snapshot.problem)
                self._problem = snapshot.problem
            elif self._problem != DEAD_REASON:
                self._problem = NOT_LOGGED_IN
            return
        if self._pair is None or snapshot.pair.refresh_token != self._pair.refresh_token:
            # A new login or another process's rotation: failures of the old
            # pair say nothing about this one.
            self._failures = 0
            self._backoff_until = 0.0
        self._pair = snapshot.pair
        self._last_api_url = snapshot.pair.api_url or self._last_api_url
        self._problem = None

    def _check_store(self, always: bool = False) -> None:
        """Pick up what other processes did to the store (at most once a second).

        Logged out, it looks every time: that path never reaches the
        upstream, and a new login should be used by the very next request.
        """
        if self._inflight is not None:
            return
        now = self._monotonic()
        if not always and self._pair is not None and now - self._checked_at < STORE_CHECK_INTERVAL:
            return
        self._checked_at = now
        signature = self.store.signature()
        if signature != self._signature:
            self._adopt(self.store.read())

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """Hold ``<store>.lock``; a lock that cannot be taken is a transient failure."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.store.acquire_lock)
        try:
            fd = await asyncio.shield(future)
        except StoreError as exc:
            self._record_transient(str(exc))
            raise RefreshTransient(str(exc), self._backoff_until - self._clock()) from None
        except asyncio.CancelledError:
            # The thread may still get the lock later: release it when it does.
            future.add_done_callback(
                lambda done: None if done.cancelled() or done.exception() else TokenStore.release_lock(done.result())
            )
            raise
        try:
            yield
        finally:
            TokenStore.release_lock(fd)

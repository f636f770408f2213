"""The token manager: one fresh access token for every caller, one refresh at a time.

Single flight inside the process (one shared task, awaited through
``asyncio.shield``) and across processes (the store's refresh lock, then a
re-read: if another process already rotated the pair, use it).  Dead refresh
tokens clear the store after a re-read; transient failures keep the pair,
hand out the stale token and back off.  The manager knows stores only
through ``sidecar.store.interface`` and refreshers only through the
``Refresher`` protocol (``sidecar.refreshing``); no HTTP server glue lives here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from sidecar.errors import ConfigError, NotLoggedIn, RefreshDead, RefreshTransient, StoreConflict, StoreError
from sidecar.following import StoreWatch
from sidecar.holding import DEAD_REASON, HeldLogin, newer_than, read_or_none, refused_write, save_unsaved
from sidecar.refreshing import (
    LOCK_TIMEOUT,
    MIN_REFRESH_INTERVAL,
    STILL_VALID_MARGIN,
    Observer,
    Refresher,
    RefreshStats,
    RejectionCooldown,
    UnsavedPair,
    backoff_delay,
    token_of,
)
from sidecar.store.interface import PendingWrite, StoreSnapshot, TokenStore, Version
from sidecar.tokens import (
    TokenPair,
    TokenState,
    UnusableGrant,
    needs_refresh,
    refresh_due_at,
    still_needs_refresh,
    token_state,
)

log = logging.getLogger("sidecar.manager")

# How often a logged-in manager asks the store about other processes'
# logins, logouts and rotations: one stat() (off the loop) a second is free.
STORE_CHECK_INTERVAL = 1.0
# The proactive loop never sleeps longer than this, so it notices a new login
# or a changed expiry soon.
PROACTIVE_MAX_SLEEP = 1.0


class TokenManager:
    """Hands out access tokens from ``store``, refreshing through ``refresher``.

    ``clock`` gives epoch seconds (token expiry), ``monotonic`` paces store
    checks, ``random`` feeds backoff jitter, ``sleep`` paces the proactive
    loop: tests inject all four.  ``observer`` is called with "ok", "dead" or
    "transient" after every refresh call that reached the network.
    ``load()`` reads the store once up front; without it the first call does.
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
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.store = store
        self.refresher = refresher
        self.leeway = leeway
        self.lock_timeout = lock_timeout
        self.stats = RefreshStats()
        self._clock = clock
        self._random = random
        self._sleep = sleep
        self._observer = observer
        self._held = HeldLogin()
        self._watch = StoreWatch(
            store,
            interval=STORE_CHECK_INTERVAL,
            monotonic=monotonic,
            version=lambda: self._held.version,
            adopt=self._adopt,
            busy=lambda: self._inflight is not None,
        )
        self._failures = 0
        self._backoff_until = 0.0
        self._inflight: asyncio.Task[TokenPair] | None = None
        self._background = refresh_in_background
        self.rejections = RejectionCooldown(clock, lambda: self._held.pair.access_token if self._held.pair else None)

    # -- what callers use -------------------------------------------------

    @property
    def pair(self) -> TokenPair | None:
        """The pair in memory (callers must not print its tokens); no I/O."""
        return self._held.pair

    @property
    def api_url(self) -> str | None:
        """The apiUrl of the current pair, or of the last one (for re-login hints)."""
        return self._held.api_url

    @property
    def problem(self) -> str | None:
        """Why there is no usable pair, if there is none."""
        return self._held.problem

    @property
    def store_problem(self) -> str | None:
        """Why the store could not be looked at just now (it may be down), if it could not."""
        return self._watch.problem

    async def load(self) -> None:
        """Read the store now (callers that look at ``pair`` before asking for a token)."""
        self._watch.looked()
        self._adopt(await self.store.read())

    async def access_token(self) -> str:
        """A usable access token, refreshing first if it is near expiry.

        Raises NotLoggedIn when there is no pair or its refresh token is
        dead.  On a transient failure the stale token is returned if there is
        one; otherwise RefreshTransient is raised.
        """
        await self._watch.follow(holding_pair=self._held.pair is not None)
        pair = self._held.pair
        if pair is None:
            raise self._held.not_logged_in()
        now = self._clock()
        state = token_state(pair, now, self.leeway, margin=STILL_VALID_MARGIN)
        if state is TokenState.FRESH:
            return token_of(pair)
        if self._inflight is None and now < self._backoff_until:
            return self._stale_or_raise(pair, now)
        if self._background and state is TokenState.DUE:
            # Still valid: refresh beside the traffic instead of in front of it.
            if self._inflight is None:
                self._start_refresh(rejected=None, force=False)
            return token_of(pair)
        try:
            pair = await self._shared_refresh(rejected=None, force=False)
        except RefreshTransient:
            return self._stale_or_raise(self._held.pair or pair, self._clock())
        return token_of(pair)

    async def token_rejected(self, token: str) -> str:
        """The token to retry with after the upstream answered 401 to ``token``.

        If the current token is already another one, that one; otherwise one
        forced refresh shared by every caller rejected with ``token``, noted
        in ``rejections``.  Raises NotLoggedIn, or RefreshTransient (with
        ``retry_after``) while the token endpoint is failing.
        """
        await self._watch.follow(holding_pair=self._held.pair is not None)
        for refreshes in range(2):
            pair = self._held.pair
            if pair is None:
                raise self._held.not_logged_in()
            if pair.access_token is not None and pair.access_token != token:
                return self.rejections.handed_out(pair.access_token, forced=refreshes > 0)
            now = self._clock()
            if self._inflight is None and now < self._backoff_until:
                raise RefreshTransient(self.stats.last_error or "refresh failing", self._backoff_until - now)
            await self._shared_refresh(rejected=token, force=True)
        if self._held.pair is None:
            raise self._held.not_logged_in()
        return self.rejections.handed_out(token_of(self._held.pair), forced=True)

    async def force_refresh(self) -> str:
        """Refresh now, whatever the expiry (``sidecar token --force-refresh``)."""
        await self._watch.follow(holding_pair=self._held.pair is not None)
        if self._held.pair is None:
            raise self._held.not_logged_in()
        return token_of(await self._shared_refresh(rejected=None, force=True))

    def next_refresh_at(self) -> float | None:
        """When the proactive loop will next refresh, in epoch seconds."""
        if self._held.pair is None:
            return None
        due = refresh_due_at(self._held.pair, self.leeway)
        due = self._clock() if due is None else due
        return max(due, self._backoff_until)

    async def run_proactive(self) -> None:
        """Refresh at expiry minus leeway for as long as it runs (until cancelled)."""
        while True:
            await self._watch.follow(holding_pair=self._held.pair is not None, always=True)
            delay = PROACTIVE_MAX_SLEEP
            due = self.next_refresh_at()
            if due is not None:
                now = self._clock()
                if now >= due:
                    try:
                        await self._shared_refresh(rejected=None, force=False)
                    except (NotLoggedIn, RefreshDead, RefreshTransient, StoreError):
                        pass  # recorded in stats and logs; the loop goes on
                    except Exception as exc:
                        # The loop must survive anything.  Type only: an
                        # exception's text may quote a response.
                        log.error("proactive refresh failed unexpectedly (%s)", type(exc).__name__)
                        await self._sleep(PROACTIVE_MAX_SLEEP)
                    continue
                delay = min(delay, due - now)
            await self._sleep(delay)

    async def aclose(self, timeout: float) -> None:
        """Let a refresh in flight finish (up to ``timeout``): its rotated pair must reach the store."""
        task = self._inflight
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=timeout)

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

    def _refresh_done(self, task: asyncio.Task[TokenPair]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it themselves

    async def _refresh_locked(self, rejected: str | None, force: bool) -> TokenPair:
        try:
            async with self.store.refresh_lock(self.lock_timeout):
                return await self._refresh_under_lock(rejected, force)
        except StoreError as exc:
            # The lock could not be had (the body handles its own store errors).
            raise self._transient(str(exc)) from None

    async def _refresh_under_lock(self, rejected: str | None, force: bool) -> TokenPair:
        snapshot = await self.store.read()
        self._adopt(snapshot)
        expected = snapshot.version
        if self._held.unsaved is not None:
            pair: TokenPair | None = self._held.unsaved.pair
            expected = await save_unsaved(self.store, self._held, expected)
        else:
            pair = snapshot.pair
        if pair is None:
            raise self._held.not_logged_in()
        now = self._clock()
        if not still_needs_refresh(pair, now, self.leeway, force=force, rejected=rejected):
            return pair  # another process rotated the pair while we waited for the lock
        return await self._refresh_with(pair, now, expected)

    async def _refresh_with(self, pair: TokenPair, now: float, expected: Version | None) -> TokenPair:
        try:
            pending = await self.store.begin_write(expected)
        except StoreError as exc:
            # Spending the refresh token now would lose its successor, or (a
            # conflict: the lock was taken over, another write landed) spend
            # it a second time.  What the store holds now may already do.
            newer = await self._newer_in_store(pair) if isinstance(exc, StoreConflict) else None
            if newer is not None:
                return newer
            raise self._transient(str(exc)) from None
        try:
            new_pair = await self.refresher.refresh(pair, now)
        except UnusableGrant as exc:
            try:
                await self._commit(pending, exc.salvage, spent=pair.refresh_token)
            except StoreConflict:
                newer = await self._lost_the_race(exc.salvage, spent=pair.refresh_token)
                if newer is not exc.salvage:
                    return newer
            raise self._transient(exc.reason) from None
        except (ConfigError, RefreshTransient) as exc:
            await pending.abort()
            newer = await self._newer_in_store(pair)  # another sidecar may have refreshed meanwhile
            if newer is not None:
                return newer
            raise self._transient(exc.reason if isinstance(exc, RefreshTransient) else str(exc)) from None
        except RefreshDead as exc:
            await pending.abort()
            return await self._handle_dead(pair, str(exc))
        except BaseException:
            await pending.abort()
            raise
        try:
            saved = await self._commit(pending, new_pair, spent=pair.refresh_token)
        except StoreConflict:
            winner = await self._lost_the_race(new_pair, spent=pair.refresh_token)
            if winner is not new_pair:
                return winner
            saved = False
        if saved:
            self.stats.last_error = None
        self._failures, self._backoff_until = 0, 0.0
        after = self._clock()
        if needs_refresh(new_pair, after, self.leeway):
            # A grant without a usable expiry (or already expired, by a
            # skewed clock) would be refreshed again at once, forever.
            self._backoff_until = after + MIN_REFRESH_INTERVAL
            log.warning(
                "the token endpoint granted a token that is already due for refresh (no or past expiry); next refresh in %.0f s",
                MIN_REFRESH_INTERVAL,
            )
        self.stats.ok += 1
        self.stats.last_refresh_at = self._clock()
        self._notify("ok")
        log.info("access token refreshed")
        return new_pair

    async def _commit(self, pending: PendingWrite, new_pair: TokenPair, *, spent: str) -> bool:
        """Save ``new_pair``, then hold it (no request uses it before its write ended); whether the store took it.
        ``spent`` is gone either way: an unsaved pair lives in memory until a refresh saves it.  StoreConflict: caller's."""
        try:
            version = await pending.commit(new_pair)
        except StoreError as exc:
            self._held.refreshed(new_pair)
            if isinstance(exc, StoreConflict):
                raise
            log.error("refreshed, but %s; the new login lives only in memory until it can be saved", exc)
            self.stats.last_error = str(exc)
            self._held.unsaved = UnsavedPair(new_pair, spent_refresh_token=spent)
            return False
        self._held.saved(new_pair, version)
        return True

    async def _newer_in_store(self, pair: TokenPair) -> TokenPair | None:
        """What the store holds if it is no longer ``pair``; adopted."""
        snapshot = await read_or_none(self.store)
        newer = newer_than(snapshot, pair)
        if snapshot is not None and newer is not None:
            self._adopt(snapshot)
        return newer

    async def _lost_the_race(self, new_pair: TokenPair, *, spent: str) -> TokenPair:
        """The compare-and-set refused our refreshed pair: what landed first wins, unless it is the spent token."""
        snapshot, theirs_wins = await refused_write(self.store, new_pair, spent=spent)
        if snapshot is None or not theirs_wins:
            self._held.unsaved = UnsavedPair(new_pair, spent_refresh_token=spent)
            return new_pair
        self._adopt(snapshot)
        if self._held.pair is None:
            raise self._held.not_logged_in()
        return self._held.pair

    async def _handle_dead(self, pair: TokenPair, reason: str) -> TokenPair:
        newer = await self._newer_in_store(pair)
        if newer is not None:
            return newer
        self.stats.dead += 1
        self.stats.last_error = reason
        self._notify("dead")
        log.warning("%s; clearing the token store", reason)
        try:
            await self.store.clear()
        except StoreError as exc:
            log.error("%s", exc)
        self._held.dead()
        raise NotLoggedIn(DEAD_REASON)

    def _transient(self, reason: str) -> RefreshTransient:
        """Count a transient failure, back off, and return the error to raise."""
        self._failures += 1
        delay = backoff_delay(self._failures, self._random())
        self._backoff_until = self._clock() + delay
        self.stats.transient += 1
        self.stats.last_error = reason
        self._notify("transient")
        log.warning("refresh failed (%s); retrying in %.1f s", reason, delay)
        return RefreshTransient(reason, delay)

    def _notify(self, outcome: str) -> None:
        if self._observer is not None:
            self._observer(outcome)

    # -- following the store ----------------------------------------------

    def _adopt(self, snapshot: StoreSnapshot) -> None:
        if self._held.adopt(snapshot):  # another login or rotation: the old pair's failures say nothing of it
            self._failures, self._backoff_until = 0, 0.0

"""What one process holds of its login, and how it settles with the store.

``HeldLogin`` is pure state: the pair in memory, why there is none, the store
version it came from, and a refreshed pair the store could not take yet.  The
three coroutines below are the manager's conversations with the store after
a refresh went sideways (another sidecar won, a write was refused, a save
must be retried); they know the store only through its interface.
"""

from __future__ import annotations

import logging

from sidecar.errors import NotLoggedIn, StoreError
from sidecar.refreshing import UnsavedPair
from sidecar.store.interface import StoreSnapshot, TokenStore, Version
from sidecar.tokens import TokenPair

log = logging.getLogger("sidecar.manager")

DEAD_REASON = "the refresh token was rejected; log in again"
NOT_LOGGED_IN = "not logged in"


class HeldLogin:
    """The login as this process holds it; the manager is its only writer."""

    def __init__(self) -> None:
        self.pair: TokenPair | None = None
        self.version: Version | None = None
        self.unsaved: UnsavedPair | None = None
        self._problem: str | None = None
        self._last_api_url: str | None = None

    @property
    def problem(self) -> str | None:
        """Why there is no usable pair, if there is none."""
        return self._problem if self.pair is None else None

    @property
    def api_url(self) -> str | None:
        """The apiUrl of the current pair, or of the last one (for re-login hints)."""
        return self.pair.api_url if self.pair is not None and self.pair.api_url else self._last_api_url

    def not_logged_in(self) -> NotLoggedIn:
        return NotLoggedIn(self._problem or NOT_LOGGED_IN)

    def refreshed(self, pair: TokenPair) -> None:
        self.pair = pair
        self._problem = None

    def saved(self, pair: TokenPair, version: Version) -> None:
        """``pair`` is held and is what the store holds at ``version``."""
        self.refreshed(pair)
        self.version = version

    def dead(self) -> None:
        """The refresh token was refused and the store cleared: nothing is held until a new login."""
        self.pair = self.version = None
        self._problem = DEAD_REASON

    def adopt(self, snapshot: StoreSnapshot) -> bool:
        """Take what the store holds, unless an unsaved pair of ours is newer.

        True when this is another login or another process's rotation: the
        old pair's failures say nothing about it.
        """
        self.version = snapshot.version
        if self.unsaved is not None:
            if not self.unsaved.superseded_by(snapshot.pair):
                return False  # the store still holds the token we spent: ours is newer
            self.unsaved = None
        if snapshot.pair is None:
            self.pair = None
            if snapshot.problem is not None:
                if snapshot.problem != self._problem:
                    log.warning("%s; treating as logged out", snapshot.problem)
                self._problem = snapshot.problem
            elif self._problem != DEAD_REASON:
                self._problem = NOT_LOGGED_IN
            return False
        changed = self.pair is None or snapshot.pair.refresh_token != self.pair.refresh_token
        self.pair = snapshot.pair
        self._last_api_url = snapshot.pair.api_url or self._last_api_url
        self._problem = None
        return changed


async def read_or_none(store: TokenStore) -> StoreSnapshot | None:
    try:
        return await store.read()
    except StoreError:
        return None


def newer_than(snapshot: StoreSnapshot | None, pair: TokenPair) -> TokenPair | None:
    """The stored pair if it is no longer ``pair`` (a login, an import or another process landed)."""
    if snapshot is None or snapshot.pair is None or snapshot.pair.refresh_token == pair.refresh_token:
        return None
    return snapshot.pair


async def refused_write(store: TokenStore, new_pair: TokenPair, *, spent: str) -> tuple[StoreSnapshot | None, bool]:
    """A refresh worked but the compare-and-set refused its pair: another write landed first.

    Returns what the store holds now and whether it wins: another sidecar's
    rotation, a login, an import or a logout does.  It does not when the
    store cannot be read or still holds the token we spent; then ours is
    kept in memory and saved later.
    """
    try:
        snapshot = await store.read()
    except StoreError as exc:
        log.error("refreshed, but %s; the new login lives only in memory until it can be saved", exc)
        return None, False
    if not UnsavedPair(new_pair, spent_refresh_token=spent).superseded_by(snapshot.pair):
        return snapshot, False
    log.warning("refreshed, but another write reached the token store first; using what it holds")
    return snapshot, True


async def save_unsaved(store: TokenStore, held: HeldLogin, expected: Version | None) -> Version | None:
    """Write the pair that could not be saved before; returns the version the store is now at."""
    unsaved = held.unsaved
    if unsaved is None:
        return expected
    try:
        pending = await store.begin_write(expected)
        version = await pending.commit(unsaved.pair)
    except StoreError as exc:
        log.error("%s; the refreshed login still lives only in memory", exc)
        return expected
    log.info("saved the refreshed login that could not be written before")
    held.unsaved = None
    held.version = version
    return version

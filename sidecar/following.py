"""Following what other processes do to the store: logins, logouts, rotations.

One look at a time, at most once per ``interval`` while a pair is held (a
store's ``changed_since`` is cheap: one ``stat`` for a file), every time while
logged out (that path never reaches the upstream, and a new login should be
used by the very next request).  Callers that find a look under way wait for
it only when they have no pair to use meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.errors import StoreError
from sidecar.store.interface import StoreSnapshot, TokenStore, Version

log = logging.getLogger("sidecar.manager")


class StoreWatch:
    """Paces and single-flights looks at ``store``; hands what changed to ``adopt``."""

    def __init__(
        self,
        store: TokenStore,
        *,
        interval: float,
        monotonic: Callable[[], float],
        version: Callable[[], Version | None],
        adopt: Callable[[StoreSnapshot], None],
        busy: Callable[[], bool],
    ) -> None:
        self._store = store
        self._interval = interval
        self._monotonic = monotonic
        self._version = version
        self._adopt = adopt
        self._busy = busy  # a refresh re-reads under the lock: nothing to look at meanwhile
        self._checked_at = float("-inf")
        self._looking: asyncio.Task[None] | None = None
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why the last look at the store failed (never a secret), or None when it worked."""
        return self._problem

    def looked(self) -> None:
        """The caller just read the store itself."""
        self._checked_at = self._monotonic()

    async def follow(self, *, holding_pair: bool, always: bool = False) -> None:
        """Look at the store if it is time to (``always``: whatever the pacing)."""
        if self._busy():
            return
        task = self._looking
        if task is None:
            now = self._monotonic()
            if not always and holding_pair and now - self._checked_at < self._interval:
                return
            self._checked_at = now
            task = self._looking = asyncio.get_running_loop().create_task(self._look())
            task.add_done_callback(self._look_done)
        elif holding_pair:
            return
        await asyncio.shield(task)

    def _look_done(self, task: asyncio.Task[None]) -> None:
        if self._looking is task:
            self._looking = None

    async def _look(self) -> None:
        try:
            if await self._store.changed_since(self._version()):
                snapshot = await self._store.read()
                if not self._busy():
                    self._adopt(snapshot)
        except StoreError as exc:
            if self._problem is None:
                log.warning("cannot look at the token store: %s", exc)
            self._problem = str(exc)
        else:
            if self._problem is not None:
                log.info("the token store answers again")
            self._problem = None

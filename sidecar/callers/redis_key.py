"""The client key of a Redis store (SPEC §9): the ``clientKey`` field of the login's record.

Every sidecar on one Redis login shares it, as every process on one machine
shares the file beside a file store.  ``RedisKey`` is what the commands use
(each call is one short ``asyncio.run``); ``LiveRedisKey`` is serve's view,
polled beside the traffic, so a request never waits for Redis and a
rotation is live everywhere within a second.  A key that vanished (a Redis
restarted empty) is planted again by the first serve that still knows it.
Nothing here ever puts a key in a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sidecar.callers.keys import KeyFileError, new_key, parse_key
from sidecar.errors import StoreError
from sidecar.store.redis_store import RedisStore
from sidecar.store.redis_url import parse_redis_url

log = logging.getLogger("sidecar.callers")

# serve re-reads the key this often (seconds): half the file store's second, so a rotation is live within one.
POLL_SECONDS = 0.5
T = TypeVar("T")


class RedisKey:
    """The client key in the record of the Redis login ``url`` names."""

    provided = False  # sidecar writes it (a deployment's own Secret goes through SIDECAR_CLIENT_KEY_SECRET_FILE)

    def __init__(self, url: str) -> None:
        self._store = RedisStore(parse_redis_url(url))

    def __repr__(self) -> str:
        return f"RedisKey({self.where!r})"

    @property
    def where(self) -> str:
        return f"the record of {self._store.description}"

    # -- for commands: one short event loop each ---------------------------------

    def ensure(self) -> bytes:
        """The key, made first if there is none yet."""
        return self._run(self.fetch_or_make)

    def rotate(self) -> bytes:
        """Replace the key; every serve on this login refuses the old one within a second."""
        key = new_key()
        self._run(lambda: self._store.replace_client_key(key.decode("ascii")))
        return key

    def _run(self, step: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            try:
                return await step()
            finally:
                await self._store.aclose()

        try:
            return asyncio.run(once())
        except StoreError as exc:
            raise KeyFileError(f"client key: {exc}") from None

    # -- for serve -----------------------------------------------------------------

    async def fetch_or_make(self, known: bytes | None = None) -> bytes:
        """The stored key; ``known`` (else a new key) is stored first if there is none."""
        stored = await self._store.client_key((known or new_key()).decode("ascii"))
        return parse_key(stored.encode("ascii", "replace"), self.where)

    async def fetch(self) -> bytes | None:
        stored = await self._store.current_client_key()
        return None if stored is None else parse_key(stored.encode("ascii", "replace"), self.where)

    async def aclose(self) -> None:
        await self._store.aclose()


class LiveRedisKey:
    """serve's current key: fetched at ``start``, then polled every ``interval`` seconds in the background."""

    def __init__(self, key: RedisKey, *, interval: float = POLL_SECONDS) -> None:
        self.key = key
        self._interval = interval
        self._current: bytes | None = None
        self._problem: str | None = None
        self._follower: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return self.key.where

    def current(self) -> bytes | None:
        """The key as of at most ``interval`` seconds ago (no I/O)."""
        return self._current

    async def start(self) -> None:
        """Fetch (or make) the key, then follow it; a Redis that is down now is retried in the background."""
        await self._look()
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.key.aclose()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._look()

    async def _look(self) -> None:
        try:
            found = await self.key.fetch()
            if found is None:
                # Never made, or lost with Redis's data: plant the key this serve knows (clients still hold it).
                found = await self.key.fetch_or_make(self._current)
        except (StoreError, KeyFileError) as exc:
            if str(exc) != self._problem:
                log.warning("client key: %s; keeping the key as last seen", exc)
            self._problem = str(exc)
            return
        if self._problem is not None:
            log.warning("client key: %s answers again", self.where)
        self._current, self._problem = found, None

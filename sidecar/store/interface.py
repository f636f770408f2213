"""What the token manager needs from any token store, and nothing more.

A store holds one token pair for one login.  It can be a file on this
machine (``file.py``), a record in a shared engine, or memory in a test
(``memory.py``).  The manager is written against this interface only:

- ``read()`` returns a snapshot: the pair (or why there is none) and a
  *version* that only the store itself interprets (a file's signature, a
  generation counter).
- ``refresh_lock(timeout)`` is the cross-process refresh lock, an async
  context manager.  A lock that cannot be had within ``timeout`` seconds
  raises StoreLockTimeout: a stalled holder must never stall every caller.
- ``begin_write(expected)`` prepares a write *before* a single-use refresh
  token is spent (so a store that cannot take the successor is found out in
  time); ``commit(pair)`` then writes only if the store is still at the
  version ``expected`` (else StoreConflict) and returns the new version;
  ``abort()`` drops it.
- ``clear()`` forgets the pair; ``changed_since(version)`` says cheaply
  whether another process wrote since ``version`` was read.

Every method may do I/O and is a coroutine; implementations keep blocking
calls off the event loop.  Messages never quote a token.  ``write_pair`` and
``clear_store`` are the writes outside a refresh (login, import, seeding,
logout): under the same lock, and as a compare-and-set on what was just read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from sidecar.refreshing import LOCK_TIMEOUT
from sidecar.tokens import TokenPair

# A store's own notion of "which write is this": compared for equality only.
Version = Hashable


@dataclasses.dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What one read of the store found.

    ``pair`` is None when there is no usable pair; ``problem`` then says why
    when something is stored but cannot be used (never quoting its content).
    ``version`` is None when nothing is stored at all.
    """

    pair: TokenPair | None
    problem: str | None
    version: Version | None


class PendingWrite(Protocol):
    """A write prepared before the refresh token is spent."""

    async def commit(self, pair: TokenPair) -> Version:
        """Store ``pair`` if the store is still at the expected version; returns the new version."""
        ...

    async def abort(self) -> None:
        """Drop the prepared write; the store is left as it is."""
        ...


class TokenStore(Protocol):
    """One login's token pair, shared by every process that uses it."""

    @property
    def description(self) -> str:
        """Where the pair lives, for messages (never a secret)."""
        ...

    async def read(self) -> StoreSnapshot: ...

    def refresh_lock(self, timeout: float) -> AbstractAsyncContextManager[None]: ...

    async def begin_write(self, expected: Version | None) -> PendingWrite: ...

    async def clear(self) -> bool:
        """Forget the pair; True if there was one."""
        ...

    async def changed_since(self, version: Version | None) -> bool: ...


async def write_pair(
    store: TokenStore,
    build: Callable[[StoreSnapshot], TokenPair | None],
    *,
    lock_timeout: float = LOCK_TIMEOUT,
) -> TokenPair | None:
    """Under the refresh lock, write ``build(current snapshot)`` unless it is None.

    The write is a compare-and-set on the snapshot ``build`` saw.
    """
    async with store.refresh_lock(lock_timeout):
        snapshot = await store.read()
        pair = build(snapshot)
        if pair is None:
            return None
        pending = await store.begin_write(snapshot.version)
        await pending.commit(pair)
        return pair


async def clear_store(store: TokenStore, *, lock_timeout: float = LOCK_TIMEOUT) -> bool:
    """Under the refresh lock, forget the pair; True if there was one."""
    async with store.refresh_lock(lock_timeout):
        return await store.clear()

"""A store in memory: the store interface with nothing behind it, for tests.

Versions are a generation counter that grows with every write and clear, as
a shared store's would.  ``writable = False`` makes ``begin_write`` fail the
way a full disk does, so tests can reach that path without breaking a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sidecar.errors import StoreConflict, StoreError, StoreLockTimeout
from sidecar.store.interface import StoreSnapshot, Version
from sidecar.tokens import TokenPair


class _MemoryWrite:
    def __init__(self, store: MemoryStore, expected: Version | None) -> None:
        self._store = store
        self._expected = expected
        self._done = False

    async def commit(self, pair: TokenPair) -> Version:
        if self._done:
            raise StoreError("token store write already finished")
        self._done = True
        return self._store.put(pair, expected=self._expected)

    async def abort(self) -> None:
        self._done = True


class MemoryStore:
    """One pair in memory; ``generation`` counts the writes."""

    def __init__(self, pair: TokenPair | None = None) -> None:
        self.pair = pair
        self.generation = 0 if pair is None else 1
        self.writable = True
        self.writes = 0
        self._lock = asyncio.Lock()

    @property
    def description(self) -> str:
        return "memory"

    def _version(self) -> Version | None:
        return None if self.pair is None else self.generation

    def put(self, pair: TokenPair, *, expected: Version | None) -> Version:
        """Store ``pair`` if the store is still at ``expected``; returns the new version."""
        if self._version() != expected:
            raise StoreConflict("token store changed since it was read")
        self.generation += 1
        self.pair = pair
        self.writes += 1
        return self.generation

    async def read(self) -> StoreSnapshot:
        return StoreSnapshot(self.pair, None, self._version())

    async def changed_since(self, version: Version | None) -> bool:
        return self._version() != version

    async def begin_write(self, expected: Version | None) -> _MemoryWrite:
        if not self.writable:
            raise StoreError("cannot write token store memory: read-only")
        return _MemoryWrite(self, expected)

    async def clear(self) -> bool:
        had = self.pair is not None
        self.pair = None
        self.generation += 1
        return had

    @contextlib.asynccontextmanager
    async def refresh_lock(self, timeout: float) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except TimeoutError:
            raise StoreLockTimeout(f"the lock was held for more than {timeout:g} s") from None
        try:
            yield
        finally:
            self._lock.release()

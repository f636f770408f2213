"""Which store a ``store`` setting names: a Redis URL, else a file path."""

from __future__ import annotations

from sidecar.store.file import FileStore
from sidecar.store.interface import TokenStore
from sidecar.store.redis_url import is_redis_url, parse_redis_url


def open_store(location: str) -> TokenStore:
    """The store at ``location``: ``redis://``, ``rediss://`` or ``unix://`` (SPEC §7), else a file path."""
    if is_redis_url(location):
        from sidecar.store.redis_store import RedisStore

        return RedisStore(parse_redis_url(location))
    return FileStore(location)

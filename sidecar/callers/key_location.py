"""Where the client key (SPEC §9) lives for a ``store`` setting: a file, a deployment's Secret, or a Redis record."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sidecar.callers.keys import KEY_SUFFIX, SECRET_FILE_VARIABLE, KeyFile
from sidecar.callers.redis_key import RedisKey
from sidecar.store.redis_url import is_redis_url


def key_file(store: str, env: Mapping[str, str]) -> KeyFile | RedisKey:
    """Where the client key is: ``SIDECAR_CLIENT_KEY_SECRET_FILE`` if set, else ``<store>.client-key``
    beside a file store, or the login's record in a Redis store (SPEC §9)."""
    provided = env.get(SECRET_FILE_VARIABLE, "").strip()
    if provided:
        return KeyFile(Path(provided).expanduser(), provided=True)
    if is_redis_url(store):
        return RedisKey(store)
    return KeyFile(Path(store + KEY_SUFFIX))

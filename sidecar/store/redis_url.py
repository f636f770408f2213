"""Redis store URLs: ``redis://``, ``rediss://`` and ``unix://``, with ``?key=NAME``, ``?lock_ttl=SECONDS`` and ``?replicas=N``; the password never shown."""

from __future__ import annotations

import dataclasses
import re

from yarl import URL

from sidecar.errors import ConfigError

SCHEMES = ("redis", "rediss", "unix")
# The refresh lock's TTL (renewed every third of it while a refresh runs): long
# enough for a slow token endpoint, short enough that a stalled holder is
# taken over soon.
DEFAULT_LOCK_TTL = 10.0
LOCK_TTL_RANGE = (0.5, 300.0)
# ``replicas=N``: after each write of the pair, wait (WAIT, up to this long) until N replicas have it.
REPLICA_WAIT_MS = 500
MAX_REPLICAS = 16
OWN_PARAMETERS = ("key", "lock_ttl", "replicas")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclasses.dataclass(frozen=True, slots=True)
class RedisLocation:
    """Where one login lives: the server's URL (sidecar's own parameters removed), the login's name, a printable form."""

    url: str = dataclasses.field(repr=False)
    name: str
    shown: str
    lock_ttl: float = DEFAULT_LOCK_TTL
    replicas: int = 0


def is_redis_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def masked(text: str) -> str:
    """``text`` with its password (if any) as ``***``."""
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return "a Redis URL that does not parse"
    return str(url.with_password("***")) if url.password is not None else str(url)


def parse_redis_url(text: str) -> RedisLocation:
    """The location ``text`` names; ConfigError (password masked) when it is malformed."""
    shown = masked(text)
    try:
        url = URL(text)
        port = url.port
    except (ValueError, TypeError):
        raise ConfigError("store: not a valid Redis URL (check the port and the characters in the password)") from None
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"store: unknown Redis URL scheme {url.scheme!r} (use redis://, rediss:// or unix://)")
    if scheme == "unix":
        if not url.path or url.path == "/":
            raise ConfigError(f"store: {shown} names no socket path")
    else:
        if not url.host:
            raise ConfigError(f"store: {shown} names no host")
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"store: {shown} has no valid port")
        database = url.path.strip("/")
        if database and not database.isdigit():
            raise ConfigError(f"store: {shown}: the path must be a database number")
    name = url.query.get("key", "default")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"store: {shown}: key must be 1-64 letters, digits, '_', '.' or '-'")
    lock_ttl = _lock_ttl(url.query.get("lock_ttl"), shown)
    replicas_text = url.query.get("replicas", "0")
    if not replicas_text.isdigit() or int(replicas_text) > MAX_REPLICAS:
        raise ConfigError(f"store: {shown}: replicas must be a whole number from 0 to {MAX_REPLICAS}")
    plain = str(url.without_query_params(*OWN_PARAMETERS))
    shown = masked(plain)
    if scheme == "unix":
        plain = shown = "unix://" + url.path  # yarl writes unix:/path; redis-py wants unix:///path
    shown += "" if name == "default" else f" (login {name})"
    return RedisLocation(plain, name, shown, lock_ttl, int(replicas_text))


def _lock_ttl(text: str | None, shown: str) -> float:
    if text is None:
        return DEFAULT_LOCK_TTL
    low, high = LOCK_TTL_RANGE
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also false for nan
        raise ConfigError(f"store: {shown}: lock_ttl must be a number of seconds from {low:g} to {high:g}")
    return seconds

"""A login handed over rather than obtained: ``sidecar import`` and seeding a container's first start.

The pair comes from flags, else the ``SIDECAR_*`` import variables; it is
checked before any lock is taken, so bad input never waits for one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.store.interface import StoreSnapshot, write_pair
from sidecar.store.location import open_store
from sidecar.tokens import TokenPair, pair_from_grant, parse_timestamp

log = logging.getLogger("sidecar.import")

IMPORT_ENV = {
    "access_token": "SIDECAR_ACCESS_TOKEN",
    "refresh_token": "SIDECAR_REFRESH_TOKEN",
    "expires_at": "SIDECAR_EXPIRES_AT",
}


def pair_from_import(
    settings: Settings,
    values: Mapping[str, str | None],
    env: Mapping[str, str],
    now: float,
    previous: TokenPair | None = None,
) -> TokenPair:
    """The pair that flags (else SIDECAR_* import variables) describe; ConfigError if unusable."""

    def pick(key: str) -> str | None:
        value = values.get(key)
        if value is None:
            value = env.get(IMPORT_ENV[key]) or None
        return value

    refresh = pick("refresh_token")
    if not refresh:
        raise ConfigError("import needs a refresh token: --refresh-token or SIDECAR_REFRESH_TOKEN")
    raw_expiry = pick("expires_at")
    expires_at = parse_timestamp(raw_expiry) if raw_expiry else None
    if raw_expiry and expires_at is None:
        raise ConfigError(
            "--expires-at / SIDECAR_EXPIRES_AT: expected an ISO 8601 timestamp such as 2026-01-31T12:00:00Z"
        )
    if not settings.upstream:
        raise ConfigError("import needs the cloud API URL: --upstream or SIDECAR_UPSTREAM")
    grant = {"accessToken": pick("access_token"), "refreshToken": refresh, "expiresAt": raw_expiry}
    return pair_from_grant(grant, previous=previous, now=now, api_url=settings.upstream, access_optional=True)


async def seed_from_env(settings: Settings, env: Mapping[str, str], clock: Callable[[], float] = time.time) -> bool:
    """On an empty store, import SIDECAR_REFRESH_TOKEN (a container's first start).

    Afterwards the store wins: the seeded refresh token is spent by then.  A
    store holding anything, even something unreadable, is left alone.
    """
    if not env.get("SIDECAR_REFRESH_TOKEN"):
        return False

    def build(snapshot: StoreSnapshot) -> TokenPair | None:
        return pair_from_import(settings, {}, env, clock()) if snapshot.version is None else None

    seeded = await write_pair(open_store(settings.store), build) is not None
    if seeded:
        log.info("seeded the token store from SIDECAR_REFRESH_TOKEN")
    return seeded

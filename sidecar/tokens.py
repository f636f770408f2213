"""The token pair as a value, and the pure decisions about it.

Nothing here does I/O or reads a clock: every function that depends on time
takes ``now`` (seconds since the epoch, UTC) as an argument.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any, Mapping

from sidecar.errors import RefreshTransient

# Expiries past this are treated as unparseable: they cannot be written back
# as ISO 8601 (year 9999 is the end of datetime), and no token lives that long.
MAX_EPOCH = 253_000_000_000.0  # about year 9987
# expires_in beyond a century is a broken server, not a long-lived token.
MAX_EXPIRES_IN = 100 * 365 * 86400.0


@dataclasses.dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token, the refresh token that renews it, and when it expires.

    ``expires_at`` and ``obtained_at`` are epoch seconds, or None when the
    store did not carry a usable value (a missing expiry means "expired").
    ``extra`` holds fields of the store file that sidecar does not know, so
    a rewrite keeps them. ``repr`` never shows a token.
    """

    access_token: str | None
    refresh_token: str
    api_url: str | None = None
    expires_at: float | None = None
    obtained_at: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"TokenPair(access_token={_redact(self.access_token)}, "
            f"refresh_token={_redact(self.refresh_token)}, api_url={self.api_url!r}, "
            f"expires_at={self.expires_at!r}, obtained_at={self.obtained_at!r})"
        )

    __str__ = __repr__


def _redact(secret: str | None) -> str:
    return "None" if secret is None else "'***'"


def refresh_due_at(pair: TokenPair, leeway: float) -> float | None:
    """When ``pair`` should be refreshed, in epoch seconds; None means now.

    A token is due ``leeway`` seconds before it expires, but never before half
    of its lifetime has passed, so that a token living shorter than the leeway
    is not refreshed on every use.
    """
    if pair.expires_at is None or pair.access_token is None:
        return None
    due = pair.expires_at - leeway
    if pair.obtained_at is not None and pair.obtained_at <= pair.expires_at:
        half_life = pair.obtained_at + (pair.expires_at - pair.obtained_at) / 2
        due = max(due, half_life)
    return due


def needs_refresh(pair: TokenPair, now: float, leeway: float) -> bool:
    """True when ``pair`` has no usable access token or is near its expiry."""
    due = refresh_due_at(pair, leeway)
    return due is None or now >= due


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds from an ISO 8601 string; None for anything unparseable.

    A timestamp without an offset is taken as UTC, as the desktop app wrote it.
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        epoch = moment.timestamp()
    except (OverflowError, ValueError):
        return None
    return epoch if -MAX_EPOCH < epoch < MAX_EPOCH else None


def format_timestamp(epoch: float) -> str:
    """ISO 8601 UTC with a ``Z`` suffix, to the millisecond."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _first(body: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in body and body[name] is not None:
            return body[name]
    return None


def pair_from_grant(
    body: object, *, previous: TokenPair | None, now: float, api_url: str | None
) -> TokenPair:
    """The pair a token endpoint granted, from its decoded JSON body.

    Accepts camelCase and snake_case names and ``expires_in`` (seconds).  A
    grant without a new refresh token keeps the previous one.  A body that is
    not a usable grant raises RefreshTransient: the stored pair stays.
    """
    if not isinstance(body, Mapping):
        raise RefreshTransient("token endpoint answered 2xx without a JSON object")
    access = _first(body, "accessToken", "access_token")
    if not isinstance(access, str) or not access:
        raise RefreshTransient("token endpoint answered 2xx without an access token")
    refresh = _first(body, "refreshToken", "refresh_token")
    if refresh is None and previous is not None:
        refresh = previous.refresh_token
    if not isinstance(refresh, str) or not refresh:
        raise RefreshTransient("token endpoint answered 2xx without a refresh token")
    expires_at = parse_timestamp(_first(body, "accessTokenExpiresAt", "access_token_expires_at", "expiresAt", "expires_at"))
    if expires_at is None:
        expires_in = _first(body, "expiresIn", "expires_in")
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and 0 <= expires_in <= MAX_EXPIRES_IN:
            expires_at = now + float(expires_in)
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        api_url=api_url if api_url is not None else (previous.api_url if previous else None),
        expires_at=expires_at,
        obtained_at=now,
        extra=previous.extra if previous is not None else {},
    )

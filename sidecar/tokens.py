"""The token pair as a value, and the pure decisions about it.

Nothing here does I/O or reads a clock: every function that depends on time
takes ``now`` (seconds since the epoch, UTC) as an argument.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sidecar.errors import RefreshTransient

# Expiries past this are treated as unparseable: they cannot be written back
# as ISO 8601 (year 9999 is the end of datetime), and no token lives that long.
MAX_EPOCH = 253_000_000_000.0  # about year 9987
# expires_in beyond a century is a broken server, not a long-lived token.
MAX_EXPIRES_IN = 100 * 365 * 86400.0
# SPEC §3: a granted token is at most this long, in RFC 6750 b64token characters.
MAX_TOKEN_LENGTH = 16 * 1024
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


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


class TokenState(enum.Enum):
    """Where a pair stands at one instant."""

    FRESH = "fresh"  # use it as it is
    DUE = "due"  # still valid: use it, and refresh beside the traffic
    EXPIRED = "expired"  # no usable access token: refresh before using


def token_state(pair: TokenPair, now: float, leeway: float, *, margin: float = 0.0) -> TokenState:
    """FRESH before the pair is due, then DUE while its access token is still valid, then EXPIRED.

    A token with less than ``margin`` seconds left counts as expired (it
    would not survive the request it is handed to).  A pair without an
    access token or a usable expiry is EXPIRED.
    """
    if not needs_refresh(pair, now, leeway):
        return TokenState.FRESH
    if pair.access_token is not None and pair.expires_at is not None and now < pair.expires_at - margin:
        return TokenState.DUE
    return TokenState.EXPIRED


def still_needs_refresh(stored: TokenPair, now: float, leeway: float, *, force: bool, rejected: str | None) -> bool:
    """After taking the refresh lock and re-reading: is a refresh still needed?

    ``stored`` is what the store holds now.  If another process rotated the
    pair while this one waited for the lock, the answer is no: use that pair
    instead of spending its refresh token again.  A forced refresh (after a
    401 with ``rejected``, or ``token --force-refresh`` with no rejected
    token) is still needed unless the stored token is a new one.
    """
    if needs_refresh(stored, now, leeway):
        return True
    if not force:
        return False
    return rejected is None or stored.access_token == rejected


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
        moment = moment.replace(tzinfo=UTC)
    try:
        epoch = moment.timestamp()
    except (OverflowError, ValueError):
        return None
    return epoch if -MAX_EPOCH < epoch < MAX_EPOCH else None


def format_timestamp(epoch: float) -> str:
    """ISO 8601 UTC with a ``Z`` suffix, to the millisecond."""
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UnusableGrant(RefreshTransient):
    """A grant that failed its checks but rotated the refresh token.

    ``salvage`` is the previous pair with the newly granted refresh token: the
    old one is spent, so the new one has to be saved although the grant's
    access token is never used.
    """

    def __init__(self, reason: str, salvage: TokenPair) -> None:
        super().__init__(reason)
        self.salvage = salvage


def is_b64token(value: object) -> bool:
    """Whether ``value`` may be sent as a bearer token: RFC 6750 ``b64token``, at most 16 KiB."""
    return isinstance(value, str) and len(value) <= MAX_TOKEN_LENGTH and _B64TOKEN.fullmatch(value) is not None


def _first(body: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in body and body[name] is not None:
            return body[name]
    return None


def pair_from_grant(
    body: object, *, previous: TokenPair | None, now: float, api_url: str | None, access_optional: bool = False
) -> TokenPair:
    """The pair a grant describes: a token endpoint's JSON body, a login callback's query, an import.

    Accepts camelCase and snake_case names and ``expires_in`` (seconds).  A
    grant without a new refresh token keeps the previous one; with
    ``access_optional`` (an import) a missing access token means "refresh on
    first use".  A body that is not a usable grant raises RefreshTransient:
    the stored pair stays.
    """
    if not isinstance(body, Mapping):
        raise RefreshTransient("token endpoint answered 2xx without a JSON object")
    access = _first(body, "accessToken", "access_token")
    if access_optional and access == "":
        access = None
    granted_refresh = _first(body, "refreshToken", "refresh_token")
    if granted_refresh is not None and not is_b64token(granted_refresh):
        raise RefreshTransient("token endpoint granted a refresh token that is not a b64token of at most 16 KiB")
    refresh = granted_refresh if granted_refresh is not None else (previous.refresh_token if previous else None)
    if not isinstance(refresh, str) or not refresh:
        raise RefreshTransient("token endpoint answered 2xx without a refresh token")
    if not (access is None and access_optional) and not is_b64token(access):
        reason = (
            "token endpoint answered 2xx without an access token"
            if access is None or access == ""
            else "token endpoint granted an access token that is not a b64token of at most 16 KiB"
        )
        if granted_refresh is None or previous is None:
            raise RefreshTransient(reason)
        # The old refresh token is spent; the new one may be the only live one.
        raise UnusableGrant(reason, dataclasses.replace(previous, refresh_token=granted_refresh))
    expires_at = parse_timestamp(
        _first(body, "accessTokenExpiresAt", "access_token_expires_at", "expiresAt", "expires_at")
    )
    if expires_at is None:
        expires_in = _first(body, "expiresIn", "expires_in")
        if (
            isinstance(expires_in, (int, float))
            and not isinstance(expires_in, bool)
            and 0 <= expires_in <= MAX_EXPIRES_IN
        ):
            expires_at = now + float(expires_in)
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        api_url=api_url if api_url is not None else (previous.api_url if previous else None),
        expires_at=expires_at,
        obtained_at=now,
        extra=previous.extra if previous is not None else {},
    )

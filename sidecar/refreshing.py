"""What a refresh is to the manager: the refresher seam, outcome counts, backoff, the 401 cooldown.

Pure values and decisions (and the cooldown's small memory); the manager
does the awaiting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from sidecar.errors import RefreshTransient
from sidecar.tokens import TokenPair

log = logging.getLogger("sidecar.manager")

# Backoff after a transient failure: 1 s doubling to 60 s (SPEC §3), with
# +-20 % jitter so that several sidecars sharing a cloud do not retry in step.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.2
# A refreshed token counts as still valid for the background refresh only
# while at least this much of it is left.
STILL_VALID_MARGIN = 5.0
# The shortest time between two refreshes when the grant carries no usable
# expiry: such a token would otherwise be refreshed on every use.
MIN_REFRESH_INTERVAL = 60.0
# How long a refresh waits for the store's lock.  A holder needs at most the
# refresh budget (30 s, auth/refresh.py) plus a write; one that holds it
# longer is stalled (a process stopped with Ctrl-Z), and waiting on would
# stall every request whose token has expired.
LOCK_TIMEOUT = 35.0
# SPEC §3: once a retry with a token that a 401 had just forced is rejected
# again, refreshing does not cure that endpoint's 401s (scope, permissions),
# and for this long a 401 forces no refresh.
REJECTION_COOLDOWN = 30.0


def backoff_delay(failures: int, jitter: float) -> float:
    """Seconds to wait after ``failures`` consecutive transient failures.

    ``jitter`` is a number in [0, 1) from the random source.
    """
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** max(0, failures - 1))
    return min(BACKOFF_MAX, base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * jitter))


def withholds_retry(rejected: str, current: str | None, now: float, quiet_until: float) -> bool:
    """Whether a 401 to ``rejected`` goes to the client as it came, not retried.

    Only before ``quiet_until`` (the end of a cooldown), and only when a
    retry would have to force a refresh: ``rejected`` is the current token.
    A 401 to an older token is still retried with the current one, which
    costs no refresh; a pair without an access token is refreshed anyway.
    """
    return now < quiet_until and current is not None and current == rejected


def cooldown_until(retried: str, forced: str | None, now: float, quiet_until: float) -> float | None:
    """When 401s may force refreshes again, now that the retry with ``retried`` drew a 401 too; None starts no cooldown.

    ``forced`` is the token the last refresh a 401 forced handed out; only a
    retry with that token is evidence that refreshing does not help.  A
    cooldown under way (``now < quiet_until``) is not extended: a refresh is
    tried again REJECTION_COOLDOWN after the evidence, not after the last 401.
    """
    if forced is None or retried != forced or now < quiet_until:
        return None
    return now + REJECTION_COOLDOWN


class RejectionCooldown:
    """One token manager's memory against refresh storms from 401s (SPEC §3); no I/O.

    ``clock`` is the manager's, ``current`` gives its current access token.
    The manager tells it which token a 401-forced refresh handed out
    (``handed_out``); the 401 policy asks ``withholds_retry`` and reports
    ``rejected_again``.  The cooldown runs its full REJECTION_COOLDOWN
    whatever happens to the token meanwhile: scheduled refreshes go on, and
    neither they nor a new login are evidence that a forced refresh would
    cure the endpoint's 401s.
    """

    __slots__ = ("_clock", "_current", "forced", "quiet_until")

    def __init__(self, clock: Callable[[], float], current: Callable[[], str | None]) -> None:
        self._clock = clock
        self._current = current
        # The token the last refresh that a 401 forced handed out, until a
        # retry with it is rejected again; when 401s may force refreshes again.
        self.forced: str | None = None
        self.quiet_until = 0.0

    def handed_out(self, token: str, *, forced: bool) -> str:
        """``token`` goes to a retry after a 401; remembered if that 401 forced a refresh for it."""
        if forced:
            self.forced = token
        return token

    def withholds_retry(self, token: str) -> bool:
        """Whether the 401 to ``token`` goes to the client as it came, neither refreshed nor retried.

        True during a cooldown for a 401 to the current token; a 401 to an
        older token is still retried with the current one, at no refresh.
        Asked before ``token_rejected``, which, once asked, goes ahead even
        if a cooldown starts while it waits.
        """
        return withholds_retry(token, self._current(), self._clock(), self.quiet_until)

    def rejected_again(self, token: str) -> None:
        """The retry with ``token`` drew a 401 too: if a 401 had just forced ``token``, cool down."""
        until = cooldown_until(token, self.forced, self._clock(), self.quiet_until)
        if until is None:
            return
        self.forced = None  # this evidence is used up; only a new forced refresh can start the next cooldown
        self.quiet_until = until
        log.warning("a token that a 401 forced was rejected too; 401s force no refresh for %.0f s", REJECTION_COOLDOWN)


@dataclasses.dataclass(slots=True)
class RefreshStats:
    """Counts and times for the status endpoint and metrics; no secrets."""

    ok: int = 0
    dead: int = 0
    transient: int = 0
    last_refresh_at: float | None = None
    last_error: str | None = None


class Refresher(Protocol):
    """Exchanges a pair's refresh token for a new pair (one per flavor, in sidecar.auth).

    Raises RefreshDead when the refresh token will never work again,
    RefreshTransient when it may work later, ConfigError when the settings
    cannot name a token endpoint.
    """

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair: ...


# Called with "ok", "dead" or "transient" after every refresh call that reached the network.
Observer = Callable[[str], None]


def token_of(pair: TokenPair) -> str:
    """The pair's access token; a pair without one is a transient failure to report."""
    if pair.access_token is None:
        raise RefreshTransient("the stored pair has no access token")
    return pair.access_token


@dataclasses.dataclass(frozen=True, slots=True)
class UnsavedPair:
    """A refreshed pair the store could not take, and the refresh token it replaced.

    The store still holds that spent token, so what it holds must not win
    over this pair; anything else it holds (a login, an import, a logout) does.
    """

    pair: TokenPair
    spent_refresh_token: str

    def superseded_by(self, stored: TokenPair | None) -> bool:
        """True when the store's content is newer than this pair."""
        return stored is None or stored.refresh_token != self.spent_refresh_token

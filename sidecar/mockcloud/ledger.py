"""The mock cloud's token ledger: every token it issued, to which login, and until when.

Refresh tokens are single use: redeeming one spends it, and presenting a
spent one again revokes its whole login family (reuse detection, as the OAuth
security BCP asks) — unless ``reuse_grace`` is set: then a spent token
presented again within that many seconds of its first use buys a new pair
too, as Auth0's "reuse interval" and Okta's rotation grace period allow. Expiry is judged by the injected ``clock``; nothing here
does I/O.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

# One logger for the whole mock cloud, whichever module logs.
log = logging.getLogger("sidecar.mockcloud")


@dataclass(slots=True, eq=False)
class Family:
    """One login and every token rotated from it."""

    id: int
    revoked: bool = False


@dataclass(slots=True, eq=False)
class Grant:
    """What the cloud remembers about one token value."""

    family: Family
    expires_at: float
    spent: bool = False
    spent_at: float = 0.0


@dataclass(frozen=True, slots=True)
class IssuedPair:
    """The tokens of a new login."""

    access_token: str
    refresh_token: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a live refresh token buys: an access token and, when rotating, the next refresh token."""

    access_token: str
    refresh_token: str | None
    expires_at: float


class TokenLedger:
    """Issued access and refresh tokens, grouped into login families.

    ``minted`` holds every token value ever handed out, for leak checks in
    tests; ``chain_revocations`` counts the families revoked for reuse.
    """

    def __init__(self, *, access_ttl: float, refresh_ttl: float, clock: Callable[[], float]) -> None:
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.clock = clock
        self.chain_revocations = 0
        self.reuse_grace = 0.0
        self.minted: set[str] = set()
        self._families = itertools.count(1)
        self._access: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}

    def issue_pair(self, *, access_ttl: float | None = None) -> IssuedPair:
        """Start a new login family and mint its first pair."""
        family = Family(next(self._families))
        access, expires_at = self._new_access(family, access_ttl)
        refresh = self._new_refresh(family)
        return IssuedPair(access, refresh, expires_at)

    def register_refresh_token(self, token: str) -> None:
        """Accept ``token`` as the refresh token of a new login."""
        self._refresh[token] = Grant(Family(next(self._families)), self.clock() + self.refresh_ttl)
        self.minted.add(token)

    def access_token_valid(self, token: str | None) -> bool:
        """Whether ``token`` is a live access token right now."""
        grant = self._access.get(token or "")
        return grant is not None and not grant.family.revoked and self.clock() < grant.expires_at

    def redeem(self, refresh_token: str, *, rotate: bool = True) -> Rotation | None:
        """Spend ``refresh_token`` and mint what it buys, or None when it is dead.

        Without ``rotate`` the refresh token stays live and no new one is
        minted. A spent token presented again revokes its family (after ``reuse_grace``).
        """
        grant = self._refresh.get(refresh_token)
        if grant is None or grant.family.revoked:
            return None
        if grant.spent and not self._within_grace(grant):
            self.chain_revocations += 1
            self._revoke_family(grant.family)
            return None
        if self.clock() >= grant.expires_at:
            return None
        access, expires_at = self._new_access(grant.family)
        new_refresh: str | None = None
        if rotate:
            if not grant.spent:
                grant.spent, grant.spent_at = True, self.clock()
            new_refresh = self._new_refresh(grant.family)
        return Rotation(access, new_refresh, expires_at)

    def same_family(self, refresh_token: str, other: str) -> bool:
        """Whether two refresh tokens we issued belong to one login (one descends from the other's rotation)."""
        first, second = self._refresh.get(refresh_token), self._refresh.get(other)
        return first is not None and second is not None and first.family is second.family

    def _within_grace(self, grant: Grant) -> bool:
        return self.reuse_grace > 0 and self.clock() - grant.spent_at <= self.reuse_grace

    def revoke_chain(self, refresh_token: str) -> None:
        """Revoke the family of ``refresh_token``, if it is one we issued."""
        grant = self._refresh.get(refresh_token)
        if grant is not None and not grant.family.revoked:
            self._revoke_family(grant.family)

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far stops working."""
        self._access.clear()

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far stops working."""
        self._refresh.clear()

    def _new_access(self, family: Family, ttl: float | None = None) -> tuple[str, float]:
        """Mint an access token in ``family``; return it with its expiry."""
        token = "at_" + secrets.token_urlsafe(32)
        expires_at = self.clock() + (self.access_ttl if ttl is None else ttl)
        self._access[token] = Grant(family, expires_at)
        self.minted.add(token)
        return token, expires_at

    def _new_refresh(self, family: Family) -> str:
        """Mint a refresh token in ``family``."""
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh[token] = Grant(family, self.clock() + self.refresh_ttl)
        self.minted.add(token)
        return token

    def _revoke_family(self, family: Family) -> None:
        """Kill every token of one login."""
        family.revoked = True
        log.info("mock cloud: revoked login family %d", family.id)

"""The exceptions sidecar raises, as one shallow tree.

    SidecarError
    ├── ConfigError          bad flag, variable or TOML key (exit 2)
    ├── StoreError           the token store cannot be read or written
    │   ├── StoreConflict    the store changed since it was read (compare-and-set refused)
    │   └── StoreLockTimeout the refresh lock was not had in time
    ├── NotLoggedIn          no usable pair in the store (re-login needed)
    ├── RefreshError
    │   ├── RefreshDead      the refresh token is spent or revoked
    │   └── RefreshTransient the token endpoint failed for now; retry later
    │       └── UnusableGrant a grant failing its checks (sidecar.tokens; keeps a new refresh token)
    └── LoginError           the login flow failed

No message ever carries a token value: callers format only status codes,
field names and reasons.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error sidecar raises on purpose."""


class ConfigError(SidecarError):
    """A configuration value is unknown, malformed or of the wrong type."""


class StoreError(SidecarError):
    """The token store could not be read or written."""


class StoreConflict(StoreError):
    """A write was refused: the store changed since the read it was based on."""


class StoreLockTimeout(StoreError):
    """The refresh lock was held by someone else for longer than allowed."""


class NotLoggedIn(SidecarError):
    """There is no usable token pair; the user has to log in again."""


class RefreshError(SidecarError):
    """Refreshing the access token failed."""


class RefreshDead(RefreshError):
    """The refresh token is dead (spent, revoked or expired): re-login needed."""


class RefreshTransient(RefreshError):
    """The token endpoint failed in a way that may pass; keep the stored pair.

    ``retry_after`` is the number of seconds until the next attempt is allowed.
    """

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class LoginError(SidecarError):
    """The login flow did not produce a token pair."""

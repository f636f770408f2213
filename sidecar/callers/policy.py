"""Pure decisions about callers: which uids ``allow_users`` names, whether a uid may connect, whether a key is the key.

Nothing here does I/O except through the ``user_uid`` function passed in
(``pwd`` in production), so user names are resolved once, at startup.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Iterable, Sequence

from sidecar.errors import ConfigError

ANY = "any"
SELF = "self"


@dataclasses.dataclass(frozen=True, slots=True)
class AllowedUsers:
    """``allow_users`` resolved: every uid (``everyone``) or these ``uids``.

    The uid running serve is always among ``uids``: it can read the store
    file itself, so refusing it would protect nothing.
    """

    everyone: bool
    uids: frozenset[int]
    self_uid: int
    configured: tuple[str, ...]


def resolve_allow_users(entries: Sequence[str], self_uid: int, user_uid: Callable[[str], int | None]) -> AllowedUsers:
    """``allow_users`` as uids: ``self``, ``any``, user names (looked up with ``user_uid``) and numeric uids.

    An empty list means the default (``self``).  A name that is no user, or
    a negative number, is a ConfigError naming it.
    """
    configured = tuple(entry.strip() for entry in entries if entry.strip()) or (SELF,)
    uids = {self_uid}
    everyone = False
    for entry in configured:
        word = entry.lower()
        if word == ANY:
            everyone = True
        elif word == SELF:
            continue
        elif entry.isdecimal():
            uids.add(int(entry))
        elif entry.startswith("-") and entry[1:].isdecimal():
            raise ConfigError(f"allow_users: a uid cannot be negative, got {entry!r}")
        else:
            uid = user_uid(entry)
            if uid is None:
                raise ConfigError(f"allow_users: no user named {entry!r} on this host")
            uids.add(uid)
    return AllowedUsers(everyone, frozenset(uids), self_uid, configured)


def allow(uid: int | None, allowed: AllowedUsers) -> bool:
    """True when a connection from ``uid`` (None: it could not be found) may use the login.

    An unknown uid is allowed only when everyone is: fail closed.
    """
    if allowed.everyone:
        return True
    return uid is not None and uid in allowed.uids


_BEARER = b"bearer "


def bearer_value(authorization: bytes) -> bytes | None:
    """The credential of ``Authorization: Bearer <credential>`` (scheme case-insensitive), else None."""
    if len(authorization) > len(_BEARER) and authorization[: len(_BEARER)].lower() == _BEARER:
        return authorization[len(_BEARER) :].strip()
    return None


def is_key(presented: bytes, key: bytes | None) -> bool:
    """``presented`` equals ``key``, compared in constant time (no key: nothing matches)."""
    return key is not None and hmac.compare_digest(presented, key)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyVerdict:
    """What a request's headers say about the client key: ``ok``, else ``reason`` (never quoting a value)."""

    ok: bool
    reason: str = ""


KEY_OK = KeyVerdict(True)


def check_client_key(
    mode: str, sidecar_keys: Iterable[bytes], authorizations: Iterable[bytes], key: bytes | None
) -> KeyVerdict:
    """The client-key rule of SPEC §9 for one request.

    ``sidecar_keys`` are the request's ``X-Sidecar-Key`` values,
    ``authorizations`` its ``Authorization`` values, ``key`` the current key
    (None when there is no readable key).  ``off``: anything goes.
    ``optional``: an ``X-Sidecar-Key`` that is sent must be the key.
    ``required``: the key must come as ``X-Sidecar-Key`` or as
    ``Authorization: Bearer <key>``.  An ``Authorization`` that is not the
    key is never a refusal by itself: it is a client's own header, replaced
    by the real token as always.
    """
    if mode == "off":
        return KEY_OK
    presented = list(sidecar_keys)
    if len(presented) > 1:
        return KeyVerdict(False, "more than one X-Sidecar-Key header was sent")
    if presented:
        if is_key(presented[0].strip(), key):
            return KEY_OK
        return KeyVerdict(False, "the X-Sidecar-Key sent is not this sidecar's client key")
    if mode != "required":
        return KEY_OK
    for authorization in authorizations:
        credential = bearer_value(authorization)
        if credential is not None and is_key(credential, key):
            return KEY_OK
    return KeyVerdict(False, "no client key was sent")

"""What the request handler asks about a caller: may this connection use the login, and did this request bring the key?

The peer's uid is looked up once per connection, on its first request, and
the verdict is kept until the connection is lost (``forget``): a keep-alive
request costs one dict lookup.  Refused connections are logged, at most one
line per uid a minute.  The client key is checked per request, against the
key file as of at most a second ago.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal

from sidecar.callers import peer
from sidecar.callers.key_location import key_file
from sidecar.callers.keys import KeyFile, LiveKey
from sidecar.callers.policy import KEY_OK, AllowedUsers, KeyVerdict, allow, check_client_key, resolve_allow_users
from sidecar.callers.redis_key import LiveRedisKey, RedisKey
from sidecar.config import Settings

log = logging.getLogger("sidecar.callers")

# One log line per refused uid at most this often (seconds): a client in a retry loop must not flood the log.
REFUSAL_LOG_INTERVAL = 60.0
# Distinct uids remembered for the rate limit; past this the memory starts over (a host has few users).
_REFUSAL_LOG_MAX_UIDS = 4096

_SIDECAR_KEY = b"x-sidecar-key"
_AUTHORIZATION = b"authorization"


def user_uid(name: str) -> int | None:
    """The uid of the local user ``name``, else None."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """One connection's verdict: its peer's ``uid`` (None: unknown), whether it is ``allowed``, and why not."""

    uid: int | None
    allowed: bool
    reason: str = ""

    def detail(self) -> str:
        """The refusal's problem detail: names the uid, never anything secret."""
        if self.uid is None:
            return (
                f"The uid of the connecting process could not be found ({self.reason}), and allow_users is not 'any'."
            )
        return f"The connecting process runs as uid {self.uid}, which is not in this sidecar's allow_users."


class RefusalLog:
    """Logs a refused connection unless the same uid was logged less than ``interval`` seconds ago."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[int | None, tuple[float, int]] = {}

    def refused(self, caller: Caller) -> bool:
        """Record a refusal; True when it was logged."""
        now = self._clock()
        last = self._last.get(caller.uid)
        if last is not None and now - last[0] < self._interval:
            self._last[caller.uid] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= _REFUSAL_LOG_MAX_UIDS:
            self._last.clear()
        quiet = last[1] if last is not None else 0
        self._last[caller.uid] = (now, 0)
        if caller.uid is not None:
            why = f"uid {caller.uid}: not in allow_users"
        else:
            why = f"a process whose uid could not be found: {caller.reason}"
        also = f"; {quiet} more since the last line" if quiet else ""
        log.warning(
            "refused a connection from %s%s (the next line for it %g s from now at the earliest)",
            why,
            also,
            self._interval,
        )
        return True


def _header_values(raw: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in raw if len(key) == len(name) and key.lower() == name]


class CallerGate:
    """The caller policy of one running serve: the verdict per connection, the key per request."""

    def __init__(
        self,
        allowed: AllowedUsers,
        key_mode: str,
        key: LiveKey | LiveRedisKey | None,
        *,
        tcp: peer.TcpLookup | None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.allowed = allowed
        self.key_mode = key_mode
        self._key = key
        self._tcp = tcp
        self._refusals = refusals or RefusalLog()
        # Keyed by the connection's protocol object; ``forget`` drops an entry when its connection is lost.
        self._callers: dict[Hashable, Caller] = {}
        self.checks_peers = not allowed.everyone
        self.checks_keys = key_mode != "off"

    @property
    def connections(self) -> int:
        """Connections whose verdict is held (for tests: none are kept after they close)."""
        return len(self._callers)

    # -- per connection ----------------------------------------------------------

    def caller(self, connection: Hashable, transport: Any) -> Caller:
        """The verdict for ``connection``, found on its first request and kept until ``forget``."""
        caller = self._callers.get(connection)
        if caller is None:
            caller = self._identify(transport)
            self._callers[connection] = caller
            if not caller.allowed:
                self._refusals.refused(caller)
        return caller

    def forget(self, connection: Hashable) -> None:
        self._callers.pop(connection, None)

    def _identify(self, transport: Any) -> Caller:
        found = self.peer_uid(transport)
        return Caller(found.uid, allow(found.uid, self.allowed), found.reason)

    def peer_uid(self, transport: Any) -> peer.PeerUid:
        if transport is None:
            return peer.PeerUid(None, "the connection is already closed")
        sock = transport.get_extra_info("socket")
        family = getattr(sock, "family", None)
        if family == getattr(socket, "AF_UNIX", None):
            return peer.unix_peer_uid(sock)
        if family in (socket.AF_INET, socket.AF_INET6):
            return peer.tcp_peer_uid(
                self._tcp, transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            )
        return peer.PeerUid(None, "the connection is neither TCP nor a unix socket")

    # -- per request -------------------------------------------------------------

    def key_verdict(self, raw_headers: Iterable[tuple[bytes, bytes]]) -> KeyVerdict:
        """Whether this request brings the client key as ``client_key`` demands."""
        if not self.checks_keys:
            return KEY_OK
        key = self._key.current() if self._key is not None else None
        return check_client_key(
            self.key_mode, _header_values(raw_headers, _SIDECAR_KEY), _header_values(raw_headers, _AUTHORIZATION), key
        )

    async def start(self) -> None:
        """Fetch a key that lives in a shared store and start following it (a file key needs nothing)."""
        if isinstance(self._key, LiveRedisKey):
            await self._key.start()

    async def aclose(self) -> None:
        """Stop following a shared store's key, and close what ``close`` closes."""
        if isinstance(self._key, LiveRedisKey):
            await self._key.aclose()
        self.close()

    def close(self) -> None:
        """Release the TCP lookup's netlink socket, if it has one."""
        close = getattr(self._tcp, "close", None)
        if close is not None:
            close()

    # -- status --------------------------------------------------------------------

    def describe(self, listen: str) -> dict[str, Any]:
        return describe_policy(self.allowed, self.key_mode, self._tcp, listen, self._key.where if self._key else None)


def describe_policy(
    allowed: AllowedUsers, key_mode: str, tcp: peer.TcpLookup | None, listen: str, key_where: str | None
) -> dict[str, Any]:
    """The caller policy as ``status`` and ``/_sidecar/status`` show it (never the key)."""
    if allowed.everyone:
        check = "off"
    elif listen.startswith("unix:"):
        check = peer.UNIX_PEERCRED if peer.unix_check_available() else peer.NO_CHECK
    else:
        check = tcp.name if tcp is not None else peer.NO_CHECK
    return {
        "allowUsers": list(allowed.configured),
        "allowedUids": None if allowed.everyone else sorted(allowed.uids),
        "peerCheck": check,
        "unknownPeers": "allowed" if allowed.everyone else "refused",
        "clientKey": key_mode,
        "clientKeyFile": key_where if key_mode != "off" else None,
    }


def describe_line(policy: Mapping[str, Any]) -> str:
    """``describe_policy``'s document as one line for a log or a terminal."""
    if policy["allowedUids"] is None:
        who = "any local user (allow_users = any)"
    else:
        uids = ", ".join(str(uid) for uid in policy["allowedUids"])
        who = f"uid {uids} (allow_users = {', '.join(policy['allowUsers'])}), checked by {policy['peerCheck']}"
        if policy["peerCheck"] == peer.NO_CHECK:
            who += (
                ": no way to find callers' uids here, so every connection is refused"
                " (listen on a unix socket, or set allow_users = any with client_key = required)"
            )
    key = f"client key {policy['clientKey']}"
    if policy["clientKeyFile"]:
        key += f" ({policy['clientKeyFile']})"
    return f"{who}; {key}"


def resolve_settings(settings: Settings, env: Mapping[str, str]) -> tuple[AllowedUsers, KeyFile | RedisKey | None]:
    """``allow_users`` as uids and, unless ``client_key`` is off, where the key is (ConfigError if either is bad)."""
    allowed = resolve_allow_users(settings.allow_users, os.geteuid(), user_uid)
    mode = settings.client_key_mode
    return allowed, key_file(settings.store, env) if mode != "off" else None


def check_settings(settings: Settings, env: Mapping[str, str]) -> None:
    """Fail with ConfigError now, not in each worker, when ``allow_users`` or the key file is bad; makes the key if needed."""
    _allowed, file = resolve_settings(settings, env)
    if file is not None:
        file.ensure()


def build_gate(
    settings: Settings,
    env: Mapping[str, str],
    *,
    monotonic: Callable[[], float] = time.monotonic,
    tcp: peer.TcpLookup | Literal["auto"] | None = "auto",
) -> CallerGate:
    """The gate serve runs with: user names resolved, the key made if needed, the TCP lookup chosen.

    ``tcp="auto"`` picks the lookup that works on this host (``peer.tcp_lookup``);
    tests pass one, or None.
    """
    allowed, file = resolve_settings(settings, env)
    live: LiveKey | LiveRedisKey | None = None
    if isinstance(file, RedisKey):
        live = LiveRedisKey(file)  # fetched by start(), in the running loop
    elif file is not None:
        file.ensure()
        live = LiveKey(file, monotonic=monotonic)
    lookup: peer.TcpLookup | None = None
    if not allowed.everyone:
        # The self-test behind tcp_lookup costs a loopback connection: not made when nothing is checked.
        lookup = peer.tcp_lookup() if tcp == "auto" else tcp
    return CallerGate(allowed, settings.client_key_mode, live, tcp=lookup, refusals=RefusalLog(monotonic))

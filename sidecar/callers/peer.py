"""The uid of the process at the other end of a connection, where the kernel can tell.

- A unix socket: ``SO_PEERCRED`` (Linux), ``LOCAL_PEERCRED`` (macOS): the
  credentials the peer had when it called ``connect()``.
- TCP on Linux: the connecting socket is in this network namespace's socket
  table when the connection came over loopback (or to one of this host's
  own addresses).  It is found by its address pair, the peer's address as
  its local end and ours as its remote end, and its owner is the uid that
  created it.  Netlink ``sock_diag`` asks the kernel for exactly that
  socket (a few microseconds); ``/proc/net/tcp`` and ``tcp6`` are the
  fallback, read whole (milliseconds on a busy host).
- Anything else (another host, another network namespace, a platform
  without these calls): unknown, and ``policy.allow`` refuses unknown uids
  unless ``allow_users`` is ``any``.

A socket in TIME_WAIT or LISTEN never counts: the kernel reports uid 0 for a
TIME_WAIT socket, and a listener that happens to hold the peer's port is not
the peer.  The pure parts (address encodings, the ``/proc`` line match, the
netlink messages) are functions of their inputs, for tests.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# What status calls the checks (SPEC §9: "status says which check is in force").
UNIX_PEERCRED = "unix-peercred"
TCP_SOCK_DIAG = "tcp-sock-diag"
TCP_PROC_NET = "tcp-proc-net"
NO_CHECK = "none"

# TCP states (include/net/tcp_states.h) in which a socket is a live connection end.
_TCP_ESTABLISHED, _TCP_LISTEN, _TCP_TIME_WAIT, _TCP_NEW_SYN_RECV = 1, 10, 6, 12
_NOT_A_PEER = frozenset({_TCP_LISTEN, _TCP_TIME_WAIT, _TCP_NEW_SYN_RECV, 7})  # 7: CLOSE
_PROC_NET_FILES: dict[int, str] = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
# A plain str, so that type checkers on Linux do not call the macOS branches unreachable.
_PLATFORM: str = sys.platform
# A /proc/net/tcp* table larger than this is not read (a host with a million sockets).
_PROC_NET_MAX_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class PeerUid:
    """A lookup's result: the ``uid``, else None and ``reason`` (for the refusal's detail)."""

    uid: int | None
    reason: str = ""


def _unknown(reason: str) -> PeerUid:
    return PeerUid(None, reason)


# -- unix sockets ---------------------------------------------------------------


class _SocketLike(Protocol):
    family: Any

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def unix_peer_uid(sock: _SocketLike) -> PeerUid:
    """The uid of a unix socket's peer, from the kernel's record of its ``connect()``."""
    try:
        if _PLATFORM.startswith("linux"):
            # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return PeerUid(uid)
        if _PLATFORM == "darwin":
            # SOL_LOCAL 0, LOCAL_PEERCRED 1: struct xucred {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16];}
            raw = sock.getsockopt(0, 1, 76)
            _version, uid = struct.unpack_from("=II", raw)
            return PeerUid(uid)
    except OSError as exc:
        return _unknown(f"the peer credentials could not be read ({exc.strerror or type(exc).__name__})")
    return _unknown(f"unix socket peer credentials are not available on {_PLATFORM}")


def unix_check_available() -> bool:
    return _PLATFORM.startswith("linux") or _PLATFORM == "darwin"


# -- addresses --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AddressPair:
    """One TCP connection as the *connecting* socket sees it: its local end (the peer) and remote end (us).

    ``family`` is AF_INET for IPv4 and for IPv4-mapped IPv6 addresses
    (normalised to plain IPv4), AF_INET6 otherwise.
    """

    family: int
    local: bytes  # 4 or 16 bytes, network order
    local_port: int
    remote: bytes
    remote_port: int


_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _packed(host: str) -> tuple[int, bytes]:
    """(family, packed address) with IPv4-mapped IPv6 unwrapped; the zone of a link-local address dropped.

    ``inet_pton``, not ``ipaddress``: this runs once per connection, and is four times faster.
    """
    if ":" not in host:
        return socket.AF_INET, socket.inet_pton(socket.AF_INET, host)
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    if packed[:12] == _MAPPED_PREFIX:
        return socket.AF_INET, packed[12:]
    return socket.AF_INET6, packed


def address_pair(peername: Any, sockname: Any) -> AddressPair | None:
    """The connecting socket's view of a connection accepted with these transport addresses, else None."""
    try:
        peer_family, peer = _packed(peername[0])
        our_family, ours = _packed(sockname[0])
        peer_port, our_port = int(peername[1]), int(sockname[1])
    except (TypeError, ValueError, IndexError, OSError):
        return None
    if peer_family != our_family:
        return None
    return AddressPair(peer_family, peer, peer_port, ours, our_port)


# -- /proc/net/tcp ------------------------------------------------------------------


def proc_net_address(packed: bytes, port: int) -> str:
    """An address as ``/proc/net/tcp*`` prints it: each 32-bit word as ``%08X`` in host byte order, then ``:%04X``."""
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def _ipv4_mapped(packed: bytes) -> bytes:
    return _MAPPED_PREFIX + packed


def proc_net_uid(table: bytes, local: str, remote: str) -> int | None:
    """The uid on the line of a ``/proc/net/tcp*`` table whose ends are ``local`` and ``remote``, else None.

    Columns: ``sl local_address rem_address st tx:rx tr:when retrnsmt uid ...``.
    """
    wanted_local, wanted_remote = local.encode(), remote.encode()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != wanted_local or fields[2] != wanted_remote:
            continue
        try:
            state, uid = int(fields[3], 16), int(fields[7])
        except ValueError:
            return None
        return None if state in _NOT_A_PEER else uid
    return None


def _read_table(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(_PROC_NET_MAX_BYTES)
    except OSError:
        return None


class ProcNet:
    """The ``/proc/net/tcp`` and ``tcp6`` lookup (``read`` is injectable for tests)."""

    name = TCP_PROC_NET

    def __init__(self, read: Callable[[str], bytes | None] = _read_table) -> None:
        self._read = read

    def uid(self, pair: AddressPair) -> PeerUid:
        # A v4 connection's connecting socket may be an AF_INET6 one using an IPv4-mapped address.
        candidates: list[tuple[int, bytes, bytes]] = [(pair.family, pair.local, pair.remote)]
        if pair.family == socket.AF_INET:
            candidates.append((socket.AF_INET6, _ipv4_mapped(pair.local), _ipv4_mapped(pair.remote)))
        readable = False
        for family, local, remote in candidates:
            table = self._read(_PROC_NET_FILES[family])
            if table is None:
                continue
            readable = True
            uid = proc_net_uid(
                table, proc_net_address(local, pair.local_port), proc_net_address(remote, pair.remote_port)
            )
            if uid is not None:
                return PeerUid(uid)
        if not readable:
            return _unknown("/proc/net/tcp cannot be read")
        return _unknown("the connecting socket is not in this network namespace's TCP table")


# -- netlink sock_diag -----------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans (4 B), inet_diag_sockid (48 B), expires, rqueue, wqueue, uid, inode.
_DIAG_MSG_UID_OFFSET = 4 + 48 + 12
_DIAG_MSG_SIZE = _DIAG_MSG_UID_OFFSET + 8


def _sockid(pair: AddressPair) -> bytes:
    """inet_diag_sockid for the connecting socket: sport, dport (network order), src[4], dst[4], if, cookie[2]."""
    return (
        struct.pack("!HH", pair.local_port, pair.remote_port)
        + pair.local.ljust(16, b"\x00")
        + pair.remote.ljust(16, b"\x00")
        + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    )


def sock_diag_request(pair: AddressPair, sequence: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for the one TCP socket with these ends (no dump: the kernel looks it up)."""
    body = struct.pack("=BBBBI", pair.family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + _sockid(pair)
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, sequence, 0) + body


def sock_diag_answer(data: bytes, pair: AddressPair, sequence: int) -> PeerUid | None:
    """The uid in a sock_diag answer to request ``sequence`` for ``pair``; None if ``data`` answers another request."""
    if len(data) < _NLMSG_HEADER.size:
        return _unknown("sock_diag answered with a short message")
    _length, kind, _flags, answered, _pid = _NLMSG_HEADER.unpack_from(data)
    if answered != sequence:
        return None
    body = data[_NLMSG_HEADER.size :]
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", body) if len(body) >= 4 else (0,)
        if -error == 2:  # ENOENT
            return _unknown("the connecting socket is not in this network namespace's TCP table")
        return _unknown(f"sock_diag failed ({os.strerror(-error) if error else 'no answer'})")
    if kind != _SOCK_DIAG_BY_FAMILY or len(body) < _DIAG_MSG_SIZE:
        return _unknown("sock_diag answered with an unexpected message")
    family, state = body[0], body[1]
    asked = pair
    if family == socket.AF_INET6 and pair.family == socket.AF_INET:
        # An AF_INET6 socket connected to an IPv4 address reports its ends IPv4-mapped.
        asked = dataclasses.replace(pair, local=_ipv4_mapped(pair.local), remote=_ipv4_mapped(pair.remote))
    # Without a matching connection the kernel falls back to a listener: the ends must be the ones asked for
    # (ports and addresses, the first 36 bytes of inet_diag_sockid).
    if body[4:40] != _sockid(asked)[:36] or state in _NOT_A_PEER:
        return _unknown("the connecting socket is no longer connected")
    (uid,) = struct.unpack_from("=I", body, _DIAG_MSG_UID_OFFSET)
    return PeerUid(uid)


class SockDiag:
    """Asks the kernel for one socket's owner over netlink ``sock_diag``; one netlink socket per instance."""

    name = TCP_SOCK_DIAG

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        self._sequence = 0

    def _netlink(self) -> socket.socket:
        if self._socket is None:
            netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            # The kernel answers during send(); the timeout only bounds a kernel that does not
            # (the call blocks the event loop, so it is short).
            netlink.settimeout(0.2)
            self._socket = netlink
        return self._socket

    def uid(self, pair: AddressPair) -> PeerUid:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        sequence = self._sequence
        try:
            netlink = self._netlink()
            netlink.send(sock_diag_request(pair, sequence))
            while True:
                answer = sock_diag_answer(netlink.recv(8192), pair, sequence)
                if answer is not None:
                    return answer
        except OSError as exc:
            self.close()
            return _unknown(f"sock_diag failed ({exc.strerror or type(exc).__name__})")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class TcpLookup(Protocol):
    """One way of finding a loopback TCP peer's uid."""

    name: str

    def uid(self, pair: AddressPair) -> PeerUid: ...


def _self_test(lookup: TcpLookup) -> bool:
    """True when ``lookup`` finds this process's uid for a loopback connection this process makes."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=1.0) as connecting:
                accepted, _ = listener.accept()
                with accepted:
                    pair = address_pair(accepted.getpeername(), accepted.getsockname())
                    del connecting  # it stays open until the with block ends
                    return pair is not None and lookup.uid(pair).uid == os.geteuid()
    except OSError:
        return False


def tcp_lookup(candidates: Iterable[TcpLookup] | None = None) -> TcpLookup | None:
    """The first way of finding TCP peers that works here (checked on a real loopback connection), else None."""
    if not _PLATFORM.startswith("linux"):
        return None
    for lookup in candidates if candidates is not None else (SockDiag(), ProcNet()):
        if _self_test(lookup):
            return lookup
        close = getattr(lookup, "close", None)
        if close is not None:
            close()
    return None


def tcp_peer_uid(lookup: TcpLookup | None, peername: Any, sockname: Any) -> PeerUid:
    """The uid owning the socket that opened this TCP connection, if it is in this network namespace."""
    if lookup is None:
        return _unknown(f"TCP peers' uids cannot be found on {_PLATFORM}")
    pair = address_pair(peername, sockname)
    if pair is None:
        return _unknown("the connection's addresses are unknown")
    return lookup.uid(pair)

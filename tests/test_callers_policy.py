"""Unit tests of the caller policy (SPEC §9): pure decisions, address encodings, the key file, the refusal log."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import struct
import sys
from pathlib import Path

import pytest
from conftest import FakeClock

from sidecar.callers import peer
from sidecar.callers.gate import Caller, RefusalLog, describe_line, describe_policy
from sidecar.callers.key_location import key_file
from sidecar.callers.keys import (
    KEY_SUFFIX,
    SECRET_FILE_VARIABLE,
    KeyFile,
    KeyFileError,
    LiveKey,
)
from sidecar.callers.policy import (
    AllowedUsers,
    allow,
    bearer_value,
    check_client_key,
    is_key,
    resolve_allow_users,
)
from sidecar.errors import ConfigError

USERS = {"alice": 1001, "bob": 1002}
KEY = b"k" * 43


def resolve(*entries: str, self_uid: int = 500) -> AllowedUsers:
    return resolve_allow_users(entries, self_uid, USERS.get)


# -- allow_users ------------------------------------------------------------------


def test_default_allows_only_the_uid_running_serve() -> None:
    """``self`` (and an empty list, which means the default) allows the serving uid and no other."""
    for allowed in (resolve("self"), resolve()):
        assert allowed.uids == {500} and not allowed.everyone
        assert allow(500, allowed)
        assert not allow(1001, allowed)
        assert not allow(0, allowed)


def test_names_and_uids_are_resolved_once_and_self_stays_allowed() -> None:
    """User names become uids at resolution; numeric entries are uids; the serving uid is always in."""
    allowed = resolve("alice", "2000")
    assert allowed.uids == {500, 1001, 2000}
    assert allowed.configured == ("alice", "2000")
    assert allow(1001, allowed) and allow(2000, allowed) and allow(500, allowed)
    assert not allow(1002, allowed)


def test_any_allows_every_uid_and_an_unknown_one() -> None:
    """``any`` lets every connection in, even one whose uid could not be found."""
    allowed = resolve("any")
    assert allowed.everyone
    assert allow(12345, allowed) and allow(None, allowed)


def test_an_unknown_uid_is_refused_unless_any() -> None:
    """Fail closed: a connection whose uid cannot be found is refused under ``self`` or a list."""
    assert not allow(None, resolve("self"))
    assert not allow(None, resolve("alice", "bob"))


def test_an_unknown_user_name_is_a_config_error_naming_it() -> None:
    """A name that is no local user stops serve at startup, naming the entry."""
    with pytest.raises(ConfigError, match=r"allow_users: no user named 'carol'"):
        resolve("alice", "carol")


def test_a_negative_uid_is_a_config_error() -> None:
    """``-1`` is not a uid (it would be nobody's, or everybody's, depending on the API)."""
    with pytest.raises(ConfigError, match=r"allow_users: a uid cannot be negative"):
        resolve("-1")


# -- client keys --------------------------------------------------------------------


def test_bearer_value_takes_the_credential_with_any_scheme_case() -> None:
    """``Bearer``/``bearer``/``BEARER`` all carry a credential; other schemes do not."""
    assert bearer_value(b"Bearer abc") == b"abc"
    assert bearer_value(b"bearer  abc ") == b"abc"
    assert bearer_value(b"BEARER abc") == b"abc"
    assert bearer_value(b"Basic abc") is None
    assert bearer_value(b"Bearer ") is None


def test_is_key_needs_a_key_and_the_same_bytes() -> None:
    """No key matches nothing; a prefix or a longer value is not the key."""
    assert is_key(KEY, KEY)
    assert not is_key(KEY, None)
    assert not is_key(KEY[:-1], KEY)
    assert not is_key(KEY + b"x", KEY)


def test_off_ignores_every_key_header() -> None:
    """``client_key = off``: a missing, wrong or duplicated key is never a refusal."""
    assert check_client_key("off", [], [], None).ok
    assert check_client_key("off", [b"wrong", b"twice"], [], KEY).ok


def test_optional_allows_no_key_but_refuses_a_wrong_one() -> None:
    """``optional``: a request without X-Sidecar-Key passes, one with a wrong X-Sidecar-Key is refused."""
    assert check_client_key("optional", [], [b"Bearer sk-whatever"], KEY).ok
    assert check_client_key("optional", [KEY], [], KEY).ok
    verdict = check_client_key("optional", [b"wrong"], [], KEY)
    assert not verdict.ok and "not this sidecar's client key" in verdict.reason


def test_required_accepts_the_key_in_either_header() -> None:
    """``required``: the key as X-Sidecar-Key or as ``Authorization: Bearer <key>`` passes."""
    assert check_client_key("required", [KEY], [], KEY).ok
    assert check_client_key("required", [b" " + KEY + b" "], [], KEY).ok
    assert check_client_key("required", [], [b"Bearer " + KEY], KEY).ok
    assert check_client_key("required", [], [b"bearer " + KEY], KEY).ok
    # The key in X-Sidecar-Key, and the SDK's own Authorization beside it (replaced by the real token).
    assert check_client_key("required", [KEY], [b"Bearer sk-sdk-placeholder"], KEY).ok


def test_required_refuses_a_missing_or_wrong_key() -> None:
    """``required``: no key, a wrong key, or an Authorization that is not the key is refused."""
    assert check_client_key("required", [], [], KEY).reason == "no client key was sent"
    assert not check_client_key("required", [], [b"Bearer sk-not-the-key"], KEY).ok
    assert not check_client_key("required", [], [b"Basic " + KEY], KEY).ok
    assert not check_client_key("required", [b"wrong"], [b"Bearer " + KEY], KEY).ok


def test_two_sidecar_key_headers_are_refused() -> None:
    """Two X-Sidecar-Key values are ambiguous: refused even when one is right."""
    verdict = check_client_key("required", [KEY, b"other"], [], KEY)
    assert not verdict.ok and "more than one" in verdict.reason


def test_without_a_readable_key_nothing_passes_required() -> None:
    """When the key file holds no key (deleted, damaged), ``required`` refuses everything."""
    assert not check_client_key("required", [KEY], [b"Bearer " + KEY], None).ok
    assert check_client_key("optional", [], [], None).ok


def test_reasons_never_quote_a_value() -> None:
    """A refusal's reason names what was wrong, never the bytes that were sent."""
    for verdict in (
        check_client_key("required", [b"sent-value-1"], [], KEY),
        check_client_key("required", [], [b"Bearer sent-value-2"], KEY),
        check_client_key("required", [b"sent-value-3", b"sent-value-4"], [], KEY),
    ):
        assert "sent-value" not in verdict.reason and KEY.decode() not in verdict.reason


# -- addresses and the kernel's tables ---------------------------------------------------


def test_proc_net_address_is_host_order_words_then_the_port() -> None:
    """``/proc/net/tcp*`` prints each 32-bit word of the address in host byte order, the port as 4 hex digits."""
    v4 = peer.proc_net_address(socket.inet_pton(socket.AF_INET, "127.0.0.1"), 8787)
    v6 = peer.proc_net_address(socket.inet_pton(socket.AF_INET6, "::1"), 443)
    if sys.byteorder == "little":
        assert v4 == "0100007F:2253"
        assert v6 == "00000000000000000000000001000000:01BB"
    else:
        assert v4 == "7F000001:2253"
        assert v6 == "00000000000000000000000000000001:01BB"


def test_address_pair_unwraps_ipv4_mapped_addresses() -> None:
    """A dual-stack listener's ``::ffff:127.0.0.1`` peer is looked up as the IPv4 connection it is."""
    pair = peer.address_pair(("::ffff:127.0.0.1", 40000, 0, 0), ("::ffff:127.0.0.1", 8787, 0, 0))
    assert pair == peer.AddressPair(socket.AF_INET, b"\x7f\x00\x00\x01", 40000, b"\x7f\x00\x00\x01", 8787)
    v6 = peer.address_pair(("::1", 40000, 0, 0), ("::1", 8787, 0, 0))
    assert v6 is not None and v6.family == socket.AF_INET6 and v6.local == b"\x00" * 15 + b"\x01"


def test_address_pair_of_nonsense_is_none() -> None:
    """Unparseable or mixed-family addresses give no pair (and so an unknown uid)."""
    assert peer.address_pair(None, None) is None
    assert peer.address_pair(("not-an-ip", 1), ("127.0.0.1", 2)) is None
    assert peer.address_pair(("::1", 1, 0, 0), ("127.0.0.1", 2)) is None


def _proc_line(local: str, remote: str, state: int, uid: int) -> str:
    return f"   0: {local} {remote} {state:02X} 00000000:00000000 00:00000000 00000000  {uid:>5}        0 12345 1"


_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"


def test_proc_net_uid_finds_the_connecting_socket_by_both_ends() -> None:
    """The line whose local end is the peer and remote end is us gives the uid; the accepted socket's mirror line does not."""
    peer_end, our_end = "0100007F:9C40", "0100007F:2253"
    table = "\n".join(
        [
            _HEADER,
            _proc_line(our_end, "00000000:0000", 0x0A, 500),  # our listener
            _proc_line(our_end, peer_end, 0x01, 500),  # our accepted socket
            _proc_line(peer_end, our_end, 0x01, 1001),  # the client's socket
        ]
    ).encode()
    assert peer.proc_net_uid(table, peer_end, our_end) == 1001
    assert peer.proc_net_uid(table, "0100007F:9C41", our_end) is None


def test_proc_net_uid_ignores_time_wait_and_listen_lines() -> None:
    """TIME_WAIT lines carry uid 0 and LISTEN lines are not a peer: neither counts as a caller."""
    peer_end, our_end = "0100007F:9C40", "0100007F:2253"
    for state in (0x06, 0x0A):
        table = (_HEADER + "\n" + _proc_line(peer_end, our_end, state, 0)).encode()
        assert peer.proc_net_uid(table, peer_end, our_end) is None


def test_proc_net_lookup_reads_tcp6_for_an_ipv4_mapped_client() -> None:
    """An AF_INET6 client connected to an IPv4 listener is in tcp6, its ends IPv4-mapped."""
    pair = peer.AddressPair(socket.AF_INET, b"\x7f\x00\x00\x01", 40000, b"\x7f\x00\x00\x01", 8787)
    mapped = b"\x00" * 10 + b"\xff\xff\x7f\x00\x00\x01"
    line = _proc_line(peer.proc_net_address(mapped, 40000), peer.proc_net_address(mapped, 8787), 1, 1002)
    tables = {"/proc/net/tcp": _HEADER.encode(), "/proc/net/tcp6": (_HEADER + "\n" + line).encode()}
    assert peer.ProcNet(tables.get).uid(pair) == peer.PeerUid(1002)
    missing = peer.ProcNet({"/proc/net/tcp": _HEADER.encode()}.get).uid(pair)
    assert missing.uid is None and "not in this network namespace" in missing.reason
    assert "cannot be read" in peer.ProcNet(lambda _path: None).uid(pair).reason


def _diag_answer(pair: peer.AddressPair, sequence: int, *, state: int = 1, uid: int = 1001, family: int = 0) -> bytes:
    sockid = peer.sock_diag_request(pair, sequence)[16 + 8 :]
    body = struct.pack("=BBBB", family or pair.family, state, 0, 0) + sockid + struct.pack("=IIIII", 0, 0, 0, uid, 99)
    return struct.pack("=IHHII", 16 + len(body), 20, 0, sequence, 0) + body


PAIR = peer.AddressPair(socket.AF_INET, b"\x7f\x00\x00\x01", 40000, b"\x7f\x00\x00\x01", 8787)


def test_sock_diag_request_names_the_connecting_socket() -> None:
    """The request asks for source = the peer's end, destination = ours, ports in network order, no cookie."""
    message = peer.sock_diag_request(PAIR, 7)
    length, kind, flags, sequence, _pid = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence) == (len(message), 20, 1, 7)
    family, protocol = message[16], message[17]
    assert (family, protocol) == (socket.AF_INET, socket.IPPROTO_TCP)
    sport, dport = struct.unpack_from("!HH", message, 24)
    assert (sport, dport) == (40000, 8787)
    assert message[28:32] == PAIR.local and message[44:48] == PAIR.remote
    assert message[-8:] == b"\xff" * 8


def test_sock_diag_answer_gives_the_uid_of_a_live_connection() -> None:
    """An answer for the asked sequence and ends, in a connected state, gives its uid."""
    assert peer.sock_diag_answer(_diag_answer(PAIR, 3), PAIR, 3) == peer.PeerUid(1001)


def test_sock_diag_answer_to_another_request_is_skipped() -> None:
    """A late answer with another sequence number is not taken for this one."""
    assert peer.sock_diag_answer(_diag_answer(PAIR, 2), PAIR, 3) is None


def test_sock_diag_time_wait_and_listener_answers_are_unknown() -> None:
    """A TIME_WAIT socket (uid 0 in the kernel's answer) or a listener on the peer's port is not the caller."""
    time_wait = peer.sock_diag_answer(_diag_answer(PAIR, 3, state=6, uid=0), PAIR, 3)
    assert time_wait is not None and time_wait.uid is None
    listener = dataclasses.replace(PAIR, remote=b"\x00" * 4, remote_port=0)
    answer = peer.sock_diag_answer(_diag_answer(listener, 3, state=10, uid=0), PAIR, 3)
    assert answer is not None and answer.uid is None


def test_sock_diag_answer_from_an_ipv6_socket_on_an_ipv4_connection() -> None:
    """An AF_INET6 client on an IPv4 connection is reported with IPv4-mapped ends: still the caller."""
    mapped = peer.AddressPair(
        socket.AF_INET, b"\x00" * 10 + b"\xff\xff" + PAIR.local, 40000, b"\x00" * 10 + b"\xff\xff" + PAIR.remote, 8787
    )
    answer = _diag_answer(mapped, 3, family=socket.AF_INET6)
    assert peer.sock_diag_answer(answer, PAIR, 3) == peer.PeerUid(1001)


def test_sock_diag_not_found_is_unknown() -> None:
    """ENOENT (no such socket in this network namespace) is an unknown uid with a reason."""
    error = struct.pack("=IHHII", 36, 2, 0, 3, 0) + struct.pack("=i", -2) + b"\x00" * 16
    answer = peer.sock_diag_answer(error, PAIR, 3)
    assert answer is not None and answer.uid is None and "not in this network namespace" in answer.reason


# -- the refusal log ------------------------------------------------------------------------


def test_refusals_are_logged_once_a_minute_per_uid(caplog: pytest.LogCaptureFixture) -> None:
    """Repeated refusals of one uid give one line a minute, which then counts the quiet ones; other uids get their own."""
    clock = FakeClock(1000.0)
    refusals = RefusalLog(clock, interval=60.0)
    other = Caller(1001, False)
    assert refusals.refused(other)
    assert not refusals.refused(other)
    assert not refusals.refused(other)
    assert refusals.refused(Caller(1002, False))
    assert refusals.refused(Caller(None, False, "the socket is gone"))
    clock.advance(59.9)
    assert not refusals.refused(other)
    clock.advance(0.2)
    assert refusals.refused(other)
    lines = [record.getMessage() for record in caplog.records if record.name == "sidecar.callers"]
    assert len(lines) == 4
    assert "uid 1001" in lines[0] and "uid 1002" in lines[1] and "could not be found: the socket is gone" in lines[2]
    assert "3 more since the last line" in lines[3]


def test_caller_detail_names_the_uid_or_why_it_is_unknown() -> None:
    """The 403 detail names the uid, or the reason none was found."""
    assert "uid 1001" in Caller(1001, False).detail()
    assert "could not be found (no table)" in Caller(None, False, "no table").detail()


# -- the key file ----------------------------------------------------------------------------


def test_key_is_made_on_first_use_0600_and_at_least_128_bits(tmp_path: Path) -> None:
    """The first ``ensure`` writes a fresh 0600 key; later ones return the same key."""
    file = KeyFile(tmp_path / "store" / ("tokens.json" + KEY_SUFFIX))
    key = file.ensure()
    assert len(key) >= 43  # 32 random bytes, base64url
    assert stat.S_IMODE(os.stat(file.path).st_mode) == 0o600
    assert file.path.read_bytes().strip() == key
    assert file.ensure() == key
    assert KeyFile(file.path).ensure() != KeyFile(tmp_path / "other").ensure()


def test_rotate_replaces_the_key_atomically(tmp_path: Path) -> None:
    """``rotate`` writes a different key with a new inode (readers never see a half-written file)."""
    file = KeyFile(tmp_path / "tokens.json.client-key")
    old = file.ensure()
    inode = os.stat(file.path).st_ino
    new = file.rotate()
    assert new != old and file.read() == new
    assert os.stat(file.path).st_ino != inode
    assert stat.S_IMODE(os.stat(file.path).st_mode) == 0o600
    assert [path.name for path in tmp_path.iterdir()] == [file.path.name]  # no temp file left


def test_a_loosened_key_file_is_tightened(tmp_path: Path) -> None:
    """A key file someone made group-readable goes back to 0600 when read."""
    file = KeyFile(tmp_path / "k")
    file.ensure()
    os.chmod(file.path, 0o644)
    file.read()
    assert stat.S_IMODE(os.stat(file.path).st_mode) == 0o600


def test_a_damaged_key_file_is_an_error_that_never_quotes_it(tmp_path: Path) -> None:
    """A short or odd key is refused with the file's name, never its content."""
    path = tmp_path / "k"
    path.write_text("short-secret-value\n")
    with pytest.raises(KeyFileError) as raised:
        KeyFile(path).read()
    assert str(path) in str(raised.value) and "short-secret-value" not in str(raised.value)
    path.write_text("has spaces " * 5)
    with pytest.raises(KeyFileError):
        KeyFile(path).read()


def test_a_provided_key_file_is_read_never_written(tmp_path: Path) -> None:
    """A Secret's key (SIDECAR_CLIENT_KEY_SECRET_FILE) is used as is: missing is an error, rotate refuses."""
    path = tmp_path / "secret" / "client-key"
    file = key_file(str(tmp_path / "tokens.json"), {SECRET_FILE_VARIABLE: str(path)})
    assert isinstance(file, KeyFile) and file.provided and file.path == path
    with pytest.raises(KeyFileError, match="does not exist"):
        file.ensure()
    path.parent.mkdir()
    path.write_text("A" * 40 + "\n")
    os.chmod(path, 0o644)  # a Secret volume's usual mode: left alone
    assert file.ensure() == b"A" * 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(KeyFileError, match="replace that file"):
        file.rotate()


def test_key_file_is_beside_the_store_unless_a_secret_is_named(tmp_path: Path) -> None:
    """``<store>.client-key`` for a file store, the login's record for a Redis store; a named Secret wins."""
    beside = key_file("/var/lib/sidecar/tokens.json", {})
    assert isinstance(beside, KeyFile) and beside.path == Path("/var/lib/sidecar/tokens.json.client-key")
    assert (
        key_file("redis://:pw@cache:6379/0?key=team", {}).where
        == "the record of redis://:***@cache:6379/0 (login team)"
    )
    assert key_file("redis://cache:6379/0", {SECRET_FILE_VARIABLE: "/run/secrets/k"}).provided


def test_live_key_sees_a_rotation_after_at_most_one_second(tmp_path: Path) -> None:
    """serve's key changes on the first look after a second has passed, not before."""
    monotonic = FakeClock(100.0)
    file = KeyFile(tmp_path / "k")
    old = file.ensure()
    live = LiveKey(file, monotonic=monotonic)
    assert live.current() == old
    new = file.rotate()
    monotonic.advance(0.5)
    assert live.current() == old
    monotonic.advance(0.5)
    assert live.current() == new


def test_live_key_is_gone_while_the_file_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A deleted key file leaves no key (logged once, by name) until a key is back."""
    monotonic = FakeClock(100.0)
    file = KeyFile(tmp_path / "k")
    file.ensure()
    live = LiveKey(file, monotonic=monotonic)
    file.path.unlink()
    for _ in range(3):
        monotonic.advance(1.0)
        assert live.current() is None
    back = file.ensure()
    monotonic.advance(1.0)
    assert live.current() == back
    messages = [record.getMessage() for record in caplog.records if record.name == "sidecar.callers"]
    assert len(messages) == 2 and "does not exist" in messages[0] and "holds a key again" in messages[1]
    assert not any(back.decode() in message for message in messages)


class _LateReader(KeyFile):
    """A key file whose first read misses a key another process is writing at that moment."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0

    def read(self) -> bytes | None:
        self.reads += 1
        return None if self.reads == 1 else super().read()


def test_ensure_keeps_a_key_another_process_made_first(tmp_path: Path) -> None:
    """When another process makes the first key between our read and our write, its key stays and is ours too."""
    theirs = KeyFile(tmp_path / "k").ensure()
    late = _LateReader(tmp_path / "k")
    assert late.ensure() == theirs
    assert KeyFile(tmp_path / "k").read() == theirs
    assert [path.name for path in tmp_path.iterdir()] == ["k"]


def test_the_key_files_missing_directories_are_made_0700(tmp_path: Path) -> None:
    """A first key for a store not yet made creates its directories 0700, as the store would."""
    file = KeyFile(tmp_path / "a" / "b" / "tokens.json.client-key")
    file.ensure()
    for directory in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


# -- what status says --------------------------------------------------------------------------


def test_status_says_which_check_is_in_force() -> None:
    """unix-peercred for a socket, the TCP lookup's name, ``none`` where uids cannot be found, ``off`` for ``any``."""
    allowed = resolve("alice")
    lookup = peer.ProcNet()
    assert describe_policy(allowed, "off", lookup, "unix:/run/s.sock", None)["peerCheck"] == peer.UNIX_PEERCRED
    assert describe_policy(allowed, "off", lookup, "127.0.0.1:8787", None)["peerCheck"] == peer.TCP_PROC_NET
    nowhere = describe_policy(allowed, "off", None, "127.0.0.1:8787", None)
    assert nowhere["peerCheck"] == peer.NO_CHECK
    assert "every connection is refused" in describe_line(nowhere)
    assert describe_policy(resolve("any"), "required", lookup, "127.0.0.1:8787", None)["peerCheck"] == "off"


def test_status_names_the_key_file_only_when_keys_are_on(tmp_path: Path) -> None:
    """The key file's path (never its content) appears when client_key is optional or required."""
    file = KeyFile(tmp_path / "k")
    key = file.ensure().decode()
    on = describe_policy(resolve(), "required", None, "127.0.0.1:1", file.where)
    assert on["clientKeyFile"] == str(file.path) and key not in repr(on) + describe_line(on)
    assert describe_policy(resolve(), "off", None, "127.0.0.1:1", file.where)["clientKeyFile"] is None

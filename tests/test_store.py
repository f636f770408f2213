"""The token file: round trips, modes, atomic writes, corrupt files, the lock."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.errors import StoreError
from sidecar.store.file import MAX_STORE_BYTES, TokenFile
from sidecar.tokens import TokenPair, needs_refresh

# 2023-11-14T22:13:20Z: a fixed "now"; no test reads the clock for token values.
NOW = 1_700_000_000.0

PAIR = TokenPair(
    access_token="at-1",
    refresh_token="rt-1",
    api_url="https://cloud.example/cloud",
    # Half a second is exact in binary and survives the millisecond format.
    expires_at=NOW + 3600.5,
    obtained_at=NOW,
)

# A child process that takes the store lock, says so, and holds it until told
# on stdin.  "waiting" is printed just before it blocks in acquire_lock().
LOCK_CHILD = """
import sys
from sidecar.store.file import TokenFile
print("waiting", flush=True)
fd = TokenFile(sys.argv[1]).acquire_lock()
print("locked", flush=True)
sys.stdin.readline()
TokenFile.release_lock(fd)
print("released", flush=True)
"""
# Generous: only reached when something is broken, and a slow CI box may need it.
CHILD_TIMEOUT = 10.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_raw(path: Path, document: object, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    os.chmod(path, mode)


def _temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# --- round trip and format ------------------------------------------------------


def test_written_pair_reads_back_equal(tmp_path: Path) -> None:
    """A pair written to the store is read back field for field."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    snapshot = store.read()
    assert (snapshot.pair, snapshot.problem) == (PAIR, None)


def test_file_uses_the_desktop_apps_camel_case_fields(tmp_path: Path) -> None:
    """The file holds accessToken, refreshToken, apiUrl and ISO 8601 UTC expiresAt/obtainedAt."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    assert json.loads(store.path.read_text()) == {
        "accessToken": "at-1",
        "refreshToken": "rt-1",
        "apiUrl": "https://cloud.example/cloud",
        "expiresAt": "2023-11-14T23:13:20.500Z",
        "obtainedAt": "2023-11-14T22:13:20.000Z",
    }


def test_unknown_fields_survive_a_rewrite(tmp_path: Path) -> None:
    """Fields sidecar does not know are kept when the pair is rewritten."""
    store = TokenFile(tmp_path / "tokens.json")
    _write_raw(store.path, {"refreshToken": "rt-1", "deviceId": "dev-7", "profile": {"tags": [1, 2]}})
    pair = store.read().pair
    assert pair is not None
    store.write(dataclasses.replace(pair, access_token="at-2", refresh_token="rt-2"))
    document = json.loads(store.path.read_text())
    assert (document["deviceId"], document["profile"], document["refreshToken"]) == ("dev-7", {"tags": [1, 2]}, "rt-2")


# --- modes ------------------------------------------------------------------------


def test_new_store_file_is_mode_0600(tmp_path: Path) -> None:
    """A store file sidecar creates is readable by its owner only."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    assert _mode(store.path) == 0o600


def test_rewrite_tightens_a_0644_store_to_0600(tmp_path: Path) -> None:
    """Rewriting a store that someone left world-readable leaves it 0600."""
    store = TokenFile(tmp_path / "tokens.json")
    _write_raw(store.path, {"refreshToken": "rt-0"}, mode=0o644)
    store.write(PAIR)
    assert _mode(store.path) == 0o600


def test_read_tightens_a_0644_store_to_0600(tmp_path: Path) -> None:
    """Reading a world-readable store tightens it to 0600."""
    store = TokenFile(tmp_path / "tokens.json")
    _write_raw(store.path, {"refreshToken": "rt-0"}, mode=0o644)
    store.read()
    assert _mode(store.path) == 0o600


def test_missing_directories_are_created_0700(tmp_path: Path) -> None:
    """Every directory sidecar creates on the way to the store is mode 0700."""
    store = TokenFile(tmp_path / "a" / "b" / "c" / "tokens.json")
    store.write(PAIR)
    modes = [_mode(tmp_path / "a"), _mode(tmp_path / "a" / "b"), _mode(tmp_path / "a" / "b" / "c")]
    assert modes == [0o700, 0o700, 0o700]


def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    """A directory that already exists keeps its mode when the store is written into it."""
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o755)
    TokenFile(directory / "tokens.json").write(PAIR)
    assert _mode(directory) == 0o755


# --- atomic writes and temp files ------------------------------------------------


def test_begin_write_opens_a_temp_file_in_the_store_directory(tmp_path: Path) -> None:
    """begin_write puts one hidden .tmp file beside the store before anything is committed."""
    store = TokenFile(tmp_path / "tokens.json")
    pending = store.begin_write()
    try:
        temps = _temp_files(tmp_path)
        assert len(temps) == 1 and temps[0].startswith(".tokens.json.")
    finally:
        pending.abort()


def test_temp_file_is_gone_after_commit(tmp_path: Path) -> None:
    """After commit the directory holds the store and no temp file."""
    store = TokenFile(tmp_path / "tokens.json")
    store.begin_write().commit(PAIR)
    assert os.listdir(tmp_path) == ["tokens.json"]


def test_temp_file_is_gone_after_abort(tmp_path: Path) -> None:
    """An aborted write leaves the directory as it was: no temp file, no store."""
    store = TokenFile(tmp_path / "tokens.json")
    store.begin_write().abort()
    assert os.listdir(tmp_path) == []


def test_abort_keeps_the_old_store(tmp_path: Path) -> None:
    """Aborting a write leaves the previous pair in place, byte for byte."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    before = store.path.read_bytes()
    store.begin_write().abort()
    assert store.path.read_bytes() == before


def test_repeated_writes_leave_no_temp_files(tmp_path: Path) -> None:
    """Many writes in a row leave only the store in its directory."""
    store = TokenFile(tmp_path / "tokens.json")
    for number in range(5):
        store.write(dataclasses.replace(PAIR, refresh_token=f"rt-{number}"))
    assert (_temp_files(tmp_path), os.listdir(tmp_path)) == ([], ["tokens.json"])


def test_commit_after_abort_raises_store_error(tmp_path: Path) -> None:
    """A finished PendingWrite cannot be committed, so a stale handle never overwrites the store."""
    pending = TokenFile(tmp_path / "tokens.json").begin_write()
    pending.abort()
    with pytest.raises(StoreError, match="already finished"):
        pending.commit(PAIR)


def test_second_commit_raises_store_error(tmp_path: Path) -> None:
    """A PendingWrite commits once; a second commit raises StoreError."""
    store = TokenFile(tmp_path / "tokens.json")
    pending = store.begin_write()
    pending.commit(PAIR)
    with pytest.raises(StoreError, match="already finished"):
        pending.commit(dataclasses.replace(PAIR, refresh_token="rt-other"))


def test_failed_serialization_raises_store_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """A pair that cannot be serialized fails the write with StoreError and no temp file left."""
    store = TokenFile(tmp_path / "tokens.json")
    pair = dataclasses.replace(PAIR, expires_at=1e19)
    try:
        with pytest.raises(StoreError):
            store.write(pair)
    finally:
        leftovers = _temp_files(tmp_path)
    assert leftovers == []


def test_parent_that_is_a_file_makes_begin_write_raise_a_one_line_store_error(tmp_path: Path) -> None:
    """A store path under a regular file fails begin_write with a one-line StoreError."""
    (tmp_path / "afile").write_text("not a directory")
    store = TokenFile(tmp_path / "afile" / "tokens.json")
    with pytest.raises(StoreError) as caught:
        store.begin_write()
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "afile") in message


def test_parent_that_is_a_file_makes_write_leave_nothing_behind(tmp_path: Path) -> None:
    """A failed write under a regular file creates no file and changes nothing."""
    (tmp_path / "afile").write_text("not a directory")
    store = TokenFile(tmp_path / "afile" / "tokens.json")
    with pytest.raises(StoreError):
        store.write(PAIR)
    assert (os.listdir(tmp_path), (tmp_path / "afile").read_text()) == (["afile"], "not a directory")


# --- reading: missing, corrupt, no expiry ------------------------------------------


def test_missing_store_reads_as_logged_out_without_a_problem(tmp_path: Path) -> None:
    """No file means no pair, no problem and no version."""
    snapshot = TokenFile(tmp_path / "tokens.json").read()
    assert (snapshot.pair, snapshot.problem, snapshot.version) == (None, None, None)


CORRUPT = {
    "bad-json": (b'{"refreshToken": "rt-SECRET-1", "accessToken": "at-SECRET-1"', "not valid JSON"),
    "json-list": (b'["rt-SECRET-1", "at-SECRET-1"]', "not a JSON object"),
    "refresh-missing": (b'{"accessToken": "at-SECRET-1"}', "refreshToken is missing or not a string"),
    "refresh-number": (
        b'{"refreshToken": 731984265, "accessToken": "at-SECRET-1"}',
        "refreshToken is missing or not a string",
    ),
    "access-number": (b'{"refreshToken": "rt-SECRET-1", "accessToken": 826491735}', "accessToken is not a string"),
    "not-utf8": (b'{"refreshToken": "rt-SECRET-1\xff\xfe"}', "not valid JSON"),
}


@pytest.mark.parametrize(("content", "cause"), CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_store_reads_as_logged_out_with_the_cause(tmp_path: Path, content: bytes, cause: str) -> None:
    """A corrupt file gives no pair and a problem that names the cause."""
    store = TokenFile(tmp_path / "tokens.json")
    store.path.write_bytes(content)
    snapshot = store.read()
    assert snapshot.pair is None
    assert snapshot.problem is not None and snapshot.problem.endswith(f"is corrupt: {cause}")


@pytest.mark.parametrize(("content", "cause"), CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_store_problem_never_quotes_the_file(tmp_path: Path, content: bytes, cause: str) -> None:
    """The problem text for a corrupt file contains none of the file's values."""
    store = TokenFile(tmp_path / "tokens.json")
    store.path.write_bytes(content)
    problem = store.read().problem or ""
    for secret in ("SECRET", "731984265", "826491735"):
        assert secret not in problem


@pytest.mark.parametrize(("content", "cause"), CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_store_is_not_deleted_by_read(tmp_path: Path, content: bytes, cause: str) -> None:
    """read() leaves a corrupt file in place, byte for byte, for the user to inspect."""
    store = TokenFile(tmp_path / "tokens.json")
    store.path.write_bytes(content)
    store.read()
    assert store.path.read_bytes() == content


def test_oversized_store_is_corrupt(tmp_path: Path) -> None:
    """A file bigger than MAX_STORE_BYTES is reported as too large, not parsed."""
    store = TokenFile(tmp_path / "tokens.json")
    store.path.write_bytes(b" " * (MAX_STORE_BYTES + 1))
    snapshot = store.read()
    assert (snapshot.pair, snapshot.problem) == (None, f"token store {store.path} is corrupt: too large")


def test_directory_at_store_path_is_a_problem(tmp_path: Path) -> None:
    """A directory where the store should be gives no pair and says it is not a regular file."""
    store = TokenFile(tmp_path / "tokens.json")
    store.path.mkdir()
    snapshot = store.read()
    assert (snapshot.pair, snapshot.problem) == (None, f"token store {store.path} is not a regular file")


def test_store_without_expiry_reads_as_a_pair_that_refreshes(tmp_path: Path) -> None:
    """A pair stored before expiry was captured is usable, has no expiry, and needs a refresh."""
    store = TokenFile(tmp_path / "tokens.json")
    _write_raw(store.path, {"accessToken": "at-1", "refreshToken": "rt-1"})
    snapshot = store.read()
    assert snapshot.pair is not None and snapshot.problem is None
    assert snapshot.pair.expires_at is None
    assert needs_refresh(snapshot.pair, NOW, 120.0) is True


@pytest.mark.parametrize("expires_at", ["next tuesday", 1_700_003_600, None, ""])
def test_store_with_unparseable_expiry_reads_as_a_pair_without_expiry(tmp_path: Path, expires_at: object) -> None:
    """An expiresAt that is not an ISO 8601 string yields a pair with expires_at None, not a corrupt store."""
    store = TokenFile(tmp_path / "tokens.json")
    _write_raw(store.path, {"accessToken": "at-1", "refreshToken": "rt-1", "expiresAt": expires_at})
    snapshot = store.read()
    assert snapshot.pair is not None and snapshot.problem is None
    assert (snapshot.pair.refresh_token, snapshot.pair.expires_at) == ("rt-1", None)


# --- clear and signature -------------------------------------------------------------


def test_clear_deletes_the_store_and_reports_it(tmp_path: Path) -> None:
    """clear() removes the file and returns True."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    assert store.clear() is True
    assert not store.path.exists()


def test_clear_without_a_store_returns_false(tmp_path: Path) -> None:
    """A second clear() finds nothing to delete and returns False."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    store.clear()
    assert store.clear() is False


def test_signature_is_none_without_a_store(tmp_path: Path) -> None:
    """A missing store has no signature."""
    assert TokenFile(tmp_path / "tokens.json").signature() is None


def test_signature_changes_inode_on_every_write(tmp_path: Path) -> None:
    """Each atomic write replaces the file, so the signature's inode changes even for the same bytes."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    first = store.signature()
    store.write(PAIR)
    second = store.signature()
    assert first is not None and second is not None
    assert first[0] != second[0]


def test_read_reports_the_current_signature(tmp_path: Path) -> None:
    """The snapshot carries the same signature that signature() reports for the file it read."""
    store = TokenFile(tmp_path / "tokens.json")
    store.write(PAIR)
    assert (
        store.read().version
        == store.signature()
        == (
            os.stat(store.path).st_ino,
            os.stat(store.path).st_mtime_ns,
            os.stat(store.path).st_size,
        )
    )


# --- a store path that is a symbolic link ---------------------------------------------


def _linked_store(tmp_path: Path) -> tuple[TokenFile, Path]:
    """A store whose path is a symlink to another program's token file (relative, as ``ln -s`` makes it)."""
    target = tmp_path / "desktop-app" / "tokens.json"
    _write_raw(target, {"accessToken": "at-app", "refreshToken": "rt-app", "appSetting": 7})
    link = tmp_path / "sidecar" / "tokens.json"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "desktop-app" / "tokens.json")
    return TokenFile(link), target


def test_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    """The rotated pair lands in the link's target (another program reads it there); the link stays a link."""
    store, target = _linked_store(tmp_path)
    before = store.read().pair
    assert before is not None
    rotated = dataclasses.replace(PAIR, extra=before.extra)
    store.write(rotated)
    assert store.path.is_symlink()
    document = json.loads(target.read_text())
    assert (document["accessToken"], document["refreshToken"], document["appSetting"]) == ("at-1", "rt-1", 7)
    assert _mode(target) == 0o600
    assert _temp_files(store.path.parent) == _temp_files(target.parent) == []
    assert store.read().pair == rotated


def test_clearing_a_symlinked_store_deletes_the_target_and_the_next_write_goes_there_again(tmp_path: Path) -> None:
    """Logout through a link removes the token file it points at; a new login writes there, through the same link."""
    store, target = _linked_store(tmp_path)
    assert store.clear() is True
    assert store.path.is_symlink() and not target.exists()
    assert store.read().pair is None
    store.write(PAIR)
    assert store.path.is_symlink()
    assert json.loads(target.read_text())["refreshToken"] == "rt-1"


# --- the cross-process lock ----------------------------------------------------------


def test_lock_file_is_created_0600_beside_the_store(tmp_path: Path) -> None:
    """acquire_lock creates <store>.lock with mode 0600."""
    store = TokenFile(tmp_path / "tokens.json")
    fd = store.acquire_lock()
    try:
        assert (store.lock_path, _mode(store.lock_path)) == (tmp_path / "tokens.json.lock", 0o600)
    finally:
        TokenFile.release_lock(fd)


def _spawn_lock_child(store: TokenFile) -> subprocess.Popen[bytes]:
    # Unbuffered bytes, so readline() never swallows a later line that select() should see.
    return subprocess.Popen(
        [sys.executable, "-c", LOCK_CHILD, str(store.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )


def _blocked_in_flock(pid: int, inode: int) -> bool:
    """True when /proc/locks lists ``pid`` as waiting for an flock on ``inode``."""
    with open("/proc/locks") as handle:
        for line in handle:
            fields = line.split()
            if (
                "->" in fields
                and "FLOCK" in fields
                and str(pid) in fields
                and any(field.endswith(f":{inode}") for field in fields)
            ):
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks to see a blocked waiter")
def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    """A second process blocks in acquire_lock while the first holds the lock, and gets it once released."""
    store = TokenFile(tmp_path / "tokens.json")
    first = _spawn_lock_child(store)
    second: subprocess.Popen[bytes] | None = None
    try:
        assert first.stdout is not None and first.stdin is not None
        assert first.stdout.readline() == b"waiting\n"
        assert first.stdout.readline() == b"locked\n"

        second = _spawn_lock_child(store)
        assert second.stdout is not None and second.stdin is not None
        assert second.stdout.readline() == b"waiting\n"
        inode = os.stat(store.lock_path).st_ino
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not _blocked_in_flock(second.pid, inode):
            assert time.monotonic() < deadline, "second process never blocked on the lock"
            # A bounded wait on the child, not a sleep: it must not finish while the lock is held.
            with pytest.raises(subprocess.TimeoutExpired):
                second.wait(timeout=0.01)
        readable, _, _ = select.select([second.stdout], [], [], 0)
        assert readable == [], "second process printed while the first held the lock"

        first.stdin.write(b"\n")
        first.stdin.flush()
        assert first.stdout.readline() == b"released\n"
        assert second.stdout.readline() == b"locked\n"

        second.stdin.write(b"\n")
        second.stdin.flush()
        assert second.stdout.readline() == b"released\n"
        assert (first.wait(timeout=CHILD_TIMEOUT), second.wait(timeout=CHILD_TIMEOUT)) == (0, 0)
    finally:
        for child in (first, second):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(timeout=CHILD_TIMEOUT)

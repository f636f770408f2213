"""The token file: atomic writes, strict modes, the cross-process lock, re-reads.

The file is JSON in the desktop app's camelCase shape (``accessToken``,
``refreshToken``, ``apiUrl``, ``expiresAt``, ``obtainedAt``); fields sidecar
does not know are kept on rewrite.  Every write goes to a temp file in the
same directory, is fsynced and renamed over the old file, so a crash at any
instant leaves the old pair or the new one.  This module decides nothing about
expiry.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import glob
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from sidecar.errors import StoreError
from sidecar.tokens import TokenPair, format_timestamp, parse_timestamp

FILE_MODE = 0o600
DIR_MODE = 0o700
# A desktop-app store is a few hundred bytes; anything this big is not ours.
MAX_STORE_BYTES = 1024 * 1024
# A temp file this old belongs to no live writer: writes take milliseconds,
# and a refresh holding one open is bounded by the token endpoint timeouts.
STALE_TEMP_SECONDS = 3600.0
_KNOWN = ("accessToken", "refreshToken", "apiUrl", "expiresAt", "obtainedAt")

# (inode, mtime_ns, size): every atomic replace changes the inode.
Signature = tuple[int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What one read of the store found.

    ``pair`` is None when there is no usable pair; ``problem`` then says why
    when the file exists but cannot be used (never quoting its content).
    """

    pair: TokenPair | None
    problem: str | None
    signature: Signature | None


def _strerror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def parse_store(data: bytes) -> TokenPair:
    """The pair in a store file's bytes; ValueError with a reason if unusable."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    refresh = document.get("refreshToken")
    if not isinstance(refresh, str) or not refresh:
        raise ValueError("refreshToken is missing or not a string")
    access = document.get("accessToken")
    if access is not None and not isinstance(access, str):
        raise ValueError("accessToken is not a string")
    api_url = document.get("apiUrl")
    if api_url is not None and not isinstance(api_url, str):
        raise ValueError("apiUrl is not a string")
    return TokenPair(
        access_token=access or None,
        refresh_token=refresh,
        api_url=api_url or None,
        # An expiry that does not parse means "expired": the pair still refreshes.
        expires_at=parse_timestamp(document.get("expiresAt")),
        obtained_at=parse_timestamp(document.get("obtainedAt")),
        extra={key: value for key, value in document.items() if key not in _KNOWN},
    )


def serialize_store(pair: TokenPair) -> bytes:
    document: dict[str, Any] = dict(pair.extra)
    if pair.access_token is not None:
        document["accessToken"] = pair.access_token
    document["refreshToken"] = pair.refresh_token
    if pair.api_url is not None:
        document["apiUrl"] = pair.api_url
    if pair.expires_at is not None:
        document["expiresAt"] = format_timestamp(pair.expires_at)
    if pair.obtained_at is not None:
        document["obtainedAt"] = format_timestamp(pair.obtained_at)
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


class PendingWrite:
    """A temp file opened before a refresh spends the old refresh token.

    Opening it first proves the directory is writable, so a refresh never
    spends a single-use token whose successor could not be saved.
    """

    def __init__(self, target: Path) -> None:
        self._target = target
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise StoreError(f"cannot write token store in {target.parent}: {_strerror(exc)}") from None
        self._fd: int | None = fd
        self._temp = Path(name)

    def commit(self, pair: TokenPair) -> None:
        """Write ``pair``, fsync, and rename over the store."""
        fd = self._fd
        if fd is None:
            raise StoreError("token store write already finished")
        self._fd = None
        try:
            try:
                data = serialize_store(pair)
            except (TypeError, ValueError, OverflowError) as exc:
                raise OSError(0, f"cannot encode the token pair ({type(exc).__name__})") from None
            try:
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._temp, self._target)
        except OSError as exc:
            self._discard()
            raise StoreError(f"cannot write token store {self._target}: {_strerror(exc)}") from None
        _fsync_dir(self._target.parent)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._discard()

    def _discard(self) -> None:
        try:
            self._temp.unlink()
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some filesystems refuse, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TokenStore:
    """The token file at ``path`` and its lock file ``<path>.lock``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r})"

    def signature(self) -> Signature | None:
        """A cheap fingerprint of the file, or None when it does not exist."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def read(self) -> StoreSnapshot:
        """Read the store; never raises for a missing, unreadable or corrupt file."""
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the reader.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return StoreSnapshot(None, None, None)
        except OSError as exc:
            return StoreSnapshot(None, f"token store {self.path} cannot be read: {_strerror(exc)}", None)
        try:
            info = os.fstat(fd)
            signature = (info.st_ino, info.st_mtime_ns, info.st_size)
            if not stat.S_ISREG(info.st_mode):
                return StoreSnapshot(None, f"token store {self.path} is not a regular file", signature)
            if info.st_size > MAX_STORE_BYTES:
                return StoreSnapshot(None, f"token store {self.path} is corrupt: too large", signature)
            if stat.S_IMODE(info.st_mode) & 0o077:
                # Tighten a store someone else created with loose modes.
                try:
                    os.fchmod(fd, FILE_MODE)
                except OSError:
                    pass
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        except OSError as exc:
            return StoreSnapshot(None, f"token store {self.path} cannot be read: {_strerror(exc)}", None)
        finally:
            os.close(fd)
        try:
            pair = parse_store(data)
        except ValueError as exc:
            return StoreSnapshot(None, f"token store {self.path} is corrupt: {exc}", signature)
        return StoreSnapshot(pair, None, signature)

    def ensure_directory(self) -> None:
        """Create missing parent directories with mode 0700; existing ones stay as they are."""
        missing: list[Path] = []
        directory = self.path.parent
        while not directory.exists():
            missing.append(directory)
            if directory.parent == directory:
                break
            directory = directory.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=DIR_MODE)
                os.chmod(directory, DIR_MODE)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create directory {directory}: {_strerror(exc)}") from None

    def begin_write(self) -> PendingWrite:
        """Open the temp file for the next write; StoreError if that is impossible."""
        self.ensure_directory()
        self._sweep_stale_temp_files()
        return PendingWrite(self.path)

    def _sweep_stale_temp_files(self) -> None:
        """Remove temp files left by a process killed mid-refresh (they hold no token)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        try:
            candidates = list(self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"))
        except OSError:
            return
        for candidate in candidates:
            try:
                if candidate.stat().st_mtime < cutoff:
                    candidate.unlink()
            except OSError:
                pass

    def write(self, pair: TokenPair) -> None:
        """Atomically replace the store with ``pair`` (mode 0600)."""
        self.begin_write().commit(pair)

    def clear(self) -> bool:
        """Delete the store; True if there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete token store {self.path}: {_strerror(exc)}") from None
        _fsync_dir(self.path.parent)
        return True

    def acquire_lock(self) -> int:
        """Block until this process holds the exclusive lock; returns its descriptor."""
        self.ensure_directory()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {self.lock_path}: {_strerror(exc)}") from None
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                os.fchmod(fd, FILE_MODE)
        except OSError:
            pass
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fd
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                os.close(fd)
                raise StoreError(f"cannot lock {self.lock_path}: {_strerror(exc)}") from None

    @staticmethod
    def release_lock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

"""The token file: atomic writes, strict modes, the cross-process lock, re-reads.

``TokenFile`` is the file itself, with blocking calls: every write goes to a
temp file in the same directory, is fsynced and renamed over the old file,
so a crash at any instant leaves the old pair or the new one.  ``FileStore`` adapts it to the store interface, running the
blocking calls off the event loop and polling the ``flock`` lock until its
deadline.  This module decides nothing about expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import glob
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from sidecar.errors import StoreConflict, StoreError, StoreLockTimeout
from sidecar.store.document import parse_store, serialize_store
from sidecar.store.interface import StoreSnapshot, Version
from sidecar.tokens import TokenPair

FILE_MODE = 0o600
DIR_MODE = 0o700
# A desktop-app store is a few hundred bytes; anything this big is not ours.
MAX_STORE_BYTES = 1024 * 1024
# A temp file this old belongs to no live writer: writes take milliseconds,
# and a refresh holding one open is bounded by the token endpoint timeouts.
STALE_TEMP_SECONDS = 3600.0
# Polling the lock: quick at first (a refresh takes milliseconds), then at
# most this often, so waiting costs no thread and can be cancelled.
LOCK_POLL_FIRST = 0.005
LOCK_POLL_MAX = 0.05

# (inode, mtime_ns, size): every atomic replace changes the inode.
Signature = tuple[int, int, int]


def _strerror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


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
                    view = view[os.write(fd, view) :]
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


def _sweep_stale_temp_files(target: Path) -> None:
    """Remove temp files left beside ``target`` by a process killed mid-refresh (they hold no token)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    try:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))
    except OSError:
        return
    for candidate in candidates:
        try:
            if candidate.stat().st_mtime < cutoff:
                candidate.unlink()
        except OSError:
            pass


class TokenFile:
    """The token file at ``path`` and its lock file ``<path>.lock`` (blocking calls)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

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
            version = (info.st_ino, info.st_mtime_ns, info.st_size)
            if not stat.S_ISREG(info.st_mode):
                return StoreSnapshot(None, f"token store {self.path} is not a regular file", version)
            if info.st_size > MAX_STORE_BYTES:
                return StoreSnapshot(None, f"token store {self.path} is corrupt: too large", version)
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
            return StoreSnapshot(None, f"token store {self.path} is corrupt: {exc}", version)
        return StoreSnapshot(pair, None, version)

    def target(self) -> Path:
        """The file a write replaces: the store path, or where its symbolic link points (SPEC §2).

        Writing through keeps the link, so another program that reads the
        link's target (a desktop app's own token file) sees every rotation.
        """
        return Path(os.path.realpath(self.path)) if self.path.is_symlink() else self.path

    def ensure_directory(self, directory: Path | None = None) -> None:
        """Create missing directories up to ``directory`` (the store's) with mode 0700; existing ones stay as they are."""
        missing: list[Path] = []
        directory = directory or self.path.parent
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
        target = self.target()
        self.ensure_directory(target.parent)
        _sweep_stale_temp_files(target)
        return PendingWrite(target)

    def write(self, pair: TokenPair) -> None:
        """Atomically replace the store with ``pair`` (mode 0600)."""
        self.begin_write().commit(pair)

    def clear(self) -> bool:
        """Delete the store (a symbolic link's target, the link kept for the next login); True if there was one."""
        target = self.target()
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete token store {self.path}: {_strerror(exc)}") from None
        _fsync_dir(target.parent)
        return True

    def open_lock_file(self) -> int:
        """Open (creating it 0600 if needed) ``<path>.lock``; returns its descriptor."""
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
        return fd

    def try_lock(self, fd: int) -> bool:
        """Take the exclusive lock on ``fd`` if it is free; never blocks."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise StoreError(f"cannot lock {self.lock_path}: {_strerror(exc)}") from None

    def acquire_lock(self) -> int:
        """Block until this process holds the exclusive lock; returns its descriptor."""
        fd = self.open_lock_file()
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


class _FileWrite:
    """A prepared write to the file that commits only over the version it expects."""

    def __init__(self, file: TokenFile, pending: PendingWrite, expected: Version | None) -> None:
        self._file = file
        self._pending = pending
        self._expected = expected

    def _commit(self, pair: TokenPair) -> Version:
        if self._file.signature() != self._expected:
            self._pending.abort()
            raise StoreConflict(f"token store {self._file.path} changed since it was read")
        self._pending.commit(pair)
        signature = self._file.signature()
        assert signature is not None  # just written
        return signature

    async def commit(self, pair: TokenPair) -> Version:
        return await asyncio.to_thread(self._commit, pair)

    async def abort(self) -> None:
        await asyncio.to_thread(self._pending.abort)


class FileStore:
    """The store interface on a token file; blocking calls run in a worker thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.file = TokenFile(path)

    def __repr__(self) -> str:
        return f"FileStore({str(self.file.path)!r})"

    @property
    def description(self) -> str:
        return str(self.file.path)

    async def read(self) -> StoreSnapshot:
        return await asyncio.to_thread(self.file.read)

    async def changed_since(self, version: Version | None) -> bool:
        return await asyncio.to_thread(self.file.signature) != version

    async def begin_write(self, expected: Version | None) -> _FileWrite:
        pending = await asyncio.to_thread(self.file.begin_write)
        return _FileWrite(self.file, pending, expected)

    async def clear(self) -> bool:
        return await asyncio.to_thread(self.file.clear)

    @contextlib.asynccontextmanager
    async def refresh_lock(self, timeout: float) -> AsyncIterator[None]:
        """Hold ``<path>.lock``, polling for it until ``timeout`` seconds have passed.

        Polling instead of a blocking ``flock`` in a thread: a holder stopped
        with Ctrl-Z must cost waiters a bounded wait, and a cancelled waiter
        must not leave a thread that takes the lock later.
        """
        loop = asyncio.get_running_loop()
        fd = await asyncio.to_thread(self.file.open_lock_file)
        try:
            deadline = loop.time() + timeout
            pause = LOCK_POLL_FIRST
            while not self.file.try_lock(fd):
                if loop.time() >= deadline:
                    raise StoreLockTimeout(
                        f"the lock {self.file.lock_path} was held by another process for more than {timeout:g} s"
                    )
                await asyncio.sleep(pause)
                pause = min(LOCK_POLL_MAX, pause * 2)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield
        finally:
            TokenFile.release_lock(fd)

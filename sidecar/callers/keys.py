"""The local client key (SPEC §9): a file beside the store, made on first use, rotated, re-read by serve.

The key is 32 random bytes (256 bits) as URL-safe base64: 43 characters a
client can send as ``X-Sidecar-Key`` or ``Authorization: Bearer <key>``.
It lives in ``<store>.client-key`` (mode 0600, written atomically), or, when
a deployment hands one in (a Kubernetes or compose Secret), in the file
named by ``SIDECAR_CLIENT_KEY_SECRET_FILE``, which sidecar reads but never
writes.  ``LiveKey`` is serve's view: it looks at the file at most once a
second, so ``sidecar client-key --rotate`` (or an updated Secret volume)
takes effect at a running serve within a second.  Nothing here ever puts a
key in a message.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.errors import ConfigError

log = logging.getLogger("sidecar.callers")

# The variable naming a key file a deployment provides (read-only to sidecar).
SECRET_FILE_VARIABLE = "SIDECAR_CLIENT_KEY_SECRET_FILE"
KEY_SUFFIX = ".client-key"
# 32 bytes: twice SPEC §9's 128-bit floor, as long as the tokens it guards.
KEY_BYTES = 32
# A provided key must be at least this long: 32 base64 characters carry 192 bits, 32 hex characters 128.
MIN_KEY_CHARACTERS = 32
# A key file larger than this is not a key.
MAX_KEY_FILE_BYTES = 4096
# serve looks at the key file at most this often (seconds): a rotation is live within it.
RECHECK_SECONDS = 1.0
FILE_MODE = 0o600
# token68 (RFC 9110 §11.2), so the key works as a Bearer credential too.
_KEY_SHAPE = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")

Signature = tuple[int, int, int]


class KeyFileError(ConfigError):
    """The key file is missing, unreadable or holds no key; the message names the file, never its content."""


def new_key() -> bytes:
    return secrets.token_urlsafe(KEY_BYTES).encode("ascii")


def parse_key(data: bytes, where: Path | str) -> bytes:
    """The key in a key file's (or record's) bytes, surrounding whitespace dropped; KeyFileError if it is not one."""
    key = data.strip()
    if len(key) < MIN_KEY_CHARACTERS or not _KEY_SHAPE.fullmatch(key):
        raise KeyFileError(
            f"client key in {where} is no usable key (expected at least {MIN_KEY_CHARACTERS} characters of A-Z a-z 0-9 - . _ ~ + /)"
        )
    return key


class KeyFile:
    """The key file at ``path``; ``provided`` files (a deployment's Secret) are read, never written."""

    def __init__(self, path: Path, *, provided: bool = False) -> None:
        self.path = path
        self.provided = provided

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r}, provided={self.provided})"

    @property
    def where(self) -> str:
        return str(self.path)

    def signature(self) -> Signature | None:
        """(inode, mtime, size), or None when there is no file: every atomic replace changes it."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def read(self) -> bytes | None:
        """The key, or None when the file does not exist; KeyFileError when it cannot be used."""
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang serve.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyFileError(f"client key file {self.path} cannot be read: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"client key file {self.path} is not a regular file")
            if not self.provided and stat.S_IMODE(info.st_mode) & 0o077:
                # Ours, loosened by someone: tighten it, as the store does.
                try:
                    os.fchmod(fd, FILE_MODE)
                except OSError:
                    pass
            data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"client key file {self.path} cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"client key file {self.path} is too large to be a key")
        return parse_key(data, self.path)

    def ensure(self) -> bytes:
        """The key, made first if there is none yet (a provided file must exist)."""
        key = self.read()
        if key is not None:
            return key
        if self.provided:
            raise KeyFileError(f"{SECRET_FILE_VARIABLE}: {self.path} does not exist")
        try:
            self._install(new_key(), replace=False)
        except FileExistsError:
            pass  # another process made it first: theirs is the key
        key = self.read()
        if key is None:
            raise KeyFileError(f"client key file {self.path} vanished while it was being made")
        return key

    def rotate(self) -> bytes:
        """Replace the key with a new one; the old one stops working everywhere within a second."""
        if self.provided:
            raise KeyFileError(
                f"the client key comes from {SECRET_FILE_VARIABLE} ({self.path}): replace that file (the Secret) to rotate it"
            )
        key = new_key()
        self._install(key, replace=True)
        return key

    def _install(self, key: bytes, *, replace: bool) -> None:
        """Write ``key`` to a 0600 temp file beside the target, fsync it, then rename (or link, to never replace) it into place."""
        directory = self.path.parent
        try:
            _make_directories(directory)
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise KeyFileError(f"cannot write client key file {self.path}: {exc.strerror}") from None
        temp = Path(name)
        try:
            try:
                os.fchmod(fd, FILE_MODE)
                os.write(fd, key + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(temp, self.path)
            else:
                os.link(temp, self.path)  # FileExistsError when another process won the race
        except FileExistsError:
            raise
        except OSError as exc:
            raise KeyFileError(f"cannot write client key file {self.path}: {exc.strerror}") from None
        finally:
            try:
                temp.unlink()
            except OSError:
                pass


def _make_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700, as the store does; existing ones stay as they are."""
    missing: list[Path] = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)  # mkdir's mode is cut by the umask
        except FileExistsError:
            pass


class LiveKey:
    """serve's current key from a file: looked at again at most once every ``RECHECK_SECONDS``.

    The file is the truth: a key that is replaced stops working, and one
    that is deleted or damaged leaves no key at all (every request that
    needs one is refused) until a good one is back.  Each such change is
    logged once, by file name.
    """

    def __init__(
        self, file: KeyFile, *, monotonic: Callable[[], float] = time.monotonic, interval: float = RECHECK_SECONDS
    ) -> None:
        self.file = file
        self._monotonic = monotonic
        self._interval = interval
        self._key: bytes | None = None
        self._signature: Signature | None = None
        self._problem: str | None = None
        self._next_look = monotonic() + interval
        self._load()

    @property
    def where(self) -> str:
        return self.file.where

    def current(self) -> bytes | None:
        """The key as of at most ``interval`` seconds ago; None when the file holds none."""
        now = self._monotonic()
        if now >= self._next_look:
            self._next_look = now + self._interval
            if self.file.signature() != self._signature or self._problem is not None:
                self._load()
        return self._key

    def _load(self) -> None:
        self._signature = self.file.signature()
        problem: str | None
        try:
            key = self.file.read()
            problem = None if key is not None else f"client key file {self.file.path} does not exist"
        except KeyFileError as exc:
            key, problem = None, str(exc)
        if problem is not None and problem != self._problem:
            log.warning("%s; requests that need the client key are refused until it is back", problem)
        elif problem is None and self._problem is not None:
            log.warning("client key file %s holds a key again", self.file.path)
        self._key, self._problem = key, problem

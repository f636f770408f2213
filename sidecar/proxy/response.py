"""The upstream's answer: what the connection's parser fills in, the body as the relay reads it, and the rules of its head and framing."""

from __future__ import annotations

import collections
import re
from typing import Protocol

# The response head's limits (SPEC §4): a line's bytes before its CRLF, and
# the whole head (interim 1xx heads included) with every CRLF.
LINE_LIMIT = 8 * 1024
HEAD_LIMIT = 64 * 1024
# Bytes a reason phrase may not hold (RFC 9112 §4: HTAB, SP, VCHAR, obs-text only).
_REASON_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Carrier(Protocol):
    """What an answer needs from the connection that carries it."""

    async def wait(self, timeout: float | None) -> None:
        """Return once the parser made progress; raise the exchange's failure."""

    def consumed(self) -> None:
        """Body bytes were taken: reading may resume."""

    def end_exchange(self, *, reusable: bool) -> None:
        """The answer is done with: keep the connection if ``reusable`` (and it agrees), else close it."""


class UpstreamResponse:
    """The upstream's answer: status, raw headers, and the body as it arrives."""

    __slots__ = (
        "_connection",
        "_released",
        "buffered",
        "chunks",
        "complete",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "until_eof",
    )

    def __init__(self, connection: Carrier) -> None:
        self._connection = connection
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.until_eof = False
        self.complete = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self._released = False

    def take_buffered(self) -> bytes:
        """Everything received so far (the whole body once ``complete``)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._connection.consumed()
        return data

    async def read(self, timeout: float | None) -> bytes:
        """The next piece of the body; ``b""`` once it is complete."""
        while not self.chunks:
            if self.complete:
                return b""
            await self._connection.wait(timeout)
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        self._connection.consumed()
        return chunk

    async def read_all(self, timeout: float | None) -> bytes:
        """The whole body, once it is complete."""
        while not self.complete:
            await self._connection.wait(timeout)
        return self.take_buffered()

    def release(self) -> None:
        """Give the connection back if the exchange finished cleanly, else close it (once; later calls do nothing)."""
        if self._released:
            return
        self._released = True
        self._connection.end_exchange(reusable=self.complete and self.keep_alive and not self.chunks)


def body_until_close(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """The body ends when the connection does (RFC 9112 §6.3), as llhttp decides it.

    A Transfer-Encoding overrides Content-Length; only a final ``chunked``
    coding (in the last such field) frames the body, any other list leaves
    it to the close.
    """
    if status in (204, 304) or status < 200:
        return False
    codings: bytes | None = None
    for name, value in headers:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            return False  # with a Transfer-Encoding as well, llhttp refuses the answer
        if size == 17 and name.lower() == b"transfer-encoding":
            codings = value
    return codings is None or not _chunked_last(codings)


def _chunked_last(codings: bytes) -> bool:
    # llhttp's reading: "chunked" then spaces at most, after the last comma.
    # (Checked against llhttp itself over some 5,000 field values.)
    return codings.rsplit(b",", 1)[-1].rstrip(b" ").lstrip(b" \t").lower() == b"chunked"


def status_problem(status: int, reason: bytes) -> str | None:
    """Why a final answer's status line cannot be relayed, or None when it can.

    101 counts as final here: the proxy strips Upgrade from these requests,
    so no upstream may switch protocols on them.
    """
    if status < 100:
        return "the upstream sent an invalid status code"
    if status == 101:
        return "the upstream sent status 101 unasked"
    if status > 599 or _REASON_CONTROL.search(reason) is not None:
        return "the upstream sent an invalid status line"
    return None

"""Raw HTTP/1.1 over a socket, for tests where the exact bytes on the wire matter."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from multidict import CIMultiDict
from yarl import URL

# Longest a raw exchange may take; a hang fails the test instead of stalling the suite.
RAW_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One response as the client received it."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """The header lines of a request or response head (start line skipped), in order, values stripped."""
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines if line)]


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One chunked body off ``reader``, trailer section included: (the bytes as framed on the wire, the payload)."""
    framed: list[bytes] = []
    payload: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        framed.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while True:  # the trailer section, up to its blank line
                line = await reader.readuntil(b"\r\n")
                framed.append(line)
                if line == b"\r\n":
                    return b"".join(framed), b"".join(payload)
        chunk = await reader.readexactly(size + 2)
        framed.append(chunk)
        payload.append(chunk[:-2])


async def read_response(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    """One final response off ``reader`` (1xx interim responses skipped): status line, header pairs, payload."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line = head.decode("latin-1").split("\r\n", 1)[0]
        status = int(status_line.split(" ", 2)[1])
        if status >= 200:
            break
    pairs = header_fields(head)
    fields = CIMultiDict(pairs)
    if "chunked" in fields.get("Transfer-Encoding", "").lower():
        _, body = await read_chunked(reader)
    elif "Content-Length" in fields:
        body = await reader.readexactly(int(fields["Content-Length"]))
    elif status in (204, 304):
        body = b""
    else:
        body = await reader.read()
    return status_line, pairs, body


async def exchange(host: str, port: int, request: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Send ``request`` verbatim on a new connection; one response as ``read_response`` returns it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), RAW_TIMEOUT)
    finally:
        writer.close()


async def raw_request(url: str, head: str, body: bytes = b"") -> Reply:
    """Send ``head`` (request line and header lines, no final blank line) and ``body`` verbatim to ``url``'s host.

    A blank line is appended to ``head``; the caller frames ``body`` itself.
    """
    parsed = URL(url)
    assert parsed.host is not None and parsed.port is not None
    status_line, pairs, payload = await exchange(parsed.host, parsed.port, head.encode("latin-1") + b"\r\n\r\n" + body)
    return Reply(int(status_line.split(" ", 2)[1]), CIMultiDict(pairs), payload)


async def read_head(url: str, request: bytes) -> bytes:
    """Send ``request`` verbatim to ``url``'s port on loopback; the response head, or b"" if the server closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        writer.write(request)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
    finally:
        writer.close()

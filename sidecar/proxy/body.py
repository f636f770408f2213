"""The client's request body, framed as the client framed it: buffered when it may be replayed, else streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from sidecar.proxy.connection import RequestBody


async def request_body(request: web.BaseRequest, replay_limit: int) -> tuple[RequestBody, bool, bool]:
    """``(body, chunked, replayable)`` keeping the client's framing.

    Bodies up to ``replay_limit`` are buffered so a 401 can replay them byte
    for byte; larger ones stream with back-pressure and are not replayed.
    ``Expect: 100-continue`` is answered first.
    """
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if not request.body_exists:
        return None, False, True
    length = request.content_length
    if length is not None:
        if length <= replay_limit:
            # Not request.read(): it enforces aiohttp's 1 MiB client_max_size.
            return await _read_up_to(request.content, length), False, True
        return _stream(b"", request.content), False, False
    prefix = await _read_up_to(request.content, replay_limit + 1)
    if len(prefix) <= replay_limit:
        return prefix, True, True
    return _stream(prefix, request.content), True, False


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def _stream(prefix: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk

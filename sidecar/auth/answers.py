"""Reading what a cloud's login and token endpoints answer, safely.

Only short machine codes from an answer are ever quoted in a message, never
free text: a hostile or broken endpoint cannot write into a terminal or a log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

# SPEC §3: what a token endpoint (or a login or whoami endpoint) answers is
# read up to this size; anything bigger is refused, not buffered.
MAX_ANSWER_BYTES = 1024 * 1024
_CODE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class AnswerTooLarge(Exception):
    """An answer's body exceeded MAX_ANSWER_BYTES; nothing past the limit was read."""


async def read_capped(response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The whole body of ``response``, or AnswerTooLarge once it passes ``limit`` bytes."""
    if (response.content_length or 0) > limit:
        raise AnswerTooLarge()
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge()
    return bytes(body)


def json_object(body: bytes) -> Mapping[str, Any]:
    """The JSON object ``body`` holds; empty when it holds anything else."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}


def error_code(value: object) -> str | None:
    """An OAuth-style error code fit for one line of output (``[A-Za-z0-9_.-]``, at most 64), else None."""
    if isinstance(value, str) and 0 < len(value) <= 64 and _CODE_CHARACTERS.issuperset(value):
        return value
    return None

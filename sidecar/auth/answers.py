"""Reading what a cloud's login and token endpoints answer, safely.

Only short machine codes from an answer are ever quoted in a message, never
free text: a hostile or broken endpoint cannot write into a terminal or a log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

_CODE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


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

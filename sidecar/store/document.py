"""The stored pair as a document: the desktop app's camelCase JSON fields.

``accessToken``, ``refreshToken``, ``apiUrl``, ``expiresAt`` and
``obtainedAt``; fields sidecar does not know are kept on rewrite.  Pure:
bytes in, pair out, and back.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.tokens import TokenPair, format_timestamp, parse_timestamp

KNOWN_FIELDS = ("accessToken", "refreshToken", "apiUrl", "expiresAt", "obtainedAt")


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
        extra={key: value for key, value in document.items() if key not in KNOWN_FIELDS},
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

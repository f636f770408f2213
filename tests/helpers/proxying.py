"""Talking to an in-process proxy (conftest's ``make_proxy``) and checking what it answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from conftest import RunningProxy
from multidict import CIMultiDict
from yarl import URL

from helpers.wire import Reply

# The mock cloud's access tokens live a day; one second more is past expiry.
PAST_EXPIRY = 86400.0 + 1.0


async def fetch(client: aiohttp.ClientSession, method: str, url: str | URL, **options: Any) -> Reply:
    """One request through ``client``, redirects not followed, body read whole."""
    async with client.request(method, url, allow_redirects=False, **options) as response:
        return Reply(response.status, CIMultiDict(response.headers), await response.read())


def authority(url: str) -> str:
    """``host:port`` of an ``http://host:port[/prefix]`` URL."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


def raw_get(proxy: RunningProxy, target: str, *extra_headers: str) -> str:
    """The head of a raw GET of ``target`` with the proxy's own Host and ``Connection: close``."""
    return "\r\n".join([f"GET {target} HTTP/1.1", f"Host: {authority(proxy.url)}", "Connection: close", *extra_headers])


def assert_problem(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """Check the shape every response sidecar makes itself has (SPEC §4); return the body."""
    assert reply.status == status
    assert reply.headers.get("X-Sidecar-Error") == code
    assert reply.headers.get("Content-Type") == "application/problem+json"
    assert reply.headers.get("Cache-Control") == "no-store"
    document: dict[str, Any] = reply.json()
    assert isinstance(document["type"], str) and document["type"]
    assert isinstance(document["title"], str) and document["title"]
    assert document["status"] == status
    assert isinstance(document["detail"], str) and document["detail"]
    return document


def stored_tokens(store_path: Path) -> set[str]:
    """Both token values in the store file right now."""
    document = json.loads(store_path.read_text())
    return {document["accessToken"], document["refreshToken"]}


def log_lines(proxy: RunningProxy) -> list[dict[str, Any]]:
    """The access log so far, one parsed JSON object per line."""
    return [json.loads(line) for line in proxy.log.getvalue().splitlines() if line]


async def wait_for_log_lines(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    """The access log once it has ``count`` lines: the line is written as the handler returns."""
    for _ in range(200):
        lines = log_lines(proxy)
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} access-log lines, got {log_lines(proxy)}")

"""The one-shot loopback listener a browser login comes back to (RFC 8252 §7.3).

It listens on ``127.0.0.1`` at a port the kernel picks, answers
``/callback`` by handing the query to a judge, shows the browser the judge's
small page, and stops with the listener.  It knows nothing about tokens.  A
judge may be a coroutine (the OIDC code flow exchanges the code before it
tells the browser how the login went).
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from aiohttp import web

CALLBACK_PATH = "/callback"

Judge = Callable[[Mapping[str, str]], web.Response | Awaitable[web.Response]]

_PAGE = "<!doctype html><meta charset=utf-8><title>sidecar login</title><h1>{title}</h1><p>{text}</p>\n"


def page(status: int, title: str, text: str) -> web.Response:
    """A plain page for the browser tab: what happened and what to do next."""
    return web.Response(
        status=status,
        text=_PAGE.format(title=html.escape(title), text=html.escape(text)),
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


@asynccontextmanager
async def loopback_callback(judge: Judge) -> AsyncIterator[str]:
    """Listen for the redirect; yields the ``redirect_uri`` to send the browser to."""

    async def callback(request: web.Request) -> web.Response:
        answer = judge(request.query)
        return answer if isinstance(answer, web.Response) else await answer

    app = web.Application()
    app.router.add_get(CALLBACK_PATH, callback)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]  # the one site just started
        yield f"http://{host}:{port}{CALLBACK_PATH}"
    finally:
        await runner.cleanup()

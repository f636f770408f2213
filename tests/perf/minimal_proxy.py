"""Minimal aiohttp pass-through proxy: the floor for what sidecar's features cost.

One catch-all route, one ClientSession; forwards method + path_qs + body to the
upstream with an added ``Authorization`` header and answers with the buffered
upstream body, status and content type. No header filtering, no streaming, no
token management. Used by ``tests/perf/bench.py``; not a test module.

    python tests/perf/minimal_proxy.py --upstream http://127.0.0.1:8080 --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


def make_app(upstream: str) -> web.Application:
    upstream = upstream.rstrip("/")
    app = web.Application(client_max_size=0)

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None),
            auto_decompress=False,
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read() if request.body_exists else None
        async with app["session"].request(
            request.method,
            upstream + request.path_qs,
            headers={"Authorization": "Bearer x"},
            data=body,
            allow_redirects=False,
        ) as up:
            return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop = "asyncio"
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop = "uvloop"
    print(f"minimal proxy on {args.host}:{args.port} ({loop})", file=sys.stderr, flush=True)
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

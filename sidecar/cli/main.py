"""Command line: parse flags, build Settings once, run a command, map errors to exit codes.

Exit codes: 0 success; 1 the command did not get what it needed (not logged
in, login failed); 2 bad configuration or input; 130 interrupted.  Errors are
one line on stderr, never a traceback (``--log-level debug`` adds one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from sidecar import __version__
from sidecar.config import KEYS, Settings, load_settings
from sidecar.errors import ConfigError, LoginError, SidecarError, StoreError

log = logging.getLogger("sidecar")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_BOOL_KEYS = {"allow_remote"}
_LONG_RUNNING = {"serve", "demo", "mock-cloud"}
_KEY_HELP = {
    "upstream": "cloud API base URL (may carry a path prefix)",
    "listen": "HOST:PORT or unix:/path.sock to listen on",
    "allow_remote": "allow listening on a non-loopback address",
    "store": "token store file",
    "ca_file": "PEM bundle of extra CAs to trust (adds to the system's)",
    "client_cert": "client certificate (PEM) for upstreams that require mTLS",
    "client_key": "off, optional or required: the local client key (sidecar client-key); else the private key file of client_cert",
    "allow_users": 'who may connect to serve: "self" (default), "any", or user names and uids, comma-separated',
    "proxy": 'egress proxy URL (overrides HTTPS_PROXY/HTTP_PROXY; "" for none)',
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"sidecar: error: {message} (see: {self.prog} --help)\n")


def _config_flags() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("configuration (each also SIDECAR_KEY_NAME or a TOML key)")
    group.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for key in KEYS:
        flag = "--" + key.replace("_", "-")
        if key in _BOOL_KEYS:
            group.add_argument(flag, dest=key, action="store_true", default=None, help=_KEY_HELP.get(key))
        else:
            group.add_argument(flag, dest=key, metavar="VALUE", default=None, help=_KEY_HELP.get(key))
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sidecar", description="A local proxy that holds your cloud login and injects a fresh bearer token."
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    config = _config_flags()

    commands.add_parser("serve", parents=[config], help="run the proxy")

    login = commands.add_parser("login", parents=[config], help="log in and store the token pair")
    login.add_argument("--no-browser", action="store_true", help="print the login URL instead of opening a browser")
    login.add_argument(
        "--flow",
        choices=("callback", "poll", "device"),
        default="callback",
        help="callback (browser on this machine) or poll/device (headless, any device: the relay poll, the oauth2 device grant)",
    )
    login.add_argument("--login-timeout", type=float, default=300.0, help=argparse.SUPPRESS)

    commands.add_parser("logout", parents=[config], help="clear the token store")

    status = commands.add_parser("status", parents=[config], help="show login state and the user")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    client_key = commands.add_parser(
        "client-key", parents=[config], help="print the local client key (made on first use)"
    )
    client_key.add_argument("--rotate", action="store_true", help="replace the key; the old one stops working")

    token = commands.add_parser("token", parents=[config], help="print a fresh access token")
    token.add_argument("--force-refresh", action="store_true", help="refresh even if the token is not near expiry")

    imp = commands.add_parser("import", parents=[config], help="seed the store from flags or SIDECAR_* variables")
    imp.add_argument("--access-token", metavar="TOKEN")
    imp.add_argument("--refresh-token", metavar="TOKEN")
    imp.add_argument("--expires-at", metavar="ISO8601")

    mock = commands.add_parser("mock-cloud", parents=[config], help="run a local mock cloud for demos and tests")
    mock.add_argument("--port", type=int, default=8788)
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--access-ttl", type=float, default=86400.0, help="access token lifetime, seconds")
    mock.add_argument("--refresh-ttl", type=float, default=7 * 86400.0, help="refresh token lifetime, seconds")
    mock.add_argument("--prefix", default="", help="path prefix of the API, e.g. /cloud")
    mock.add_argument(
        "--known-refresh-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="accept this refresh token as a login (for container examples)",
    )

    demo = commands.add_parser("demo", parents=[config], help="mock cloud + login + proxy with short-lived tokens")
    demo.add_argument("--access-ttl", type=float, default=30.0, help="access token lifetime, seconds")
    demo.add_argument("--cloud-port", type=int, default=0, help="mock cloud port (default: any free port)")
    return parser


def _settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    flags = {key: getattr(args, key) for key in KEYS if getattr(args, key, None) is not None}
    # The demo and the mock cloud bring their own provider.
    provider_needed = args.command not in ("demo", "mock-cloud")
    return load_settings(flags, env, getattr(args, "config", None), provider_needed=provider_needed)


def _message(record: logging.LogRecord) -> str:
    """The record's message; an exception adds its type name only.

    Exception texts and tracebacks can quote request lines, headers or
    response bodies, so they appear only at --log-level debug.
    """
    message = record.getMessage()
    if record.exc_info and record.exc_info[0] is not None and logging.getLogger().level > logging.DEBUG:
        message = f"{message} ({record.exc_info[0].__name__})"
    return message


class _JsonFormatter(logging.Formatter):
    """Log records as JSON lines, matching the access log's shape."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        from sidecar.tokens import format_timestamp

        return orjson.dumps(
            {"ts": format_timestamp(record.created), "level": record.levelname.lower(), "message": _message(record)}
        ).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if logging.getLogger().level <= logging.DEBUG:
            return "sidecar: " + super().format(record)
        return "sidecar: " + _message(record)


def _setup_logging(settings: Settings, command: str) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    json_lines = command == "serve" and (
        settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    )
    handler.setFormatter(_JsonFormatter() if json_lines else _TextFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if command not in _LONG_RUNNING and level > logging.DEBUG:
        # One-shot commands report their own outcome in one line; the
        # manager's running commentary would say everything twice.
        level = max(level, logging.ERROR)
    root.setLevel(level)
    # aiohttp's own access log is replaced by ours in serve; its server log
    # quotes malformed request lines and headers (cookies, tokens) verbatim.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level > logging.DEBUG:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from sidecar.cli import commands

    settings = _settings_from(args, env)
    name = args.command
    _setup_logging(settings, name)
    if name == "token":
        return asyncio.run(commands.token_command(settings, force=args.force_refresh))
    if name == "import":
        values = {"access_token": args.access_token, "refresh_token": args.refresh_token, "expires_at": args.expires_at}
        return commands.import_command(settings, values, env)
    if name == "logout":
        return commands.logout_command(settings)
    if name == "status":
        return asyncio.run(commands.status_command(settings, as_json=args.json, env=env))
    if name == "client-key":
        return commands.client_key_command(settings, env, rotate=args.rotate)
    if name == "mock-cloud":
        from sidecar.mockcloud import run_mock_cloud

        def ready(url: str) -> None:
            print(f"mock cloud listening on {url}", file=sys.stderr, flush=True)

        _run_until_signal(
            run_mock_cloud(
                host=args.host,
                port=args.port,
                access_ttl=args.access_ttl,
                refresh_ttl=args.refresh_ttl,
                prefix=args.prefix,
                known_refresh_tokens=tuple(args.known_refresh_token),
                ready=ready,
            )
        )
        return EXIT_OK
    if name == "serve":
        from sidecar.server.serve import serve_command

        return serve_command(settings, env)
    if name == "login":
        from sidecar.auth.login import login_command

        return asyncio.run(
            login_command(settings, flow=args.flow, open_browser=not args.no_browser, timeout=args.login_timeout)
        )
    if name == "demo":
        from sidecar.cli.demo import demo_command

        return demo_command(settings, access_ttl=args.access_ttl, cloud_port=args.cloud_port)
    raise ConfigError(f"unknown command {name!r}")


def _run_until_signal(coroutine: Any) -> None:
    """Run ``coroutine`` until SIGINT or SIGTERM, then cancel it cleanly."""
    import signal

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coroutine)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(runner())


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _run(args, env)
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (StoreError, LoginError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sidecar: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        print(
            f"sidecar: unexpected error ({type(exc).__name__}); run with --log-level debug for details", file=sys.stderr
        )
        return EXIT_FAILED

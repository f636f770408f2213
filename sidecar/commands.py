"""The commands that use the token store without the proxy: token, import, logout, status.

Each returns its exit code and writes its own one-line messages; none ever
prints a token except ``token``, whose whole job is to print one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Mapping, TextIO

import aiohttp
import orjson

from sidecar.config import Settings
from sidecar.errors import ConfigError, NotLoggedIn, RefreshTransient
from sidecar.manager import TokenManager
from sidecar.refresh import make_refresher
from sidecar.store import TokenStore
from sidecar.tokens import TokenPair, format_timestamp, parse_timestamp

WHOAMI_PATH = "/api/v1/auth/whoami"
IMPORT_ENV = {
    "access_token": "SIDECAR_ACCESS_TOKEN",
    "refresh_token": "SIDECAR_REFRESH_TOKEN",
    "expires_at": "SIDECAR_EXPIRES_AT",
    "upstream": "SIDECAR_UPSTREAM",
}


def _client_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout)
    return aiohttp.ClientSession(timeout=timeout)


def _say(stream: TextIO, message: str) -> None:
    print(f"sidecar: {message}", file=stream)


async def token_command(settings: Settings, *, force: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print a fresh access token (refreshing under the shared lock if needed)."""
    store = TokenStore(settings.store)
    async with _client_session(settings) as session:
        manager = TokenManager(store, make_refresher(session, settings), leeway=settings.leeway)
        before = manager.pair  # the hint needs its apiUrl even after a dead token clears it
        try:
            token = await (manager.force_refresh() if force else manager.access_token())
        except NotLoggedIn as exc:
            _say(err, f"{exc}; run: {login_hint(settings, before)}")
            return 1
        except RefreshTransient as exc:
            pair = manager.pair
            if pair is None or pair.access_token is None:
                _say(err, f"refresh failed ({exc.reason}) and there is no access token to fall back on")
                return 1
            token = pair.access_token
        if manager.stats.transient:
            _say(err, f"warning: refresh failed ({manager.stats.last_error}); printing the current token, which may be expired")
    print(token, file=out)
    return 0


def login_hint(settings: Settings, pair: TokenPair | None = None) -> str:
    upstream = settings.upstream or (pair.api_url if pair else None)
    return f"sidecar login --upstream {upstream}" if upstream else "sidecar login --upstream <API>"


def pair_from_import(settings: Settings, values: Mapping[str, str | None], env: Mapping[str, str], now: float, previous: TokenPair | None = None) -> TokenPair:
    """The pair that flags (else SIDECAR_* import variables) describe; ConfigError if unusable."""

    def pick(key: str) -> str | None:
        value = values.get(key)
        if value is None:
            value = env.get(IMPORT_ENV[key]) or None
        return value

    refresh = pick("refresh_token")
    if not refresh:
        raise ConfigError("import needs a refresh token: --refresh-token or SIDECAR_REFRESH_TOKEN")
    raw_expiry = pick("expires_at")
    expires_at = parse_timestamp(raw_expiry) if raw_expiry else None
    if raw_expiry and expires_at is None:
        raise ConfigError("--expires-at / SIDECAR_EXPIRES_AT: expected an ISO 8601 timestamp such as 2026-01-31T12:00:00Z")
    if not settings.upstream:
        raise ConfigError("import needs the cloud API URL: --upstream or SIDECAR_UPSTREAM")
    return TokenPair(
        access_token=pick("access_token"),
        refresh_token=refresh,
        api_url=settings.upstream,
        expires_at=expires_at,
        obtained_at=now,
        extra=previous.extra if previous else {},
    )


def import_command(settings: Settings, values: Mapping[str, str | None], env: Mapping[str, str], *, clock: Any = time.time, err: TextIO = sys.stderr) -> int:
    """Seed the store from flags, else the SIDECAR_* import variables."""
    store = TokenStore(settings.store)
    try:
        pair = pair_from_import(settings, values, env, clock(), store.read().pair)
    except ConfigError as exc:
        _say(err, str(exc))
        return 2
    fd = store.acquire_lock()
    try:
        store.write(pair)
    finally:
        store.release_lock(fd)
    note = "" if pair.access_token and pair.expires_at else " (the access token will be refreshed on first use)"
    _say(err, f"imported a token pair for {pair.api_url} into {store.path}{note}")
    return 0


def logout_command(settings: Settings, *, err: TextIO = sys.stderr) -> int:
    """Delete the store; logging out twice is not an error."""
    store = TokenStore(settings.store)
    if not store.path.exists():
        _say(err, f"not logged in; nothing to clear at {store.path}")
        return 0
    fd = store.acquire_lock()
    try:
        store.clear()
    finally:
        store.release_lock(fd)
    _say(err, f"logged out; removed {store.path}")
    return 0


async def status_report(settings: Settings, *, clock: Any = time.time) -> dict[str, Any]:
    """What ``sidecar status`` shows, as a JSON-ready dict without secrets."""
    store = TokenStore(settings.store)
    report: dict[str, Any] = {
        "loggedIn": False,
        "store": str(store.path),
        "apiUrl": None,
        "expiresAt": None,
        "secondsToExpiry": None,
        "user": None,
        "problem": None,
    }
    async with _client_session(settings) as session:
        manager = TokenManager(store, make_refresher(session, settings), leeway=settings.leeway)
        pair = manager.pair
        if pair is None:
            report["problem"] = manager.problem or "not logged in"
            return report
        api_url = settings.upstream or pair.api_url
        report["apiUrl"] = api_url
        try:
            token = await manager.access_token()
        except NotLoggedIn as exc:
            report["problem"] = str(exc)
            return report
        except (RefreshTransient, ConfigError) as exc:
            token = None
            report["problem"] = f"refresh failed: {exc}"
        report["loggedIn"] = True
        pair = manager.pair or pair
        if pair.expires_at is not None:
            report["expiresAt"] = format_timestamp(pair.expires_at)
            report["secondsToExpiry"] = round(pair.expires_at - clock())
        if token and api_url:
            report["user"], problem = await _whoami(session, api_url, token)
            report["problem"] = report["problem"] or problem
    return report


async def _whoami(session: aiohttp.ClientSession, api_url: str, token: str) -> tuple[dict[str, Any] | None, str | None]:
    url = api_url.rstrip("/") + WHOAMI_PATH
    try:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}, allow_redirects=False) as response:
            body = await response.read()
            if response.status != 200:
                return None, f"whoami answered HTTP {response.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return None, f"whoami failed: {type(exc).__name__}"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, "whoami answered without JSON"
    if not isinstance(document, dict):
        return None, "whoami answered without a JSON object"
    user = {key: document[key] for key in ("name", "email", "id") if isinstance(document.get(key), (str, int))}
    return user, None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return f"expired {_duration(-seconds)} ago"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


async def status_command(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Show login state; exit 0 when logged in, 1 when not."""
    report = await status_report(settings)
    if as_json:
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if report["loggedIn"] else 1
    if not report["loggedIn"]:
        print(f"Not logged in ({report['problem']}).", file=out)
        print(f"Log in with: {login_hint(settings)}", file=out)
        return 1
    user = report["user"] or {}
    who = user.get("name") or user.get("email") or "an unknown user"
    if user.get("name") and user.get("email"):
        who = f"{user['name']} <{user['email']}>"
    print(f"Logged in to {report['apiUrl']} as {who}.", file=out)
    if report["expiresAt"] is None:
        print("Access token expiry unknown: it is refreshed on next use.", file=out)
    else:
        left = report["secondsToExpiry"]
        when = _duration(left) + (" left" if left >= 0 else "")
        print(f"Access token expires {report['expiresAt']} ({when}).", file=out)
    if report["problem"]:
        print(f"Note: {report['problem']}.", file=out)
    print(f"Token store: {report['store']}", file=out)
    return 0


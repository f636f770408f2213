"""The commands that use the token store without the proxy: token, import, logout, status, client-key.

Each returns its exit code and writes its own one-line messages; none ever
prints a token except ``token``, whose whole job is to print one (and
``client-key``, whose job is to print the local client key).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import aiohttp
import orjson

from sidecar.auth.answers import AnswerTooLarge, read_capped
from sidecar.auth.hint import login_hint as flavor_login_hint
from sidecar.auth.imported import pair_from_import
from sidecar.auth.oidc.discovery import provider_metadata
from sidecar.auth.oidc.http import ProviderError, ProviderSession
from sidecar.auth.oidc.revocation import Revocation, revoke
from sidecar.auth.oidc.userinfo import account
from sidecar.auth.refresh import make_refresher
from sidecar.callers import peer
from sidecar.callers.gate import describe_line, describe_policy, resolve_settings
from sidecar.callers.key_location import key_file
from sidecar.config import Settings
from sidecar.egress.outbound import Outbound, Proxies, client_session
from sidecar.egress.tls import describe_tls_failure
from sidecar.errors import ConfigError, NotLoggedIn, RefreshTransient
from sidecar.manager import TokenManager
from sidecar.refreshing import LOCK_TIMEOUT
from sidecar.store.interface import StoreSnapshot, clear_store, write_pair
from sidecar.store.location import open_store
from sidecar.tokens import TokenPair, format_timestamp

WHOAMI_PATH = "/api/v1/auth/whoami"


def _say(stream: TextIO, message: str) -> None:
    print(f"sidecar: {message}", file=stream)


async def token_command(settings: Settings, *, force: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print a fresh access token (refreshing under the shared lock if needed)."""
    store = open_store(settings.store)
    outbound = Outbound(settings)
    async with client_session(settings, outbound) as session:
        manager = TokenManager(store, make_refresher(session, settings, outbound.proxies), leeway=settings.leeway)
        await manager.load()
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
            _say(
                err,
                f"warning: refresh failed ({manager.stats.last_error}); printing the current token, which may be expired",
            )
    print(token, file=out)
    return 0


def login_hint(settings: Settings, pair: TokenPair | None = None) -> str:
    return flavor_login_hint(settings, pair.api_url if pair else None)


def import_command(
    settings: Settings,
    values: Mapping[str, str | None],
    env: Mapping[str, str],
    *,
    clock: Any = time.time,
    err: TextIO = sys.stderr,
) -> int:
    """Seed the store from flags, else the SIDECAR_* import variables."""
    store = open_store(settings.store)
    now = clock()
    # Checked before taking the lock: bad input never waits for it.
    try:
        pair_from_import(settings, values, env, now)
    except ConfigError as exc:
        _say(err, str(exc))
        return 2

    def build(snapshot: StoreSnapshot) -> TokenPair:
        return pair_from_import(settings, values, env, now, snapshot.pair)

    pair = asyncio.run(write_pair(store, build))
    assert pair is not None  # build always makes one
    note = "" if pair.access_token and pair.expires_at else " (the access token will be refreshed on first use)"
    _say(err, f"imported a token pair for {pair.api_url} into {store.description}{note}")
    return 0


def logout_command(settings: Settings, *, err: TextIO = sys.stderr) -> int:
    """Delete the store; logging out twice is not an error.

    In the oauth2 flavor the refresh token is revoked at the provider first
    (SPEC §8); the store is cleared whether or not that worked, and the exit
    code is 1 unless both did.
    """
    if settings.flavor == "oauth2":
        return asyncio.run(_oauth2_logout(settings, err))
    store = open_store(settings.store)
    if not asyncio.run(clear_store(store)):
        _say(err, f"not logged in; nothing to clear at {store.description}")
        return 0
    _say(err, f"logged out; removed {store.description}")
    return 0


async def _oauth2_logout(settings: Settings, err: TextIO) -> int:
    store = open_store(settings.store)
    if (await store.read()).pair is None:
        cleared = await clear_store(store)  # an unreadable store is still removed
        _say(
            err,
            f"logged out; removed {store.description}"
            if cleared
            else f"not logged in; nothing to clear at {store.description}",
        )
        return 0
    outbound = Outbound(settings)
    async with client_session(settings, outbound) as client:
        session = ProviderSession(client, outbound.proxies)
        try:
            metadata = await provider_metadata(session, settings)
        except (ProviderError, ConfigError) as exc:
            metadata, revocation = None, Revocation(False, str(exc))
        # Under the refresh lock, so that a running serve cannot rotate the pair
        # between the revocation and the clearing.
        async with store.refresh_lock(LOCK_TIMEOUT):
            pair = (await store.read()).pair
            if metadata is not None:
                revocation = await revoke(session, settings, metadata, pair.refresh_token) if pair else Revocation(True)
            await store.clear()
    if revocation.revoked:
        _say(err, f"logged out; revoked the refresh token at the provider and removed {store.description}")
        return 0
    if revocation.problem is None:
        _say(
            err,
            f"logged out; removed {store.description} (the provider has no revocation endpoint: "
            "the refresh token stays valid there until it expires)",
        )
        return 0
    _say(
        err,
        f"revocation failed ({revocation.problem}): the refresh token may still be valid at the provider; "
        f"removed {store.description} anyway",
    )
    return 1


def client_key_command(
    settings: Settings, env: Mapping[str, str], *, rotate: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Print the local client key (SPEC §9), making it on first use; ``rotate`` replaces it first."""
    file = key_file(settings.store, env)
    key = file.rotate() if rotate else file.ensure()
    if rotate:
        _say(err, f"made a new client key in {file.where}; a running serve refuses the old one within a second")
    if settings.client_key_mode == "off":
        _say(err, "note: client_key is off, so serve does not ask for this key (set client_key = required)")
    print(key.decode("ascii"), file=out)
    return 0


def caller_policy(settings: Settings, env: Mapping[str, str]) -> dict[str, Any]:
    """The caller policy a ``serve`` with these settings runs with (never the key)."""
    try:
        allowed, file = resolve_settings(settings, env)
    except ConfigError as exc:
        return {"problem": str(exc)}
    lookup = None if allowed.everyone else peer.tcp_lookup()
    return describe_policy(allowed, settings.client_key_mode, lookup, settings.listen, file.where if file else None)


async def status_report(
    settings: Settings, *, clock: Any = time.time, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What ``sidecar status`` shows, as a JSON-ready dict without secrets."""
    store = open_store(settings.store)
    report: dict[str, Any] = {
        "loggedIn": False,
        "store": store.description,
        "apiUrl": None,
        "expiresAt": None,
        "secondsToExpiry": None,
        "user": None,
        "problem": None,
        "callers": caller_policy(settings, env or {}),
    }
    outbound = Outbound(settings)
    async with client_session(settings, outbound) as session:
        manager = TokenManager(store, make_refresher(session, settings, outbound.proxies), leeway=settings.leeway)
        await manager.load()
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
        if token and settings.flavor == "oauth2":
            report["user"], problem = await account(ProviderSession(session, outbound.proxies), settings, token)
            report["problem"] = report["problem"] or problem
        elif token and api_url:
            report["user"], problem = await _whoami(session, api_url, token, outbound.proxies)
            report["problem"] = report["problem"] or problem
    return report


async def _whoami(
    session: aiohttp.ClientSession, api_url: str, token: str, proxies: Proxies
) -> tuple[dict[str, Any] | None, str | None]:
    url = api_url.rstrip("/") + WHOAMI_PATH
    options = proxies.options(url, {"Authorization": f"Bearer {token}"})
    try:
        async with session.get(url, allow_redirects=False, **options) as response:
            if response.status != 200:
                return None, f"whoami answered HTTP {response.status}"
            body = await read_capped(response)
    except AnswerTooLarge:
        return None, "whoami answered with a body over 1 MiB"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return None, f"whoami failed: {describe_tls_failure(exc) or type(exc).__name__}"
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


def _callers_line(policy: dict[str, Any]) -> str:
    if "problem" in policy:
        return f"Callers: {policy['problem']}"
    return f"Callers: {describe_line(policy)}."


async def status_command(
    settings: Settings, *, as_json: bool, out: TextIO = sys.stdout, env: Mapping[str, str] | None = None
) -> int:
    """Show login state; exit 0 when logged in, 1 when not."""
    report = await status_report(settings, env=env)
    if as_json:
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if report["loggedIn"] else 1
    if not report["loggedIn"]:
        print(f"Not logged in ({report['problem']}).", file=out)
        print(f"Log in with: {login_hint(settings)}", file=out)
        print(_callers_line(report["callers"]), file=out)
        return 1
    user = report["user"] or {}
    who = user.get("name") or user.get("email") or "an unknown user"
    if user.get("name") and user.get("email"):
        who = f"{user['name']} <{user['email']}>"
    if user.get("sub"):
        who += f" (subject {user['sub']})"
    if settings.flavor == "oauth2":
        where = f"at {settings.issuer or settings.token_url}" + (f" for {report['apiUrl']}" if report["apiUrl"] else "")
    else:
        where = f"to {report['apiUrl']}"
    print(f"Logged in {where} as {who}.", file=out)
    if report["expiresAt"] is None:
        print("Access token expiry unknown: it is refreshed on next use.", file=out)
    else:
        left = report["secondsToExpiry"]
        when = _duration(left) + (" left" if left >= 0 else "")
        print(f"Access token expires {report['expiresAt']} ({when}).", file=out)
    if report["problem"]:
        print(f"Note: {report['problem']}.", file=out)
    print(f"Token store: {report['store']}", file=out)
    print(_callers_line(report["callers"]), file=out)
    return 0

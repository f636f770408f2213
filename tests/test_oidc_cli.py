"""The oauth2 flavor's commands as a user runs them: login, logout, status, and the re-login hint (SPEC §5, §8).

``login``, ``logout`` and ``status`` run as real subprocesses against the mock
cloud as the provider, served from this test's event loop; the browser is
scripted (helpers/oidc.py).  The 511 hint comes from an in-process proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, Run, finish, kill_running, read_lines_until, run_sidecar, start_sidecar
from helpers.oidc import browse, code_login, oidc_settings
from helpers.proxying import assert_problem, fetch

from sidecar.errors import SidecarError
from sidecar.mockcloud import MockCloud
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair

AUTHORIZE_MARK = "/oauth/authorize?"
DEVICE_MARK = "/oauth/device?user_code="

Start = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start(env: dict[str, str]) -> AsyncIterator[Start]:
    """Start ``sidecar ARGS`` processes; any still running at teardown are killed."""
    started: list[asyncio.subprocess.Process] = []

    async def factory(*args: str) -> asyncio.subprocess.Process:
        process = await start_sidecar(env, *args)
        started.append(process)
        return process

    try:
        yield factory
    finally:
        await kill_running(started)


def provider_args(cloud: MockCloud, store_path: Path, *extra: str) -> tuple[str, ...]:
    """The flags a user with only an issuer and a client id gives."""
    return (
        "--flavor",
        "oauth2",
        "--issuer",
        cloud.base_url,
        "--client-id",
        "sidecar-cli",
        "--store",
        str(store_path),
        *extra,
    )


async def url_on_stderr(process: asyncio.subprocess.Process, mark: str) -> tuple[str, str]:
    """Read stderr until a line carries ``mark``; everything read, and the URL on that line."""
    seen = await read_lines_until(process.stderr, mark, 20.0, "stderr")
    return "".join(seen), next(word for word in seen[-1].split() if mark in word)


async def logged_in(cloud: MockCloud, store_path: Path) -> TokenPair:
    """A code login done in-process, written to the store."""
    result, _ = await code_login(oidc_settings(cloud, store_path))
    assert not isinstance(result, SidecarError), result
    TokenFile(store_path).write(result[0])
    return result[0]


def error_lines(run: Run) -> list[str]:
    return [line for line in run.err.splitlines() if line.startswith("sidecar:")]


# -- login ----------------------------------------------------------------------


async def test_login_with_issuer_and_client_id_stores_a_live_pair(
    start: Start, cloud: MockCloud, store_path: Path
) -> None:
    """``sidecar login --flavor oauth2 --issuer I --client-id C`` logs in through the browser and stores the pair, printing no token."""
    process = await start("login", "--no-browser", *provider_args(cloud, store_path))
    seen, url = await url_on_stderr(process, AUTHORIZE_MARK)
    page = await browse(url)
    run = await finish(process, seen)
    assert run.code == 0, run
    assert page.status == 200
    pair = TokenFile(store_path).read().pair
    assert pair is not None and pair.access_token is not None and cloud.access_token_valid(pair.access_token)
    assert pair.access_token not in run.err and pair.refresh_token not in run.err
    assert "as alice" in run.err


async def test_denied_device_login_exits_1_with_one_line_and_leaves_the_store(
    start: Start, cloud: MockCloud, store_path: Path
) -> None:
    """``login --flow device`` that the user denies exits 1 with one error line, and the old login stays as it was."""
    await logged_in(cloud, store_path)
    before = store_path.read_bytes()
    cloud.oidc.switches.device_interval = 1  # the shortest wait sidecar honours
    process = await start("login", "--flow", "device", *provider_args(cloud, store_path))
    seen, url = await url_on_stderr(process, DEVICE_MARK)
    assert (await browse(url + "&deny=1")).status == 200
    run = await finish(process, seen)
    assert run.code == 1, run
    assert len(error_lines(run)) == 1 and "access_denied" in error_lines(run)[0]
    assert "Traceback" not in run.err
    assert store_path.read_bytes() == before


async def test_device_login_shows_the_code_and_stores_the_pair(
    start: Start, cloud: MockCloud, store_path: Path
) -> None:
    """``login --flow device`` prints the verification URI with the user code, and an approval logs in."""
    cloud.oidc.switches.device_interval = 1  # the shortest wait sidecar honours
    process = await start("login", "--flow", "device", *provider_args(cloud, store_path))
    seen, url = await url_on_stderr(process, DEVICE_MARK)
    assert (await browse(url)).status == 200
    run = await finish(process, seen)
    assert run.code == 0, run
    assert url.rsplit("=", 1)[1] in run.err  # the user code, shown for typing in too
    assert TokenFile(store_path).read().pair is not None


# -- logout -----------------------------------------------------------------------


async def test_logout_revokes_the_refresh_token_and_clears_the_store(
    env: dict[str, str], cloud: MockCloud, store_path: Path
) -> None:
    """``logout`` revokes the stored refresh token at the provider (it is dead there), removes the store, exits 0."""
    pair = await logged_in(cloud, store_path)
    run = await run_sidecar(env, "logout", *provider_args(cloud, store_path))
    assert run.code == 0, run
    assert not store_path.exists()
    assert cloud.oidc.revoked == [pair.refresh_token]
    form = {"grant_type": "refresh_token", "refresh_token": pair.refresh_token, "client_id": "sidecar-cli"}
    async with aiohttp.ClientSession() as session, session.post(cloud.base_url + "/oauth/token", data=form) as answer:
        assert (answer.status, (await answer.json())["error"]) == (400, "invalid_grant")


async def test_failed_revocation_exits_1_and_still_clears_the_store(
    env: dict[str, str], cloud: MockCloud, store_path: Path
) -> None:
    """A revocation endpoint answering 503 makes logout exit 1 naming the failure, with the store removed anyway."""
    await logged_in(cloud, store_path)
    cloud.oidc.switches.revocation_status = 503
    run = await run_sidecar(env, "logout", *provider_args(cloud, store_path))
    assert run.code == 1, run
    assert not store_path.exists()
    assert len(error_lines(run)) == 1 and "revocation failed" in run.err and "HTTP 503" in run.err


# -- status and the re-login hint --------------------------------------------------------


async def test_status_shows_the_userinfo_account(env: dict[str, str], cloud: MockCloud, store_path: Path) -> None:
    """``status`` names the account userinfo reports: name, email and subject; ``--json`` has them as user."""
    await logged_in(cloud, store_path)
    run = await run_sidecar(env, "status", *provider_args(cloud, store_path))
    assert run.code == 0, run
    assert "alice <alice@example.test> (subject user-alice)" in run.out
    as_json = await run_sidecar(env, "status", "--json", *provider_args(cloud, store_path))
    assert orjson.loads(as_json.out)["user"] == {"sub": "user-alice", "name": "alice", "email": "alice@example.test"}


async def test_status_when_logged_out_names_the_oauth2_login(
    env: dict[str, str], cloud: MockCloud, store_path: Path
) -> None:
    """Logged out, ``status`` suggests the oauth2 login command, with the issuer and client id."""
    run = await run_sidecar(env, "status", *provider_args(cloud, store_path))
    assert run.code == 1
    assert f"sidecar login --flavor oauth2 --issuer {cloud.base_url} --client-id sidecar-cli" in run.out


async def test_511_hint_names_the_oauth2_login_command(
    cloud: MockCloud, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With no login, the proxy's 511 body names a login that works for oauth2, and never the client secret."""
    p = await make_proxy(flavor="oauth2", issuer=cloud.base_url, client_id="app", client_secret="s3cret")
    reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    document = assert_problem(reply, 511, "relogin-required")
    assert (
        document["login"]
        == f"sidecar login --flavor oauth2 --issuer {cloud.base_url} --client-id app --upstream {cloud.base_url}"
    )
    assert b"s3cret" not in reply.body


# -- through an egress proxy ---------------------------------------------------------


async def test_device_login_status_and_logout_go_through_the_proxy_setting(
    env: dict[str, str], start: Start, cloud: MockCloud, store_path: Path, tmp_path: Path
) -> None:
    """With --proxy, discovery, the device grant, userinfo and revocation all reach the provider through the proxy."""
    from helpers.forward_proxy import running_tinyproxy

    cloud.oidc.switches.device_interval = 1
    async with running_tinyproxy(tmp_path) as tinyproxy:
        via = ("--proxy", tinyproxy.url)
        process = await start("login", "--flow", "device", *provider_args(cloud, store_path, *via))
        seen, url = await url_on_stderr(process, DEVICE_MARK)
        assert (await browse(url)).status == 200  # the user's browser: direct
        assert (await finish(process, seen)).code == 0
        assert (await run_sidecar(env, "status", *provider_args(cloud, store_path, *via))).code == 0
        assert (await run_sidecar(env, "logout", *provider_args(cloud, store_path, *via))).code == 0
        lines = await tinyproxy.requests()
    for path in (
        "/.well-known/openid-configuration",
        "/oauth/device_authorization",
        "/oauth/token",
        "/oauth/userinfo",
        "/oauth/revoke",
    ):
        assert any(path in line for line in lines), (path, lines)

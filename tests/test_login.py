"""``sidecar login``: the browser callback flow and the headless poll flow (SPEC §1, §5).

The subprocess tests play the browser: they read the login URL from the
command's stderr and open it with aiohttp, which follows the mock cloud's
redirect to the command's loopback callback.  The mock cloud serves from this
test's event loop while the child runs.  The in-process tests drive
``callback_flow`` and ``poll_flow`` directly with short timeouts and intervals.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import (
    TIMEOUT,
    FakeClock,
    Run,
    finish,
    free_port,
    kill_running,
    poll_until,
    read_lines_until,
    seed_store,
    serving,
    start_sidecar,
)
from yarl import URL

from sidecar.auth.login import POLL_PATH, callback_flow, one_time_code, poll_flow
from sidecar.errors import LoginError
from sidecar.mockcloud import MockCloud
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair, parse_timestamp

# The poll flow polls about once a second; a few polls must fit.
POLL_EXIT_TIMEOUT = 10.0
# In-process polling: fast enough for many polls in a fraction of a second.
FAST_INTERVAL = 0.05
LOGIN_URL_MARK = "/api/v1/cli/login?"
DEVICE_URL_MARK = "/cli-login?code="
# SPEC §1: "c_" + 24 random bytes, base64url (32 characters without padding).
CODE_PATTERN = re.compile(r"c_[A-Za-z0-9_-]{32}")
DAY = 86400.0


Start = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start(env: dict[str, str]) -> AsyncIterator[Start]:
    """Start ``sidecar ARGS`` processes (``extra_env`` adds variables); any still running at teardown are killed."""
    started: list[asyncio.subprocess.Process] = []

    async def factory(*args: str, extra_env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        process = await start_sidecar({**env, **(extra_env or {})}, *args)
        started.append(process)
        return process

    try:
        yield factory
    finally:
        await kill_running(started)


async def read_until(process: asyncio.subprocess.Process, mark: str, timeout: float = TIMEOUT) -> tuple[str, str]:
    """Read stderr lines until one contains ``mark``; return (everything read, the URL on that line)."""
    seen = await read_lines_until(process.stderr, mark, timeout, "stderr")
    url = next(word for word in seen[-1].split() if mark in word)
    return "".join(seen), url


async def browse(url: str, *, follow: bool = True) -> tuple[int, str, str | None]:
    """GET ``url`` as a browser would; return (status, body, Location)."""
    async with aiohttp.ClientSession() as browser, browser.get(url, allow_redirects=follow) as response:
        return response.status, await response.text(), response.headers.get("Location")


def error_lines(err: str) -> list[str]:
    """The lines of stderr that the CLI's error reporting wrote."""
    return [line for line in err.splitlines() if line.startswith("sidecar:")]


def stored_document(path: Path) -> dict[str, object]:
    """The store file's JSON."""
    document = orjson.loads(path.read_bytes())
    assert isinstance(document, dict)
    return document


def login_args(cloud: MockCloud, store_path: Path, *extra: str) -> tuple[str, ...]:
    return ("login", "--no-browser", "--upstream", cloud.base_url, "--store", str(store_path), *extra)


async def login_through_browser(start: Start, cloud: MockCloud, store_path: Path) -> tuple[Run, int, str]:
    """Run a whole callback login; return its Run and the result page's status and body."""
    process = await start(*login_args(cloud, store_path))
    seen, url = await read_until(process, LOGIN_URL_MARK)
    status, page, _ = await browse(url)
    return await finish(process, seen), status, page


async def login_with_forged_state(start: Start, cloud: MockCloud, store_path: Path) -> Run:
    """Run a callback login whose browser comes back with a state the command did not make; return its Run."""
    process = await start(*login_args(cloud, store_path))
    seen, url = await read_until(process, LOGIN_URL_MARK)
    _, _, location = await browse(url, follow=False)
    assert location is not None
    await browse(str(URL(location).update_query(state="forged-state")))
    return await finish(process, seen)


# -- the callback flow, as a subprocess ---------------------------------------


async def test_login_exits_0_and_shows_logged_in_page(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A browser that completes the login sees a 200 "Logged in" page and the command exits 0."""
    run, status, page = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    assert status == 200
    assert "logged in" in page.lower()


async def test_login_stores_the_pair_with_expiry(
    start: Start, cloud: MockCloud, store_path: Path, clock: FakeClock
) -> None:
    """The store gets both tokens (live at the cloud), apiUrl, expiresAt a day ahead and obtainedAt now."""
    before = time.time()
    run, _, _ = await login_through_browser(start, cloud, store_path)
    after = time.time()
    assert run.code == 0, run
    document = stored_document(store_path)
    assert cloud.access_token_valid(str(document["accessToken"]))
    assert str(document["refreshToken"]).startswith("rt_")
    assert document["apiUrl"] == cloud.base_url
    expires_at = parse_timestamp(document["expiresAt"])
    assert expires_at is not None and abs(expires_at - (clock.now + DAY)) < 1.0
    obtained_at = parse_timestamp(document["obtainedAt"])
    assert obtained_at is not None and before - 1.0 <= obtained_at <= after + 1.0


async def test_login_store_file_is_mode_0600(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """The store a login writes is readable by its owner only."""
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600


async def test_login_never_prints_a_token(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """Neither token value appears in the login command's stdout or stderr."""
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    document = stored_document(store_path)
    for secret in (document["accessToken"], document["refreshToken"]):
        assert isinstance(secret, str) and secret
        assert secret not in run.out
        assert secret not in run.err


async def test_login_announces_a_loopback_callback(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """The printed login URL points at the cloud and asks it to redirect to http://127.0.0.1:<port>/callback with a state."""
    process = await start(*login_args(cloud, store_path))
    _, url = await read_until(process, LOGIN_URL_MARK)
    login = URL(url)
    assert str(login.with_query(None)) == cloud.base_url + "/api/v1/cli/login"
    redirect = URL(login.query["redirect_uri"])
    assert (redirect.scheme, redirect.host, redirect.path) == ("http", "127.0.0.1", "/callback")
    assert len(login.query["state"]) >= 16


async def test_login_without_upstream_uses_the_stores_api_url(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A re-login without --upstream sends the browser to the stored apiUrl."""
    seed_store(store_path, cloud)
    process = await start("login", "--no-browser", "--store", str(store_path))
    _, url = await read_until(process, LOGIN_URL_MARK)
    assert url.startswith(cloud.base_url + "/api/v1/cli/login?")


async def test_login_with_forged_state_gets_400_page(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A callback whose state differs from the one the command made is answered with a 400 page."""
    process = await start(*login_args(cloud, store_path))
    _, url = await read_until(process, LOGIN_URL_MARK)
    status, _, location = await browse(url, follow=False)
    assert status == 302 and location is not None
    forged = URL(location).update_query(state="forged-state")
    status, page, _ = await browse(str(forged))
    assert status == 400
    assert "state" in page.lower()


async def test_login_with_forged_state_exits_1_naming_state(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A forged state ends the command with exit 1 and one error line that mentions the state, no traceback."""
    run = await login_with_forged_state(start, cloud, store_path)
    assert run.code == 1, run
    errors = error_lines(run.err)
    assert len(errors) == 1, run.err
    assert "state" in errors[0]
    assert "Traceback" not in run.err


async def test_login_with_forged_state_keeps_existing_store(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A forged state leaves an existing store byte for byte as it was."""
    seed_store(store_path, cloud)
    seeded = store_path.read_bytes()
    run = await login_with_forged_state(start, cloud, store_path)
    assert run.code == 1, run
    assert store_path.read_bytes() == seeded


async def test_login_denied_by_cloud_exits_1_naming_the_error(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """The cloud redirecting with error=access_denied ends the command with exit 1 and the error named on stderr."""
    cloud.login_error = "access_denied"
    run, status, _ = await login_through_browser(start, cloud, store_path)
    assert status == 400
    assert run.code == 1, run
    errors = error_lines(run.err)
    assert len(errors) == 1, run.err
    assert "access_denied" in errors[0]


async def test_login_denied_by_cloud_keeps_existing_store(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A login the cloud denied leaves an existing store byte for byte as it was."""
    seed_store(store_path, cloud)
    seeded = store_path.read_bytes()
    cloud.login_error = "access_denied"
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 1, run
    assert store_path.read_bytes() == seeded


async def test_login_without_expiry_stores_no_expires_at(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A login answer without access_token_expires_at is stored without expiresAt (SPEC §2: "expired")."""
    cloud.login_omit_expiry = True
    run, status, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    assert status == 200
    document = stored_document(store_path)
    assert "expiresAt" not in document
    assert document["refreshToken"]


async def test_login_without_expiry_refreshes_on_first_token(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """After a login without expiry, the first ``sidecar token`` refreshes once and prints the new token."""
    cloud.login_omit_expiry = True
    login, _, _ = await login_through_browser(start, cloud, store_path)
    assert login.code == 0, login
    assert cloud.refresh_calls == 0
    run = await finish(await start("token", "--store", str(store_path)))
    assert run.code == 0, run
    assert cloud.refresh_calls == 1
    document = stored_document(store_path)
    assert "expiresAt" in document
    assert run.out == f"{document['accessToken']}\n"


async def test_login_nobody_visits_times_out_with_exit_1(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """With --login-timeout 1 and no browser, the command exits 1 within a few seconds saying it timed out, no traceback."""
    began = time.monotonic()
    process = await start(*login_args(cloud, store_path, "--login-timeout", "1"))
    run = await finish(process, timeout=10.0)
    assert run.code == 1, run
    assert time.monotonic() - began < 8.0
    errors = error_lines(run.err)
    assert len(errors) == 1, run.err
    assert "timed out" in errors[0]
    assert "Traceback" not in run.err


async def test_login_timeout_writes_no_store(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A login that timed out creates no store file."""
    run = await finish(await start(*login_args(cloud, store_path, "--login-timeout", "1")), timeout=10.0)
    assert run.code == 1, run
    assert not store_path.exists()


async def test_login_without_upstream_or_store_exits_2_with_one_line(start: Start, store_path: Path) -> None:
    """Without --upstream and with an empty store, login exits 2 with one line naming the missing upstream."""
    run = await finish(await start("login", "--no-browser", "--store", str(store_path)))
    assert run.code == 2, run
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert "upstream" in lines[0]
    assert not store_path.exists()


@pytest.fixture
def fake_browser(tmp_path: Path) -> tuple[str, Path]:
    """A BROWSER command that only records the URLs it was asked to open, and the file it records them in."""
    opened = tmp_path / "opened.txt"
    script = tmp_path / "fake-browser"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{opened}"\n')
    script.chmod(0o700)
    return str(script), opened


async def test_login_opens_the_browser_at_the_login_url(
    start: Start, cloud: MockCloud, store_path: Path, fake_browser: tuple[str, Path]
) -> None:
    """Without --no-browser the command hands the login URL to $BROWSER, and completing it there logs in."""
    command, opened = fake_browser
    process = await start(
        "login", "--upstream", cloud.base_url, "--store", str(store_path), extra_env={"BROWSER": command}
    )
    seen, printed = await read_until(process, LOGIN_URL_MARK)
    await poll_until(
        lambda: opened.exists() and opened.read_text().strip(), TIMEOUT, "the browser being asked to open the login URL"
    )
    assert opened.read_text().split() == [printed]
    status, _, _ = await browse(printed)
    run = await finish(process, seen)
    assert status == 200
    assert run.code == 0, run


async def test_login_no_browser_never_starts_the_browser(
    start: Start, cloud: MockCloud, store_path: Path, fake_browser: tuple[str, Path]
) -> None:
    """With --no-browser the command only prints the URL, even when $BROWSER is set."""
    command, opened = fake_browser
    process = await start(*login_args(cloud, store_path), extra_env={"BROWSER": command})
    seen, url = await read_until(process, LOGIN_URL_MARK)
    await browse(url)
    run = await finish(process, seen)
    assert run.code == 0, run
    assert not opened.exists()


async def test_login_keeps_unknown_store_fields(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A login over an existing store keeps the fields sidecar does not know (SPEC §2)."""
    seed_store(store_path, cloud)
    document = stored_document(store_path)
    store_path.write_bytes(orjson.dumps({**document, "deviceName": "laptop"}))
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    after = stored_document(store_path)
    assert after["deviceName"] == "laptop"
    assert after["accessToken"] != document["accessToken"]


async def test_login_creates_store_directory_0700(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """The store directory a login creates is private to its owner."""
    assert not store_path.parent.exists()
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    assert stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700


async def test_login_waits_for_the_store_lock(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A finished login writes the store only once another process lets go of the store lock."""
    store = TokenFile(store_path)
    fd = store.acquire_lock()
    try:
        process = await start(*login_args(cloud, store_path))
        seen, url = await read_until(process, LOGIN_URL_MARK)
        status, _, _ = await browse(url)
        assert status == 200
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), 1.0)
        assert not store_path.exists()
    finally:
        store.release_lock(fd)
    run = await finish(process, seen)
    assert run.code == 0, run
    assert stored_document(store_path)["apiUrl"] == cloud.base_url


async def test_login_interrupted_exits_130_without_traceback(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """Ctrl-C while waiting for the browser exits 130 with one line, no traceback, and no store."""
    process = await start(*login_args(cloud, store_path))
    seen, _ = await read_until(process, LOGIN_URL_MARK)
    process.send_signal(signal.SIGINT)
    run = await finish(process, seen)
    assert run.code == 130, run
    assert "Traceback" not in run.err
    assert error_lines(run.err) == ["sidecar: interrupted"]
    assert not store_path.exists()


# -- the poll flow, as a subprocess ------------------------------------------


async def test_poll_login_prints_device_url_with_one_time_code(
    start: Start, cloud: MockCloud, store_path: Path
) -> None:
    """``login --flow poll`` prints API/cli-login?code=c_<32 base64url chars> (24 random bytes)."""
    process = await start("login", "--flow", "poll", "--upstream", cloud.base_url, "--store", str(store_path))
    _, url = await read_until(process, DEVICE_URL_MARK)
    device = URL(url)
    assert str(device.with_query(None)) == cloud.base_url + "/cli-login"
    code = device.query["code"]
    assert CODE_PATTERN.fullmatch(code), code
    assert len(base64.urlsafe_b64decode(code[2:] + "==")) == 24


async def test_poll_login_approved_exits_0_and_stores_pair(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """Opening the device URL approves the code; the polling command then exits 0 with a live pair stored."""
    process = await start("login", "--flow", "poll", "--upstream", cloud.base_url, "--store", str(store_path))
    seen, url = await read_until(process, DEVICE_URL_MARK)
    status, _, _ = await browse(url)
    assert status == 200
    run = await finish(process, seen, timeout=POLL_EXIT_TIMEOUT)
    assert run.code == 0, run
    document = stored_document(store_path)
    assert cloud.access_token_valid(str(document["accessToken"]))
    assert document["refreshToken"]
    assert document["apiUrl"] == cloud.base_url
    assert "expiresAt" in document
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert str(document["accessToken"]) not in run.err + run.out


async def test_poll_login_error_exits_1_naming_it(start: Start, cloud: MockCloud, store_path: Path) -> None:
    """A poll answered with error access_denied ends the command with exit 1 and the error named on stderr."""
    cloud.poll_error = "access_denied"
    run = await finish(await start("login", "--flow", "poll", "--upstream", cloud.base_url, "--store", str(store_path)))
    assert run.code == 1, run
    errors = error_lines(run.err)
    assert len(errors) == 1, run.err
    assert "access_denied" in errors[0]
    assert not store_path.exists()


# -- status after a login -----------------------------------------------------


@pytest.fixture
async def logged_in(start: Start, cloud: MockCloud, store_path: Path) -> Path:
    """A store written by a real callback login."""
    run, _, _ = await login_through_browser(start, cloud, store_path)
    assert run.code == 0, run
    return store_path


async def test_status_after_login_names_user_upstream_and_time_left(
    start: Start, cloud: MockCloud, logged_in: Path
) -> None:
    """``sidecar status`` after a login exits 0 and says alice, the upstream and about a day left."""
    run = await finish(await start("status", "--store", str(logged_in)))
    assert run.code == 0, run
    assert "alice" in run.out
    assert cloud.base_url in run.out
    # A day minus the second or so the login took; round() can make that "24h 0m".
    assert re.search(r"\((23h \d{1,2}m|24h 0m) left\)", run.out), run.out


async def test_status_json_after_login_names_alice(start: Start, cloud: MockCloud, logged_in: Path) -> None:
    """``sidecar status --json`` after a login reports loggedIn, the upstream and user.name alice."""
    run = await finish(await start("status", "--json", "--store", str(logged_in)))
    assert run.code == 0, run
    report = orjson.loads(run.out)
    assert report["loggedIn"] is True
    assert report["apiUrl"] == cloud.base_url
    assert report["user"]["name"] == "alice"


# -- callback_flow in process -------------------------------------------------


async def announced(urls: list[str], timeout: float = 5.0) -> str:
    """The first URL a flow announced, waiting for it briefly."""
    await poll_until(lambda: urls, timeout, "the flow announcing a URL", interval=0.01)
    return urls[0]


async def complete_in_browser(
    login_flow: Coroutine[Any, Any, TokenPair], urls: list[str]
) -> tuple[str, int, TokenPair]:
    """Run ``login_flow`` (it announces into ``urls``), open the URL it announces, and wait for its pair: (URL, page status, pair)."""
    flow = asyncio.ensure_future(login_flow)
    try:
        url = await announced(urls)
        status, _, _ = await browse(url)
        return url, status, await asyncio.wait_for(flow, 5.0)
    finally:
        flow.cancel()


async def test_callback_flow_returns_the_redirected_pair(cloud: MockCloud, clock: FakeClock) -> None:
    """The pair from the cloud's redirect comes back with the upstream as apiUrl and the injected clock as obtainedAt."""
    urls: list[str] = []
    _, status, pair = await complete_in_browser(
        callback_flow(cloud.base_url, timeout=5.0, announce=urls.append, clock=clock), urls
    )
    assert status == 200
    assert isinstance(pair, TokenPair)
    assert pair.access_token is not None and cloud.access_token_valid(pair.access_token)
    assert pair.api_url == cloud.base_url
    assert pair.expires_at is not None and abs(pair.expires_at - (clock.now + DAY)) < 1.0
    assert pair.obtained_at == clock.now


async def test_callback_flow_closes_its_listener_afterwards(cloud: MockCloud) -> None:
    """Once the login is done the one-shot callback port refuses connections."""
    urls: list[str] = []
    url, _, _ = await complete_in_browser(callback_flow(cloud.base_url, timeout=5.0, announce=urls.append), urls)
    callback = URL(URL(url).query["redirect_uri"])
    with pytest.raises(aiohttp.ClientConnectionError):
        await browse(str(callback.with_query(state="late")))


async def test_callback_flow_incomplete_answer_is_login_error(cloud: MockCloud) -> None:
    """A callback with the right state but no tokens gets a 400 page and the flow raises LoginError."""
    urls: list[str] = []
    flow = asyncio.ensure_future(callback_flow(cloud.base_url, timeout=5.0, announce=urls.append))
    try:
        login = URL(await announced(urls))
        callback = URL(login.query["redirect_uri"]).with_query(state=login.query["state"], access_token="at_only")
        status, _, _ = await browse(str(callback))
        with pytest.raises(LoginError, match="refresh token"):
            await asyncio.wait_for(flow, 5.0)
    finally:
        flow.cancel()
    assert status == 400


async def test_callback_flow_non_ascii_state_is_a_state_mismatch(cloud: MockCloud) -> None:
    """A callback whose state holds non-ASCII characters is refused like any wrong state: 400 and LoginError naming the state."""
    urls: list[str] = []
    flow = asyncio.ensure_future(callback_flow(cloud.base_url, timeout=2.0, announce=urls.append))
    try:
        login = URL(await announced(urls))
        status, _, _ = await browse(str(URL(login.query["redirect_uri"]).with_query(state="\u00e9t\u00e9")))
        assert status == 400
        with pytest.raises(LoginError, match="state"):
            await asyncio.wait_for(flow, 5.0)
    finally:
        flow.cancel()


async def test_callback_flow_works_under_a_path_prefix(clock: FakeClock) -> None:
    """An upstream with a path prefix gets the login request under that prefix and the pair names it as apiUrl."""
    urls: list[str] = []
    async with serving(MockCloud(prefix="/cloud", clock=clock)) as prefixed:
        url, status, pair = await complete_in_browser(
            callback_flow(prefixed.base_url, timeout=5.0, announce=urls.append), urls
        )
    assert url.startswith(prefixed.base_url + "/api/v1/cli/login?")
    assert status == 200
    assert pair.api_url == prefixed.base_url


async def test_callback_flow_times_out_with_login_error(cloud: MockCloud) -> None:
    """Nobody coming back within the timeout raises LoginError saying it timed out."""
    with pytest.raises(LoginError, match="timed out"):
        await asyncio.wait_for(callback_flow(cloud.base_url, timeout=0.2, announce=lambda url: None), 5.0)


# -- poll_flow in process -----------------------------------------------------


async def test_poll_flow_waits_while_pending_then_returns_pair(cloud: MockCloud, clock: FakeClock) -> None:
    """poll_flow keeps polling while the code is pending and returns the pair once the device page approves it."""
    urls: list[str] = []
    async with aiohttp.ClientSession() as session:
        flow = asyncio.ensure_future(
            poll_flow(cloud.base_url, session, timeout=5.0, announce=urls.append, interval=FAST_INTERVAL, clock=clock)
        )
        try:
            url = await announced(urls)
            await asyncio.sleep(FAST_INTERVAL * 4)
            polls_before_approval = cloud.requests_seen
            await browse(url)
            pair = await asyncio.wait_for(flow, 5.0)
        finally:
            flow.cancel()
    assert polls_before_approval >= 2
    assert pair.access_token is not None and cloud.access_token_valid(pair.access_token)
    assert pair.api_url == cloud.base_url
    assert pair.obtained_at == clock.now


async def test_poll_flow_works_under_a_path_prefix(clock: FakeClock) -> None:
    """An upstream with a path prefix gets the device page and the polls under that prefix."""
    urls: list[str] = []
    async with serving(MockCloud(prefix="/cloud", clock=clock)) as prefixed, aiohttp.ClientSession() as session:
        url, status, pair = await complete_in_browser(
            poll_flow(prefixed.base_url, session, timeout=5.0, announce=urls.append, interval=FAST_INTERVAL), urls
        )
    assert url.startswith(prefixed.base_url + "/cli-login?code=c_")
    assert status == 200
    assert pair.access_token is not None and prefixed.access_token_valid(pair.access_token)


async def test_poll_flow_http_500_is_login_error_naming_it(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """A poll answered with HTTP 500 raises LoginError naming 500 at once."""
    calls = 0

    async def poll(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get(POLL_PATH, poll)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(LoginError, match="500"):
            await asyncio.wait_for(
                poll_flow(
                    str(server.make_url("")), session, timeout=5.0, announce=lambda url: None, interval=FAST_INTERVAL
                ),
                5.0,
            )
    assert calls == 1


async def test_poll_flow_200_pending_means_wait(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    """A 200 with {"status": "pending"} is waited out like a 202, and snake_case tokens are accepted."""
    calls = 0

    async def poll(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return web.json_response({"status": "pending"})
        return web.json_response(
            {"access_token": "at_x", "refresh_token": "rt_x", "access_token_expires_at": "2030-01-01T00:00:00Z"}
        )

    app = web.Application()
    app.router.add_get(POLL_PATH, poll)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        pair = await asyncio.wait_for(
            poll_flow(
                str(server.make_url("")), session, timeout=5.0, announce=lambda url: None, interval=FAST_INTERVAL
            ),
            5.0,
        )
    assert calls == 3
    assert (pair.access_token, pair.refresh_token) == ("at_x", "rt_x")
    assert pair.expires_at == parse_timestamp("2030-01-01T00:00:00Z")


async def test_poll_flow_times_out_with_login_error(cloud: MockCloud) -> None:
    """A code nobody approves raises LoginError saying it timed out once the timeout passes."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(LoginError, match="timed out"):
            await asyncio.wait_for(
                poll_flow(cloud.base_url, session, timeout=0.3, announce=lambda url: None, interval=FAST_INTERVAL), 5.0
            )


async def test_poll_flow_unreachable_cloud_is_login_error() -> None:
    """A cloud that refuses the connection raises LoginError saying it could not be reached."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(LoginError, match="could not be reached"):
            await asyncio.wait_for(
                poll_flow(
                    f"http://127.0.0.1:{free_port()}",
                    session,
                    timeout=5.0,
                    announce=lambda url: None,
                    interval=FAST_INTERVAL,
                ),
                5.0,
            )


def test_one_time_code_is_c_and_24_random_bytes_base64url() -> None:
    """one_time_code is "c_" + 24 bytes in unpadded base64url, different every time."""
    codes = {one_time_code() for _ in range(50)}
    assert len(codes) == 50
    for code in codes:
        assert CODE_PATTERN.fullmatch(code), code
        assert len(base64.urlsafe_b64decode(code[2:] + "==")) == 24

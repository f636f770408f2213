"""The oauth2 flavor against a real, independently written provider: node ``oidc-provider`` 9.

The provider (tests/oidc-provider/server.mjs) runs once for the module on a
free port, issuer ``http://127.0.0.1:PORT``.  ``sidecar login``, ``token``,
``serve``, ``status`` and ``logout`` run as real subprocesses given only the
issuer and the client id; the "browser" is an aiohttp client with a cookie
jar that fills in the provider's own development login and consent pages
(any login and password) and follows its redirects to sidecar's loopback
callback.  What the provider thinks of a token is asked of the provider
itself: its token endpoint (``invalid_grant``) and its introspection endpoint,
as the confidential resource-server client.

Refresh-token reuse makes oidc-provider revoke the whole grant, so each test
that spends or kills a token does it on a login of its own.  Skipped only when
``node`` is not installed; the packages come from ``npm ci`` (.ci/run).
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import secrets
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import finish, free_port, kill_running, read_lines_until, run_sidecar, start_sidecar, stored
from helpers.serving import running_serve
from yarl import URL

from sidecar.auth.oidc.pkce import new_pkce
from sidecar.tokens import TokenPair

SERVER = Path(__file__).parent / "oidc-provider" / "server.mjs"
NODE = shutil.which("node")
CLIENT_ID = "sidecar-cli"
RESOURCE_SERVER = ("resource-server", "resource-server-secret")  # as in server.mjs
ACCOUNT = {"sub": "alice", "name": "Alice Example", "email": "alice@example.test"}  # name and email as in server.mjs
PROFILE_SCOPE = "openid offline_access profile email"
START_TIMEOUT = 15.0
STEP_TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: the real OpenID provider needs Node.js")


@dataclass(frozen=True, slots=True)
class Provider:
    issuer: str

    def url(self, path: str) -> str:
        return self.issuer + path


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    """oidc-provider on a free loopback port for the whole module; stopped (SIGTERM, then kill) at the end."""
    assert NODE is not None
    if not (SERVER.parent / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("tests/oidc-provider has no node_modules: run `npm ci` there (.ci/run does)")
    port = free_port()
    process = subprocess.Popen(
        [NODE, str(SERVER), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if ready else ""  # "ready <issuer>", printed once listening
        if not line.startswith("ready "):
            pytest.fail(f"oidc-provider did not start (exit {process.poll()}): {line!r}")
        issuer = line.split()[1]
        assert issuer == f"http://127.0.0.1:{port}"
        yield Provider(issuer)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the browser: the provider's own HTML pages -----------------------------------------


@dataclass(slots=True)
class Form:
    action: str
    fields: dict[str, str] = field(default_factory=dict)
    element_id: str | None = None


class _Forms(html.parser.HTMLParser):
    """Every ``<form>`` on a page with its inputs (name to value)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._open: Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {key: value or "" for key, value in attrs}
        if tag == "form":
            self._open = Form(named.get("action", ""), element_id=named.get("id"))
            self.forms.append(self._open)
        elif tag == "input" and self._open is not None and "name" in named:
            self._open.fields[named["name"]] = named.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None


def forms_on(text: str) -> list[Form]:
    parser = _Forms()
    parser.feed(text)
    return parser.forms


@dataclass(frozen=True, slots=True)
class Page:
    """Where the browser stopped: the last URL and its answer, or (``stopped``) a redirect it did not follow."""

    url: str
    status: int
    text: str
    stopped: bool = False


class Browser:
    """A cookie-keeping client that follows redirects itself, so it can stop before a given URL prefix."""

    def __init__(self, session: aiohttp.ClientSession, stop_at: str | None = None) -> None:
        self.session = session
        self.stop_at = stop_at
        self.visited: list[str] = []

    async def go(self, method: str, url: str, data: Mapping[str, str] | None = None) -> Page:
        for _ in range(20):
            if self.stop_at is not None and url.startswith(self.stop_at):
                return Page(url, 0, "", stopped=True)
            self.visited.append(url)
            async with self.session.request(method, url, data=data, allow_redirects=False) as response:
                text = await response.text()
                location = response.headers.get("Location")
                if response.status not in (301, 302, 303, 307, 308) or location is None:
                    return Page(str(response.url), response.status, text)
            url = str(URL(url).join(URL(location)))
            method, data = "GET", None
        raise AssertionError(f"more than 20 redirects: {self.visited}")

    async def submit(self, page: Page, form: Form, **values: str) -> Page:
        return await self.go("POST", str(URL(page.url).join(URL(form.action))), {**form.fields, **values})

    async def sign_in(self, page: Page, login: str = ACCOUNT["sub"]) -> Page:
        """Fill in the provider's login and consent pages as they come; the page after the last one."""
        for _ in range(4):
            if page.stopped or page.status != 200:
                return page
            form = next((f for f in forms_on(page.text) if f.fields.get("prompt") in ("login", "consent")), None)
            if form is None:
                return page
            if form.fields["prompt"] == "login":
                page = await self.submit(page, form, login=login, password="any password")
            else:
                page = await self.submit(page, form)
        raise AssertionError(f"the provider kept asking: {self.visited}")


@asynccontextmanager
async def browser(stop_at: str | None = None) -> AsyncIterator[Browser]:
    # unsafe=True: the provider is 127.0.0.1, and aiohttp keeps no cookies for IP hosts otherwise.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browser(session, stop_at)


async def authorize_in_browser(url: str) -> Page:
    """Open ``url`` (the authorization URL sidecar printed), sign in and consent; the page the browser lands on."""
    async with browser() as b:
        return await b.sign_in(await b.go("GET", url))


# -- the provider's endpoints, asked directly ---------------------------------------------


async def post(provider: Provider, path: str, form: Mapping[str, str], *, basic: bool = False) -> tuple[int, Any]:
    headers = (
        {"Authorization": "Basic " + base64.b64encode(":".join(RESOURCE_SERVER).encode()).decode()} if basic else {}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(provider.url(path), data=form, headers=headers) as answer,
    ):
        return answer.status, await answer.json()


async def introspect(provider: Provider, token: str) -> dict[str, Any]:
    """The provider's introspection answer for ``token``, asked as the confidential resource server."""
    status, document = await post(provider, "/token/introspection", {"token": token}, basic=True)
    assert status == 200, document
    assert isinstance(document, dict)
    return document


async def refresh_error(provider: Provider, refresh_token: str) -> str | None:
    """Spend ``refresh_token`` at the provider: None when it worked, else the error code."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": CLIENT_ID}
    status, document = await post(provider, "/token", form)
    if status == 200:
        return None
    assert status == 400, (status, document)
    return str(document["error"])


# -- sidecar as a user runs it -------------------------------------------------------------


def args(provider: Provider, store_path: Path, *extra: str) -> tuple[str, ...]:
    """The flags of a user who has only the issuer and the client id."""
    return (
        "--flavor",
        "oauth2",
        "--issuer",
        provider.issuer,
        "--client-id",
        CLIENT_ID,
        "--store",
        str(store_path),
        *extra,
    )


async def cli_login(env: dict[str, str], provider: Provider, store_path: Path, *extra: str) -> tuple[TokenPair, str]:
    """``sidecar login --no-browser`` through the provider's pages; the stored pair and the URL sidecar printed."""
    process = await start_sidecar(env, "login", "--no-browser", *args(provider, store_path, *extra))
    try:
        seen = await read_lines_until(process.stderr, provider.url("/auth?"), STEP_TIMEOUT, "stderr")
        url = next(word for word in seen[-1].split() if word.startswith(provider.url("/auth?")))
        page = await authorize_in_browser(url)
        run = await finish(process, "".join(seen), timeout=STEP_TIMEOUT)
    finally:
        await kill_running([process])
    assert run.code == 0, run
    assert (page.status, URL(page.url).path) == (200, "/callback"), page  # sidecar's own page, after the exchange
    assert "Logged in" in page.text
    return stored(store_path), url


# -- the tests ---------------------------------------------------------------------------------


async def test_login_discovers_everything_from_the_issuer_and_stores_a_live_pair(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """Given only issuer and client id, login finds the provider's endpoints, asks with PKCE S256 and a loopback port, and stores a pair the provider says is live."""
    pair, url = await cli_login(env, provider, store_path)
    query = URL(url).query
    assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    redirect = URL(query["redirect_uri"])
    assert (redirect.host, redirect.path) == ("127.0.0.1", "/callback") and redirect.port not in (None, 80)
    assert pair.access_token is not None and pair.refresh_token is not None
    assert pair.expires_at is not None and pair.expires_at - time.time() <= 10.5  # the provider's 10 s TTL
    active = await introspect(provider, pair.access_token)
    assert active["active"] is True and active["client_id"] == CLIENT_ID and active["sub"] == ACCOUNT["sub"]
    assert (await introspect(provider, pair.refresh_token))["active"] is True


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


async def _authorization_code(provider: Provider, challenge: str, redirect_uri: str) -> str:
    """An authorization this test drives itself (nothing listens on the redirect URI): the code."""
    url = URL(provider.url("/auth")).with_query(
        response_type="code",
        client_id=CLIENT_ID,
        redirect_uri=redirect_uri,
        scope="openid",
        state=secrets.token_urlsafe(16),
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    async with browser(stop_at=redirect_uri) as b:
        page = await b.sign_in(await b.go("GET", str(url)))
    assert page.stopped, page
    return URL(page.url).query["code"]


async def test_the_code_exchange_needs_the_right_pkce_verifier(provider: Provider) -> None:
    """A code issued for sidecar's S256 challenge is refused with a wrong verifier or none, and exchanged with the right one."""
    pkce = new_pkce()  # sidecar's own PKCE: the provider must agree on its S256 challenge
    assert pkce.challenge == _challenge(pkce.verifier)
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    exchange = {"grant_type": "authorization_code", "redirect_uri": redirect_uri, "client_id": CLIENT_ID}

    code = await _authorization_code(provider, pkce.challenge, redirect_uri)
    wrong = await post(provider, "/token", {**exchange, "code": code, "code_verifier": new_pkce().verifier})
    assert wrong[0] == 400 and wrong[1]["error"] == "invalid_grant", wrong

    code = await _authorization_code(provider, pkce.challenge, redirect_uri)
    missing = await post(provider, "/token", {**exchange, "code": code})
    assert missing[0] == 400 and missing[1]["error"] in ("invalid_grant", "invalid_request"), missing

    code = await _authorization_code(provider, pkce.challenge, redirect_uri)
    right = await post(provider, "/token", {**exchange, "code": code, "code_verifier": pkce.verifier})
    assert right[0] == 200 and right[1]["token_type"] == "Bearer", right


async def test_force_refresh_rotates_and_reusing_the_old_refresh_token_kills_the_grant(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """``token --force-refresh`` stores a new pair the provider honours; the spent refresh token is refused, and its reuse revokes the grant."""
    first, _ = await cli_login(env, provider, store_path)
    run = await run_sidecar(env, "token", "--force-refresh", *args(provider, store_path))
    assert run.code == 0, run
    second = stored(store_path)
    assert run.out.strip() == second.access_token
    assert second.access_token != first.access_token and second.refresh_token != first.refresh_token
    assert second.access_token is not None and second.refresh_token is not None
    assert (await introspect(provider, second.access_token))["active"] is True
    assert (await introspect(provider, second.refresh_token))["active"] is True
    # Last: reuse of the spent token (oidc-provider then revokes the whole grant, the new pair with it).
    assert first.refresh_token is not None
    assert await refresh_error(provider, first.refresh_token) == "invalid_grant"
    assert (await introspect(provider, second.access_token))["active"] is False
    assert await refresh_error(provider, second.refresh_token) == "invalid_grant"


@asynccontextmanager
async def resource_server(provider: Provider) -> AsyncIterator[tuple[str, list[str]]]:
    """An API that lets a request in only if the provider's introspection calls its bearer token active; its URL, and the tokens it saw."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return web.json_response({"error": "no bearer token"}, status=401)
        seen.append(token)
        answer = await introspect(provider, token)
        if answer.get("active") is not True or answer.get("client_id") != CLIENT_ID:
            return web.json_response({"error": "inactive token"}, status=401)
        return web.json_response({"sub": answer["sub"], "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_serve_reaches_a_resource_server_that_introspects_at_the_provider(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """Through ``sidecar serve`` a request gets 200 from an API that checks the bearer token at the provider; without sidecar it gets 401."""
    async with resource_server(provider) as (api, seen):
        pair, _ = await cli_login(env, provider, store_path, "--upstream", api)
        async with aiohttp.ClientSession() as client:
            async with client.get(api + "/v1/things") as direct:
                assert direct.status == 401  # the API does check
            listen = f"127.0.0.1:{free_port()}"
            async with running_serve(env, listen, *args(provider, store_path, "--upstream", api)) as served:
                async with client.get(served.base_url + "/v1/things") as answer:
                    body = await answer.text()
                    assert answer.status == 200, body
        assert orjson.loads(body) == {"sub": ACCOUNT["sub"], "path": "/v1/things"}
        assert seen and seen[-1] in (pair.access_token, stored(store_path).access_token)


async def test_logout_revokes_the_refresh_token_at_the_provider(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """``logout`` exits 0, removes the store, and the provider then refuses the refresh token (revoked)."""
    pair, _ = await cli_login(env, provider, store_path)
    assert pair.refresh_token is not None
    assert (await introspect(provider, pair.refresh_token))["active"] is True
    run = await run_sidecar(env, "logout", *args(provider, store_path))
    assert run.code == 0, run
    assert not store_path.exists()
    assert (await introspect(provider, pair.refresh_token))["active"] is False
    assert await refresh_error(provider, pair.refresh_token) == "invalid_grant"


async def test_status_shows_the_account_from_userinfo(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """With profile and email granted, ``status`` names the account the provider's userinfo reports."""
    await cli_login(env, provider, store_path, "--scope", PROFILE_SCOPE)
    run = await run_sidecar(env, "status", *args(provider, store_path, "--scope", PROFILE_SCOPE))
    assert run.code == 0, run
    assert f"{ACCOUNT['name']} <{ACCOUNT['email']}> (subject {ACCOUNT['sub']})" in run.out
    as_json = await run_sidecar(env, "status", "--json", *args(provider, store_path, "--scope", PROFILE_SCOPE))
    assert as_json.code == 0, as_json
    assert orjson.loads(as_json.out)["user"] == ACCOUNT


async def test_device_login_through_the_providers_device_pages(
    env: dict[str, str], provider: Provider, store_path: Path
) -> None:
    """``login --flow device`` prints the provider's verification_uri_complete; confirming the code there and signing in ends the login with exit 0 and a live pair."""
    mark = provider.url("/device?user_code=")
    process = await start_sidecar(env, "login", "--flow", "device", *args(provider, store_path))
    try:
        seen = await read_lines_until(process.stderr, mark, STEP_TIMEOUT, "stderr")
        url = next(word for word in seen[-1].split() if word.startswith(mark))
        user_code = URL(url).query["user_code"]
        async with browser() as b:
            page = await b.go("GET", url)  # the user code form, filled in from the URI
            entry = next(f for f in forms_on(page.text) if "user_code" in f.fields)
            assert entry.fields["user_code"] == user_code
            page = await b.submit(page, entry)  # "Confirm Device", showing the code
            confirm = next(f for f in forms_on(page.text) if f.fields.get("confirm") == "yes")
            assert confirm.fields["user_code"] == user_code and user_code in page.text
            done = await b.sign_in(await b.submit(page, confirm))
        run = await finish(process, "".join(seen), timeout=STEP_TIMEOUT)
    finally:
        await kill_running([process])
    assert (done.status, "Sign-in Success" in done.text) == (200, True), done
    assert run.code == 0, run
    assert user_code in run.err
    pair = stored(store_path)
    assert pair.access_token is not None and pair.refresh_token is not None
    answer = await introspect(provider, pair.access_token)
    assert answer["active"] is True and answer["sub"] == ACCOUNT["sub"]

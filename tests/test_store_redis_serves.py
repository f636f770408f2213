"""Several real ``sidecar serve`` processes (and CLI commands) on one Redis login (SPEC §7).

Stalled lock holders, expiries under traffic, a Redis killed and restarted,
logins landing in the middle of a refresh.  Expiry is injected at the mock
cloud (its clock, or revoking its access tokens): no test waits for a token
to age.  The store-level behaviour is in test_store_redis.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    FakeClock,
    child_env,
    finish,
    free_port,
    pair_from_cloud,
    poll_until,
    read_lines_until,
    run_sidecar,
    start_sidecar,
)
from helpers.redis_server import RedisServer, redis_server
from helpers.serving import ECHO, Served, running_serve, status_of

from sidecar.mockcloud import MockCloud
from sidecar.store.interface import write_pair
from sidecar.store.redis_store import RedisStore
from sidecar.store.redis_url import parse_redis_url
from sidecar.tokens import TokenPair

__all__ = ["redis_server"]  # the fixture, imported for pytest

# A short lock TTL, so a stalled holder is taken over within half a second.
FAST_TAKEOVER = "&lock_ttl=0.5"


async def seed(url: str, pair: TokenPair) -> None:
    store = RedisStore(parse_redis_url(url))
    try:
        await write_pair(store, lambda _: pair)
    finally:
        await store.aclose()


async def stored_pair(url: str) -> TokenPair | None:
    store = RedisStore(parse_redis_url(url))
    try:
        return (await store.read()).pair
    finally:
        await store.aclose()


async def echo(served: Served, session: aiohttp.ClientSession) -> tuple[int, str | None]:
    """One GET of the echo endpoint through ``served``: its status and the Authorization the cloud saw."""
    async with session.get(served.base_url + ECHO) as response:
        if response.status != 200:
            await response.read()
            return response.status, None
        answer: dict[str, Any] = await response.json()
        return 200, answer["authorization"]


@contextlib.asynccontextmanager
async def serves(env: dict[str, str], count: int) -> AsyncIterator[list[tuple[Served, aiohttp.ClientSession]]]:
    """``count`` running serves on ``env``'s store, each with a client session."""
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(running_serve(env, f"127.0.0.1:{free_port()}", ready=False))
            for _ in range(count)
        ]
        await asyncio.gather(*(served.wait_ready() for served in started))  # they start side by side
        yield [(served, await stack.enter_async_context(served.session())) for served in started]


def login_of(cloud: MockCloud) -> TokenPair:
    return pair_from_cloud(cloud.issue_pair(), cloud.base_url)


# -- the stalled holder ---------------------------------------------------------


async def stall_a_holder(
    cloud: MockCloud, a: tuple[Served, aiohttp.ClientSession], b: tuple[Served, aiohttp.ClientSession], hang: float
) -> tuple[asyncio.Future[tuple[int, str | None]], tuple[int, str | None]]:
    """A refreshes (its call held at the cloud for ``hang`` s) and is SIGSTOPped past its lock TTL while B takes over.

    Returns A's request still in flight and B's answer; A is continued.
    """
    cloud.revoke_access_tokens()  # the login's access token stops working: a 401 forces a refresh
    cloud.hang_next_refreshes(1, seconds=hang)
    in_flight = asyncio.ensure_future(echo(*a))
    await poll_until(lambda: cloud.refresh_calls == 1, 10, "A's refresh call reaching the cloud")
    os.kill(a[0].pid, signal.SIGSTOP)
    try:
        answer_b = await echo(*b)  # B waits out A's lock (0.5 s TTL, no renewal now), then refreshes
        assert cloud.refresh_calls == 2
    finally:
        os.kill(a[0].pid, signal.SIGCONT)
    return in_flight, answer_b


async def test_a_stalled_holder_is_taken_over_and_its_late_write_is_refused(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its refresh call already at the cloud: a cloud with a reuse grace honours both; the CAS keeps B's pair."""
    cloud.refresh_reuse_grace = 600.0
    url = redis_server.url("team") + FAST_TAKEOVER
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 2) as (a, b):
        in_flight, (status_b, token_b) = await stall_a_holder(cloud, a, b, hang=1.5)
        assert status_b == 200
        status_a, token_a = await in_flight
        assert status_a == 200 and token_a == token_b  # A's own pair was refused; it uses the stored one
        assert cloud.refresh_ok == 2 and cloud.chain_revocations == 0
        kept = await stored_pair(url)
        assert kept is not None and f"Bearer {kept.access_token}" == token_b
        assert "another write reached the token store first" in a[0].stderr
        assert [await echo(*one) for one in (a, b)] == [(200, token_b)] * 2


async def test_a_holder_stalled_before_the_cloud_redeemed_its_token_spends_nothing_on_waking(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Strict single use: A's call never got through (it timed out); on waking A adopts B's pair: no reuse, all 200."""
    url = redis_server.url("team") + FAST_TAKEOVER
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning", SIDECAR_READ_TIMEOUT="1.2")
    async with serves(env, 2) as (a, b):
        in_flight, (status_b, token_b) = await stall_a_holder(cloud, a, b, hang=3600)
        assert status_b == 200
        assert await in_flight == (200, token_b)
        assert cloud.refresh_ok == 1 and cloud.chain_revocations == 0
        assert [await echo(*one) for one in (a, b)] == [(200, token_b)] * 2


async def test_a_stalled_holder_whose_token_the_cloud_redeemed_twice_ends_in_a_clean_relogin(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """What is not recoverable: both calls spent one single-use token; reuse detection kills the login.

    Every serve then answers 511 (no crash, no restart), and one new import
    makes them all work again.
    """
    url = redis_server.url("team") + FAST_TAKEOVER
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 2) as (a, b):
        in_flight, (status_b, _) = await stall_a_holder(cloud, a, b, hang=1.5)
        assert status_b == 200
        await in_flight
        assert cloud.chain_revocations == 1

        async def both_answer(status: int) -> bool:
            return [(await echo(*one))[0] for one in (a, b)] == [status, status]

        await poll_until(lambda: both_answer(511), 10, "both serves answering 511")
        grant = cloud.issue_pair()
        imported = await run_sidecar(
            {**env, "SIDECAR_REFRESH_TOKEN": grant["refreshToken"], "SIDECAR_UPSTREAM": cloud.base_url}, "import"
        )
        assert imported.code == 0, imported.err
        await poll_until(lambda: both_answer(200), 10, "both serves working on the new login")


# -- expiries under traffic, many processes --------------------------------------


async def test_three_serves_under_traffic_through_five_expiries_refresh_once_each(
    cloud: MockCloud, clock: FakeClock, redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url()
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 3) as running:
        seen: list[list[tuple[float, int, str | None]]] = [[] for _ in running]
        stop = asyncio.Event()

        async def traffic(index: int) -> None:
            while not stop.is_set():
                status, token = await echo(*running[index])
                seen[index].append((time.monotonic(), status, token))

        def refreshes_reach(count: int) -> Callable[[], bool]:
            return lambda: cloud.refresh_ok == count

        def serve_uses(index: int, token: str) -> Callable[[], bool]:
            return lambda: any(seen_token == token for _, _, seen_token in seen[index])

        loops = [asyncio.ensure_future(traffic(i)) for i in range(len(running))]
        lags: list[float] = []
        try:
            for expiry in range(1, 6):
                clock.advance(cloud.access_ttl + 1)  # every access token issued so far has expired
                await poll_until(refreshes_reach(expiry), 10, f"rotation {expiry}")
                rotated_at = time.monotonic()
                pair = await stored_pair(url)
                assert pair is not None
                new = f"Bearer {pair.access_token}"
                for index in range(len(running)):
                    await poll_until(serve_uses(index, new), 5, f"serve {index} using rotation {expiry}")
                    first = min(at for at, _, t in seen[index] if t == new)
                    lags.append(first - rotated_at)
        finally:
            stop.set()
            await asyncio.gather(*loops)
    assert cloud.refresh_calls == 5 and cloud.chain_revocations == 0
    assert max(lags) < 1.0, lags
    statuses = {status for answers in seen for _, status, _ in answers}
    assert statuses == {200}
    assert all(len(answers) > 10 for answers in seen)


async def test_eight_token_commands_and_two_serves_on_one_expired_redis_login_refresh_once(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url()
    await seed(url, dataclasses.replace(login_of(cloud), expires_at=time.time() - 10))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with contextlib.AsyncExitStack() as stack:
        commands = [await start_sidecar(env, "token") for _ in range(8)]
        running = [
            await stack.enter_async_context(running_serve(env, f"127.0.0.1:{free_port()}", ready=False))
            for _ in range(2)
        ]
        results = await asyncio.gather(*(command.communicate() for command in commands))
        assert [command.returncode for command in commands] == [0] * 8, [err for _, err in results]
        for served in running:
            await served.wait_ready()
        sessions = [await stack.enter_async_context(served.session()) for served in running]
        answers = await asyncio.gather(*(echo(running[i % 2], sessions[i % 2]) for i in range(20)))
    tokens = {out.decode().strip() for out, _ in results}
    assert len(tokens) == 1
    assert answers == [(200, f"Bearer {tokens.pop()}")] * 20
    assert cloud.refresh_calls == 1


async def test_serve_workers_share_one_redis_login(cloud: MockCloud, redis_server: RedisServer, tmp_path: Path) -> None:
    """``serve --workers 3`` on an expired Redis login: one refresh for all workers, every request 200."""
    url = redis_server.url()
    await seed(url, dataclasses.replace(login_of(cloud), expires_at=time.time() - 10))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with running_serve(env, f"127.0.0.1:{free_port()}", "--workers", "3") as served, served.session() as session:
        statuses = await asyncio.gather(*(status_of(served, session) for _ in range(60)))
    assert statuses == [200] * 60
    assert cloud.refresh_calls == 1


# -- a login landing in the middle of a refresh ---------------------------------------


async def test_an_import_landing_during_a_refresh_is_never_overwritten(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A new login written while a serve's refresh is in flight: the refreshed pair is refused, the login kept and used."""
    url = redis_server.url()
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 1) as [one]:
        cloud.revoke_access_tokens()
        cloud.hang_next_refreshes(1, seconds=1.5)
        in_flight = asyncio.ensure_future(echo(*one))
        await poll_until(lambda: cloud.refresh_calls == 1, 10, "the refresh call reaching the cloud")
        # Another host's login (its own CAS on what it read, not waiting for this lock).
        landed = login_of(cloud)
        store = RedisStore(parse_redis_url(url))
        try:
            snapshot = await store.read()
            await (await store.begin_write(snapshot.version)).commit(landed)
        finally:
            await store.aclose()
        assert await in_flight == (200, f"Bearer {landed.access_token}")
        assert cloud.refresh_ok == 1  # the refresh did happen; its pair lost to the newer login
        kept = await stored_pair(url)
        assert kept is not None and kept.refresh_token == landed.refresh_token
        assert await echo(*one) == (200, f"Bearer {landed.access_token}")


async def test_a_browser_login_into_a_redis_store_reaches_running_serves(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """``sidecar login`` (the callback flow) writes to Redis like ``import``; logged-out serves then answer 200."""
    url = redis_server.url()
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 2) as running:
        assert [(await echo(*one))[0] for one in running] == [511, 511]
        process = await start_sidecar(env, "login", "--no-browser", "--upstream", cloud.base_url)
        seen = await read_lines_until(process.stderr, "/api/v1/cli/login?", 10, "login's stderr")
        login_url = next(word for word in seen[-1].split() if "/api/v1/cli/login?" in word)
        async with aiohttp.ClientSession() as browser, browser.get(login_url) as page:
            assert page.status == 200
        run = await finish(process, "".join(seen))
        assert run.code == 0, run.err
        pair = await stored_pair(url)
        assert pair is not None and cloud.access_token_valid(pair.access_token)

        async def both_logged_in() -> bool:
            return [await echo(*one) for one in running] == [(200, f"Bearer {pair.access_token}")] * 2

        await poll_until(both_logged_in, 5, "both serves using the new login")


async def test_an_import_command_during_a_refresh_waits_for_it_and_wins(
    cloud: MockCloud, redis_server: RedisServer, tmp_path: Path
) -> None:
    """``sidecar import`` takes the refresh lock: it lands after the refresh's write, so nothing overwrites it."""
    url = redis_server.url()
    await seed(url, login_of(cloud))
    env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
    async with serves(env, 1) as [one]:
        cloud.revoke_access_tokens()
        cloud.hang_next_refreshes(1, seconds=1.5)
        in_flight = asyncio.ensure_future(echo(*one))
        await poll_until(lambda: cloud.refresh_calls == 1, 10, "the refresh call reaching the cloud")
        grant = cloud.issue_pair()
        imported = await run_sidecar(
            {**env, "SIDECAR_REFRESH_TOKEN": grant["refreshToken"], "SIDECAR_UPSTREAM": cloud.base_url}, "import"
        )
        assert imported.code == 0, imported.err  # it waited for the refresh's lock, then wrote
        assert (await in_flight)[0] == 200
        kept = await stored_pair(url)
        # The import's token, or already the serve's rotation of it (the import carried no access token):
        # never the pair the refresh in flight made from the seed.
        assert kept is not None and cloud.same_login(kept.refresh_token, grant["refreshToken"])

        async def serving_the_import() -> bool:
            status, _ = await echo(*one)
            return status == 200 and cloud.refresh_ok == 2  # the imported refresh token was used

        await poll_until(serving_the_import, 10, "the serve adopting the imported login")


# -- Redis killed mid-traffic ------------------------------------------------------------


async def ready_of(served: Served, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with session.get(served.base_url + "/_sidecar/ready") as response:
        return response.status, await response.json()


@pytest.mark.parametrize("keeps_its_data", [True, False], ids=["restarted-with-aof", "restarted-empty"])
async def test_redis_killed_mid_traffic_and_restarted(cloud: MockCloud, tmp_path: Path, keeps_its_data: bool) -> None:
    """Down: the token in memory serves, ready/status say why, refreshes are 503 refresh-unavailable.

    Back with its data (AOF): everything resumes by itself.  Back empty:
    logged out (511), and one import makes every serve work again.  Never
    a crash, never a restart of serve.
    """
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    server.start()
    try:
        url = server.url()
        await seed(url, login_of(cloud))
        env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning")
        async with serves(env, 2) as running:
            assert [(await echo(*one))[0] for one in running] == [200, 200]
            server.stop()  # SIGKILL
            answers = [await echo(*one) for one in running for _ in range(5)]
            assert {status for status, _ in answers} == {200}  # nothing on the hot path touches Redis

            async def store_error_reported() -> bool:
                reported = []
                for one in running:
                    await echo(*one)
                    reported.append("cannot connect to Redis" in (await ready_of(*one))[1].get("storeError", ""))
                return all(reported)

            await poll_until(store_error_reported, 10, "ready naming the unreachable store")
            cloud.revoke_access_tokens()  # the token in memory no longer works: a refresh is needed
            for one in running:
                async with one[1].get(one[0].base_url + ECHO) as response:
                    assert response.status == 503
                    assert (await response.json())["type"].endswith("refresh-unavailable")
                ready_status, ready = await ready_of(*one)
                assert ready_status == 200 or "Redis" in ready["reason"]
            if not keeps_its_data:
                shutil.rmtree(directory)
                directory.mkdir()
            server.start()
            if keeps_its_data:

                async def all_200() -> bool:
                    return [(await echo(*one))[0] for one in running] == [200, 200]

                await poll_until(all_200, 20, "every serve working again")
                assert cloud.refresh_ok == 1 and cloud.chain_revocations == 0
            else:

                async def all_511() -> bool:
                    return [(await echo(*one))[0] for one in running] == [511, 511]

                await poll_until(all_511, 10, "every serve answering 511")
                grant = cloud.issue_pair()
                imported = await run_sidecar(
                    {**env, "SIDECAR_REFRESH_TOKEN": grant["refreshToken"], "SIDECAR_UPSTREAM": cloud.base_url},
                    "import",
                )
                assert imported.code == 0, imported.err

                async def all_200_again() -> bool:
                    return [(await echo(*one))[0] for one in running] == [200, 200]

                await poll_until(all_200_again, 10, "every serve working on the new login")
            for served, _ in running:
                assert served.process.returncode is None
                assert "Traceback" not in served.stderr
    finally:
        server.stop()


# -- the client key in the login's record (SPEC §9) -------------------------------------


async def keyed_echo(served: Served, session: aiohttp.ClientSession, headers: dict[str, str]) -> tuple[int, str]:
    async with session.get(served.base_url + ECHO, headers=headers) as response:
        return response.status, await response.text()


async def test_the_client_key_lives_in_the_redis_record_shared_by_every_serve(cloud: MockCloud, tmp_path: Path) -> None:
    """One key for every serve on the login; ``--rotate`` reaches them all within a second; it outlives a logout
    and a Redis that lost its data (a serve plants the key it knows again)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        url = server.url("team")
        await seed(url, login_of(cloud))
        env = child_env(tmp_path / "xdg", SIDECAR_STORE=url, SIDECAR_LOG_LEVEL="warning", SIDECAR_CLIENT_KEY="required")
        async with serves(env, 2) as running:
            printed = await run_sidecar(env, "client-key")
            assert printed.code == 0, printed.err
            key = printed.out.strip()

            def stored_key() -> str | None:
                answer = server.command("HGET", "sidecar:{team}:pair", "clientKey").decode()
                return None if answer.startswith("$-1") else answer.split("\r\n")[1]

            assert stored_key() == key
            for served, session in running:
                assert (await keyed_echo(served, session, {}))[0] == 403
                status, body = await keyed_echo(served, session, {"Authorization": f"Bearer {key}"})
                assert status == 200 and key not in body  # replaced by the real token
                async with session.get(served.base_url + "/_sidecar/status") as response:
                    text = await response.text()
                assert key not in text and "the record of redis://127.0.0.1" in text
            rotated = await run_sidecar(env, "client-key", "--rotate")
            assert rotated.code == 0 and key not in rotated.err
            new = rotated.out.strip()

            async def old_refused_everywhere() -> bool:
                answers = [(await keyed_echo(*one, {"X-Sidecar-Key": key}))[0] for one in running]
                return answers == [403, 403]

            started = time.monotonic()
            await poll_until(old_refused_everywhere, 5, "every serve refusing the rotated-out key")
            assert time.monotonic() - started < 1.5
            assert [(await keyed_echo(*one, {"X-Sidecar-Key": new}))[0] for one in running] == [200, 200]

            assert (await run_sidecar(env, "logout")).code == 0
            assert stored_key() == new  # the key belongs to the login's name
            server.stop()
            server.start()  # empty
            await poll_until(lambda: stored_key() is not None, 5, "a serve planting the key again")
            assert stored_key() == new
            for served, _ in running:
                assert key not in served.stderr and new not in served.stderr
    finally:
        server.stop()

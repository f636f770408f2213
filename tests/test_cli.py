"""The store commands (token, import, logout, status) as real subprocesses against the mock cloud.

Every command runs as ``python -m sidecar`` with a clean environment (no
``SIDECAR_*`` variables, ``XDG_CONFIG_HOME`` in tmp_path so no user config is
read), its own real token file, and the mock cloud serving from this test's
event loop while the child runs.
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Run, assert_one_line_failure, run_sidecar, seed_expired, seed_store, stored

from sidecar.mockcloud import MockCloud
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair, parse_timestamp


def assert_no_secrets(run: Run, *secrets: str | None) -> None:
    """None of ``secrets`` appears on stderr."""
    for secret in secrets:
        if secret:
            assert secret not in run.err


CORRUPT_STORES = {
    "bad-json": b'{"refreshToken": "rt_cut_off',
    "wrong-type": b'{"accessToken": "at_x", "refreshToken": 5, "expiresAt": "2030-01-01T00:00:00Z"}\n',
    "no-refresh-token": b'{"accessToken": "at_x", "expiresAt": "2030-01-01T00:00:00Z"}\n',
}


def write_corrupt(path: Path, content: bytes) -> None:
    """Write ``content`` as the store file, mode 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o600)


# -- token ------------------------------------------------------------------


async def test_token_prints_stored_token_when_fresh(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """A token with a day left is printed exactly as stored, with no refresh call."""
    pair = seed_store(store_path, cloud)
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 0, run
    assert run.out == f"{pair.access_token}\n"
    assert cloud.refresh_calls == 0


async def test_token_refreshes_expired_store_and_persists_rotation(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """An expired store is refreshed once, the new token printed and the rotated pair written."""
    old = seed_expired(store_path, cloud)
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 0, run
    new = stored(store_path)
    assert cloud.refresh_calls == 1
    assert run.out == f"{new.access_token}\n"
    assert new.access_token != old.access_token
    assert new.refresh_token != old.refresh_token
    assert new.expires_at is not None and new.expires_at > time.time() + 86000
    assert_no_secrets(run, old.access_token, old.refresh_token, new.access_token, new.refresh_token)


async def test_token_force_refresh_refreshes_a_fresh_token(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``--force-refresh`` refreshes a token that has a day left."""
    old = seed_store(store_path, cloud)
    run = await run_sidecar(env, "token", "--force-refresh", "--store", str(store_path))
    assert run.code == 0, run
    assert cloud.refresh_calls == 1
    new = stored(store_path)
    assert new.refresh_token != old.refresh_token
    assert run.out == f"{new.access_token}\n"


async def test_token_transient_failure_prints_stale_token_with_warning(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """A 503 from the token endpoint prints the stale token, warns on stderr and leaves the file alone."""
    old = seed_expired(store_path, cloud)
    before = store_path.read_bytes()
    cloud.fail_next_refreshes(1, status=503)
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 0, run
    assert run.out == f"{old.access_token}\n"
    assert any("warning" in line for line in run.err.splitlines()), run.err
    assert store_path.read_bytes() == before
    assert cloud.refresh_calls == 1
    assert_no_secrets(run, old.access_token, old.refresh_token)


async def test_token_dead_refresh_token_clears_store_and_asks_for_login(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """invalid_grant exits 1 with a one-line hint to run ``sidecar login`` and deletes the store."""
    old = seed_expired(store_path, cloud)
    cloud.reject_next_refreshes(1)
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 1, run
    assert run.out == ""
    assert "Traceback" not in run.err
    assert any("sidecar login" in line for line in run.err.splitlines()), run.err
    assert not store_path.exists()
    assert cloud.refresh_calls == 1
    assert_no_secrets(run, old.access_token, old.refresh_token)


async def test_token_dead_refresh_token_hint_names_the_upstream(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """The re-login hint after invalid_grant names the upstream the store was logged in to."""
    seed_expired(store_path, cloud)
    cloud.reject_next_refreshes(1)
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 1, run
    assert f"sidecar login --upstream {cloud.base_url}" in run.err


@pytest.mark.parametrize("case", ["dead-refresh-token", *sorted(CORRUPT_STORES)])
async def test_token_failure_is_one_stderr_line(
    cloud: MockCloud, store_path: Path, env: dict[str, str], case: str
) -> None:
    """When ``token`` cannot produce a token it says why in exactly one stderr line."""
    if case == "dead-refresh-token":
        seed_expired(store_path, cloud)
        cloud.reject_next_refreshes(1)
    else:
        write_corrupt(store_path, CORRUPT_STORES[case])
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert_one_line_failure(run, 1)


async def test_token_not_logged_in_exits_1(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """With no store file ``token`` prints nothing on stdout and exits 1 without calling the cloud."""
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert_one_line_failure(run, 1)
    assert run.out == ""
    assert "sidecar login" in run.err
    assert cloud.requests_seen == 0


# -- status -----------------------------------------------------------------


async def test_status_not_logged_in_exits_1(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """With no store file ``status`` says so and exits 1."""
    run = await run_sidecar(env, "status", "--store", str(store_path))
    assert run.code == 1, run
    assert "Not logged in" in run.out
    assert "Traceback" not in run.out + run.err


async def test_status_json_not_logged_in(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """With no store file ``status --json`` prints loggedIn false and exits 1."""
    run = await run_sidecar(env, "status", "--json", "--store", str(store_path))
    assert run.code == 1, run
    assert json.loads(run.out)["loggedIn"] is False


async def test_status_shows_user_and_upstream(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """Logged in, ``status`` exits 0 and names the whoami user and the upstream."""
    pair = seed_store(store_path, cloud)
    run = await run_sidecar(env, "status", "--store", str(store_path))
    assert run.code == 0, run
    assert "alice" in run.out
    assert cloud.base_url in run.out
    assert pair.access_token and pair.access_token not in run.out + run.err
    assert pair.refresh_token not in run.out + run.err


async def test_status_json_reports_login_without_tokens(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``status --json`` has loggedIn, apiUrl, expiresAt, an integer secondsToExpiry and the user, but no token."""
    pair = seed_store(store_path, cloud)
    run = await run_sidecar(env, "status", "--json", "--store", str(store_path))
    assert run.code == 0, run
    report = json.loads(run.out)
    assert report["loggedIn"] is True
    assert report["apiUrl"] == cloud.base_url
    assert parse_timestamp(report["expiresAt"]) == pytest.approx(pair.expires_at, abs=0.001)
    assert isinstance(report["secondsToExpiry"], int)
    assert report["secondsToExpiry"] == pytest.approx(86400, abs=30)
    assert report["user"]["name"] == "alice"
    assert pair.access_token and pair.access_token not in run.out + run.err
    assert pair.refresh_token not in run.out + run.err
    assert cloud.refresh_calls == 0


# -- import -----------------------------------------------------------------


async def test_import_flags_store_refresh_token_upstream_and_now(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``import --refresh-token --upstream`` writes refreshToken, apiUrl and obtainedAt only."""
    refresh = cloud.issue_pair()["refreshToken"]
    started = time.time()
    run = await run_sidecar(
        env, "import", "--refresh-token", refresh, "--upstream", cloud.base_url, "--store", str(store_path)
    )
    assert run.code == 0, run
    document = json.loads(store_path.read_bytes())
    assert set(document) == {"refreshToken", "apiUrl", "obtainedAt"}
    assert document["refreshToken"] == refresh
    assert document["apiUrl"] == cloud.base_url
    obtained_at = parse_timestamp(document["obtainedAt"])
    assert obtained_at is not None and started - 1 <= obtained_at <= time.time() + 1
    assert_no_secrets(run, refresh)


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "loose-old-file"])
async def test_import_writes_store_mode_0600(
    cloud: MockCloud, store_path: Path, env: dict[str, str], existing: bool
) -> None:
    """Under umask 0, the store ``import`` writes is mode 0600, also over an old file that was 0644."""
    if existing:
        seed_store(store_path, cloud)
        store_path.chmod(0o644)
    refresh = cloud.issue_pair()["refreshToken"]
    run = await run_sidecar(
        env, "import", "--refresh-token", refresh, "--upstream", cloud.base_url, "--store", str(store_path), umask=0
    )
    assert run.code == 0, run
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600


async def test_import_creates_store_directory_0700(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """Under umask 0, the store directory that ``import`` creates is mode 0700."""
    refresh = cloud.issue_pair()["refreshToken"]
    run = await run_sidecar(
        env, "import", "--refresh-token", refresh, "--upstream", cloud.base_url, "--store", str(store_path), umask=0
    )
    assert run.code == 0, run
    assert stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700


async def test_imported_refresh_token_is_refreshed_on_first_token(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """After importing only a refresh token, the first ``token`` refreshes and prints the new access token."""
    refresh = cloud.issue_pair()["refreshToken"]
    imported = await run_sidecar(
        env, "import", "--refresh-token", refresh, "--upstream", cloud.base_url, "--store", str(store_path)
    )
    assert imported.code == 0, imported
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 0, run
    assert cloud.refresh_calls == 1
    new = stored(store_path)
    assert new.refresh_token != refresh
    assert run.out == f"{new.access_token}\n"


async def test_import_from_environment(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """``import`` takes the pair, expiry and upstream from SIDECAR_* variables, and ``token`` then uses it as is."""
    grant = cloud.issue_pair()
    env = {
        **env,
        "SIDECAR_REFRESH_TOKEN": grant["refreshToken"],
        "SIDECAR_ACCESS_TOKEN": grant["accessToken"],
        "SIDECAR_EXPIRES_AT": grant["accessTokenExpiresAt"],
        "SIDECAR_UPSTREAM": cloud.base_url,
        "SIDECAR_STORE": str(store_path),
    }
    run = await run_sidecar(env, "import")
    assert run.code == 0, run
    pair = stored(store_path)
    assert (pair.access_token, pair.refresh_token, pair.api_url) == (
        grant["accessToken"],
        grant["refreshToken"],
        cloud.base_url,
    )
    assert pair.expires_at == parse_timestamp(grant["accessTokenExpiresAt"])
    assert_no_secrets(run, grant["accessToken"], grant["refreshToken"])
    token = await run_sidecar(env, "token")
    assert (token.code, token.out) == (0, grant["accessToken"] + "\n")
    assert cloud.refresh_calls == 0


async def test_import_without_refresh_token_exits_2_and_keeps_store(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``import`` with no refresh token exits 2 and leaves a working store byte for byte."""
    seed_store(store_path, cloud)
    before = store_path.read_bytes()
    run = await run_sidecar(
        env, "import", "--access-token", "at_x", "--upstream", cloud.base_url, "--store", str(store_path)
    )
    assert_one_line_failure(run, 2)
    assert "refresh token" in run.err
    assert store_path.read_bytes() == before


async def test_import_bad_expires_at_exits_2_and_keeps_store(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """``import --expires-at tomorrow`` exits 2 and leaves a working store byte for byte."""
    seed_store(store_path, cloud)
    before = store_path.read_bytes()
    refresh = cloud.issue_pair()["refreshToken"]
    run = await run_sidecar(
        env,
        "import",
        "--refresh-token",
        refresh,
        "--expires-at",
        "tomorrow",
        "--upstream",
        cloud.base_url,
        "--store",
        str(store_path),
    )
    assert_one_line_failure(run, 2)
    assert "expires-at" in run.err
    assert store_path.read_bytes() == before
    assert_no_secrets(run, refresh)


# -- logout -----------------------------------------------------------------


async def test_logout_deletes_store(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """``logout`` exits 0 and the store file is gone."""
    pair = seed_store(store_path, cloud)
    run = await run_sidecar(env, "logout", "--store", str(store_path))
    assert run.code == 0, run
    assert not store_path.exists()
    assert_no_secrets(run, pair.access_token, pair.refresh_token)


async def test_logout_twice_exits_0(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """A second ``logout`` with nothing left to clear is not an error."""
    seed_store(store_path, cloud)
    first = await run_sidecar(env, "logout", "--store", str(store_path))
    second = await run_sidecar(env, "logout", "--store", str(store_path))
    assert (first.code, second.code) == (0, 0), (first, second)
    assert not store_path.exists()


# -- bad input --------------------------------------------------------------


@pytest.fixture(params=sorted(CORRUPT_STORES))
def corrupt_store(request: pytest.FixtureRequest, store_path: Path) -> bytes:
    """A store file that is not a usable pair; returns its bytes."""
    content = CORRUPT_STORES[request.param]
    write_corrupt(store_path, content)
    return content


async def test_corrupt_store_token_exits_1_and_keeps_file(
    cloud: MockCloud, store_path: Path, env: dict[str, str], corrupt_store: bytes
) -> None:
    """``token`` on a corrupt store exits 1 without a traceback and does not delete or rewrite it."""
    run = await run_sidecar(env, "token", "--store", str(store_path))
    assert run.code == 1, run
    assert run.out == ""
    assert "Traceback" not in run.err
    assert "corrupt" in run.err
    assert store_path.read_bytes() == corrupt_store
    assert cloud.requests_seen == 0


async def test_corrupt_store_status_json_is_logged_out_with_reason(
    cloud: MockCloud, store_path: Path, env: dict[str, str], corrupt_store: bytes
) -> None:
    """``status --json`` on a corrupt store shows loggedIn false with a problem naming the corruption."""
    run = await run_sidecar(env, "status", "--json", "--store", str(store_path))
    assert run.code == 1
    assert "Traceback" not in run.out + run.err
    report = json.loads(run.out)
    assert report["loggedIn"] is False
    assert "corrupt" in report["problem"]
    assert store_path.read_bytes() == corrupt_store


async def _bad_input_is_refused(
    cloud: MockCloud, store_path: Path, env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    """On an expired store, ``token ARGS`` with ``env`` exits 2 with one line naming ``named``, leaves the store alone and calls nobody."""
    seed_expired(store_path, cloud)
    before = store_path.read_bytes()
    run = await run_sidecar(env, "token", *args, "--store", str(store_path))
    assert_one_line_failure(run, 2)
    assert named in run.err
    assert store_path.read_bytes() == before
    assert cloud.requests_seen == 0


async def test_unknown_toml_key_exits_2_naming_it(
    cloud: MockCloud, store_path: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """An unknown key in ``--config`` is a one-line error naming the key, and the store is untouched."""
    config = tmp_path / "sidecar.toml"
    config.write_text("leewaay = 30\n")
    await _bad_input_is_refused(cloud, store_path, env, ("--config", str(config)), "leewaay")


async def test_bad_leeway_variable_exits_2_naming_it(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """SIDECAR_LEEWAY=abc is a one-line error naming the variable, and the store is untouched."""
    await _bad_input_is_refused(cloud, store_path, {**env, "SIDECAR_LEEWAY": "abc"}, (), "SIDECAR_LEEWAY")


async def test_unknown_flag_exits_2(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """An unknown flag is a one-line usage error, and the store is untouched."""
    await _bad_input_is_refused(cloud, store_path, env, ("--frobnicate",), "--frobnicate")


def _chattr(flag: str, directory: Path) -> bool:
    try:
        return (
            subprocess.run(["chattr", flag, str(directory)], capture_output=True, timeout=10, check=False).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


async def _token_in_immutable_dir(
    cloud: MockCloud, store_path: Path, env: dict[str, str], *, lock_file: bool
) -> tuple[Run, TokenPair, bytes]:
    """Run ``token`` on an expired store whose directory is immutable; return the run, the seeded pair and its bytes."""
    old = seed_expired(store_path, cloud)
    if lock_file:
        TokenFile(store_path).release_lock(TokenFile(store_path).acquire_lock())
    before = store_path.read_bytes()
    if not _chattr("+i", store_path.parent):
        pytest.skip("chattr +i is not available here (needs root and ext2/3/4, xfs or btrfs)")
    try:
        run = await run_sidecar(env, "token", "--store", str(store_path))
    finally:
        _chattr("-i", store_path.parent)
    return run, old, before


@pytest.mark.parametrize("lock_file", [True, False], ids=["lock-file", "no-lock-file"])
async def test_unwritable_store_dir_never_spends_refresh_token(
    cloud: MockCloud, store_path: Path, env: dict[str, str], lock_file: bool
) -> None:
    """With an immutable store directory ``token`` makes no refresh call and leaves the store byte for byte."""
    run, old, before = await _token_in_immutable_dir(cloud, store_path, env, lock_file=lock_file)
    assert cloud.refresh_calls == 0
    assert store_path.read_bytes() == before
    assert "Traceback" not in run.out + run.err
    assert_no_secrets(run, old.access_token, old.refresh_token)


async def test_unwritable_store_dir_with_lock_file_prints_stale_token(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """In an immutable directory that already holds the lock file, ``token`` prints the stale token with a warning."""
    run, old, _ = await _token_in_immutable_dir(cloud, store_path, env, lock_file=True)
    assert run.code == 0, run
    assert run.out == f"{old.access_token}\n"
    assert any("warning" in line for line in run.err.splitlines()), run.err


async def test_unwritable_store_dir_without_lock_file_prints_stale_token(
    cloud: MockCloud, store_path: Path, env: dict[str, str]
) -> None:
    """In an immutable directory with no lock file yet, ``token`` prints the stale token with a warning."""
    run, old, _ = await _token_in_immutable_dir(cloud, store_path, env, lock_file=False)
    assert run.code == 0, run
    assert run.out == f"{old.access_token}\n"
    assert any("warning" in line for line in run.err.splitlines()), run.err


# -- help and secrets -------------------------------------------------------


@pytest.mark.parametrize("args", [("--help",), ("token", "--help")], ids=["top", "token"])
async def test_help_exits_0(env: dict[str, str], args: tuple[str, ...]) -> None:
    """``--help`` prints usage and exits 0."""
    run = await run_sidecar(env, *args)
    assert run.code == 0, run
    assert "usage:" in run.out


async def test_no_token_reaches_stderr_across_commands(cloud: MockCloud, store_path: Path, env: dict[str, str]) -> None:
    """import, token (refreshing and transient), status and logout never put a token value on stderr."""
    grant = cloud.issue_pair()
    store = ["--store", str(store_path)]
    runs = [
        await run_sidecar(
            env,
            "import",
            "--refresh-token",
            grant["refreshToken"],
            "--access-token",
            grant["accessToken"],
            "--upstream",
            cloud.base_url,
            *store,
        ),
        await run_sidecar(env, "token", *store),
        await run_sidecar(env, "status", *store),
        await run_sidecar(env, "status", "--json", *store),
    ]
    first = stored(store_path)
    cloud.fail_next_refreshes(1)
    runs.append(await run_sidecar(env, "token", "--force-refresh", *store))
    runs.append(await run_sidecar(env, "token", "--force-refresh", *store))
    second = stored(store_path)
    runs.append(await run_sidecar(env, "logout", *store))
    assert [run.code for run in runs] == [0] * len(runs), runs
    secrets = {
        grant["accessToken"],
        grant["refreshToken"],
        first.access_token,
        first.refresh_token,
        second.access_token,
        second.refresh_token,
    }
    assert len(secrets) == 6
    for run in runs:
        assert_no_secrets(run, *secrets)

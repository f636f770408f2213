"""Settings from flags, SIDECAR_* variables, TOML and defaults, and the errors on bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sidecar.config import Settings, load_settings
from sidecar.errors import ConfigError


@pytest.fixture(autouse=True)
def user_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point platformdirs (and ~) into tmp_path so no real user config is ever read."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "sidecar"


def _toml(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# --- defaults ---------------------------------------------------------------------


def test_defaults_without_flags_env_or_file() -> None:
    """With nothing configured every key has its documented default."""
    settings = load_settings({}, {}, None)
    assert {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "store"} == {
        "upstream": None,
        "listen": "127.0.0.1:8787",
        "allow_remote": False,
        "flavor": "relay",
        "refresh_path": "/api/v1/auth/token/refresh",
        "token_url": None,
        "client_id": None,
        "client_secret": None,
        "scope": None,
        "leeway": 120.0,
        "replay_limit": 1_048_576,
        "relogin_status": 511,
        "allowed_hosts": ("localhost", "127.0.0.1", "[::1]"),
        "allowed_origins": (),
        "connect_timeout": 10.0,
        "read_timeout": 300.0,
        "shutdown_timeout": 10.0,
        "log_format": "auto",
        "log_level": "info",
        "workers": 1,
        "ca_file": None,
        "client_cert": None,
        "client_key": None,
        "proxy": None,
        "issuer": None,
        "client_auth": None,
        "audience": None,
        "resource": None,
        "allow_users": ("self",),
    }


def test_default_store_is_tokens_json_in_the_user_config_dir(user_config_dir: Path) -> None:
    """The store defaults to user_config_dir("sidecar")/tokens.json."""
    assert load_settings({}, {}, None).store == str(user_config_dir / "tokens.json")


def test_store_path_expands_the_home_directory(tmp_path: Path) -> None:
    """A store given as ~/... is expanded against HOME."""
    settings = load_settings({}, {"SIDECAR_STORE": "~/tokens/t.json"}, None)
    assert settings.store == str(tmp_path / "home" / "tokens" / "t.json")


# --- precedence ------------------------------------------------------------------


def test_toml_beats_defaults(tmp_path: Path) -> None:
    """A key set in the TOML file replaces the default."""
    config = _toml(tmp_path / "c.toml", "leeway = 30\nlisten = '127.0.0.1:9001'\n")
    settings = load_settings({}, {}, config)
    assert (settings.leeway, settings.listen) == (30.0, "127.0.0.1:9001")


def test_env_beats_toml(tmp_path: Path) -> None:
    """A SIDECAR_* variable replaces the TOML file's value."""
    config = _toml(tmp_path / "c.toml", "leeway = 30\nlisten = '127.0.0.1:9001'\n")
    settings = load_settings({}, {"SIDECAR_LEEWAY": "45", "SIDECAR_LISTEN": "127.0.0.1:9002"}, config)
    assert (settings.leeway, settings.listen) == (45.0, "127.0.0.1:9002")


def test_flags_beat_env(tmp_path: Path) -> None:
    """A flag replaces both the SIDECAR_* variable and the TOML file's value."""
    config = _toml(tmp_path / "c.toml", "leeway = 30\nlisten = '127.0.0.1:9001'\n")
    env = {"SIDECAR_LEEWAY": "45", "SIDECAR_LISTEN": "127.0.0.1:9002"}
    settings = load_settings({"leeway": 60, "listen": "127.0.0.1:9003"}, env, config)
    assert (settings.leeway, settings.listen) == (60.0, "127.0.0.1:9003")


def test_flag_set_to_none_falls_through_to_env() -> None:
    """A flag left unset (None) does not hide the variable below it."""
    settings = load_settings({"leeway": None}, {"SIDECAR_LEEWAY": "45"}, None)
    assert settings.leeway == 45.0


def test_empty_env_variable_falls_through_to_toml(tmp_path: Path) -> None:
    """An empty SIDECAR_* variable counts as unset, so the TOML value stands."""
    config = _toml(tmp_path / "c.toml", "leeway = 30\n")
    assert load_settings({}, {"SIDECAR_LEEWAY": ""}, config).leeway == 30.0


# --- which TOML file -----------------------------------------------------------------


def test_sidecar_config_env_selects_the_file(tmp_path: Path) -> None:
    """SIDECAR_CONFIG names the TOML file when no --config is given."""
    config = _toml(tmp_path / "elsewhere" / "custom.toml", "leeway = 33\n")
    assert load_settings({}, {"SIDECAR_CONFIG": config}, None).leeway == 33.0


def test_config_flag_beats_sidecar_config_env(tmp_path: Path) -> None:
    """--config wins over SIDECAR_CONFIG."""
    flagged = _toml(tmp_path / "flag.toml", "leeway = 11\n")
    from_env = _toml(tmp_path / "env.toml", "leeway = 22\n")
    assert load_settings({}, {"SIDECAR_CONFIG": from_env}, flagged).leeway == 11.0


def test_user_config_file_is_read_when_present(user_config_dir: Path) -> None:
    """Without --config or SIDECAR_CONFIG, user_config_dir/sidecar.toml is read if it exists."""
    _toml(user_config_dir / "sidecar.toml", "leeway = 77\n")
    assert load_settings({}, {}, None).leeway == 77.0


def test_missing_config_flag_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist raises ConfigError naming the path."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_settings({}, {}, str(missing))
    assert str(missing) in str(caught.value)


def test_missing_sidecar_config_file_is_an_error(tmp_path: Path) -> None:
    """SIDECAR_CONFIG naming a missing file is an error, not a silent fallback to defaults."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, {"SIDECAR_CONFIG": str(tmp_path / "nope.toml")}, None)


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError saying so."""
    config = _toml(tmp_path / "c.toml", "leeway = = 3\n[unclosed\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings({}, {}, config)


# --- bad keys and types ---------------------------------------------------------------


def test_unknown_toml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    """A key sidecar does not know raises ConfigError that names the key."""
    config = _toml(tmp_path / "c.toml", "leeway = 30\ncolour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_settings({}, {}, config)


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    """A TOML table is not a sidecar key, and the error names it."""
    config = _toml(tmp_path / "c.toml", "[server]\nlisten = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="unknown key 'server'"):
        load_settings({}, {}, config)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('leeway = "soon"', "leeway"),
        ("allow_remote = 3", "allow_remote"),
        ("allowed_hosts = 5", "allowed_hosts"),
        ("allowed_origins = [1, 2]", "allowed_origins"),
        ("replay_limit = 1.5", "replay_limit"),
        ("upstream = 8080", "upstream"),
        ("leeway = -1", "leeway"),
    ],
)
def test_wrong_toml_type_is_an_error_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    """A TOML value of the wrong type raises ConfigError whose message starts with the key."""
    config = _toml(tmp_path / "c.toml", line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, config)
    assert str(caught.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('leeway = "30"', "leeway"),
        ('allow_remote = "true"', "allow_remote"),
        ('relogin_status = "511"', "relogin_status"),
    ],
)
def test_quoted_scalar_in_toml_is_a_wrong_type(tmp_path: Path, line: str, key: str) -> None:
    """A TOML string where a number or boolean belongs raises ConfigError naming the key."""
    config = _toml(tmp_path / "c.toml", line + "\n")
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_settings({}, {}, config)


def test_wrong_env_type_is_an_error_naming_the_variable() -> None:
    """A malformed SIDECAR_* value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=r"^SIDECAR_LEEWAY: "):
        load_settings({}, {"SIDECAR_LEEWAY": "soon"}, None)


def test_unknown_flag_is_an_error() -> None:
    """A flag key that is not a setting raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings({"colour": "blue"}, {}, None)


# --- parsing env values -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["true", "1", "yes", "ON"])
def test_env_true_values_enable_a_bool(text: str) -> None:
    """SIDECAR_ALLOW_REMOTE=true (and its spellings) turns the default False into True."""
    assert load_settings({}, {"SIDECAR_ALLOW_REMOTE": text}, None).allow_remote is True


@pytest.mark.parametrize("text", ["0", "false", "no", "Off"])
def test_env_false_values_disable_a_bool_set_in_toml(tmp_path: Path, text: str) -> None:
    """SIDECAR_ALLOW_REMOTE=0 (and its spellings) turns a TOML true back into False."""
    config = _toml(tmp_path / "c.toml", "allow_remote = true\n")
    assert load_settings({}, {"SIDECAR_ALLOW_REMOTE": text}, config).allow_remote is False


def test_env_bool_rejects_other_words() -> None:
    """A boolean variable that is neither true nor false is an error naming the variable."""
    with pytest.raises(ConfigError, match=r"^SIDECAR_ALLOW_REMOTE: "):
        load_settings({}, {"SIDECAR_ALLOW_REMOTE": "maybe"}, None)


def test_env_allowed_hosts_is_a_comma_list() -> None:
    """SIDECAR_ALLOWED_HOSTS is split on commas, trimmed, and empty items dropped."""
    settings = load_settings({}, {"SIDECAR_ALLOWED_HOSTS": "a.local, b.local ,,sidecar"}, None)
    assert settings.allowed_hosts == ("a.local", "b.local", "sidecar")


def test_toml_allowed_hosts_is_a_list(tmp_path: Path) -> None:
    """allowed_hosts in TOML is an array of strings, kept in order."""
    config = _toml(tmp_path / "c.toml", "allowed_hosts = ['x.local', 'localhost']\n")
    assert load_settings({}, {}, config).allowed_hosts == ("x.local", "localhost")


@pytest.mark.parametrize("status", ["399", "600", "200"])
def test_relogin_status_out_of_range_is_an_error(status: str) -> None:
    """relogin_status outside 400-599 raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=r"^SIDECAR_RELOGIN_STATUS: expected an HTTP error status"):
        load_settings({}, {"SIDECAR_RELOGIN_STATUS": status}, None)


def test_relogin_status_in_range_is_accepted() -> None:
    """relogin_status 401 is a valid choice."""
    assert load_settings({}, {"SIDECAR_RELOGIN_STATUS": "401"}, None).relogin_status == 401


def test_flavor_must_be_relay_or_oauth2() -> None:
    """A flavor other than relay or oauth2 raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=r"^SIDECAR_FLAVOR: expected one of relay, oauth2"):
        load_settings({}, {"SIDECAR_FLAVOR": "saml"}, None)


def test_oauth2_without_token_url_is_an_error() -> None:
    """The oauth2 flavor needs token_url, and the error names it."""
    with pytest.raises(ConfigError, match=r"^token_url: required when flavor is oauth2"):
        load_settings({}, {"SIDECAR_FLAVOR": "oauth2"}, None)


def test_oauth2_with_token_url_is_accepted() -> None:
    """oauth2 with a token_url builds Settings with both."""
    settings = load_settings({}, {"SIDECAR_FLAVOR": "OAuth2", "SIDECAR_TOKEN_URL": "https://idp.example/token"}, None)
    assert (settings.flavor, settings.token_url) == ("oauth2", "https://idp.example/token")


# --- the Settings value ------------------------------------------------------------------


def test_repr_hides_client_secret() -> None:
    """repr and str of Settings never show the client secret."""
    settings = load_settings({}, {"SIDECAR_CLIENT_SECRET": "cs-SECRET-41"}, None)
    text = repr(settings) + str(settings)
    assert "cs-SECRET-41" not in text and "client_secret='***'" in text


def test_repr_shows_an_unset_client_secret_as_none() -> None:
    """An absent client secret shows as None, so 'unset' is distinguishable from 'hidden'."""
    assert "client_secret=None" in repr(load_settings({}, {}, None))


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after they are built."""
    settings = load_settings({}, {}, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.leeway = 1.0  # type: ignore[misc]


def test_settings_default_value_matches_loaded_defaults(user_config_dir: Path) -> None:
    """load_settings with nothing configured equals Settings() with only the store filled in."""
    assert load_settings({}, {}, None) == Settings(store=str(user_config_dir / "tokens.json"))


def test_proxy_setting_keeps_credentials_but_never_shows_them() -> None:
    """A proxy URL may carry user:password (for the proxy); repr masks the password."""
    settings = load_settings({"proxy": "http://alice:s3cret@127.0.0.1:3128"}, {}, None)
    assert settings.proxy == "http://alice:s3cret@127.0.0.1:3128"
    assert "s3cret" not in repr(settings)
    assert "alice:***@127.0.0.1:3128" in repr(settings)


def test_empty_proxy_variable_turns_proxies_off() -> None:
    """SIDECAR_PROXY="" is a choice (no egress proxy), unlike other empty variables."""
    assert load_settings({}, {"SIDECAR_PROXY": ""}, None).proxy == ""
    assert load_settings({}, {}, None).proxy is None


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:1080", "127.0.0.1:3128", "http://"])
def test_proxy_setting_must_be_an_http_url(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^--proxy: "):
        load_settings({"proxy": value}, {}, None)


def test_client_key_needs_a_client_cert() -> None:
    with pytest.raises(ConfigError, match=r"^client_key: set client_cert too"):
        load_settings({"client_key": "/tmp/key.pem"}, {}, None)


@pytest.mark.parametrize(
    ("value", "mode", "path"),
    [
        ("required", "required", None),
        ("Optional", "optional", None),
        ("/etc/sidecar/client.key", "off", "/etc/sidecar/client.key"),
    ],
)
def test_client_key_is_a_mode_word_or_the_mtls_key_file(value: str, mode: str, path: str | None) -> None:
    """SPEC uses client_key twice: off/optional/required is the local key (§9), anything else the mTLS key (§4)."""
    settings = load_settings({"client_key": value, "client_cert": "/etc/sidecar/client.pem"}, {}, None)
    assert (settings.client_key_mode, settings.client_key_file) == (mode, path)


def test_oauth2_flavor_accepts_an_issuer_instead_of_a_token_url() -> None:
    settings = load_settings({"flavor": "oauth2", "issuer": "https://id.example"}, {}, None)
    assert settings.issuer == "https://id.example" and settings.token_url is None

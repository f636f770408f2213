"""One frozen Settings value, built once from flags, environment, TOML and defaults.

Precedence: flags > ``SIDECAR_*`` variables > TOML file > defaults.  The TOML
file is ``--config``, else ``SIDECAR_CONFIG``, else ``sidecar.toml`` in the
user config directory if it exists.  Unknown keys and wrong types raise
ConfigError naming the key.  Nothing outside this module reads the process
environment for settings: callers pass the mapping in.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import platformdirs

from sidecar.errors import ConfigError

APP_NAME = "sidecar"
ENV_PREFIX = "SIDECAR_"
FLAVORS = ("relay", "oauth2")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
CLIENT_AUTHS = ("basic", "post", "none")
CLIENT_KEY_MODES = ("off", "optional", "required")


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME))


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every setting sidecar has; see config/sidecar.example.toml for each key."""

    upstream: str | None = None
    listen: str = "127.0.0.1:8787"
    allow_remote: bool = False
    store: str = ""
    flavor: str = "relay"
    refresh_path: str = "/api/v1/auth/token/refresh"
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None
    leeway: float = 120.0
    replay_limit: int = 1024 * 1024
    relogin_status: int = 511
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
    allowed_origins: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    shutdown_timeout: float = 10.0
    log_format: str = "auto"
    log_level: str = "info"
    workers: int = 1
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None
    issuer: str | None = None
    client_auth: str | None = None
    audience: str | None = None
    resource: str | None = None
    allow_users: tuple[str, ...] = ("self",)

    @property
    def client_key_mode(self) -> str:
        """SPEC §9's local client key: ``off``, ``optional`` or ``required``."""
        return self.client_key if self.client_key in CLIENT_KEY_MODES else "off"

    @property
    def client_key_file(self) -> str | None:
        """SPEC §4's mTLS private key file (``client_key`` set to a path, not a mode)."""
        return self.client_key if self.client_key and self.client_key not in CLIENT_KEY_MODES else None

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_shown(f.name, getattr(self, f.name))!r}" for f in dataclasses.fields(self))
        return f"Settings({fields})"


def _shown(key: str, value: object) -> object:
    """A setting as it may be printed: secrets and credentials in URLs masked."""
    if key == "client_secret" and value:
        return "***"
    if key in ("proxy", "store") and isinstance(value, str) and "://" in value:
        return mask_url_password(value)
    return value


def mask_url_password(text: str) -> str:
    """``text`` with the password of its URL (if any) replaced by ``***``."""
    from yarl import URL

    try:
        url = URL(text)
    except (ValueError, TypeError):
        return "***"
    if url.password is None:
        return text
    return str(url.with_password("***"))


def _parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")


def _parse_float(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number of seconds, got {_describe(value)}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number of seconds, got {_describe(value)}") from None
    else:
        raise ConfigError(f"{key}: expected a number of seconds, got {_describe(value)}")
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"{key}: expected a finite number >= 0, got {_describe(value)}")
    return number


def _parse_int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}") from None
    else:
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if number < 0:
        raise ConfigError(f"{key}: expected an integer >= 0, got {number}")
    return number


def _parse_str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    return value


def _parse_url(key: str, value: object) -> str:
    """An http(s) URL with a host and a valid port, and no credentials in it."""
    from yarl import URL

    text = _parse_str(key, value).strip()
    try:
        url = URL(text)
        port = url.port
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host or port is None:
        raise ConfigError(f"{key}: expected an http:// or https:// URL with a host")
    if url.user is not None or url.password is not None:
        # They would travel into logs, status and hints; tokens are the credentials here.
        raise ConfigError(f"{key}: must not contain a user name or password")
    return text


def _parse_proxy(key: str, value: object) -> str:
    """An http(s) proxy URL (credentials allowed: they go to the proxy only), or "" for none."""
    from yarl import URL

    text = _parse_str(key, value).strip()
    if not text:
        return ""
    try:
        url = URL(text)
        port = url.port
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host or port is None:
        raise ConfigError(f'{key}: expected an http:// or https:// proxy URL with a host, or "" for none')
    return text


def _parse_path(key: str, value: object) -> str:
    text = _parse_str(key, value).strip()
    if not text:
        raise ConfigError(f"{key}: expected a file path")
    return str(Path(text).expanduser())


def _parse_client_key(key: str, value: object) -> str:
    """``off``/``optional``/``required`` (the local client key, §9), else the mTLS key file (§4)."""
    text = _parse_str(key, value).strip()
    if text.lower() in CLIENT_KEY_MODES:
        return text.lower()
    return _parse_path(key, text)


def _parse_list(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a list of strings, got {_describe(value)}")


def _choice(options: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(key: str, value: object) -> str:
        text = _parse_str(key, value).strip().lower()
        if text not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def _parse_status(key: str, value: object) -> int:
    status = _parse_int(key, value)
    if not 400 <= status <= 599:
        raise ConfigError(f"{key}: expected an HTTP error status 400-599, got {status}")
    return status


def _parse_workers(key: str, value: object) -> int:
    count = _parse_int(key, value)
    if count < 1:
        raise ConfigError(f"{key}: expected at least 1, got {count}")
    return count


def _describe(value: object) -> str:
    """Name a bad value's type, and the value itself only when it is short and harmless."""
    if isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    return f"a {type(value).__name__}"


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "upstream": _parse_url,
    "listen": _parse_str,
    "allow_remote": _parse_bool,
    "store": _parse_str,
    "flavor": _choice(FLAVORS),
    "refresh_path": _parse_str,
    "token_url": _parse_url,
    "client_id": _parse_str,
    "client_secret": _parse_str,
    "scope": _parse_str,
    "leeway": _parse_float,
    "replay_limit": _parse_int,
    "relogin_status": _parse_status,
    "allowed_hosts": _parse_list,
    "allowed_origins": _parse_list,
    "connect_timeout": _parse_float,
    "read_timeout": _parse_float,
    "shutdown_timeout": _parse_float,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "workers": _parse_workers,
    "ca_file": _parse_path,
    "client_cert": _parse_path,
    "client_key": _parse_client_key,
    "proxy": _parse_proxy,
    "issuer": _parse_url,
    "client_auth": _choice(CLIENT_AUTHS),
    "audience": _parse_str,
    "resource": _parse_url,
    "allow_users": _parse_list,
}

KEYS = tuple(_PARSERS)
_TYPED_KEYS = {
    "allow_remote": "true or false",
    "leeway": "a number",
    "replay_limit": "an integer",
    "relogin_status": "an integer",
    "connect_timeout": "a number",
    "read_timeout": "a number",
    "shutdown_timeout": "a number",
    "workers": "an integer",
}


# Keys for which an empty value is a choice, not "unset" ("" = no egress proxy).
_EMPTY_MEANS_SOMETHING = frozenset({"proxy"})


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def config_file_path(flag: str | None, env: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The TOML file to read and whether the user named it explicitly."""
    if flag:
        return Path(flag).expanduser(), True
    if env.get(env_name("config")):
        return Path(env[env_name("config")]).expanduser(), True
    default = default_config_dir() / "sidecar.toml"
    return (default, False) if default.is_file() else (None, False)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
    *,
    provider_needed: bool = True,
) -> Settings:
    """Build Settings from flags (already named by key), environment and TOML.

    ``provider_needed`` false (``demo``, ``mock-cloud``: they bring their own
    provider) lets the oauth2 flavor go without token_url or issuer.
    """
    flags = flags or {}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    path, _ = config_file_path(config_path, env)
    if path is not None:
        for key, value in read_toml(path).items():
            if key not in _PARSERS:
                raise ConfigError(f"{path}: unknown key {key!r}")
            if isinstance(value, str) and key in _TYPED_KEYS:
                # TOML has real numbers and booleans: a quoted one is a mistake.
                raise ConfigError(f"{key}: expected {_TYPED_KEYS[key]}, got a string {_describe(value)}")
            values[key] = _PARSERS[key](key, value)

    for key, parse in _PARSERS.items():
        raw = env.get(env_name(key))
        if raw is not None and (raw != "" or key in _EMPTY_MEANS_SOMETHING):
            values[key] = parse(env_name(key), raw)

    for key, value in flags.items():
        if key not in _PARSERS:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _PARSERS[key]("--" + key.replace("_", "-"), value)

    if not values.get("store"):
        values["store"] = str(default_config_dir() / "tokens.json")
    if "://" not in values["store"]:
        values["store"] = str(Path(values["store"]).expanduser())
    settings = Settings(**values)
    if settings.client_key_file and not settings.client_cert:
        raise ConfigError("client_key: set client_cert too (the certificate the key belongs to)")
    if provider_needed and settings.flavor == "oauth2" and not (settings.token_url or settings.issuer):
        raise ConfigError("token_url: required when flavor is oauth2 (or set issuer to discover it)")
    return settings

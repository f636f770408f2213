"""Talking to the token endpoint, for each flavor.

Each refresher turns one HTTP exchange into a new TokenPair, RefreshDead or
RefreshTransient.  This is the one seam where aiohttp's exceptions become
sidecar's; nothing here caches or persists.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from sidecar import __version__
from sidecar.auth.answers import AnswerTooLarge, error_code, json_object, read_capped
from sidecar.auth.oidc.client_auth import client_credentials
from sidecar.auth.oidc.discovery import provider_metadata
from sidecar.auth.oidc.grant import endpoint
from sidecar.auth.oidc.http import ProviderError, ProviderSession
from sidecar.config import Settings
from sidecar.egress.outbound import Proxies
from sidecar.egress.tls import describe_tls_failure
from sidecar.errors import ConfigError, RefreshDead, RefreshTransient
from sidecar.tokens import TokenPair, pair_from_grant

log = logging.getLogger("sidecar.refresh")

# A refresh holds the store lock and, for waiting callers, the request: it
# gets this long in all, whatever read_timeout allows a streaming proxy.
REFRESH_TIMEOUT = 30.0
_HEADERS = {"Accept": "application/json", "User-Agent": f"sidecar/{__version__}"}
# Statuses that mean "this refresh token will never work again" (SPEC §1).
_ALWAYS_DEAD = frozenset({401, 403})
_DEAD_WITH_INVALID_GRANT = frozenset({400, 401, 403})
# RFC 6749 §5.2 errors that mean "sidecar is configured wrong", not "log in again".
_CONFIG_HINTS = {
    "invalid_client": "check client_id and client_secret",
    "unauthorized_client": "this client may not use the refresh_token grant; check the client's settings at the provider",
    "invalid_scope": "check scope: the provider refuses the scope asked for",
}


def classify_failure(status: int, body: bytes, *, oauth2: bool = False) -> RefreshDead | RefreshTransient:
    """The error a non-2xx token endpoint answer means.

    Relay (SPEC §1): invalid_grant or any 401/403 is dead.  OAuth2 (RFC 6749
    §5.2): only invalid_grant is; a 401 there is invalid_client, a
    configuration mistake that left the refresh token unspent.
    """
    error = error_code(json_object(body).get("error"))
    if oauth2:
        if error == "invalid_grant":
            return RefreshDead(f"token endpoint rejected the refresh token: HTTP {status} (invalid_grant)")
        suffix = f" ({error})" if error else ""
        hint = _CONFIG_HINTS.get(error or "") or (_CONFIG_HINTS["invalid_client"] if status in _ALWAYS_DEAD else None)
        if hint is not None:
            # A configuration mistake: the refresh token was not spent.
            log.error("token endpoint refused the refresh: HTTP %d%s; %s", status, suffix, hint)
            return RefreshTransient(f"token endpoint answered HTTP {status}{suffix}; {hint}")
        return RefreshTransient(f"token endpoint answered HTTP {status}{suffix}")
    if status in _ALWAYS_DEAD or (status in _DEAD_WITH_INVALID_GRANT and error == "invalid_grant"):
        suffix = f" ({error})" if error else ""
        return RefreshDead(f"token endpoint rejected the refresh token: HTTP {status}{suffix}")
    suffix = f" ({error})" if error else ""
    return RefreshTransient(f"token endpoint answered HTTP {status}{suffix}")


class HttpRefresher:
    """Shared HTTP plumbing; subclasses say what to send."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, proxies: Proxies | None = None) -> None:
        self._session = session
        self._settings = settings
        # Built from settings and the environment when the caller has none to share.
        self._proxies = proxies or Proxies(settings.proxy)
        self._timeout = aiohttp.ClientTimeout(
            total=REFRESH_TIMEOUT, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        )

    def _request(self, pair: TokenPair) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        url, options = self._request(pair)
        options.update(self._proxies.options(url, options.get("headers")))
        try:
            async with self._session.post(url, timeout=self._timeout, allow_redirects=False, **options) as response:
                body = await read_capped(response)
                status = response.status
        except AnswerTooLarge:
            raise RefreshTransient("token endpoint answered with a body over 1 MiB") from None
        except TimeoutError:
            raise RefreshTransient("token endpoint timed out") from None
        except aiohttp.ClientError as exc:
            tls_failure = describe_tls_failure(exc, "the token endpoint")
            raise RefreshTransient(tls_failure or f"token endpoint unreachable: {type(exc).__name__}") from None
        except OSError as exc:
            tls_failure = describe_tls_failure(exc, "the token endpoint")
            raise RefreshTransient(
                tls_failure or f"token endpoint unreachable: {exc.strerror or type(exc).__name__}"
            ) from None
        if not 200 <= status < 300:
            raise classify_failure(status, body, oauth2=isinstance(self, OAuth2Refresher))
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RefreshTransient(f"token endpoint answered HTTP {status} without JSON") from None
        return pair_from_grant(document, previous=pair, now=now, api_url=pair.api_url)


class RelayRefresher(HttpRefresher):
    """The default cloud: POST ``API + refresh_path`` with JSON ``{"refreshToken": RT}``."""

    def _request(self, pair: TokenPair) -> tuple[str, dict[str, Any]]:
        upstream = self._settings.upstream or pair.api_url
        if not upstream:
            raise ConfigError("upstream: not configured and the token store has no apiUrl")
        url = upstream.rstrip("/") + "/" + self._settings.refresh_path.lstrip("/")
        return url, {
            "data": orjson.dumps({"refreshToken": pair.refresh_token}),
            "headers": {"Content-Type": "application/json", **_HEADERS},
        }


class OAuth2Refresher(HttpRefresher):
    """RFC 6749 §6: a form POST to the token endpoint with ``grant_type=refresh_token``.

    The endpoint is ``token_url``, else the one discovered from ``issuer``
    (cached for the process).  The client authenticates as ``client_auth``
    says (auth/oidc/client_auth.py); unset, that is HTTP Basic when both id
    and secret are set, else ``client_id`` in the form (a public client).
    """

    _token_endpoint: str | None = None

    async def refresh(self, pair: TokenPair, now: float) -> TokenPair:
        if not self._settings.token_url and self._token_endpoint is None:
            try:
                metadata = await provider_metadata(ProviderSession(self._session, self._proxies), self._settings)
            except ProviderError as exc:
                raise RefreshTransient(f"discovery failed: {exc}") from None
            self._token_endpoint = endpoint(metadata, "token_endpoint")
        return await super().refresh(pair, now)

    def _request(self, pair: TokenPair) -> tuple[str, dict[str, Any]]:
        settings = self._settings
        url = settings.token_url or self._token_endpoint
        if not url:
            raise ConfigError("token_url: required when flavor is oauth2 (or set issuer to discover it)")
        credentials = client_credentials(settings, required=False)
        form = {"grant_type": "refresh_token", "refresh_token": pair.refresh_token, **credentials.form}
        headers = {"Content-Type": "application/x-www-form-urlencoded", **_HEADERS, **credentials.headers}
        if settings.scope:
            form["scope"] = settings.scope
        return url, {"headers": headers, "data": urlencode(form).encode("ascii")}


def make_refresher(session: aiohttp.ClientSession, settings: Settings, proxies: Proxies | None = None) -> HttpRefresher:
    """The refresher for ``settings.flavor``; ``proxies`` defaults to the settings' and the environment's."""
    if settings.flavor == "oauth2":
        return OAuth2Refresher(session, settings, proxies)
    return RelayRefresher(session, settings, proxies)

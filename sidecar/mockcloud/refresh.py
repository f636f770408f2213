"""The two refresh endpoints: relay (JSON, camelCase by default) and OAuth2 (RFC 6749 §6, form in).

Both count the call, let the test switches answer first, then redeem the
refresh token at the ledger. The reply shapes and request parsing are pure
functions; the route class is the aiohttp glue around them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import unquote_plus

import orjson
from aiohttp import web

from sidecar.mockcloud.ledger import Rotation, TokenLedger
from sidecar.mockcloud.stopping import Pause
from sidecar.mockcloud.switches import RefreshSwitches
from sidecar.mockcloud.wire import Handler, iso_timestamp, json_response

# What each flavor answers for a dead refresh token (SPEC §1).
RELAY_DEAD_STATUS = 403
OAUTH_DEAD_STATUS = 400


def json_seconds(value: float) -> int | float:
    """A duration as JSON wants it: an integer when whole."""
    return int(value) if float(value).is_integer() else value


def relay_refresh_token(body: bytes) -> str | None:
    """The ``refreshToken`` of a relay refresh body, or None when it is not JSON with a non-empty one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    token = data.get("refreshToken") if isinstance(data, dict) else None
    return token if isinstance(token, str) and token else None


def relay_reply(style: str, rotation: Rotation, access_ttl: float) -> dict[str, Any]:
    """The relay answer in ``style``: "camel" (the default), "snake", "expires_in" or "no_rotation"."""
    expires_at = iso_timestamp(rotation.expires_at)
    if style == "snake":
        return {
            "access_token": rotation.access_token,
            "refresh_token": rotation.refresh_token,
            "access_token_expires_at": expires_at,
        }
    if style == "expires_in":
        return {
            "accessToken": rotation.access_token,
            "refreshToken": rotation.refresh_token,
            "expires_in": json_seconds(access_ttl),
        }
    if style == "no_rotation":
        return {"accessToken": rotation.access_token, "accessTokenExpiresAt": expires_at}
    return {
        "accessToken": rotation.access_token,
        "refreshToken": rotation.refresh_token,
        "accessTokenExpiresAt": expires_at,
    }


def oauth_reply(rotation: Rotation, access_ttl: float, scope: str | None) -> dict[str, Any]:
    """The OAuth2 token answer; ``refresh_token`` only when rotated, ``scope`` echoed when asked for."""
    data: dict[str, Any] = {
        "access_token": rotation.access_token,
        "token_type": "Bearer",
        "expires_in": json_seconds(access_ttl),
    }
    if rotation.refresh_token is not None:
        data["refresh_token"] = rotation.refresh_token
    if scope is not None:
        data["scope"] = scope
    return data


def basic_credentials(authorization: str) -> tuple[str, str] | None:
    """HTTP Basic client credentials, form-decoded as RFC 6749 §2.3.1 says, or None."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(user), unquote_plus(password)


class RefreshHost(Protocol):
    """The cloud's refresh counters, what it records of OAuth calls, and the switches that shape answers."""

    refresh_calls: int
    refresh_ok: int
    last_oauth_form: dict[str, str]
    last_oauth_basic: tuple[str, str] | None

    @property
    def refresh_response_style(self) -> str: ...

    @property
    def oauth_client(self) -> tuple[str, str] | None: ...


class RefreshRoutes:
    """``/api/v1/auth/token/refresh`` (relay) and ``/oauth/token`` (OAuth2).

    ``other_grants`` answers the token endpoint's other grants, by
    grant_type (the OIDC logins, oidc.py); those count as no refresh call.
    """

    def __init__(
        self,
        cloud: RefreshHost,
        ledger: TokenLedger,
        switches: RefreshSwitches,
        pause: Pause,
        *,
        other_grants: Mapping[str, Handler] | None = None,
    ) -> None:
        self._cloud = cloud
        self._ledger = ledger
        self._switches = switches
        self._pause = pause
        self._other_grants = dict(other_grants or {})

    def add_to(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Register both refresh routes under ``prefix``."""
        router.add_post(prefix + "/api/v1/auth/token/refresh", self._relay_refresh)
        router.add_post(prefix + "/oauth/token", self._oauth_refresh)

    async def _switched_answer(self, refresh_token: str, *, dead_status: int) -> web.Response | None:
        """The answer a flipped test switch dictates for this refresh call, if any."""
        misbehaviour = await self._switches.take(self._pause)
        if misbehaviour is None:
            return None
        if misbehaviour.status is None:
            self._ledger.revoke_chain(refresh_token)
            return json_response({"error": misbehaviour.error}, dead_status)
        return json_response({"error": misbehaviour.error}, misbehaviour.status)

    async def _relay_refresh(self, request: web.Request) -> web.StreamResponse:
        """Relay flavor: JSON ``{"refreshToken"}`` in, the rotated pair out."""
        self._cloud.refresh_calls += 1
        refresh_token = relay_refresh_token(await request.read())
        if refresh_token is None:
            return json_response({"error": "invalid_request"}, 400)
        switched = await self._switched_answer(refresh_token, dead_status=RELAY_DEAD_STATUS)
        if switched is not None:
            return switched
        style = self._cloud.refresh_response_style
        rotation = self._ledger.redeem(refresh_token, rotate=style != "no_rotation")
        if rotation is None:
            return json_response({"error": "invalid_grant"}, RELAY_DEAD_STATUS)
        self._cloud.refresh_ok += 1
        return json_response(relay_reply(style, rotation, self._ledger.access_ttl))

    async def _oauth_refresh(self, request: web.Request) -> web.StreamResponse:
        """OAuth2 flavor (RFC 6749 §6): form in, ``access_token``/``refresh_token``/``expires_in`` out."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        other = self._other_grants.get(form.get("grant_type", ""))
        if other is not None:
            return await other(request)
        self._cloud.refresh_calls += 1
        basic = basic_credentials(request.headers.get("Authorization", ""))
        self._cloud.last_oauth_form = form
        self._cloud.last_oauth_basic = basic
        expected_client = self._cloud.oauth_client
        if expected_client is not None:
            presented = basic or (form.get("client_id", ""), form.get("client_secret", ""))
            if presented != expected_client:
                return json_response(
                    {"error": "invalid_client"},
                    401,
                    headers={"WWW-Authenticate": 'Basic realm="mock-cloud"'},
                )
        if form.get("grant_type") != "refresh_token":
            return json_response({"error": "unsupported_grant_type"}, 400)
        refresh_token = form.get("refresh_token", "")
        if not refresh_token:
            return json_response({"error": "invalid_request"}, 400)
        switched = await self._switched_answer(refresh_token, dead_status=OAUTH_DEAD_STATUS)
        if switched is not None:
            return switched
        rotation = self._ledger.redeem(refresh_token, rotate=self._cloud.refresh_response_style != "no_rotation")
        if rotation is None:
            return json_response({"error": "invalid_grant"}, OAUTH_DEAD_STATUS)
        self._cloud.refresh_ok += 1
        reply = oauth_reply(rotation, self._ledger.access_ttl, form.get("scope"))
        return json_response(reply, headers={"Cache-Control": "no-store"})

"""The mock cloud as a standard OpenID Connect provider (SPEC §8), so the oauth2 flavor's logins run locally.

Discovery (``/.well-known/openid-configuration`` and RFC 8414's
``/.well-known/oauth-authorization-server``), an authorization endpoint
that approves at once and redirects to the loopback ``redirect_uri`` with
``code`` and ``state`` (or ``access_denied``), the authorization_code and
device_code grants at the OAuth2 token endpoint ``/oauth/token`` (whose
refresh_token grant lives in refresh.py: the tokens granted here come from
the same ledger, so they rotate there), device authorization with its
approval page, revocation (RFC 7009) and userinfo.  PKCE S256 is required
for the code flow and checked on the device flow when a challenge was sent.
Clients are registered (``register_client``); each must authenticate the
way it was registered.  The switches are in ``switches``.
"""

from __future__ import annotations

import html
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from yarl import URL

from sidecar.mockcloud.api import bearer_token, invalid_token_response
from sidecar.mockcloud.ledger import TokenLedger
from sidecar.mockcloud.login import LOOPBACK_HOSTS
from sidecar.mockcloud.oidc_parts import (
    DEFAULT_CLIENT_ID,
    ID_TOKEN_TTL,
    NONE,
    MockClient,
    OidcSwitches,
    authenticate,
    discovery_document,
    mint_id_token,
    new_user_code,
    s256_matches,
)
from sidecar.mockcloud.refresh import basic_credentials
from sidecar.mockcloud.wire import Handler, json_response

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Authorization codes are short-lived (RFC 6749 §4.1.2 recommends at most 10 minutes).
CODE_TTL = 60.0
DEVICE_CODE_TTL = 600.0
_NO_STORE = {"Cache-Control": "no-store"}


class OidcHost(Protocol):
    """What the provider needs from the cloud: the account, and the address it is served at."""

    @property
    def user(self) -> str: ...

    @property
    def email(self) -> str: ...

    def api_url(self, request: web.Request) -> str: ...


@dataclass(slots=True)
class _Authorization:
    """What an authorization code or a device code was issued for."""

    client_id: str
    scope: str
    challenge: str | None
    expires_at: float
    redirect_uri: str | None = None
    nonce: str | None = None
    consented: bool = True  # the code flow: prompt=consent was asked for (OIDC Core §11, for offline_access)
    status: str = "pending"  # device codes: pending, approved, denied; both: used


def _oauth_error(error: str, status: int = 400) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="mock-cloud"'} if status == 401 else {}
    return json_response({"error": error}, status, headers={**_NO_STORE, **headers})


def _page(status: int, text: str) -> web.Response:
    body = f"<!doctype html><title>mock provider</title><p>{html.escape(text)}</p>\n"
    return web.Response(status=status, text=body, content_type="text/html")


class OidcRoutes:
    """The provider's routes and memory: clients, authorization codes, device codes, switches."""

    def __init__(self, cloud: OidcHost, ledger: TokenLedger) -> None:
        self._cloud = cloud
        self._ledger = ledger
        self.clients: dict[str, MockClient] = {DEFAULT_CLIENT_ID: MockClient()}
        self.switches = OidcSwitches()
        self.revoked: list[str] = []  # every token revocation was asked for, for tests
        self._key = secrets.token_bytes(32)
        self._codes: dict[str, _Authorization] = {}
        self._devices: dict[str, _Authorization] = {}
        self._user_codes: dict[str, str] = {}  # user code -> device code

    @property
    def subject(self) -> str:
        return f"user-{self._cloud.user}"

    def register_client(self, client_id: str, secret: str | None = None, method: str | None = None) -> None:
        """Know ``client_id``: public without a secret, else confidential (``client_secret_basic`` unless ``method``)."""
        self.clients[client_id] = MockClient(secret, method or ("client_secret_basic" if secret else NONE))

    def add_to(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Register the provider's routes; RFC 8414's document sits before the prefix, as §3.1 says."""
        router.add_get(prefix + "/.well-known/openid-configuration", self._openid_configuration)
        router.add_get("/.well-known/oauth-authorization-server" + prefix, self._authorization_server)
        router.add_get(prefix + "/oauth/authorize", self._authorize)
        router.add_post(prefix + "/oauth/device_authorization", self._device_authorization)
        router.add_get(prefix + "/oauth/device", self._device_page)
        router.add_post(prefix + "/oauth/revoke", self._revoke)
        router.add_route("*", prefix + "/oauth/userinfo", self._userinfo)
        router.add_get(prefix + "/oauth/jwks", self._jwks)

    # -- discovery --------------------------------------------------------

    async def _openid_configuration(self, request: web.Request) -> web.StreamResponse:
        if not self.switches.openid_configuration:
            return json_response({"error": "not_found"}, 404)
        return self._metadata(request)

    async def _authorization_server(self, request: web.Request) -> web.StreamResponse:
        return self._metadata(request)

    def _metadata(self, request: web.Request) -> web.Response:
        issuer = self._cloud.api_url(request)
        return json_response(discovery_document(issuer, self.switches.announced_issuer))

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        # HS256 keys are never published; the document exists because Discovery requires jwks_uri.
        return json_response({"keys": []})

    # -- the code flow ----------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        """Approve at once: redirect to ``redirect_uri`` with a code (or an error) and ``state``."""
        query = request.query
        self.switches.seen["authorize"] = dict(query)
        client_id = query.get("client_id", "")
        if client_id not in self.clients:
            return _page(400, "Unknown client_id.")
        try:
            target = URL(query.get("redirect_uri", ""))
        except ValueError:
            target = URL()
        if target.scheme != "http" or target.host not in LOOPBACK_HOSTS:
            # RFC 6749 §4.1.2.1: never redirect to an unchecked redirect_uri.
            return _page(400, "redirect_uri must be a loopback http URL (RFC 8252).")
        answer = {"state": query.get("state", ""), "iss": self._cloud.api_url(request)}
        if query.get("response_type") != "code":
            answer["error"] = "unsupported_response_type"
        elif not query.get("code_challenge") or query.get("code_challenge_method") != "S256":
            answer["error"] = "invalid_request"
        elif self.switches.deny:
            answer["error"] = "access_denied"
        else:
            code = "ac_" + secrets.token_urlsafe(24)
            self._codes[code] = _Authorization(
                client_id=client_id,
                scope=query.get("scope", ""),
                challenge=query["code_challenge"],
                expires_at=self._ledger.clock() + CODE_TTL,
                redirect_uri=str(target),
                nonce=query.get("nonce"),
                consented="consent" in query.get("prompt", "").split(),
            )
            answer["code"] = code
        raise web.HTTPFound(str(target.extend_query(answer)), text="Approved; back to the application.\n")

    # -- the token endpoint's login grants ---------------------------------

    def grants(self) -> dict[str, Handler]:
        """The token endpoint's grants this provider answers, for refresh.py's ``/oauth/token`` to hand over."""
        return {"authorization_code": self.token, DEVICE_GRANT: self.token}

    async def token(self, request: web.Request) -> web.StreamResponse:
        """The authorization_code and device_code grants of ``/oauth/token``."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.switches.seen["token"] = form
        client_id = authenticate(self.clients, form, basic_credentials(request.headers.get("Authorization", "")))
        if client_id is None:
            return _oauth_error("invalid_client", 401)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._redeem_code(request, client_id, form)
        if grant_type == DEVICE_GRANT:
            return self._poll_device(request, client_id, form)
        return _oauth_error("unsupported_grant_type")

    def _redeem_code(self, request: web.Request, client_id: str, form: dict[str, str]) -> web.Response:
        grant = self._codes.get(form.get("code", ""))
        if grant is None or grant.status == "used" or self._ledger.clock() >= grant.expires_at:
            return _oauth_error("invalid_grant")
        grant.status = "used"  # single use, whatever comes next
        if grant.client_id != client_id or grant.redirect_uri != form.get("redirect_uri"):
            return _oauth_error("invalid_grant")
        if grant.challenge is None or not s256_matches(form.get("code_verifier", ""), grant.challenge):
            return _oauth_error("invalid_grant")
        return self._grant(request, grant)

    def _poll_device(self, request: web.Request, client_id: str, form: dict[str, str]) -> web.Response:
        switches = self.switches
        grant = self._devices.get(form.get("device_code", ""))
        if grant is None or grant.client_id != client_id or grant.status == "used":
            return _oauth_error("invalid_grant")
        if switches.expire_device_codes or self._ledger.clock() >= grant.expires_at:
            return _oauth_error("expired_token")
        if switches.slow_down_polls > 0:
            switches.slow_down_polls -= 1
            return _oauth_error("slow_down")
        if switches.deny or grant.status == "denied":
            return _oauth_error("access_denied")
        if switches.pending_polls > 0 or grant.status == "pending":
            switches.pending_polls = max(0, switches.pending_polls - 1)
            return _oauth_error("authorization_pending")
        if grant.challenge is not None and not s256_matches(form.get("code_verifier", ""), grant.challenge):
            return _oauth_error("invalid_grant")
        grant.status = "used"
        return self._grant(request, grant)

    def _grant(self, request: web.Request, grant: _Authorization) -> web.Response:
        """Start a login family at the ledger; a refresh token only for offline_access with consent, as providers do."""
        issued = self._ledger.issue_pair()
        now = self._ledger.clock()
        scopes = grant.scope.split()
        body: dict[str, Any] = {
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": max(0, round(issued.expires_at - now)),
            "scope": grant.scope,
        }
        if "offline_access" in scopes and grant.consented and not self.switches.omit_refresh_token:
            body["refresh_token"] = issued.refresh_token
        if "openid" in scopes:
            claims: dict[str, Any] = {
                "iss": self._cloud.api_url(request),
                "sub": self.subject,
                "aud": grant.client_id,
                "iat": int(now),
                "exp": int(now + ID_TOKEN_TTL),
                "name": self._cloud.user,
                "email": self._cloud.email,
            }
            nonce = self.switches.id_token_nonce or grant.nonce
            if nonce is not None:
                claims["nonce"] = nonce
            body["id_token"] = mint_id_token(self._key, claims)
            self._ledger.minted.add(body["id_token"])
        return json_response(body, headers=_NO_STORE)

    # -- the device flow --------------------------------------------------

    async def _device_authorization(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.switches.seen["device_authorization"] = form
        client_id = authenticate(self.clients, form, basic_credentials(request.headers.get("Authorization", "")))
        if client_id is None:
            return _oauth_error("invalid_client", 401)
        challenge = form.get("code_challenge")
        if challenge is not None and form.get("code_challenge_method") != "S256":
            return _oauth_error("invalid_request")
        device_code, user_code = "dc_" + secrets.token_urlsafe(24), new_user_code()
        self._devices[device_code] = _Authorization(
            client_id=client_id,
            scope=form.get("scope", ""),
            challenge=challenge,
            expires_at=self._ledger.clock() + DEVICE_CODE_TTL,
        )
        self._user_codes[user_code] = device_code
        page = f"{self._cloud.api_url(request)}/oauth/device"
        body = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": page,
            "verification_uri_complete": str(URL(page).with_query(user_code=user_code)),
            "expires_in": int(DEVICE_CODE_TTL),
            "interval": self.switches.device_interval,
        }
        return json_response(body, headers=_NO_STORE)

    async def _device_page(self, request: web.Request) -> web.StreamResponse:
        """The user's side: opening it with ``user_code`` approves the code (``deny=1`` denies it)."""
        user_code = request.query.get("user_code", "").strip().upper()
        if not user_code:
            form = '<form><input name="user_code" autofocus> <button>Approve</button></form>'
            return web.Response(text=f"<!doctype html><title>mock provider</title>{form}\n", content_type="text/html")
        grant = self._devices.get(self._user_codes.get(user_code, ""))
        if grant is None or grant.status != "pending":
            return _page(400, "Unknown or used code.")
        grant.status = "denied" if request.query.get("deny") else "approved"
        return _page(200, f"Code {user_code} {grant.status}; you can close this page.")

    # -- logout and status ------------------------------------------------

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        """RFC 7009: 200 whether or not the token was live; the refresh token's whole family dies."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.switches.seen["revoke"] = form
        if authenticate(self.clients, form, basic_credentials(request.headers.get("Authorization", ""))) is None:
            return _oauth_error("invalid_client", 401)
        if self.switches.revocation_status is not None:
            return _oauth_error("server_error", self.switches.revocation_status)
        token = form.get("token", "")
        if not token:
            return _oauth_error("invalid_request")
        self.revoked.append(token)
        self._ledger.revoke_chain(token)
        return web.Response(status=200)

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "POST"):
            return json_response({"error": "invalid_request"}, 405)
        if not self._ledger.access_token_valid(bearer_token(request)):
            return invalid_token_response()
        return json_response({"sub": self.subject, "name": self._cloud.user, "email": self._cloud.email})

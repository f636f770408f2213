"""The oauth2 flavor's browser login: authorization code + PKCE S256 on a loopback redirect (SPEC §8).

Each test runs the flow in-process against the mock cloud as the provider;
a scripted browser follows the authorization redirect to the login's
loopback callback and reports the page it lands on.  What the provider
received is read from its ``switches.seen`` record.
"""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import pytest
from helpers.oidc import Page, browse, code_login, oidc_settings
from yarl import URL

from sidecar.auth.oidc.codeflow import Login
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.login import oauth2_login
from sidecar.auth.oidc.pkce import s256
from sidecar.errors import ConfigError, LoginError, SidecarError
from sidecar.mockcloud import MockCloud


def login_of(result: Login | SidecarError) -> Login:
    """The (pair, claims) of a login that worked; fails the test with the error otherwise."""
    assert not isinstance(result, SidecarError), result
    return result


async def test_public_client_login_grants_a_live_pair(cloud: MockCloud, store_path: Path) -> None:
    """With only an issuer and a public client id the login ends with a live access token and a refresh token."""
    result, page = await code_login(oidc_settings(cloud, store_path))
    pair, _ = login_of(result)
    assert page.status == 200 and "Logged in" in page.text
    assert cloud.access_token_valid(pair.access_token)
    assert pair.refresh_token.startswith("rt_")
    assert pair.api_url == cloud.base_url


async def test_authorization_request_carries_pkce_s256_state_nonce_and_default_scope(
    cloud: MockCloud, store_path: Path
) -> None:
    """The authorization request asks for code with an S256 challenge, state, nonce, scope openid offline_access and a loopback redirect."""
    await code_login(oidc_settings(cloud, store_path))
    query = cloud.oidc.switches.seen["authorize"]
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 22 and len(query["nonce"]) >= 22
    assert query["scope"] == "openid offline_access"
    assert query["prompt"] == "consent"  # OIDC Core §11: offline_access wants it
    redirect = URL(query["redirect_uri"])
    assert (redirect.scheme, redirect.host, redirect.path) == ("http", "127.0.0.1", "/callback")
    assert redirect.port not in (None, 80)


async def test_code_exchange_sends_the_verifier_of_the_challenge(cloud: MockCloud, store_path: Path) -> None:
    """The token request carries the code, the same redirect_uri and the verifier whose S256 is the challenge."""
    await code_login(oidc_settings(cloud, store_path))
    authorize, token = cloud.oidc.switches.seen["authorize"], cloud.oidc.switches.seen["token"]
    assert token["grant_type"] == "authorization_code"
    assert token["redirect_uri"] == authorize["redirect_uri"]
    assert s256(token["code_verifier"]) == authorize["code_challenge"]


async def test_public_client_sends_client_id_and_no_secret(cloud: MockCloud, store_path: Path) -> None:
    """A public client puts client_id in the token request's form and sends no secret at all."""
    await code_login(oidc_settings(cloud, store_path, client_auth="none", client_secret="ignored"))
    token = cloud.oidc.switches.seen["token"]
    assert token["client_id"] == "sidecar-cli"
    assert "client_secret" not in token


@pytest.mark.parametrize("method", ["basic", "post"])
async def test_confidential_client_logs_in_with_its_registered_method(
    cloud: MockCloud, store_path: Path, method: str
) -> None:
    """A confidential client registered for client_secret_basic or _post logs in with client_auth basic or post."""
    cloud.oidc.register_client("app", "s3cret:/+", f"client_secret_{method}")
    result, page = await code_login(
        oidc_settings(cloud, store_path, client_id="app", client_secret="s3cret:/+", client_auth=method)
    )
    login_of(result)
    assert page.status == 200
    token = cloud.oidc.switches.seen["token"]
    assert ("client_secret" in token) == (method == "post")


async def test_confidential_client_with_the_wrong_method_is_refused(cloud: MockCloud, store_path: Path) -> None:
    """A client registered for Basic that sends its secret in the form gets invalid_client, and the hint names client_auth."""
    cloud.oidc.register_client("app", "s3cret", "client_secret_basic")
    result, page = await code_login(
        oidc_settings(cloud, store_path, client_id="app", client_secret="s3cret", client_auth="post")
    )
    assert isinstance(result, LoginError)
    assert "invalid_client" in str(result) and "client_auth" in str(result)
    assert page.status == 400


async def test_denied_login_fails_and_the_page_says_so(cloud: MockCloud, store_path: Path) -> None:
    """A provider that answers access_denied ends the login with that error, and the browser page says it was denied."""
    cloud.oidc.switches.deny = True
    result, page = await code_login(oidc_settings(cloud, store_path))
    assert isinstance(result, LoginError) and "access_denied" in str(result)
    assert page.status == 400 and "denied" in page.text
    assert "token" not in cloud.oidc.switches.seen


async def test_wrong_state_is_refused_without_spending_the_code(cloud: MockCloud, store_path: Path) -> None:
    """A callback whose state is not this login's fails the login, and no token request is made."""

    async def forging_browser(url: str) -> Page:
        redirected = await browse(url, follow=False)
        assert redirected.location is not None
        return await browse(str(URL(redirected.location).update_query(state="forged")))

    result, page = await code_login(oidc_settings(cloud, store_path), browser=forging_browser)
    assert isinstance(result, LoginError) and "state" in str(result)
    assert page.status == 400
    assert "token" not in cloud.oidc.switches.seen


# A verifier of the RFC 7636 length (64 characters), fixed so a failure reproduces.
VERIFIER = base64.urlsafe_b64encode(b"v" * 48).decode().rstrip("=")


async def exchange_with(cloud: MockCloud, verifier: str) -> int:
    """Get a code for VERIFIER's challenge straight from the authorize endpoint, redeem it with ``verifier``; the status."""
    redirect_uri = "http://127.0.0.1:9/callback"
    query = {
        "response_type": "code",
        "client_id": "sidecar-cli",
        "redirect_uri": redirect_uri,
        "scope": "openid offline_access",
        "state": "s",
        "code_challenge": s256(VERIFIER),
        "code_challenge_method": "S256",
    }
    redirected = await browse(str(URL(cloud.base_url + "/oauth/authorize").with_query(query)), follow=False)
    assert redirected.location is not None
    form = {
        "grant_type": "authorization_code",
        "code": URL(redirected.location).query["code"],
        "redirect_uri": redirect_uri,
        "client_id": "sidecar-cli",
        "code_verifier": verifier,
    }
    async with aiohttp.ClientSession() as session, session.post(cloud.base_url + "/oauth/token", data=form) as answer:
        return answer.status


async def test_mock_refuses_a_code_with_the_wrong_verifier(cloud: MockCloud) -> None:
    """The provider's token endpoint answers 400 to a code presented with a verifier that is not the challenge's."""
    assert await exchange_with(cloud, VERIFIER[::-1]) == 400


async def test_mock_grants_a_code_with_the_right_verifier(cloud: MockCloud) -> None:
    """The same exchange with the challenge's own verifier is granted (so the refusal above is the verifier's)."""
    assert await exchange_with(cloud, VERIFIER) == 200


async def test_grant_without_refresh_token_says_to_request_offline_access(cloud: MockCloud, store_path: Path) -> None:
    """A login granted no refresh token (scope without offline_access) fails with a message naming offline_access."""
    result, page = await code_login(oidc_settings(cloud, store_path, scope="openid"))
    assert isinstance(result, LoginError) and "offline_access" in str(result)
    assert page.status == 400
    assert "prompt" not in cloud.oidc.switches.seen["authorize"]  # consent is forced only for offline access


async def test_provider_withholding_the_refresh_token_is_the_same_error(cloud: MockCloud, store_path: Path) -> None:
    """Even with offline_access asked for, a grant without a refresh token fails naming offline_access."""
    cloud.oidc.switches.omit_refresh_token = True
    result, _ = await code_login(oidc_settings(cloud, store_path))
    assert isinstance(result, LoginError) and "offline_access" in str(result)


async def test_id_token_with_another_nonce_is_refused(cloud: MockCloud, store_path: Path) -> None:
    """An ID token that does not carry this login's nonce fails the login."""
    cloud.oidc.switches.id_token_nonce = "someone-elses-nonce"
    result, page = await code_login(oidc_settings(cloud, store_path))
    assert isinstance(result, LoginError) and "nonce" in str(result)
    assert page.status == 400


async def test_id_token_claims_name_the_account(cloud: MockCloud, store_path: Path) -> None:
    """The checked ID token's subject, name and email come back with the pair."""
    result, _ = await code_login(oidc_settings(cloud, store_path))
    _, claims = login_of(result)
    assert claims is not None
    assert (claims.subject, claims.name, claims.email) == ("user-alice", "alice", "alice@example.test")


async def test_audience_and_resource_are_sent_when_set(cloud: MockCloud, store_path: Path) -> None:
    """audience (Auth0) and resource (RFC 8707) go into the authorization request and the code exchange."""
    settings = oidc_settings(cloud, store_path, audience="https://api.example", resource="https://api.example/v1")
    await code_login(settings)
    for seen in (cloud.oidc.switches.seen["authorize"], cloud.oidc.switches.seen["token"]):
        assert seen["audience"] == "https://api.example"
        assert seen["resource"] == "https://api.example/v1"


async def test_unset_audience_and_resource_are_not_sent(cloud: MockCloud, store_path: Path) -> None:
    """Without audience or resource configured neither parameter appears."""
    await code_login(oidc_settings(cloud, store_path))
    assert not {"audience", "resource"} & set(cloud.oidc.switches.seen["authorize"])


async def test_login_needs_a_client_id(cloud: MockCloud, store_path: Path) -> None:
    """Without a client id the login is a configuration error before anything is sent."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ConfigError, match="client_id"):
            await oauth2_login(
                ProviderSession(session),
                oidc_settings(cloud, store_path, client_id=None),
                flow="callback",
                announce=lambda _url: None,
                show=lambda _prompt: None,
                timeout=1,
                api_url=None,
            )
    assert cloud.requests_seen == 0

"""Discovery (SPEC §8) and what the oauth2 flavor's refreshes make of it.

Discovery runs against the mock cloud as the provider: from the issuer alone,
RFC 8414's document as the fallback, the issuer check, the per-process
cache.  Then the refresher and a real in-process proxy with only an issuer
configured, kept working through rotations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import FakeClock, ProxyFactory, serving, stored
from helpers.certs import make_ca
from helpers.oidc import code_login, oidc_settings
from helpers.proxying import PAST_EXPIRY, fetch

from sidecar.auth.oidc.discovery import (
    DiscoveryError,
    ProviderMetadata,
    discovery_urls,
    provider_metadata,
    same_issuer,
)
from sidecar.auth.oidc.http import ProviderError, ProviderSession
from sidecar.auth.refresh import make_refresher
from sidecar.egress.outbound import Outbound, client_session
from sidecar.errors import ConfigError, RefreshTransient, SidecarError
from sidecar.mockcloud import MockCloud
from sidecar.store.file import TokenFile
from sidecar.tokens import TokenPair


async def discover(cloud: MockCloud, store_path: Path, **overrides: Any) -> ProviderMetadata:
    async with aiohttp.ClientSession() as session:
        return await provider_metadata(ProviderSession(session), oidc_settings(cloud, store_path, **overrides))


async def test_discovery_from_the_issuer_alone(cloud: MockCloud, store_path: Path) -> None:
    """With only the issuer, every endpoint comes from its openid-configuration document."""
    base = cloud.base_url
    assert await discover(cloud, store_path) == ProviderMetadata(
        issuer=base,
        token_endpoint=f"{base}/oauth/token",
        authorization_endpoint=f"{base}/oauth/authorize",
        device_authorization_endpoint=f"{base}/oauth/device_authorization",
        revocation_endpoint=f"{base}/oauth/revoke",
        userinfo_endpoint=f"{base}/oauth/userinfo",
        code_challenge_methods=("S256",),
    )


async def test_rfc8414_document_is_the_fallback(store_path: Path) -> None:
    """A provider without openid-configuration is found at RFC 8414's well-known URI, inserted before the issuer's path."""
    async with serving(MockCloud(prefix="/tenant")) as cloud:
        cloud.oidc.switches.openid_configuration = False
        metadata = await discover(cloud, store_path)
    assert metadata.issuer == cloud.base_url
    assert metadata.token_endpoint == cloud.base_url + "/oauth/token"


def test_discovery_urls_put_the_well_known_path_where_each_spec_says() -> None:
    """OIDC appends /.well-known/openid-configuration; RFC 8414 §3.1 inserts its suffix between host and path."""
    assert discovery_urls("https://id.example/realms/dev/") == (
        "https://id.example/realms/dev/.well-known/openid-configuration",
        "https://id.example/.well-known/oauth-authorization-server/realms/dev",
    )


async def test_issuer_mismatch_is_refused(cloud: MockCloud, store_path: Path) -> None:
    """A document naming another issuer is refused, and nothing of it is used."""
    cloud.oidc.switches.announced_issuer = "https://evil.example"
    with pytest.raises(DiscoveryError, match="issuer mismatch"):
        await discover(cloud, store_path)


def test_a_trailing_slash_is_the_only_leeway_in_the_issuer_match() -> None:
    """``https://t.auth0.com/`` matches ``https://t.auth0.com``; another path or host does not."""
    assert same_issuer("https://t.auth0.com", "https://t.auth0.com/")
    assert not same_issuer("https://id.example/a", "https://id.example/b")
    assert not same_issuer("https://id.example", "https://id.example.evil")


async def test_an_http_issuer_off_loopback_is_refused_before_any_request(store_path: Path) -> None:
    """issuer http://id.example is a configuration error: tokens would cross the network in the clear."""
    cloud = MockCloud()
    cloud.base_url = "http://id.example"
    with pytest.raises(ConfigError, match="https"):
        await discover(cloud, store_path)


async def test_discovery_is_cached_for_the_process(cloud: MockCloud, store_path: Path) -> None:
    """A second lookup of the same issuer makes no request."""
    settings = oidc_settings(cloud, store_path)
    async with aiohttp.ClientSession() as session:
        await provider_metadata(ProviderSession(session), settings)
        seen = cloud.requests_seen
        await provider_metadata(ProviderSession(session), settings)
    assert seen == 1 and cloud.requests_seen == 1


async def test_a_failed_discovery_is_not_cached(cloud: MockCloud, store_path: Path) -> None:
    """After a refused document the next lookup asks again, and succeeds once the provider is right."""
    settings = oidc_settings(cloud, store_path)
    cloud.oidc.switches.announced_issuer = "https://evil.example"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DiscoveryError):
            await provider_metadata(ProviderSession(session), settings)
        cloud.oidc.switches.announced_issuer = None
        assert (await provider_metadata(ProviderSession(session), settings)).issuer == cloud.base_url


async def test_an_explicit_token_url_wins(cloud: MockCloud, store_path: Path) -> None:
    """token_url set beside issuer replaces the discovered token endpoint; the other endpoints stay."""
    metadata = await discover(cloud, store_path, token_url="https://tokens.example/token")
    assert metadata.token_endpoint == "https://tokens.example/token"
    assert metadata.revocation_endpoint == cloud.base_url + "/oauth/revoke"


async def https_discovery(tmp_path: Path, store_path: Path, *, trusted: bool) -> ProviderMetadata:
    """Discover an https mock provider whose certificate comes from a private CA, trusted through ca_file or not."""
    ca = make_ca(tmp_path)
    cloud = MockCloud()
    assert (await cloud.start(ssl_context=ca.server_context())).startswith("https://")
    try:
        settings = oidc_settings(cloud, store_path, ca_file=str(ca.pem) if trusted else None)
        outbound = Outbound(settings)
        async with client_session(settings, outbound) as client:
            return await provider_metadata(ProviderSession(client, outbound.proxies), settings)
    finally:
        await cloud.stop()


async def test_discovery_over_https_trusts_ca_file(tmp_path: Path, store_path: Path) -> None:
    """Discovery goes through the configured TLS context: a provider signed by the ca_file CA is trusted."""
    metadata = await https_discovery(tmp_path, store_path, trusted=True)
    assert metadata.token_endpoint is not None and metadata.token_endpoint.startswith("https://")


async def test_discovery_over_https_names_a_tls_failure(tmp_path: Path, store_path: Path) -> None:
    """Without the CA the provider's certificate is refused, and the error says it was TLS verification."""
    with pytest.raises(ProviderError, match="TLS verification"):
        await https_discovery(tmp_path, store_path, trusted=False)


# -- refreshing with what discovery found -------------------------------------


async def logged_in(cloud: MockCloud, store_path: Path, **overrides: Any) -> TokenPair:
    """A code login with the mock provider, written to the store."""
    result, _ = await code_login(oidc_settings(cloud, store_path, **overrides))
    assert not isinstance(result, SidecarError), result
    TokenFile(store_path).write(result[0])
    return result[0]


async def test_refresher_finds_the_token_endpoint_from_the_issuer(
    cloud: MockCloud, store_path: Path, clock: FakeClock
) -> None:
    """With issuer and no token_url the refresh goes to the discovered token endpoint and rotates the pair."""
    pair = await logged_in(cloud, store_path)
    async with aiohttp.ClientSession() as session:
        refreshed = await make_refresher(session, oidc_settings(cloud, store_path)).refresh(pair, clock())
    assert cloud.refresh_ok == 1
    assert refreshed.refresh_token != pair.refresh_token
    assert cloud.access_token_valid(refreshed.access_token)


async def test_refresher_with_an_unreachable_issuer_is_transient(
    cloud: MockCloud, store_path: Path, clock: FakeClock
) -> None:
    """A discovery that cannot reach the provider is a transient refresh failure, so the stored pair stays."""
    pair = await logged_in(cloud, store_path)
    settings = oidc_settings(cloud, store_path, issuer="http://127.0.0.1:9")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(RefreshTransient, match="discovery failed"):
            await make_refresher(session, settings).refresh(pair, clock())
    assert cloud.refresh_calls == 0


@pytest.mark.parametrize(("method", "in_form"), [("post", True), ("basic", False)])
async def test_refresher_authenticates_as_client_auth_says(
    cloud: MockCloud, store_path: Path, clock: FakeClock, method: str, in_form: bool
) -> None:
    """client_auth post puts the secret in the refresh form; basic puts it in HTTP Basic."""
    cloud.oidc.register_client("app", "s3cret", f"client_secret_{method}")
    cloud.oauth_client = ("app", "s3cret")
    settings = {"client_id": "app", "client_secret": "s3cret", "client_auth": method}
    pair = await logged_in(cloud, store_path, **settings)
    async with aiohttp.ClientSession() as session:
        await make_refresher(session, oidc_settings(cloud, store_path, **settings)).refresh(pair, clock())
    assert cloud.refresh_ok == 1
    assert ("client_secret" in cloud.last_oauth_form) == in_form
    assert (cloud.last_oauth_basic is not None) == (not in_form)


async def test_serve_with_only_an_issuer_keeps_working_through_rotations(
    cloud: MockCloud, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A proxy configured with issuer and client id alone refreshes at each expiry and every request gets 200."""
    first = await logged_in(cloud, store_path)
    p = await make_proxy(**_oauth2(cloud))
    for _ in range(2):
        clock.advance(PAST_EXPIRY)
        assert (await fetch(client, "GET", p.url + "/api/v1/echo")).status == 200
    assert cloud.refresh_ok == 2
    assert stored(store_path).refresh_token != first.refresh_token


def _oauth2(cloud: MockCloud) -> dict[str, Any]:
    return {"flavor": "oauth2", "issuer": cloud.base_url, "client_id": "sidecar-cli"}

"""The pure parts of the OIDC login: ID token checks, client authentication, PKCE, the re-login hint.

No sockets: each decision is a function of values (STYLE habit 1).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import pytest

from sidecar.auth.hint import login_hint
from sidecar.auth.oidc.client_auth import basic_credentials, client_credentials
from sidecar.auth.oidc.idtoken import check_id_token
from sidecar.auth.oidc.pkce import new_pkce, s256
from sidecar.config import Settings
from sidecar.errors import ConfigError, LoginError

ISSUER = "https://id.example"
NOW = time.time()


def id_token(**claims: Any) -> str:
    """An unsigned-looking JWS with ``claims`` over a valid default set (None removes a claim)."""
    body = {"iss": ISSUER, "sub": "u1", "aud": "app", "exp": NOW + 300, "nonce": "n1", **claims}
    body = {key: value for key, value in body.items() if value is not None}

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(body)}.c2ln"


def check(token: str, nonce: str | None = "n1") -> str:
    return check_id_token(token, issuer=ISSUER, client_id="app", nonce=nonce, now=NOW).subject


def test_a_valid_id_token_passes() -> None:
    """Issuer, audience, expiry and nonce all right: the subject comes back."""
    assert check(id_token()) == "u1"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": "https://other.example"}, "iss"),
        ({"aud": "someone-else"}, "aud"),
        ({"aud": ["app", "api"]}, "azp"),
        ({"aud": ["app", "api"], "azp": "api"}, "azp"),
        ({"azp": "other"}, "azp"),
        ({"exp": NOW - 3600}, "expired"),
        ({"exp": None}, "exp"),
        ({"nonce": "n2"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"sub": None}, "sub"),
    ],
)
def test_an_id_token_failing_a_check_is_refused_naming_it(claims: dict[str, Any], reason: str) -> None:
    """Each failed OIDC Core §3.1.3.7 check refuses the login and says which claim failed."""
    with pytest.raises(LoginError, match=reason):
        check(id_token(**claims))


def test_several_audiences_with_our_azp_pass() -> None:
    """With several audiences, azp naming our client is enough."""
    assert check(id_token(aud=["app", "api"], azp="app")) == "u1"


def test_the_device_flow_checks_no_nonce() -> None:
    """Without a nonce to expect (the device flow sends none) a token without one passes."""
    assert check(id_token(nonce=None), nonce=None) == "u1"


def test_an_encrypted_id_token_is_refused() -> None:
    """A five-part JWE is refused as unsupported rather than misread."""
    with pytest.raises(LoginError, match="encrypted"):
        check("a.b.c.d.e")


def settings(**values: Any) -> Settings:
    return Settings(flavor="oauth2", issuer=ISSUER, **values)


def test_client_auth_basic_sends_http_basic_only() -> None:
    """basic: id and secret form-urlencoded into HTTP Basic, nothing in the form."""
    credentials = client_credentials(settings(client_id="a b", client_secret="s:/", client_auth="basic"))
    assert dict(credentials.headers) == {"Authorization": basic_credentials("a b", "s:/")}
    assert base64.b64decode(credentials.headers["Authorization"].split()[1]) == b"a+b:s%3A%2F"
    assert dict(credentials.form) == {}


def test_client_auth_post_sends_both_in_the_form() -> None:
    """post: client_id and client_secret in the form, no Authorization header."""
    credentials = client_credentials(settings(client_id="app", client_secret="s", client_auth="post"))
    assert (dict(credentials.headers), dict(credentials.form)) == ({}, {"client_id": "app", "client_secret": "s"})


def test_client_auth_none_never_sends_the_secret() -> None:
    """none: a public client sends its id only, even with a secret configured."""
    credentials = client_credentials(settings(client_id="app", client_secret="s", client_auth="none"))
    assert (dict(credentials.headers), dict(credentials.form)) == ({}, {"client_id": "app"})


def test_unset_client_auth_keeps_the_old_behaviour() -> None:
    """Unset: Basic with a secret, client_id in the form without one."""
    assert "Authorization" in client_credentials(settings(client_id="app", client_secret="s")).headers
    assert dict(client_credentials(settings(client_id="app")).form) == {"client_id": "app"}


def test_a_method_needing_a_secret_without_one_is_a_config_error() -> None:
    """client_auth basic or post without client_secret names client_secret."""
    with pytest.raises(ConfigError, match="client_secret"):
        client_credentials(settings(client_id="app", client_auth="post"))


def test_credentials_repr_hides_the_secret() -> None:
    """The credentials' repr shows which fields go out, never their values."""
    credentials = client_credentials(settings(client_id="app", client_secret="s3cret", client_auth="post"))
    assert "s3cret" not in repr(credentials)


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    """The S256 challenge of RFC 7636's example verifier is the one in its appendix B."""
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_verifiers_are_long_fresh_and_hidden() -> None:
    """Each verifier is 43-128 unreserved characters, differs from the last, and its repr hides it."""
    first, second = new_pkce(), new_pkce()
    assert 43 <= len(first.verifier) <= 128 and first.verifier != second.verifier
    assert first.verifier not in repr(first)


def test_relay_hint_is_unchanged() -> None:
    """The relay flavor's hint is ``sidecar login --upstream API``."""
    assert login_hint(Settings(upstream="https://cloud.example")) == "sidecar login --upstream https://cloud.example"


def test_oauth2_hint_names_issuer_client_and_upstream_but_no_secret() -> None:
    """The oauth2 hint is a working login command with the issuer, the client id and the upstream, shell-quoted, never the secret."""
    hint = login_hint(
        Settings(
            flavor="oauth2", issuer=ISSUER, client_id="my app", client_secret="s3cret", upstream="https://api.example"
        )
    )
    assert (
        hint
        == "sidecar login --flavor oauth2 --issuer https://id.example --client-id 'my app' --upstream https://api.example"
    )


def test_oauth2_hint_without_an_issuer_shows_a_placeholder() -> None:
    """Configured with token_url only, the hint says an issuer is needed to log in."""
    assert "--issuer <ISSUER>" in login_hint(Settings(flavor="oauth2", token_url="https://id.example/token"))

"""The oauth2 flavor's headless login: the device authorization grant (RFC 8628, SPEC §8).

The flow runs in-process against the mock cloud as the provider, with an
injected sleep and monotonic clock (helpers/oidc.py ``Polling``): every wait
is recorded, none is real.  The "user" approves by opening the complete
verification URI after a chosen poll.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import pytest
from helpers.oidc import Polling, approve, device_login, oidc_settings

from sidecar.auth.oidc.codeflow import Login
from sidecar.auth.oidc.device import DEVICE_GRANT, DevicePrompt, device_code_from, device_flow
from sidecar.auth.oidc.discovery import provider_metadata
from sidecar.auth.oidc.http import ProviderSession
from sidecar.auth.oidc.login import device_instructions
from sidecar.errors import LoginError, SidecarError
from sidecar.mockcloud import MockCloud


def approving_after(poll: int, *, deny: bool = False) -> Polling:
    """Polling whose user opens the verification URI right after the ``poll``-th wait."""

    async def on_sleep(n: int, prompt: DevicePrompt) -> None:
        if n == poll:
            page = await approve(prompt, deny=deny)
            assert page.status == 200

    return Polling(on_sleep)


def granted(result: Login | SidecarError) -> Login:
    assert not isinstance(result, SidecarError), result
    return result


async def test_approved_code_grants_a_live_pair(cloud: MockCloud, store_path: Path) -> None:
    """A code the user approves before the first poll is granted at that poll, with a refresh token."""
    polling = approving_after(1)
    pair, claims = granted(await device_login(oidc_settings(cloud, store_path), polling))
    assert cloud.access_token_valid(pair.access_token)
    assert pair.refresh_token.startswith("rt_")
    assert claims is not None and claims.subject == "user-alice"
    assert polling.slept == [5.0]


async def test_authorization_pending_keeps_polling_at_the_interval(cloud: MockCloud, store_path: Path) -> None:
    """authorization_pending answers are waited out at the same interval until the grant comes."""
    cloud.oidc.switches.device_interval = 3
    polling = approving_after(3)
    granted(await device_login(oidc_settings(cloud, store_path), polling))
    assert polling.slept == [3.0, 3.0, 3.0]


async def test_slow_down_adds_five_seconds_for_good(cloud: MockCloud, store_path: Path) -> None:
    """Each slow_down adds 5 s to the interval, for that poll and all later ones."""
    cloud.oidc.switches.slow_down_polls = 2
    cloud.oidc.switches.pending_polls = 1
    polling = approving_after(1)
    granted(await device_login(oidc_settings(cloud, store_path), polling))
    assert polling.slept == [5.0, 10.0, 15.0, 15.0]


async def test_access_denied_ends_the_login(cloud: MockCloud, store_path: Path) -> None:
    """A user who denies the code ends the login with an access_denied LoginError, after no further poll."""
    polling = approving_after(1, deny=True)
    result = await device_login(oidc_settings(cloud, store_path), polling)
    assert isinstance(result, LoginError)
    assert "denied at the provider (access_denied)" in str(result)
    assert polling.slept == [5.0]


async def test_expired_token_ends_the_login(cloud: MockCloud, store_path: Path) -> None:
    """An expired_token answer ends the login with a LoginError naming it."""
    cloud.oidc.switches.expire_device_codes = True
    result = await device_login(oidc_settings(cloud, store_path), Polling())
    assert isinstance(result, LoginError)
    assert "expired before it was approved (expired_token)" in str(result)


async def test_code_never_approved_ends_when_it_expires(cloud: MockCloud, store_path: Path) -> None:
    """Without approval the flow stops once the code's expires_in has passed, without polling beyond it."""
    cloud.oidc.switches.device_interval = 60
    polling = Polling()
    result = await device_login(oidc_settings(cloud, store_path), polling)
    assert isinstance(result, LoginError) and "expired" in str(result)
    assert sum(polling.slept) <= 600 and len(polling.slept) == 10


async def test_pkce_goes_along_when_the_provider_advertises_s256(cloud: MockCloud, store_path: Path) -> None:
    """With S256 in code_challenge_methods_supported the device request carries a challenge and the poll its verifier."""
    granted(await device_login(oidc_settings(cloud, store_path), approving_after(1)))
    seen = cloud.oidc.switches.seen
    assert seen["device_authorization"]["code_challenge_method"] == "S256"
    assert len(seen["token"]["code_verifier"]) >= 43
    assert seen["token"]["grant_type"] == DEVICE_GRANT


async def test_no_pkce_when_the_provider_does_not_advertise_it(cloud: MockCloud, store_path: Path) -> None:
    """A provider that advertises no S256 gets neither challenge nor verifier (some refuse unknown parameters)."""
    settings = oidc_settings(cloud, store_path)
    polling = approving_after(1)
    async with aiohttp.ClientSession() as client:
        session = ProviderSession(client)
        metadata = dataclasses.replace(await provider_metadata(session, settings), code_challenge_methods=())
        await device_flow(
            session,
            settings,
            metadata,
            show=polling.show,
            api_url=None,
            monotonic=polling.monotonic,
            sleep=polling.sleep,
        )
    assert "code_challenge" not in cloud.oidc.switches.seen["device_authorization"]
    assert "code_verifier" not in cloud.oidc.switches.seen["token"]


async def test_mock_refuses_a_device_poll_with_the_wrong_verifier(cloud: MockCloud, store_path: Path) -> None:
    """A device code asked for with a challenge is not granted to a poll with another verifier."""
    base = cloud.base_url
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"  # RFC 7636 appendix B
    async with aiohttp.ClientSession() as session:
        form = {
            "client_id": "sidecar-cli",
            "scope": "openid",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        async with session.post(base + "/oauth/device_authorization", data=form) as answer:
            code = await answer.json()
        await approve(device_code_from(code).prompt)
        poll = {"grant_type": DEVICE_GRANT, "device_code": code["device_code"], "client_id": "sidecar-cli"}
        async with session.post(base + "/oauth/token", data={**poll, "code_verifier": "x" * 43}) as wrong:
            assert (wrong.status, (await wrong.json())["error"]) == (400, "invalid_grant")


async def test_user_code_and_uri_are_shown_without_a_complete_uri() -> None:
    """Without verification_uri_complete the terminal shows the URI and the user code; Google's verification_url counts."""
    code = device_code_from(
        {
            "device_code": "d",
            "user_code": "WDJB-MJHT",
            "verification_url": "https://www.google.com/device",
            "expires_in": 1800,
        }
    )
    text = device_instructions(code.prompt)
    assert "https://www.google.com/device" in text and "WDJB-MJHT" in text
    assert code.interval == 5.0


async def test_an_unprintable_user_code_is_refused() -> None:
    """A user code with control characters (a terminal escape) is never shown: the answer is refused."""
    document = {"device_code": "d", "user_code": "\x1b[2JAB", "verification_uri": "https://id.example/device"}
    with pytest.raises(LoginError, match="user_code"):
        device_code_from(document)


async def test_an_interval_of_zero_still_waits_a_second() -> None:
    """A provider asking for interval 0 is polled once a second, not in a busy loop."""
    document = {"device_code": "d", "user_code": "AB", "verification_uri": "https://id.example/device", "interval": 0}
    assert device_code_from(document).interval == 1.0

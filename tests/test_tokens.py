"""The token value and the pure decisions about it: expiry, timestamps, grants."""

from __future__ import annotations

import pytest

from sidecar.errors import RefreshTransient
from sidecar.tokens import (
    TokenPair,
    format_timestamp,
    needs_refresh,
    pair_from_grant,
    parse_timestamp,
    refresh_due_at,
)

# 2023-11-14T22:13:20Z: a round, fixed "now" so no test reads the clock.
NOW = 1_700_000_000.0
# 2024-01-01T00:00:00Z, the instant every timestamp-parsing case below denotes.
NEW_YEAR_2024 = 1_704_067_200.0
LEEWAY = 120.0


def _pair(
    *,
    access_token: str | None = "at-1",
    expires_at: float | None = NOW + 3600,
    obtained_at: float | None = NOW - 3600,
) -> TokenPair:
    return TokenPair(
        access_token=access_token,
        refresh_token="rt-1",
        api_url="https://cloud.example",
        expires_at=expires_at,
        obtained_at=obtained_at,
    )


# --- needs_refresh / refresh_due_at ---------------------------------------


def test_token_far_from_expiry_does_not_need_refresh() -> None:
    """A token with an hour left and a 120 s leeway is used as is."""
    assert needs_refresh(_pair(), NOW, LEEWAY) is False


def test_token_just_outside_leeway_does_not_need_refresh() -> None:
    """A token with one second more than the leeway left is not yet near expiry."""
    pair = _pair(expires_at=NOW + LEEWAY + 1)
    assert needs_refresh(pair, NOW, LEEWAY) is False


def test_token_within_leeway_needs_refresh() -> None:
    """A token with fewer than leeway seconds left is near expiry."""
    pair = _pair(expires_at=NOW + 60)
    assert needs_refresh(pair, NOW, LEEWAY) is True


def test_expired_token_needs_refresh() -> None:
    """A token whose expiry has passed needs a refresh."""
    pair = _pair(expires_at=NOW - 1, obtained_at=NOW - 3601)
    assert needs_refresh(pair, NOW, LEEWAY) is True


def test_missing_expiry_needs_refresh() -> None:
    """A pair without an expiry counts as expired."""
    pair = _pair(expires_at=None)
    assert needs_refresh(pair, NOW, LEEWAY) is True


def test_missing_access_token_needs_refresh() -> None:
    """A pair without an access token needs a refresh even when its expiry is far off."""
    pair = _pair(access_token=None)
    assert needs_refresh(pair, NOW, LEEWAY) is True


def test_short_lived_token_is_not_refreshed_before_half_its_lifetime() -> None:
    """A 10 s token with a 120 s leeway is still fresh 4 s after it was obtained."""
    pair = _pair(obtained_at=NOW, expires_at=NOW + 10)
    assert needs_refresh(pair, NOW + 4, LEEWAY) is False


@pytest.mark.parametrize("elapsed", [5.0, 7.5, 10.0, 30.0])
def test_short_lived_token_is_refreshed_from_half_its_lifetime_on(elapsed: float) -> None:
    """A 10 s token with a 120 s leeway needs a refresh from 5 s after it was obtained."""
    pair = _pair(obtained_at=NOW, expires_at=NOW + 10)
    assert needs_refresh(pair, NOW + elapsed, LEEWAY) is True


def test_refresh_is_due_leeway_before_expiry_for_long_lived_tokens() -> None:
    """For a token living longer than twice the leeway, refresh is due at expiry minus leeway."""
    assert refresh_due_at(_pair(), LEEWAY) == NOW + 3600 - LEEWAY


def test_refresh_is_due_at_half_lifetime_for_short_lived_tokens() -> None:
    """For a 10 s token the refresh is due at obtained_at + 5 s, not at expiry minus leeway."""
    pair = _pair(obtained_at=NOW, expires_at=NOW + 10)
    assert refresh_due_at(pair, LEEWAY) == NOW + 5


def test_refresh_due_ignores_obtained_at_later_than_expiry() -> None:
    """An obtained_at after expires_at (clock skew) does not push the refresh past expiry."""
    pair = _pair(obtained_at=NOW + 100, expires_at=NOW + 10)
    assert refresh_due_at(pair, LEEWAY) == NOW + 10 - LEEWAY


def test_refresh_due_is_none_without_expiry() -> None:
    """A pair without an expiry is due now, which refresh_due_at spells None."""
    assert refresh_due_at(_pair(expires_at=None), LEEWAY) is None


# --- parse_timestamp / format_timestamp ----------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:00:00z",
        "2024-01-01T00:00:00.000Z",
        "2024-01-01T02:00:00+02:00",
        "2023-12-31T19:00:00-05:00",
        " 2024-01-01T00:00:00Z ",
    ],
)
def test_parse_timestamp_honours_the_offset(text: str) -> None:
    """Timestamps with a Z or a numeric offset parse to the UTC instant they name."""
    assert parse_timestamp(text) == NEW_YEAR_2024


def test_parse_timestamp_takes_naive_timestamps_as_utc() -> None:
    """A timestamp without an offset is read as UTC, as the desktop app wrote it."""
    assert parse_timestamp("2024-01-01T00:00:00") == NEW_YEAR_2024


@pytest.mark.parametrize("text", ["", "tomorrow", "2024-13-01T00:00:00Z", "2024-01-01T25:00:00Z", "nan", "1704067200"])
def test_parse_timestamp_returns_none_for_garbage(text: str) -> None:
    """A string that is not an ISO 8601 timestamp parses to None."""
    assert parse_timestamp(text) is None


@pytest.mark.parametrize("value", [None, 1_704_067_200, 1_704_067_200.0, True, ["2024-01-01T00:00:00Z"], {}])
def test_parse_timestamp_returns_none_for_non_strings(value: object) -> None:
    """Numbers, booleans, lists and None are not timestamps."""
    assert parse_timestamp(value) is None


def test_format_timestamp_is_utc_with_z_and_milliseconds() -> None:
    """format_timestamp writes UTC with a Z suffix to the millisecond."""
    assert format_timestamp(NEW_YEAR_2024 + 0.25) == "2024-01-01T00:00:00.250Z"


@pytest.mark.parametrize("epoch", [NEW_YEAR_2024, NOW + 0.5, 0.0, NOW + 86_400 * 7])
def test_format_then_parse_round_trips(epoch: float) -> None:
    """Parsing what format_timestamp wrote gives back the same instant."""
    assert parse_timestamp(format_timestamp(epoch)) == epoch


# --- pair_from_grant ----------------------------------------------------------

PREVIOUS = TokenPair(
    access_token="at-old",
    refresh_token="rt-old",
    api_url="https://cloud.example/cloud",
    expires_at=NOW - 10,
    obtained_at=NOW - 86_400,
    extra={"deviceId": "dev-7", "profile": {"name": "work"}},
)


def test_grant_in_camel_case_becomes_a_pair() -> None:
    """The relay's camelCase answer yields the new tokens, its expiry and obtained_at = now."""
    body = {"accessToken": "at-new", "refreshToken": "rt-new", "accessTokenExpiresAt": "2024-01-01T00:00:00Z"}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert (pair.access_token, pair.refresh_token, pair.expires_at, pair.obtained_at) == (
        "at-new",
        "rt-new",
        NEW_YEAR_2024,
        NOW,
    )


def test_grant_in_snake_case_becomes_a_pair() -> None:
    """The snake_case twins of the relay's names are accepted too."""
    body = {"access_token": "at-new", "refresh_token": "rt-new", "access_token_expires_at": "2024-01-01T00:00:00Z"}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert (pair.access_token, pair.refresh_token, pair.expires_at) == ("at-new", "rt-new", NEW_YEAR_2024)


def test_grant_expires_in_counts_from_now() -> None:
    """An expires_in of 3600 s means the access token expires an hour after now."""
    body = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert pair.expires_at == NOW + 3600


def test_grant_with_boolean_expires_in_has_no_expiry() -> None:
    """A boolean expires_in is not a number of seconds, so the pair has no expiry (refresh next use)."""
    body = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": True}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert pair.expires_at is None


def test_grant_without_refresh_token_keeps_the_previous_one() -> None:
    """A grant that does not rotate the refresh token keeps the one already held."""
    body = {"access_token": "at-new", "expires_in": 60}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert pair.refresh_token == "rt-old"


def test_grant_without_refresh_token_and_no_previous_is_transient() -> None:
    """With no previous pair to borrow from, a grant lacking a refresh token is unusable."""
    with pytest.raises(RefreshTransient):
        pair_from_grant({"access_token": "at-new"}, previous=None, now=NOW, api_url=None)


@pytest.mark.parametrize(
    "body",
    [
        {"refreshToken": "rt-new", "expires_in": 60},
        {"accessToken": "", "refreshToken": "rt-new"},
        {"accessToken": None, "refreshToken": "rt-new"},
        {"accessToken": 12345, "refreshToken": "rt-new"},
    ],
)
def test_grant_without_access_token_is_transient(body: dict[str, object]) -> None:
    """A 2xx answer without a usable access token raises RefreshTransient."""
    with pytest.raises(RefreshTransient, match="access token"):
        pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)


@pytest.mark.parametrize("body", [["at-new", "rt-new"], "at-new", None, 42])
def test_grant_that_is_not_an_object_is_transient(body: object) -> None:
    """A 2xx answer whose JSON is not an object raises RefreshTransient."""
    with pytest.raises(RefreshTransient, match="JSON object"):
        pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)


def test_grant_keeps_the_previous_pairs_extra_fields() -> None:
    """Unknown store fields of the previous pair survive a refresh."""
    body = {"accessToken": "at-new", "refreshToken": "rt-new"}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert dict(pair.extra) == {"deviceId": "dev-7", "profile": {"name": "work"}}


def test_grant_keeps_the_previous_api_url_when_none_is_given() -> None:
    """Without an explicit api_url the new pair keeps the previous pair's."""
    body = {"accessToken": "at-new", "refreshToken": "rt-new"}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert pair.api_url == "https://cloud.example/cloud"


def test_grant_uses_the_given_api_url() -> None:
    """An explicit api_url wins over the previous pair's."""
    body = {"accessToken": "at-new", "refreshToken": "rt-new"}
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url="https://other.example")
    assert pair.api_url == "https://other.example"


@pytest.mark.parametrize(
    "body",
    [
        {"accessToken": "at-new", "refreshToken": "rt-new", "expires_in": 2**63 - 1},
        {"accessToken": "at-new", "refreshToken": "rt-new", "accessTokenExpiresAt": "9999-12-31T23:59:59-01:00"},
    ],
)
def test_grant_never_yields_an_expiry_that_cannot_be_stored(body: dict[str, object]) -> None:
    """An absurd expiry is treated as unknown (refresh on next use), never one that cannot be written."""
    pair = pair_from_grant(body, previous=PREVIOUS, now=NOW, api_url=None)
    assert pair.expires_at is None


# --- redaction ------------------------------------------------------------------


def test_repr_never_shows_tokens() -> None:
    """repr of a pair hides both token strings."""
    pair = TokenPair(access_token="at-SECRET-a1", refresh_token="rt-SECRET-r1", api_url="https://cloud.example")
    text = repr(pair)
    assert "at-SECRET-a1" not in text
    assert "rt-SECRET-r1" not in text
    assert "access_token='***'" in text


def test_str_never_shows_tokens() -> None:
    """str and f-string formatting of a pair hide both token strings."""
    pair = TokenPair(access_token="at-SECRET-a1", refresh_token="rt-SECRET-r1")
    text = f"{pair} {pair!s} {[pair]!r}"
    assert "SECRET" not in text


def test_repr_does_not_show_extra_fields() -> None:
    """Unknown store fields, which may hold secrets of their own, stay out of repr."""
    pair = TokenPair(access_token=None, refresh_token="rt-1", extra={"idToken": "id-SECRET-x"})
    assert "id-SECRET-x" not in repr(pair)


def test_repr_shows_a_missing_access_token_as_none() -> None:
    """repr says None for an absent access token, so logs tell 'absent' from 'redacted'."""
    pair = TokenPair(access_token=None, refresh_token="rt-1")
    assert repr(pair).startswith("TokenPair(access_token=None, refresh_token='***'")

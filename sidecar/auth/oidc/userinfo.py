"""Who the access token belongs to, from the provider's userinfo endpoint (OpenID Connect Core §5.3).

Only ``sub``, ``name`` (else ``preferred_username``) and ``email`` are kept,
and only when they are short printable strings: status prints them.
"""

from __future__ import annotations

import dataclasses

from sidecar.auth.oidc.discovery import provider_metadata
from sidecar.auth.oidc.http import ProviderError, ProviderSession, get_json
from sidecar.config import Settings
from sidecar.errors import ConfigError

# A claim longer than this is not a name anybody wants on one line of status.
MAX_CLAIM = 256


@dataclasses.dataclass(frozen=True, slots=True)
class UserInfo:
    """The account: its subject, and its name and email when the provider shares them."""

    subject: str | None
    name: str | None = None
    email: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``sub``/``name``/``email`` as status --json reports them, the missing ones left out."""
        found = {"sub": self.subject, "name": self.name, "email": self.email}
        return {key: value for key, value in found.items() if value is not None}


def _claim(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_CLAIM and all(c.isprintable() for c in value):
        return value
    return None


async def userinfo(session: ProviderSession, url: str, access_token: str) -> tuple[UserInfo | None, str | None]:
    """The account behind ``access_token``, or None and why not (never raises for the provider's failures)."""
    try:
        answer = await get_json(
            session, url, what="userinfo endpoint", headers={"Authorization": f"Bearer {access_token}"}
        )
    except ProviderError as exc:
        return None, str(exc)
    if answer.status != 200:
        return None, f"the userinfo endpoint answered {answer.describe()}"
    if not answer.document:
        return None, "the userinfo endpoint answered without a JSON object"
    document = answer.document
    return (
        UserInfo(
            subject=_claim(document.get("sub")),
            name=_claim(document.get("name")) or _claim(document.get("preferred_username")),
            email=_claim(document.get("email")),
        ),
        None,
    )


async def account(
    session: ProviderSession, settings: Settings, access_token: str
) -> tuple[dict[str, str] | None, str | None]:
    """``status``'s user for the oauth2 flavor: sub/name/email from the discovered userinfo endpoint.

    None and no problem when there is no endpoint to ask (no issuer, or none advertised).
    """
    try:
        metadata = await provider_metadata(session, settings)
    except (ProviderError, ConfigError) as exc:
        return None, str(exc)
    if metadata.userinfo_endpoint is None:
        return None, None
    found, problem = await userinfo(session, metadata.userinfo_endpoint, access_token)
    return (found.as_dict() if found is not None else None), problem

"""The provider's metadata, from its issuer alone (OpenID Connect Discovery 1.0, RFC 8414).

``ISSUER/.well-known/openid-configuration`` first, then RFC 8414's
``/.well-known/oauth-authorization-server`` (inserted before the issuer's
path).  The document's ``issuer`` must be the configured one (a trailing
slash aside); every endpoint must be https, or http on a loopback host.
Documents are cached in memory for the life of the process; failures are
not, so the next call tries again.  An explicit ``token_url`` wins over the
document's token endpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from yarl import URL

from sidecar.auth.oidc.http import Answer, ProviderError, ProviderSession, get_json
from sidecar.config import Settings
from sidecar.errors import ConfigError

OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
RFC8414_WELL_KNOWN = "/.well-known/oauth-authorization-server"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_ENDPOINTS = (
    "token_endpoint",
    "authorization_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
    "userinfo_endpoint",
)


class DiscoveryError(ProviderError):
    """The provider's metadata could not be had, or fails its checks."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What sidecar uses of a provider's metadata; an endpoint the provider lacks is None."""

    issuer: str | None
    token_endpoint: str | None = None
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    code_challenge_methods: tuple[str, ...] = ()

    @property
    def advertises_s256(self) -> bool:
        """Whether the provider says it supports PKCE S256 (``code_challenge_methods_supported``)."""
        return "S256" in self.code_challenge_methods


def is_safe_endpoint(url: str) -> bool:
    """https, or http on a loopback host (RFC 8414 §2 asks for https; loopback is for local providers)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return False
    if not parsed.is_absolute() or not parsed.host or parsed.user is not None or parsed.fragment:
        return False
    return parsed.scheme == "https" or (parsed.scheme == "http" and parsed.host in _LOOPBACK)


def discovery_urls(issuer: str) -> tuple[str, str]:
    """Where the metadata may be: the OIDC location (appended), then RFC 8414 §3.1's (inserted)."""
    url = URL(issuer)
    path = url.path.rstrip("/")
    origin = str(url.origin())
    return origin + path + OIDC_WELL_KNOWN, origin + RFC8414_WELL_KNOWN + path


def same_issuer(configured: str, announced: str) -> bool:
    """Exact match, except that one side may end in ``/`` where the other does not (Auth0's issuers do)."""
    return configured.rstrip("/") == announced.rstrip("/")


def metadata_from(document: Mapping[str, Any], issuer: str, where: str) -> ProviderMetadata:
    """The checked metadata in ``document`` (fetched from ``where``) for the configured ``issuer``."""
    announced = document.get("issuer")
    if not isinstance(announced, str) or not announced:
        raise DiscoveryError(f"the provider's metadata at {where} has no issuer")
    if not same_issuer(issuer, announced):
        raise DiscoveryError(
            f"issuer mismatch: the metadata at {where} names a different issuer "
            f"({_shown(announced)}), refused (OpenID Connect Discovery §4.3); check issuer"
        )
    endpoints: dict[str, str | None] = {}
    for name in _ENDPOINTS:
        value = document.get(name)
        if value is None:
            endpoints[name] = None
        elif isinstance(value, str) and is_safe_endpoint(value):
            endpoints[name] = value
        else:
            raise DiscoveryError(f"the provider's {name} is not an https URL (or http on loopback); refused")
    methods = document.get("code_challenge_methods_supported")
    challenge_methods = tuple(m for m in methods if isinstance(m, str)) if isinstance(methods, list) else ()
    return ProviderMetadata(issuer=announced, code_challenge_methods=challenge_methods, **endpoints)


def _shown(text: str) -> str:
    """A value from the provider fit for one line: printable ASCII, at most 200 characters."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= 200 else clean[:200] + "..."


class DiscoveryCache:
    """Metadata by issuer, for the life of the process; only successes are kept."""

    def __init__(self) -> None:
        self._documents: dict[str, ProviderMetadata] = {}

    def forget(self) -> None:
        """Drop everything (tests that change a provider under the same issuer)."""
        self._documents.clear()

    async def metadata(self, session: ProviderSession, issuer: str) -> ProviderMetadata:
        """The issuer's checked metadata, fetched on first use; DiscoveryError if there is none to be had."""
        cached = self._documents.get(issuer)
        if cached is not None:
            return cached
        if not is_safe_endpoint(issuer):
            raise ConfigError("issuer: must be an https URL (http only on a loopback host)")
        answers: list[Answer] = []
        for url in discovery_urls(issuer):
            answer = await get_json(session, url, what="provider's metadata endpoint")
            if answer.ok and answer.document:
                found = metadata_from(answer.document, issuer, url)
                self._documents[issuer] = found
                return found
            answers.append(answer)
        tried = " and ".join(f"{url} ({a.describe()})" for url, a in zip(discovery_urls(issuer), answers, strict=True))
        raise DiscoveryError(f"no provider metadata for issuer {issuer}: tried {tried}")


# The process's cache: `serve` discovers once, every refresh after that is free.
CACHE = DiscoveryCache()


async def provider_metadata(session: ProviderSession, settings: Settings) -> ProviderMetadata:
    """The endpoints ``settings`` point at: discovered from ``issuer``, with an explicit ``token_url`` winning.

    Without an issuer only the token endpoint is known.
    """
    if settings.issuer is None:
        return ProviderMetadata(issuer=None, token_endpoint=settings.token_url)
    found = await CACHE.metadata(session, settings.issuer)
    if settings.token_url:
        return dataclasses.replace(found, token_endpoint=settings.token_url)
    return found

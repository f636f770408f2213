"""The checks an ID token from the token endpoint must pass (OpenID Connect Core §3.1.3.7).

Checked: ``iss`` is the discovered issuer, ``aud`` contains our client id
(with several audiences ``azp`` must be present, and when present it must be
our client id), ``exp`` has not passed, ``sub`` is there, and ``nonce`` is
the one this login sent.

Not checked: the signature.  §3.1.3.7 item 6 allows TLS server validation in
its place when the token comes straight from the token endpoint, as it does
here; sidecar never sends the ID token anywhere nor bases a decision on it
beyond this login, and carries no JOSE library.  Pure: ``now`` is passed in.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.errors import LoginError

# Clock skew between this machine and the provider that exp tolerates.
CLOCK_SKEW = 60.0
# A name or email longer than this is not shown.
MAX_CLAIM = 256


@dataclasses.dataclass(frozen=True, slots=True)
class IdClaims:
    """Who an ID token names."""

    subject: str
    name: str | None = None
    email: str | None = None


def _refused(why: str) -> LoginError:
    return LoginError(f"login failed: the ID token {why}; refused (run sidecar login again, or check the client id)")


def token_claims(id_token: str) -> Mapping[str, Any]:
    """The payload of a JWS compact ID token, unverified; LoginError when it is not one."""
    parts = id_token.split(".")
    if len(parts) == 5:
        raise _refused("is encrypted (JWE), which sidecar does not support")
    if len(parts) != 3:
        raise _refused("is not a JWT")
    payload = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        raise _refused("does not carry a JSON payload") from None
    if not isinstance(claims, dict):
        raise _refused("does not carry a JSON object")
    return claims


def check_id_token(id_token: object, *, issuer: str | None, client_id: str, nonce: str | None, now: float) -> IdClaims:
    """The claims of ``id_token`` once it passes the checks above; LoginError naming the first that fails.

    ``nonce`` None (the device flow, which sends none) skips the nonce check.
    """
    if not isinstance(id_token, str) or not id_token:
        raise _refused("is not a string")
    claims = token_claims(id_token)
    if issuer is not None and claims.get("iss") != issuer:
        raise _refused("was issued by someone other than the discovered issuer (iss)")
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
    if client_id not in audiences:
        raise _refused("is not meant for this client (aud)")
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        raise _refused("has several audiences but no azp")
    if azp is not None and azp != client_id:
        raise _refused("was issued to another client (azp)")
    expiry = claims.get("exp")
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool):
        raise _refused("has no expiry (exp)")
    if now >= expiry + CLOCK_SKEW:
        raise _refused("has expired (exp); check this machine's clock")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not secrets.compare_digest(got.encode(), nonce.encode()):
            raise _refused("does not carry this login's nonce (a replayed or injected login)")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise _refused("has no subject (sub)")
    return IdClaims(
        subject, _shown(claims.get("name")) or _shown(claims.get("preferred_username")), _shown(claims.get("email"))
    )


def _shown(value: object) -> str | None:
    """A claim fit for one line of output: a short printable string, else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_CLAIM and value.isprintable():
        return value
    return None

"""The random values of a login: PKCE (RFC 7636, S256 only), ``state`` and ``nonce``.

Pure apart from the system's CSPRNG; nothing here does I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets

# RFC 7636 §4.1: 43 to 128 characters; 48 random bytes make 64, 384 bits.
VERIFIER_BYTES = 48
# state and nonce only have to be unguessable: 192 bits each.
STATE_BYTES = 24


@dataclasses.dataclass(frozen=True, slots=True)
class Pkce:
    """A code verifier and its S256 challenge.  ``repr`` hides the verifier."""

    verifier: str
    challenge: str
    method: str = "S256"

    def __repr__(self) -> str:
        return f"Pkce(verifier='***', challenge={self.challenge!r}, method={self.method!r})"


def s256(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(verifier)))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def new_pkce() -> Pkce:
    """A fresh verifier (64 unreserved characters) and its challenge."""
    verifier = secrets.token_urlsafe(VERIFIER_BYTES)
    return Pkce(verifier, s256(verifier))


def new_state() -> str:
    return secrets.token_urlsafe(STATE_BYTES)


def new_nonce() -> str:
    return secrets.token_urlsafe(STATE_BYTES)

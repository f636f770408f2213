"""The TLS context for every outgoing connection, and what a failed handshake means."""

from __future__ import annotations

import ssl

from sidecar.config import Settings


def tls_context(settings: Settings) -> ssl.SSLContext:
    """System trust (plus ``ca_file``), and the client certificate when one is configured."""
    return ssl.create_default_context()


def describe_tls_failure(exc: BaseException) -> str | None:
    """A short, named reason for a TLS failure (``None`` if ``exc`` is not one)."""
    return None

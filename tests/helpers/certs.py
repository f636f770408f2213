"""Certificates made on the fly (trustme): a private CA, server certificates, TLS contexts."""

from __future__ import annotations

import dataclasses
import datetime
import ssl
from pathlib import Path

import trustme


@dataclasses.dataclass(frozen=True)
class PrivateCA:
    """A CA nobody's system trusts, its PEM on disk, and a way to issue server certificates."""

    ca: trustme.CA
    pem: Path

    def server_context(
        self, *hosts: str, not_after: datetime.datetime | None = None, client_ca: PrivateCA | None = None
    ) -> ssl.SSLContext:
        """A server-side context for ``hosts`` (default 127.0.0.1 and localhost).

        ``not_after`` in the past makes an expired certificate; ``client_ca``
        makes the server require a client certificate issued by that CA.
        """
        cert = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")), not_after=not_after)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            client_ca.ca.configure_trust(context)
        return context

    def client_files(self, directory: Path, name: str = "client") -> Path:
        """A client certificate and its key in one PEM file, for ``client_cert``."""
        cert = self.ca.issue_cert(f"{name}@sidecar.test")
        path = directory / f"{name}.pem"
        path.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
        return path


def make_ca(directory: Path, name: str = "ca") -> PrivateCA:
    ca = trustme.CA()
    pem = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(pem))
    return PrivateCA(ca, pem)

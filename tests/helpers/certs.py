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
        self,
        *hosts: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        client_ca: PrivateCA | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A server-side context for ``hosts`` (default 127.0.0.1 and localhost).

        ``not_after`` in the past makes an expired certificate, ``not_before``
        in the future one not yet valid; ``client_ca`` makes the server
        require a client certificate issued by that CA; ``max_version``
        caps the TLS version (TLS 1.2 refuses a missing client certificate
        in the handshake, TLS 1.3 only after it).
        """
        cert = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")), not_before=not_before, not_after=not_after)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            client_ca.ca.configure_trust(context)
        if max_version is not None:
            context.maximum_version = max_version
        return context

    def client_files(self, directory: Path, name: str = "client") -> Path:
        """A client certificate and its key in one PEM file, for ``client_cert``."""
        cert = self.ca.issue_cert(f"{name}@sidecar.test")
        path = directory / f"{name}.pem"
        path.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
        return path

    def client_files_apart(self, directory: Path, name: str = "client") -> tuple[Path, Path]:
        """A client certificate and its key in two PEM files, for ``client_cert`` and ``client_key``."""
        cert = self.ca.issue_cert(f"{name}@sidecar.test")
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        key_path.write_bytes(cert.private_key_pem.bytes())
        return cert_path, key_path

    def intermediate(self, directory: Path, name: str = "intermediate") -> PrivateCA:
        """A CA signed by this one; its server certificates carry it in their chain."""
        child = self.ca.create_child_ca()
        pem = directory / f"{name}.pem"
        child.cert_pem.write_to_path(str(pem))
        return PrivateCA(child, pem)


def make_ca(directory: Path, name: str = "ca") -> PrivateCA:
    ca = trustme.CA()
    pem = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(pem))
    return PrivateCA(ca, pem)


def days(n: float) -> datetime.datetime:
    """``n`` days from now (negative: ago), for ``not_before`` and ``not_after``."""
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=n)

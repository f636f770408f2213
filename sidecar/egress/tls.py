"""The TLS context for every outgoing connection, what a failed handshake means, and how it is reported.

Trust is the system's store (OpenSSL's default paths, which ``SSL_CERT_FILE``
and ``SSL_CERT_DIR`` move) plus ``ca_file``, added with
``load_verify_locations``: a corporate CA never costs the public ones.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.config import Settings
from sidecar.errors import ConfigError

log = logging.getLogger("sidecar.tls")


def tls_context(settings: Settings) -> ssl.SSLContext:
    """System trust (plus ``ca_file``), and the client certificate when one is configured.

    A missing, unreadable or unusable file is a ConfigError naming the key
    and the path, so a typo stops ``serve`` at startup instead of failing
    every request.
    """
    context = ssl.create_default_context()
    # Trust what ca_file lists even when it is an intermediate or the
    # server's own certificate, not only a self-signed root (Python 3.13's
    # default; system stores hold roots, so there it changes nothing).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if settings.ca_file:
        _load_ca_file(context, settings.ca_file)
    if settings.client_cert:
        _load_client_cert(context, settings.client_cert, settings.client_key_file)
    return context


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


# What load_verify_locations reads: PEM certificates, OpenSSL's "trusted" form included.
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (TRUSTED )?CERTIFICATE-----")


def _load_ca_file(context: ssl.SSLContext, path: str) -> None:
    if not _PEM_CERTIFICATE.search(_read("ca_file", path)):
        raise ConfigError(f"ca_file: no PEM certificate in {path}")
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"ca_file: cannot load {path}: {_ssl_reason(exc)}") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, hanging serve.
    raise _EncryptedKey


def _load_client_cert(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    cert_pem = _read("client_cert", cert)
    if not _PEM_CERTIFICATE.search(cert_pem):
        raise ConfigError(f"client_cert: no PEM certificate in {cert}")
    key_key, key_path = ("client_key", key) if key else ("client_cert", cert)
    key_pem = _read("client_key", key) if key else cert_pem
    if b"PRIVATE KEY-----" not in key_pem:
        hint = "" if key else " (put the key in the same file or set client_key)"
        raise ConfigError(f"{key_key}: no PEM private key in {key_path}{hint}")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"{key_key}: the private key in {key_path} is encrypted; sidecar needs it unencrypted"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"{key_key}: the private key in {key_path} does not belong to the certificate in {cert}"
            ) from None
        raise ConfigError(f"client_cert: cannot load {cert}: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"client_cert: cannot load {cert}: {exc.strerror or type(exc).__name__}") from None


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason in words ("KEY_VALUES_MISMATCH" -> "key values mismatch")."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    text = _OPENSSL_NOISE.sub("", str(getattr(exc, "strerror", None) or "")).strip()
    return text or type(exc).__name__


# "[SSL: NAME] " before and " (_ssl.c:1006)" after OpenSSL's words.
_OPENSSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")


# -- what a failure means ------------------------------------------------------

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that have a plainer name.
_VERIFY_REASONS = {
    2: "certificate issued by an unknown CA (not in the system's trust store or ca_file)",
    7: "the certificate's signature is invalid",
    9: "certificate is not yet valid (check this machine's clock)",
    10: "certificate has expired",
    18: "self-signed certificate (add it to ca_file to trust it)",
    19: "self-signed certificate in the chain: its root CA is not in the system's trust store or ca_file",
    20: "certificate issued by an unknown CA (not in the system's trust store or ca_file)",
    21: "certificate issued by an unknown CA (not in the system's trust store or ca_file)",
    22: "the certificate chain is too long",
    23: "certificate has been revoked",
    24: "a certificate in the chain is not a valid CA",
    26: "the certificate is not meant for a TLS server",
    27: "the root CA is not trusted for TLS servers",
    28: "the root CA is marked as rejected",
}
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64

# OpenSSL reason codes of other handshake failures.
_HANDSHAKE_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate (set client_cert)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "the server refused the handshake (it may require a client certificate, or share no cipher with sidecar)"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server rejected the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says the client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server says the client certificate has been revoked",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denied access to this client certificate",
    "WRONG_VERSION_NUMBER": "the server did not answer with TLS (is it plain http?)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common with the server",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common with the server",
    "TLSV1_ALERT_UNRECOGNIZED_NAME": "the server does not serve this host name (SNI)",
    "UNEXPECTED_EOF_WHILE_READING": "the server closed the connection during the TLS handshake",
}
_QUOTED = re.compile(r"'([^']*)'")


def describe_tls_failure(exc: BaseException, peer: str = "the upstream") -> str | None:
    """A short, named reason for a TLS failure (``None`` if ``exc`` is not one).

    ``exc`` may be an ``ssl.SSLError`` or anything that wraps one as its
    cause or ``os_error`` (aiohttp's ClientConnectorCertificateError,
    ClientConnectorSSLError, ClientOSError); ``peer`` names the other side
    in the sentence, e.g. "TLS verification of the upstream failed:
    certificate has expired".
    """
    error = _ssl_error(exc)
    if error is None:
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS verification of {peer} failed: {_verify_reason(error)}"
    reason = _HANDSHAKE_REASONS.get(error.reason or "") or _ssl_reason(error)
    return f"TLS handshake with {peer} failed: {reason}"


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The innermost SSLError in ``exc``'s wrappers.

    Innermost, because aiohttp's wrappers are SSLErrors themselves
    (ClientConnectorCertificateError subclasses ssl.CertificateError)
    without OpenSSL's verify_code and reason.
    """
    found: ssl.SSLError | None = None
    current: BaseException | None = exc
    for _ in range(8):  # wrappers are one or two deep; the bound also stops a cycle
        if current is None:
            break
        if isinstance(current, ssl.SSLError):
            found = current
        inner = getattr(current, "certificate_error", None) or getattr(current, "os_error", None)
        current = inner if isinstance(inner, BaseException) and inner is not current else current.__cause__
    return found


def _verify_reason(error: ssl.SSLCertVerificationError) -> str:
    code = getattr(error, "verify_code", None)
    message = str(getattr(error, "verify_message", None) or "certificate verify failed")
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        name = _QUOTED.search(message)
        what = "IP address" if code == _IP_ADDRESS_MISMATCH else "host name"
        return f"hostname mismatch: the certificate is not valid for the {what} " + (
            f"'{name.group(1)}'" if name else "connected to"
        )
    return _VERIFY_REASONS.get(code or 0, message)


# -- reporting -------------------------------------------------------------------

# A broken upstream fails every request the same way; one line a minute says so.
REPORT_INTERVAL = 60.0
# Distinct messages remembered; beyond this the stalest are forgotten.
_MAX_REMEMBERED = 64


class FailureLog:
    """Logs each distinct message as a warning at most once per ``interval`` seconds.

    A later line says how many were held back, so a storm of failing
    requests is visible without flooding the log.
    """

    def __init__(
        self,
        logger: logging.Logger = log,
        *,
        interval: float = REPORT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, message: str) -> bool:
        """Log ``message`` unless it was logged less than ``interval`` ago; whether it was."""
        now = self.clock()
        last = self._last.get(message)
        if last is not None and now - last < self.interval:
            self._held[message] = self._held.get(message, 0) + 1
            return False
        held = self._held.pop(message, 0)
        if len(self._last) >= _MAX_REMEMBERED and message not in self._last:
            stalest = min(self._last, key=self._last.__getitem__)
            del self._last[stalest]
            self._held.pop(stalest, None)
        self._last[message] = now
        suffix = f" ({held} more since the last report)" if held else ""
        self.logger.warning("%s%s", message, suffix)
        return True

    def reset(self) -> None:
        """Forget what was logged (tests start from a clean slate)."""
        self._last.clear()
        self._held.clear()


# The proxy's paths share one: the same failure seen by the HTTP and the
# WebSocket path is still one line a minute.
TLS_FAILURES = FailureLog()


def report_tls_failure(exc: BaseException, *, peer: str = "the upstream", where: str | None = None) -> str | None:
    """``describe_tls_failure(exc, peer)``, also logged through TLS_FAILURES (``where``: host:port, for the log)."""
    reason = describe_tls_failure(exc, peer)
    if reason is not None:
        TLS_FAILURES.warn(f"{reason} ({where})" if where else reason)
    return reason

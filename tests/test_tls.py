"""TLS to the upstream and the token endpoint (SPEC §4): trust, client certificates, and failures named by their reason.

Servers are real, on 127.0.0.1, with certificates made on the fly
(tests/helpers/certs.py).  The mock cloud serves https for the proxy's
paths; a small blocking server stands in where the failure must arrive
as a TLS alert, which asyncio's own TLS server does not send before it
drops the connection (nginx and most real servers do).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    FakeClock,
    ProxyFactory,
    assert_one_line_failure,
    clean_env,
    free_port,
    poll_until,
    run_sidecar,
    seed_expired,
    seed_store,
    serving,
)
from helpers.certs import PrivateCA, days, make_ca
from helpers.proxying import PAST_EXPIRY, assert_problem, authority, fetch
from helpers.serving import running_serve
from helpers.wire import raw_request

from sidecar.cli.commands import status_report, token_command
from sidecar.config import Settings
from sidecar.egress.tls import TLS_FAILURES, FailureLog, describe_tls_failure, tls_context
from sidecar.errors import ConfigError
from sidecar.mockcloud import MockCloud
from sidecar.tokens import TokenPair

WHOAMI = "/api/v1/auth/whoami"


@pytest.fixture(autouse=True)
def fresh_tls_reports() -> Iterator[None]:
    """Each test sees its own first report of a TLS failure (the proxy's rate limit is per process)."""
    TLS_FAILURES.reset()
    yield
    TLS_FAILURES.reset()


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    """The private CA that ca_file names."""
    return make_ca(tmp_path, "private-ca")


@pytest.fixture
def stranger(tmp_path: Path) -> PrivateCA:
    """A CA that nothing trusts."""
    return make_ca(tmp_path, "stranger-ca")


class TlsCloud(MockCloud):
    """The mock cloud over https with ``context``."""

    def __init__(self, context: ssl.SSLContext, **options: Any) -> None:
        super().__init__(**options)
        self.context = context

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        return await super().start(host, port, ssl_context=ssl_context or self.context)


@contextlib.asynccontextmanager
async def tls_cloud(context: ssl.SSLContext, clock: Any = None) -> AsyncIterator[MockCloud]:
    """A mock cloud serving https with ``context`` for the block (its tokens are checked for leaks)."""
    async with serving(TlsCloud(context, **({"clock": clock} if clock else {}))) as cloud:
        yield cloud


def tls_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the TLS failure reports logged, one message each."""
    return [record.getMessage() for record in caplog.records if record.name == "sidecar.tls"]


class BlockingTlsServer:
    """A TLS server in a thread that, like nginx, sends its alert and reads the client out before closing.

    Requests it accepts get 200 with the client certificate's names (subjectAltName) as the body.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self.refused: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping:
                raw.close()
                return
            raw.settimeout(5.0)
            conn = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with conn:
                try:
                    conn.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    self.refused.append(getattr(exc, "reason", None) or type(exc).__name__)
                    _read_out(conn)
                    continue
                with contextlib.suppress(OSError):
                    self._answer(conn)

    def _answer(self, conn: ssl.SSLSocket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        names = (conn.getpeercert() or {}).get("subjectAltName", ())
        body = ",".join(str(name[1]) for name in names if isinstance(name, tuple)).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        # Closing the socket would not wake the thread's accept(); a connection does.
        self._stopping = True
        with contextlib.suppress(OSError):
            socket.create_connection(self._listener.getsockname(), timeout=1.0).close()
        self._thread.join(5.0)
        self._listener.close()


# Long enough for the client to read the alert; a client that keeps its end
# open after a failed handshake (asyncio's does, for a while) is not waited for.
_READ_OUT_SECONDS = 0.5


def _read_out(conn: ssl.SSLSocket) -> None:
    """Half-close and read until the client hangs up, so the alert is not lost to a reset."""
    with contextlib.suppress(OSError):
        conn.settimeout(_READ_OUT_SECONDS)
        socket.socket.shutdown(conn, socket.SHUT_WR)
        while socket.socket.recv(conn, 65536):
            pass


@contextlib.contextmanager
def blocking_server(context: ssl.SSLContext) -> Iterator[BlockingTlsServer]:
    server = BlockingTlsServer(context)
    try:
        yield server
    finally:
        server.close()


# -- trust: the system store plus ca_file -----------------------------------------


async def test_a_private_ca_in_ca_file_is_trusted_for_refresh_and_forwarding(
    ca: PrivateCA, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With ca_file naming a private CA, an expired token is refreshed at, and the request then forwarded to, a cloud that CA signed."""
    async with tls_cloud(ca.server_context(), clock) as cloud:
        seed_store(store_path, cloud, obtained_at=clock())
        clock.advance(PAST_EXPIRY)
        p = await make_proxy(upstream=cloud.base_url, ca_file=str(ca.pem))
        reply = await fetch(client, "GET", p.url + WHOAMI)
    assert reply.status == 200, reply.body
    assert cloud.refresh_ok == 1


async def test_ca_file_may_name_an_intermediate_ca(
    ca: PrivateCA,
    tmp_path: Path,
    store_path: Path,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    """A ca_file holding only the issuing intermediate (not its root) is enough to trust the upstream."""
    issuing = ca.intermediate(tmp_path)
    async with tls_cloud(issuing.server_context(), clock) as cloud:
        seed_store(store_path, cloud, obtained_at=clock())
        p = await make_proxy(upstream=cloud.base_url, ca_file=str(issuing.pem))
        reply = await fetch(client, "GET", p.url + WHOAMI)
    assert reply.status == 200, reply.body


async def test_ca_file_adds_to_the_system_trust_store(tmp_path: Path, listen: str) -> None:
    """In a serve process whose system store is CA-1 (SSL_CERT_FILE) and whose ca_file is CA-2, a CA-1 upstream and a CA-2 token endpoint both work."""
    system, private = make_ca(tmp_path, "system-ca"), make_ca(tmp_path, "private-ca")
    async with tls_cloud(system.server_context()) as cloud:
        token_url = await cloud.add_listener(ssl_context=private.server_context()) + "/oauth/token"
        store = tmp_path / "tokens.json"
        seed_expired(store, cloud)
        xdg = tmp_path / "xdg"
        xdg.mkdir()
        env = clean_env(XDG_CONFIG_HOME=str(xdg), SSL_CERT_FILE=str(system.pem))
        env.pop("SSL_CERT_DIR", None)
        args = ("--upstream", cloud.base_url, "--store", str(store), "--ca-file", str(private.pem))
        oauth2 = ("--flavor", "oauth2", "--token-url", token_url, "--log-format", "json")
        async with running_serve(env, listen, *args, *oauth2) as served, served.session() as session:
            async with session.get(served.base_url + WHOAMI) as response:
                body = await response.text()
                assert response.status == 200, (body, served.stderr)
    assert cloud.refresh_ok == 1


# -- verification failures: a 502 and one log line naming the reason ----------


async def test_an_untrusted_certificate_and_a_hostname_mismatch_name_different_reasons(
    ca: PrivateCA,
    stranger: PrivateCA,
    login: TokenPair,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream signed by an unknown CA and one whose certificate is for another host get two different named reasons, in the 502 and in the log."""
    details = []
    async with (
        tls_cloud(stranger.server_context(), clock) as untrusted,
        tls_cloud(ca.server_context("api.elsewhere.test"), clock) as misnamed,
    ):
        for cloud in (untrusted, misnamed):
            p = await make_proxy(upstream=cloud.base_url, ca_file=str(ca.pem))
            reply = await fetch(client, "GET", p.url + "/api/v1/echo")
            details.append(assert_problem(reply, 502, "upstream-unreachable")["detail"])
            assert cloud.requests_seen == 0
    unknown, mismatch = details
    assert "TLS verification of the upstream failed: certificate issued by an unknown CA" in unknown
    assert "TLS verification of the upstream failed: hostname mismatch" in mismatch
    assert "'127.0.0.1'" in mismatch
    assert "Error" not in unknown + mismatch  # no bare exception class names
    logged = tls_lines(caplog)
    assert len(logged) == 2
    assert "unknown CA" in logged[0] and authority(untrusted.base_url) in logged[0]
    assert "hostname mismatch" in logged[1] and authority(misnamed.base_url) in logged[1]


async def test_an_expired_certificate_is_named_as_expired(
    ca: PrivateCA,
    login: TokenPair,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream whose certificate expired yesterday is a 502 whose detail and log line say the certificate has expired."""
    async with tls_cloud(ca.server_context(not_before=days(-30), not_after=days(-1)), clock) as cloud:
        p = await make_proxy(upstream=cloud.base_url, ca_file=str(ca.pem))
        reply = await fetch(client, "GET", p.url + "/api/v1/echo")
    detail = assert_problem(reply, 502, "upstream-unreachable")["detail"]
    assert "TLS verification of the upstream failed: certificate has expired" in detail
    assert [line for line in tls_lines(caplog) if "certificate has expired" in line]


async def test_a_storm_of_failing_requests_logs_one_line(
    stranger: PrivateCA,
    login: TokenPair,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten requests to an untrusted upstream are ten 502s and one warning."""
    async with tls_cloud(stranger.server_context(), clock) as cloud:
        p = await make_proxy(upstream=cloud.base_url)
        replies = await asyncio.gather(*(fetch(client, "GET", p.url + "/api/v1/echo") for _ in range(10)))
    assert [reply.status for reply in replies] == [502] * 10
    assert len(tls_lines(caplog)) == 1


def test_a_failure_is_logged_once_per_interval_then_with_the_count_held_back(
    monotonic: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The same message within the interval is held back; after it, one line says how many were; another message is its own."""
    import logging

    reports = FailureLog(logging.getLogger("test.tls"), interval=60.0, clock=monotonic)
    assert reports.warn("expired") is True
    assert reports.warn("expired") is False
    assert reports.warn("unknown CA") is True
    monotonic.advance(59.0)
    assert reports.warn("expired") is False
    monotonic.advance(1.0)
    assert reports.warn("expired") is True
    lines = [record.getMessage() for record in caplog.records if record.name == "test.tls"]
    assert lines == ["expired", "unknown CA", "expired (2 more since the last report)"]


async def test_a_websocket_upgrade_to_an_untrusted_upstream_names_the_reason(
    stranger: PrivateCA, login: TokenPair, clock: FakeClock, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The WebSocket path answers an untrusted upstream with a 502 naming the reason, not aiohttp's class name."""
    async with tls_cloud(stranger.server_context(), clock) as cloud:
        p = await make_proxy(upstream=cloud.base_url)
        head = "\r\n".join(
            [
                "GET /api/v1/ws HTTP/1.1",
                f"Host: {authority(p.url)}",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ]
        )
        reply = await raw_request(p.url, head)
    detail = assert_problem(reply, 502, "upstream-unreachable")["detail"]
    assert "TLS verification of the upstream failed: certificate issued by an unknown CA" in detail
    assert len(tls_lines(caplog)) == 1


# -- the token endpoint and whoami -------------------------------------------


async def test_a_token_endpoint_failing_verification_is_named_in_last_error(
    ca: PrivateCA, store_path: Path, clock: FakeClock, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """When the token endpoint's certificate has expired, /_sidecar/status's lastError says so."""
    async with tls_cloud(ca.server_context(not_before=days(-30), not_after=days(-1)), clock) as cloud:
        seed_store(store_path, cloud, obtained_at=clock())
        clock.advance(PAST_EXPIRY)
        p = await make_proxy(upstream=cloud.base_url, ca_file=str(ca.pem))
        await fetch(client, "GET", p.url + "/api/v1/echo")
        status = (await fetch(client, "GET", p.url + "/_sidecar/status")).json()
    assert status["lastError"] == "TLS verification of the token endpoint failed: certificate has expired"


async def test_sidecar_token_names_the_tls_reason(stranger: PrivateCA, store_path: Path, clock: FakeClock) -> None:
    """``sidecar token --force-refresh`` against an untrusted token endpoint says why on stderr."""
    async with tls_cloud(stranger.server_context(), clock) as cloud:
        seed_store(store_path, cloud, obtained_at=clock())
        out, err = io.StringIO(), io.StringIO()
        settings = Settings(upstream=cloud.base_url, store=str(store_path))
        await token_command(settings, force=True, out=out, err=err)
    assert "TLS verification of the token endpoint failed: certificate issued by an unknown CA" in err.getvalue()


async def test_status_names_the_tls_reason_when_whoami_fails(
    stranger: PrivateCA, tmp_path: Path, store_path: Path, clock: FakeClock
) -> None:
    """``sidecar status`` with a fresh token but an upstream with an untrusted certificate reports the reason whoami failed."""
    async with tls_cloud(stranger.server_context(), clock) as cloud:
        seed_store(store_path, cloud)
        report = await status_report(Settings(upstream=cloud.base_url, store=str(store_path)))
    assert report["loggedIn"] is True
    assert report["problem"].startswith(
        "whoami failed: TLS verification of the upstream failed: certificate issued by an unknown CA"
    )


# -- client certificates (mTLS) ---------------------------------------------------


@pytest.mark.parametrize(
    ("max_version", "expected"),
    [
        # TLS 1.3 refuses after the handshake, with an alert that says why.
        (None, "TLS handshake with the upstream failed: the server requires a client certificate (set client_cert)"),
        # TLS 1.2 refuses in the handshake, with a generic alert.
        (ssl.TLSVersion.TLSv1_2, "the server refused the handshake (it may require a client certificate"),
    ],
    ids=["tls1.3", "tls1.2"],
)
async def test_a_server_requiring_a_client_certificate_refuses_without_client_cert_and_accepts_with_it(
    ca: PrivateCA,
    tmp_path: Path,
    login: TokenPair,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    max_version: ssl.TLSVersion | None,
    expected: str,
) -> None:
    """Without client_cert the upstream refuses the handshake (a 502 saying a client certificate is wanted); with it, the request is served."""
    client_cert = ca.client_files(tmp_path, "alice")
    with blocking_server(ca.server_context(client_ca=ca, max_version=max_version)) as server:
        without = await make_proxy(upstream=server.url, ca_file=str(ca.pem))
        refused = await fetch(client, "GET", without.url + "/whoami")
        # Under TLS 1.3 the client hears the alert while the server's thread is still noting it.
        await poll_until(lambda: server.refused, 5, "the server refusing a handshake without a certificate")
        with_cert = await make_proxy(upstream=server.url, ca_file=str(ca.pem), client_cert=str(client_cert))
        served = await fetch(client, "GET", with_cert.url + "/whoami")
    detail = assert_problem(refused, 502, "upstream-unreachable")["detail"]
    assert expected in detail
    assert served.status == 200
    assert served.body == b"alice@sidecar.test"


async def test_client_cert_is_presented_to_the_token_endpoint(
    ca: PrivateCA,
    tmp_path: Path,
    store_path: Path,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    """A cloud that requires a client certificate refreshes and serves when client_cert and client_key are set."""
    cert, key = ca.client_files_apart(tmp_path, "bob")
    async with tls_cloud(ca.server_context(client_ca=ca), clock) as cloud:
        seed_store(store_path, cloud, obtained_at=clock())
        clock.advance(PAST_EXPIRY)
        p = await make_proxy(upstream=cloud.base_url, ca_file=str(ca.pem), client_cert=str(cert), client_key=str(key))
        reply = await fetch(client, "GET", p.url + WHOAMI)
    assert reply.status == 200, reply.body
    assert cloud.refresh_ok == 1


# -- bad files are configuration errors at startup -----------------------------


@pytest.mark.parametrize("command", [("serve",), ("serve", "--workers", "2"), ("token",), ("status",)], ids=" ".join)
async def test_a_missing_ca_file_is_exit_2_with_one_line(
    command: tuple[str, ...], tmp_path: Path, env: dict[str, str]
) -> None:
    """serve (before any worker forks) and the commands that connect out refuse a ca_file that does not exist: exit 2, one line naming the key and the path."""
    missing = tmp_path / "nowhere" / "corp.pem"
    listen = ("--listen", f"127.0.0.1:{free_port()}") if command[0] == "serve" else ()
    store = ("--store", str(tmp_path / "tokens.json"))
    run = await run_sidecar(
        env, *command, *listen, *store, "--upstream", "https://127.0.0.1:9", "--ca-file", str(missing)
    )
    assert_one_line_failure(run, 2)
    assert run.err.strip() == f"sidecar: configuration error: ca_file: cannot read {missing}: No such file or directory"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_ca_file_without_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    """A ca_file that holds no PEM certificate (empty, DER, a key) is refused, naming the key and the path."""
    path = _write(tmp_path / "empty.pem", "not a certificate\n")
    with pytest.raises(ConfigError, match=rf"^ca_file: no PEM certificate in {path}$"):
        tls_context(Settings(ca_file=path))


def test_ca_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^ca_file: {tmp_path} is a directory, not a PEM file$"):
        tls_context(Settings(ca_file=str(tmp_path)))


def test_client_cert_without_its_key_is_a_config_error(ca: PrivateCA, tmp_path: Path) -> None:
    """A client_cert file with only the certificate and no client_key says where the key should be."""
    cert, _ = ca.client_files_apart(tmp_path)
    with pytest.raises(ConfigError, match=r"^client_cert: no PEM private key in .*set client_key\)$"):
        tls_context(Settings(client_cert=str(cert)))


def test_a_client_key_of_another_certificate_is_a_config_error(ca: PrivateCA, tmp_path: Path) -> None:
    cert, _ = ca.client_files_apart(tmp_path, "one")
    _, key = ca.client_files_apart(tmp_path, "two")
    with pytest.raises(
        ConfigError, match=rf"^client_key: the private key in {key} does not belong to the certificate in {cert}$"
    ):
        tls_context(Settings(client_cert=str(cert), client_key=str(key)))


def test_an_encrypted_client_key_is_a_config_error_not_a_password_prompt(ca: PrivateCA, tmp_path: Path) -> None:
    """OpenSSL would prompt on the terminal for an encrypted key (hanging serve); sidecar refuses it instead."""
    from cryptography.hazmat.primitives import serialization

    cert, key = ca.client_files_apart(tmp_path)
    plain = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=rf"^client_key: the private key in {key} is encrypted"):
        tls_context(Settings(client_cert=str(cert), client_key=str(key)))


def test_a_missing_client_key_is_a_config_error(ca: PrivateCA, tmp_path: Path) -> None:
    cert = str(ca.client_files(tmp_path))
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match=rf"^client_key: cannot read {missing}: No such file or directory$"):
        tls_context(Settings(client_cert=cert, client_key=str(missing)))


# -- describe_tls_failure, against real handshakes ---------------------------------


async def _answer_plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await reader.read(100)
    writer.close()


@contextlib.asynccontextmanager
async def plain_http_server() -> AsyncIterator[str]:
    """A plain TCP server that answers anything with an HTTP 400, as an http port does to a TLS hello."""
    listener = await asyncio.start_server(_answer_plain_http, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()


async def _handshake_failure(
    server: ssl.SSLContext | None, client: ssl.SSLContext, hostname: str = "127.0.0.1"
) -> BaseException:
    """What connecting with ``client`` to a server using ``server`` (None: plain TCP answering HTTP) raises."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(100)
        writer.close()

    listener = await asyncio.start_server(answer if server else _answer_plain_http, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port, ssl=client, server_hostname=hostname
        )
    except (OSError, ssl.SSLError) as exc:
        return exc
    finally:
        listener.close()
    transport.close()
    raise AssertionError("the handshake succeeded")


def _trusting(ca: PrivateCA) -> ssl.SSLContext:
    return tls_context(Settings(ca_file=str(ca.pem)))


async def test_a_certificate_not_yet_valid_is_named(ca: PrivateCA) -> None:
    exc = await _handshake_failure(ca.server_context(not_before=days(1), not_after=days(30)), _trusting(ca))
    assert (
        describe_tls_failure(exc)
        == "TLS verification of the upstream failed: certificate is not yet valid (check this machine's clock)"
    )


async def test_a_self_signed_certificate_is_named(ca: PrivateCA, tmp_path: Path) -> None:
    """A server presenting a self-signed certificate (here a CA's own) is "self-signed", with the way to trust it."""
    key = tmp_path / "self.key"
    ca.ca.private_key_pem.write_to_path(str(key))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(ca.pem), str(key))
    exc = await _handshake_failure(server, tls_context(Settings()))
    assert (
        describe_tls_failure(exc)
        == "TLS verification of the upstream failed: self-signed certificate (add it to ca_file to trust it)"
    )


async def test_a_host_name_mismatch_names_the_host(ca: PrivateCA) -> None:
    exc = await _handshake_failure(ca.server_context("api.elsewhere.test"), _trusting(ca), hostname="localhost")
    assert describe_tls_failure(exc, "the token endpoint") == (
        "TLS verification of the token endpoint failed: hostname mismatch: the certificate is not valid for the host name 'localhost'"
    )


async def test_plain_http_where_tls_was_expected_is_named(ca: PrivateCA) -> None:
    exc = await _handshake_failure(None, _trusting(ca))
    assert (
        describe_tls_failure(exc)
        == "TLS handshake with the upstream failed: the server did not answer with TLS (is it plain http?)"
    )


def test_a_revoked_certificate_is_named() -> None:
    """X509_V_ERR_CERT_REVOKED (23), as OpenSSL reports it when a CRL lists the certificate."""
    exc = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate revoked"
    )
    exc.verify_code = 23
    exc.verify_message = "certificate revoked"
    assert describe_tls_failure(exc) == "TLS verification of the upstream failed: certificate has been revoked"


async def test_no_common_tls_version_is_named(ca: PrivateCA) -> None:
    client = _trusting(ca)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    with blocking_server(ca.server_context(max_version=ssl.TLSVersion.TLSv1_2)) as server:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as session:
            with pytest.raises(aiohttp.ClientSSLError) as caught:
                await session.get(server.url)
    assert (
        describe_tls_failure(caught.value)
        == "TLS handshake with the upstream failed: no TLS version in common with the server"
    )


async def test_aiohttp_wrappers_are_seen_through(ca: PrivateCA, stranger: PrivateCA) -> None:
    """aiohttp's ClientConnectorCertificateError, ClientConnectorSSLError and a ClientOSError caused by a TLS alert name the same reasons."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_trusting(ca))) as session:
        async with tls_cloud(stranger.server_context()) as untrusted:
            with pytest.raises(aiohttp.ClientConnectorCertificateError) as certificate:
                await session.get(untrusted.base_url + WHOAMI)
        async with plain_http_server() as url:
            with pytest.raises(aiohttp.ClientConnectorSSLError) as not_tls:
                await session.get(url.replace("http://", "https://"))
        with blocking_server(ca.server_context(client_ca=ca)) as mtls:
            with pytest.raises(aiohttp.ClientOSError) as alert:
                await session.get(mtls.url)
    assert "unknown CA" in (describe_tls_failure(certificate.value) or "")
    assert (describe_tls_failure(not_tls.value) or "").startswith("TLS handshake with the upstream failed: ")
    assert describe_tls_failure(alert.value) == (
        "TLS handshake with the upstream failed: the server requires a client certificate (set client_cert)"
    )


def test_other_errors_are_not_tls_failures() -> None:
    assert describe_tls_failure(ConnectionRefusedError(111, "Connection refused")) is None
    assert describe_tls_failure(TimeoutError()) is None
    assert describe_tls_failure(aiohttp.ServerDisconnectedError()) is None

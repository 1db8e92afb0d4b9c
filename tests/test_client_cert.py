"""Client certificates (``Relay(client_cert=..., client_key=...)``, ``--client-cert``)
for relays that authenticate clients by certificate: aiosmtpd with a TLS context that
requires one (``verify_mode = CERT_REQUIRED`` and the test CA), over STARTTLS and
implicit TLS, on asyncio and trio. The relay's own certificate is still verified
against the system trust store (here the test CA, through ``SSL_CERT_FILE``, as
OpenSSL reads it), whatever the client presents.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import asmtp
from asmtp.errors import InputError
from servers import SMTPTestServer, server_ssl_context

MakeServer = Callable[..., SMTPTestServer]
SENDER, RCPT = "a@example.com", "b@example.org"


@pytest.fixture
def trusted(ca_pem_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test CA as the system's trust store of every default context made now
    (with a client certificate, one per send: never the process's cached default)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem_file))
    return ca_pem_file


@pytest.fixture
def client_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate from the test CA, and its key, as PEM files."""
    cert = ca.issue_cert("client.asmtp.test")
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def demanding(ca: trustme.CA) -> ssl.SSLContext:
    """A server context that requires a client certificate from the test CA."""
    context = server_ssl_context(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    return context


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, RCPT, "by certificate"
    msg.set_content("hello\n")
    return msg


def server_for(smtp_server: MakeServer, ca: trustme.CA, tls: str) -> SMTPTestServer:
    if tls == "implicit":
        return smtp_server(implicit_tls_context=demanding(ca))
    return smtp_server(starttls_context=demanding(ca), require_starttls=True)


@pytest.mark.anyio
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_a_relay_that_wants_a_certificate_gets_it(
    smtp_server: MakeServer,
    ca: trustme.CA,
    trusted: Path,
    client_files: tuple[Path, Path],
    tls: str,
) -> None:
    server = server_for(smtp_server, ca, tls)
    cert, key = client_files
    relay = asmtp.Relay("localhost", server.port, tls=tls, client_cert=cert, client_key=key)  # type: ignore[arg-type]
    [result] = await asmtp.send(message(), relay=relay, timeout=10)
    assert (result.status, result.tls) == ("delivered", "verified")
    assert [m.rcpt_tos for m in server.messages] == [[RCPT]]


@pytest.mark.anyio
async def test_without_a_certificate_nothing_is_delivered(
    smtp_server: MakeServer, ca: trustme.CA, tls_client_context: ssl.SSLContext
) -> None:
    # A context of the test's own: the process's default one is made once and kept,
    # so it must never be made while SSL_CERT_FILE names the test CA.
    server = server_for(smtp_server, ca, "starttls")
    relay = asmtp.Relay("localhost", server.port, ssl_context=tls_client_context)
    [result] = await asmtp.send(message(), relay=relay, timeout=10)
    assert result.status == "transient"
    assert server.messages == []


@pytest.mark.anyio
async def test_the_relays_certificate_is_still_verified(
    smtp_server: MakeServer,
    ca: trustme.CA,
    client_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = server_for(smtp_server, ca, "starttls")
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger))  # a trust store without the test CA
    cert, key = client_files
    relay = asmtp.Relay("localhost", server.port, client_cert=cert, client_key=key)
    [result] = await asmtp.send(message(), relay=relay, timeout=10)
    assert (result.status, result.stage) == ("transient", "starttls")
    assert "certificate of localhost not trusted" in result.message


@pytest.mark.anyio
async def test_certificate_and_key_in_one_file(
    smtp_server: MakeServer,
    ca: trustme.CA,
    trusted: Path,
    client_files: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    server = server_for(smtp_server, ca, "starttls")
    cert, key = client_files
    both = tmp_path / "client.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    [result] = await asmtp.send(
        message(), relay=asmtp.Relay("localhost", server.port, client_cert=both), timeout=10
    )
    assert result.status == "delivered"


@pytest.mark.anyio
async def test_or_a_context_of_ones_own(
    smtp_server: MakeServer,
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
    client_files: tuple[Path, Path],
) -> None:
    """The documented alternative: ``ssl_context`` with ``load_cert_chain`` called on it."""
    server = server_for(smtp_server, ca, "starttls")
    tls_client_context.load_cert_chain(*client_files)
    relay = asmtp.Relay("localhost", server.port, ssl_context=tls_client_context)
    [result] = await asmtp.send(message(), relay=relay, timeout=10)
    assert result.status == "delivered"


def encrypted_key(key: Path, target: Path) -> Path:
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    target.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return target


@pytest.mark.anyio
async def test_files_that_do_not_load_are_input_errors(
    client_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Found when the send starts, before any connection (the port is never opened)."""
    cert, key = client_files
    other_key = trustme.CA().issue_cert("x.test").private_key_pem
    other_key.write_to_path(str(tmp_path / "other.key"))
    cases = {
        (tmp_path / "missing.crt", None): "cannot read",
        (cert, tmp_path / "other.key"): "do not hold a PEM certificate and its matching key",
        (cert, None): "do not hold a PEM certificate and its matching key",  # no key in it
        (cert, encrypted_key(key, tmp_path / "locked.key")): "has a passphrase",
    }
    for (cert_file, key_file), fragment in cases.items():
        relay = asmtp.Relay("localhost", 1, client_cert=cert_file, client_key=key_file)
        with pytest.raises(InputError, match=fragment):
            await asmtp.send(message(), relay=relay, timeout=10)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"client_key": "k.pem"}, "client_key goes with client_cert"),
        ({"client_cert": "c.pem", "tls": "none"}, "needs TLS"),
        ({"client_cert": "c.pem", "path": "/run/x.sock"}, "needs TLS"),  # none there by default
        ({"client_cert": "c.pem", "ssl_context": ssl.create_default_context()}, "not both"),
        ({"client_cert": "c\0.pem"}, "must not contain CR, LF or NUL"),
    ],
)
def test_bad_certificate_settings_are_refused(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        asmtp.Relay("localhost", **options)  # type: ignore[arg-type]


def test_the_cli_presents_the_certificate(
    smtp_server: MakeServer, ca: trustme.CA, ca_pem_file: Path, client_files: tuple[Path, Path]
) -> None:
    server = server_for(smtp_server, ca, "starttls")
    cert, key = client_files
    send = ["send", "--from", SENDER, "--to", RCPT, "--subject", "hi", "--body", "hello"]
    relay = ["--relay", f"localhost:{server.port}", "--json"]
    certificate = ["--client-cert", str(cert), "--client-key", str(key)]
    done = subprocess.run(
        [sys.executable, "-m", "asmtp", *send, *relay, *certificate],
        capture_output=True,
        text=True,
        env={**os.environ, "SSL_CERT_FILE": str(ca_pem_file)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"status": "delivered"' in done.stdout and '"tls": "verified"' in done.stdout
    assert len(server.messages) == 1

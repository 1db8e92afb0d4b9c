"""REQUIRETLS (RFC 8689): the pure decision (asmtp._core.requiretls), and on loopback a
small SMTP server (a thread, blocking sockets, STARTTLS under a trustme certificate)
that offers REQUIRETLS or not and records the MAIL FROM line it got: aiosmtpd refuses
MAIL parameters it does not know, so it cannot play a REQUIRETLS server."""

from __future__ import annotations

import random
import socketserver
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

import asmtp
from asmtp._core.capabilities import Capabilities
from asmtp._core.reply import Reply
from asmtp._core.requiretls import requiretls_refusal
from asmtp.config import Direct, Relay
from dnsserver import DNSServer
from servers import client_ssl_context, free_port, server_ssl_context

MX1, MX2 = "127.0.0.2", "127.0.0.3"


def caps(*keywords: str) -> Capabilities:
    return Capabilities.from_ehlo(Reply(250, ("mx.example.test", *keywords)))


@pytest.mark.parametrize(
    ("keywords", "tls", "refused"),
    [
        (("REQUIRETLS",), "verified", None),
        (("REQUIRETLS",), "dane", None),
        (("REQUIRETLS",), "sts", None),
        (("REQUIRETLS",), "unverified", "not authenticated (unverified)"),
        (("REQUIRETLS",), "none", "not authenticated (none)"),
        ((), "verified", "does not offer REQUIRETLS"),
    ],
)
def test_requiretls_refusal(keywords: tuple[str, ...], tls: str, refused: str | None) -> None:
    why = requiretls_refusal(caps(*keywords), tls, "mx.example.test")
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why and why.startswith("5.7.30 ")


class MiniSMTP:
    """Answers 250 to everything, offers STARTTLS (and REQUIRETLS when asked),
    records each MAIL FROM line and each message's recipients."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, requiretls: bool) -> None:
        self.mail_lines: list[str] = []
        self.delivered: list[list[str]] = []
        self.sessions = 0
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner.sessions += 1
                self.open: list[Any] = []  # what to close: files, the TLS socket
                try:
                    self.converse()
                except OSError:  # the client went away (or refused the certificate)
                    pass
                finally:
                    for thing in reversed(self.open):
                        thing.close()

            def converse(self) -> None:
                sock, tls = self.request, False
                reader = sock.makefile("rb")
                self.open.append(reader)
                sock.sendall(b"220 mini.test ESMTP\r\n")
                rcpts: list[str] = []
                while True:
                    line = reader.readline(1000).decode("ascii", "replace").rstrip("\r\n")
                    verb = line[:4].upper()
                    if not line or verb == "QUIT":
                        sock.sendall(b"221 bye\r\n")
                        return
                    if verb == "EHLO":
                        words = ["mini.test", "PIPELINING", "8BITMIME"]
                        words += ["REQUIRETLS"] if tls and requiretls else []
                        words += [] if tls else ["STARTTLS"]
                        reply = "".join(f"250-{w}\r\n" for w in words[:-1])
                        sock.sendall(f"{reply}250 {words[-1]}\r\n".encode())
                    elif verb == "STAR":
                        sock.sendall(b"220 go ahead\r\n")
                        sock = context.wrap_socket(sock, server_side=True)
                        reader, tls = sock.makefile("rb"), True
                        self.open += [sock, reader]
                    elif verb == "MAIL":
                        owner.mail_lines.append(line)
                        sock.sendall(b"250 ok\r\n")
                    elif verb == "RCPT":
                        rcpts.append(line.partition(":")[2].strip("<> "))
                        sock.sendall(b"250 ok\r\n")
                    elif verb == "DATA":
                        sock.sendall(b"354 go\r\n")
                        while reader.readline(100_000) not in (b".\r\n", b""):
                            pass
                        owner.delivered.append(rcpts)
                        rcpts = []
                        sock.sendall(b"250 queued\r\n")
                    else:
                        sock.sendall(b"250 ok\r\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def mini() -> Iterator[list[MiniSMTP]]:
    started: list[MiniSMTP] = []
    yield started
    for server in started:
        server.stop()


def start(
    started: list[MiniSMTP], ca: trustme.CA, host: str, port: int, name: str, requiretls: bool
) -> MiniSMTP:
    server = MiniSMTP(host, port, server_ssl_context(ca, name), requiretls)
    started.append(server)
    return server


async def send_requiretls(relay: Relay | Direct) -> asmtp.RecipientResult:
    async with asmtp.Mailer(relay=relay, requiretls=True, timeout=5, retry=None) as mailer:
        report = await mailer.send(
            asmtp.build_message(
                from_="sender@client.test", to="ann@example.test", subject="s", body="secret"
            )
        )
    return report[0]


async def test_relay_offering_requiretls_gets_the_parameter(
    mini: list[MiniSMTP], ca: trustme.CA
) -> None:
    port = free_port("127.0.0.1")
    server = start(mini, ca, "127.0.0.1", port, "localhost", requiretls=True)
    relay = Relay("localhost", port, ssl_context=client_ssl_context(ca))
    r = await send_requiretls(relay)
    assert (r.status, r.tls) == ("delivered", "verified")
    assert [line.split()[-1] for line in server.mail_lines] == ["REQUIRETLS"]


async def test_relay_without_requiretls_refuses_permanently(
    mini: list[MiniSMTP], ca: trustme.CA
) -> None:
    port = free_port("127.0.0.1")
    server = start(mini, ca, "127.0.0.1", port, "localhost", requiretls=False)
    relay = Relay("localhost", port, ssl_context=client_ssl_context(ca))
    r = await send_requiretls(relay)
    assert (r.status, r.stage) == ("permanent", "starttls")
    assert r.message.startswith("5.7.30 REQUIRETLS: localhost does not offer REQUIRETLS")
    assert server.mail_lines == []  # the message never went out


async def test_direct_skips_the_mx_without_requiretls_and_never_goes_unverified(
    mini: list[MiniSMTP], ca: trustme.CA, dns_server: object
) -> None:
    zone = """
        @    MX 10 mx1
        @    MX 20 mx2
        @    MX 30 mx3
        mx1  A 127.0.0.2
        mx2  A 127.0.0.3
        mx3  A 127.0.0.4
    """
    dns: DNSServer = dns_server({"example.test": zone})  # type: ignore[operator]
    port = free_port(MX1, MX2, "127.0.0.4")
    plain = start(mini, ca, MX1, port, "mx1.example.test", requiretls=False)
    # offers REQUIRETLS, but its certificate is for another name: opportunistic TLS
    # would go on unverified; REQUIRETLS must not
    wrong = start(mini, ca, MX2, port, "other.test", requiretls=True)
    good = start(mini, ca, "127.0.0.4", port, "mx3.example.test", requiretls=True)
    settings = Direct(
        dns_servers=[dns.spec],
        port=port,
        tls="opportunistic",
        ssl_context=client_ssl_context(ca),
        rng=random.Random(1),
        helo="client.asmtp.test",
    )
    r = await send_requiretls(settings)
    assert (r.status, r.host, r.tls) == ("delivered", "mx3.example.test", "verified")
    assert [a.stage for a in r.tried] == ["starttls", "starttls", "message"]
    assert "does not offer REQUIRETLS" in r.tried[0].message
    assert "certificate" in r.tried[1].message
    assert plain.mail_lines == [] and wrong.sessions == 1 and wrong.mail_lines == []
    assert [line.split()[-1] for line in good.mail_lines] == ["REQUIRETLS"]


def test_cli_requiretls_sends_the_parameter_or_refuses(
    mini: list[MiniSMTP], ca: trustme.CA, tmp_path: Any
) -> None:
    """``asmtp send --requiretls``: the MAIL parameter to a relay that offers it; a relay
    that does not gets no message and the run fails (exit 1, permanent 5.7.30)."""
    from test_cli import asmtp_cli

    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    env = {"SSL_CERT_FILE": str(pem)}  # the trustme CA, as the system's trust store
    offering, refusing = free_port("127.0.0.1"), free_port("127.0.0.1")
    good = start(mini, ca, "127.0.0.1", offering, "localhost", requiretls=True)
    bad = start(mini, ca, "127.0.0.1", refusing, "localhost", requiretls=False)
    common = (
        "--from",
        "sender@client.test",
        "--to",
        "ann@example.test",
        "--subject",
        "s",
        "--body",
        "b",
    )
    sent = asmtp_cli("send", "--relay", f"localhost:{offering}", "--requiretls", *common, env=env)
    assert sent.returncode == 0, sent.stderr
    assert [line.split()[-1] for line in good.mail_lines] == ["REQUIRETLS"]
    refused = asmtp_cli(
        "send", "--relay", f"localhost:{refusing}", "--requiretls", "--json", *common, env=env
    )
    assert refused.returncode == 1, refused.stderr
    assert "5.7.30" in refused.stdout
    assert bad.mail_lines == []
    queued = asmtp_cli(
        "send", "--relay", f"localhost:{offering}", "--requiretls", "--broker",
        "redis://127.0.0.1:1/0", "--campaign", "c", *common, env=env,
    )  # fmt: skip
    assert queued.returncode == 2 and "--requiretls does not go with --broker" in queued.stderr

"""Self-test of the test servers in servers.py, driven by the standard library's smtplib.

smtplib stands in as a known client here only, so that asmtp's own tests can trust what
SMTPTestServer and FaultServer record and how they misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from servers import (
    FaultBehaviour,
    FaultServer,
    SMTPTestServer,
    client_ssl_context,
    free_port,
    server_ssl_context,
    wait_until,
    write_ca_pem,
)

MakeSMTP = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]
MESSAGE = b"Subject: hello\r\n\r\nfirst line\r\n.starts with a dot\r\nlast line\r\n"
TIMEOUT = 5.0


def connect(address: tuple[str, int], timeout: float = TIMEOUT) -> smtplib.SMTP:
    return smtplib.SMTP(*address, local_hostname="client.test", timeout=timeout)


def read_reply(stream: io.BufferedIOBase) -> list[bytes]:
    """All lines of one (possibly multi-line) reply from a raw socket file."""
    lines: list[bytes] = []
    while True:
        line = stream.readline()
        assert line.endswith(b"\r\n"), line
        lines.append(line)
        if line[3:4] != b"-":
            return lines


# --------------------------------------------------------------------------- SMTPTestServer


def test_records_message_with_envelope(smtp_server: MakeSMTP) -> None:
    server = smtp_server()
    with connect(server.address) as client:
        refused = client.sendmail(
            "from@example.test", ["a@example.test", "b@example.test"], MESSAGE
        )
    assert refused == {}
    [received] = server.messages
    assert received.mail_from == "from@example.test"
    assert received.rcpt_tos == ["a@example.test", "b@example.test"]
    # aiosmtpd undoes the client's dot-stuffing: the body is what was sent.
    assert received.content == MESSAGE
    assert any(option.startswith("SIZE=") for option in received.mail_options)
    assert received.tls is False
    assert received.auth_user is None
    assert received.helo_name == "client.test"
    assert received.peer is not None and received.peer[0] == "127.0.0.1"
    assert server.sessions_opened == 1
    assert server.ehlo_names == ["client.test"]
    verbs = [verb for verb, _ in server.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert server.errors == []


def test_starttls_verifies_against_the_test_ca(smtp_server: MakeSMTP, ca: trustme.CA) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca))
    with connect(server.address) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_ssl_context(ca))
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    [received] = server.messages
    assert received.tls is True
    assert ("STARTTLS", "") in server.commands


def test_starttls_fails_for_a_client_not_trusting_the_ca(
    smtp_server: MakeSMTP, ca: trustme.CA
) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca))
    untrusting = client_ssl_context(trustme.CA())
    with connect(server.address) as client, pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=untrusting)
    assert server.messages == []
    assert server.errors == []  # the client's refusal is no fault of the server


def test_require_starttls_refuses_mail_in_clear(smtp_server: MakeSMTP, ca: trustme.CA) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca), require_starttls=True)
    with connect(server.address) as client:
        client.ehlo()
        code, _ = client.mail("from@example.test")
    assert code == 530


def test_implicit_tls(smtp_server: MakeSMTP, ca: trustme.CA) -> None:
    server = smtp_server(implicit_tls_context=server_ssl_context(ca))
    context = client_ssl_context(ca)
    with smtplib.SMTP_SSL(*server.address, context=context, timeout=TIMEOUT) as client:
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    [received] = server.messages
    assert received.tls is True
    assert server.sessions_opened == 1


def test_auth_plain_good_and_bad_over_starttls(smtp_server: MakeSMTP, ca: trustme.CA) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca), auth={"alice": "s3cret"})
    with connect(server.address) as client:
        client.ehlo()
        assert not client.has_extn("auth")  # auth_require_tls: not before TLS
        client.starttls(context=client_ssl_context(ca))
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("alice", "wrong")
        assert refused.value.smtp_code == 535
        client.login("alice", "s3cret")
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    [received] = server.messages
    assert received.auth_user == "alice"
    # smtplib tries every offered mechanism before giving up; the good login used PLAIN.
    mechanisms = [arg for verb, arg in server.commands if verb == "AUTH"]
    assert mechanisms[0] == mechanisms[-1] == "PLAIN"


def test_auth_login_in_clear_when_allowed_and_required(smtp_server: MakeSMTP) -> None:
    server = smtp_server(auth={"bob": "pw"}, auth_require_tls=False, auth_required=True)
    with connect(server.address) as client:
        client.ehlo()
        code, _ = client.mail("from@example.test")
        assert code == 530
        client.rset()
        client.user, client.password = "bob", "pw"
        # initial_response_ok=False: smtplib's LOGIN with an initial response is broken.
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    [received] = server.messages
    assert received.auth_user == "bob"
    assert ("AUTH", "LOGIN") in server.commands


def test_no_auth_offered_without_users(smtp_server: MakeSMTP, ca: trustme.CA) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca))
    with connect(server.address) as client:
        client.starttls(context=client_ssl_context(ca))
        client.ehlo()
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==")
    assert code == 504


def test_scripted_rcpt_refusal(smtp_server: MakeSMTP) -> None:
    def rcpt_reply(address: str) -> str | None:
        return "550 5.1.1 no such user" if address.startswith("nobody@") else None

    server = smtp_server(rcpt_reply=rcpt_reply)
    with connect(server.address) as client:
        refused = client.sendmail(
            "from@example.test", ["ok@example.test", "nobody@example.test"], MESSAGE
        )
    assert refused == {"nobody@example.test": (550, b"5.1.1 no such user")}
    [received] = server.messages
    assert received.rcpt_tos == ["ok@example.test"]


def test_scripted_mail_and_data_replies(smtp_server: MakeSMTP) -> None:
    server = smtp_server(
        mail_reply=lambda sender: "451 4.7.1 greylisted" if sender.startswith("grey") else None,
        data_reply=lambda message: "554 5.6.0 no thanks" if b"spam" in message.content else None,
    )
    with connect(server.address) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as sender:
            client.sendmail("grey@example.test", ["to@example.test"], MESSAGE)
        assert sender.value.smtp_code == 451
        with pytest.raises(smtplib.SMTPDataError) as data:
            client.sendmail("from@example.test", ["to@example.test"], b"Subject: spam\r\n\r\nx\r\n")
        assert data.value.smtp_code == 554
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    assert [m.content for m in server.messages] == [MESSAGE]


def test_script_errors_are_recorded(smtp_server: MakeSMTP) -> None:
    def broken(address: str) -> str | None:
        raise ZeroDivisionError(address)

    server = smtp_server(rcpt_reply=broken)
    with connect(server.address) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    [error] = server.errors
    assert isinstance(error, ZeroDivisionError)


def test_max_rcpt_per_transaction(smtp_server: MakeSMTP) -> None:
    server = smtp_server(max_rcpt_per_transaction=2)
    rcpts = [f"r{n}@example.test" for n in range(3)]
    with connect(server.address) as client:
        refused = client.sendmail("from@example.test", rcpts, MESSAGE)
    assert refused == {"r2@example.test": (452, b"4.5.3 Too many recipients")}
    assert server.messages[0].rcpt_tos == rcpts[:2]


def test_ehlo_disabled_falls_back_to_helo(smtp_server: MakeSMTP) -> None:
    server = smtp_server(ehlo_disabled=True)
    with connect(server.address) as client:
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
        assert client.does_esmtp is False
    assert server.ehlo_names == ["client.test"]
    assert server.helo_names == ["client.test"]
    assert server.messages[0].mail_options == []


def test_concurrent_sessions_are_counted(smtp_server: MakeSMTP) -> None:
    server = smtp_server()
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(server.address)) for _ in range(5)]
        # Each client has read its greeting, so the server has seen every connection.
        assert server.active_sessions == 5
        for client in clients:
            assert client.noop()[0] == 250
    assert server.sessions_opened == 5
    assert server.max_concurrent_sessions == 5
    assert server.wait_idle(timeout=TIMEOUT)
    assert server.active_sessions == 0


def test_servers_share_one_port_on_several_hosts(smtp_server: MakeSMTP) -> None:
    port = free_port("127.0.0.2", "127.0.0.3")
    first = smtp_server(host="127.0.0.2", port=port)
    second = smtp_server(host="127.0.0.3", port=port)
    assert first.port == second.port == port
    for server in (first, second):
        with connect(server.address) as client:
            client.sendmail("from@example.test", [f"to@{server.host}"], MESSAGE)
    assert [m.rcpt_tos for m in first.messages] == [["to@127.0.0.2"]]
    assert [m.rcpt_tos for m in second.messages] == [["to@127.0.0.3"]]


def test_stop_drops_open_connections() -> None:
    server = SMTPTestServer().start()
    client = connect(server.address)
    try:
        assert client.ehlo()[0] == 250
        server.stop()
        assert server.active_sessions == 0
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=TIMEOUT).close()


def test_loopback_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        SMTPTestServer(host="192.0.2.1")
    with pytest.raises(ValueError, match="numeric"):
        FaultServer(host="localhost")


def test_ca_pem_file_is_usable(ca: trustme.CA, tmp_path: Path) -> None:
    path = write_ca_pem(ca, tmp_path / "ca.pem")
    context = ssl.create_default_context(cafile=str(path))
    assert context.cert_store_stats()["x509_ca"] == 1
    assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


# --------------------------------------------------------------------------- FaultServer


def test_fault_server_normal_run_delivers(fault_server: MakeFault) -> None:
    server = fault_server()
    with connect(server.address) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("pipelining")
        assert not client.has_extn("starttls")
        refused = client.sendmail(
            "from@example.test", ["a@example.test", "b@example.test"], MESSAGE
        )
    assert refused == {}
    [received] = server.messages
    assert received.mail_from == "from@example.test"
    assert received.rcpt_tos == ["a@example.test", "b@example.test"]
    assert received.content == MESSAGE
    assert server.recipients == ["a@example.test", "b@example.test"]
    assert server.connections == 1
    assert server.ehlo_names == ["client.test"]
    assert server.errors == []


def test_fault_server_parses_pipelined_commands(fault_server: MakeFault) -> None:
    server = fault_server()
    with (
        socket.create_connection(server.address, timeout=TIMEOUT) as sock,
        sock.makefile("rb") as replies,
    ):
        assert read_reply(replies)[0].startswith(b"220 fault.test")
        sock.sendall(
            b"EHLO pipe.test\r\nMAIL FROM:<from@example.test> BODY=8BITMIME\r\n"
            b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
        )
        codes = [read_reply(replies)[-1][:3] for _ in range(5)]
        assert codes == [b"250", b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: p\r\n\r\n..dotted\r\n.\r\nQUIT\r\n")
        assert read_reply(replies)[0].startswith(b"250")
        assert read_reply(replies)[0].startswith(b"221")
    [received] = server.messages
    assert received.content == b"Subject: p\r\n\r\n.dotted\r\n"
    assert received.mail_options == ["BODY=8BITMIME"]
    assert received.helo_name == "pipe.test"


def test_fault_close_at_rcpt_is_a_disconnect(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="close")
    with connect(server.address) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    assert server.messages == []


def test_fault_reply_421_at_greeting(fault_server: MakeFault) -> None:
    server = fault_server(greeting="reply:421 4.3.2 shutting down")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(server.address)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error == b"4.3.2 shutting down"


def test_fault_garbage_at_greeting(fault_server: MakeFault) -> None:
    server = fault_server(greeting="garbage")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(server.address)
    assert refused.value.smtp_code == -1  # smtplib's code for an unparsable reply


def test_fault_silence_times_out_the_client(fault_server: MakeFault) -> None:
    server = fault_server(greeting="silence")
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        connect(server.address, timeout=1.0)
    assert server.connections == 1


def test_fault_huge_line(fault_server: MakeFault) -> None:
    server = fault_server(ehlo="huge")
    with connect(server.address) as client, pytest.raises(smtplib.SMTPResponseException) as huge:
        client.ehlo()
    assert huge.value.smtp_error == "Line too long."  # smtplib's own limit: 8192 bytes


def test_fault_trickle_still_delivers_the_whole_reply(fault_server: MakeFault) -> None:
    server = fault_server(quit="trickle", trickle_interval=0.02)
    client = connect(server.address)
    try:
        client.ehlo()
        assert client.quit() == (221, b"2.0.0 Bye")
    finally:
        client.close()


def test_fault_close_mid_data(fault_server: MakeFault) -> None:
    server = fault_server(data="close_mid_data")
    with connect(server.address) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    assert server.messages == []
    assert server.recipients == ["to@example.test"]


def test_fault_reply_after_the_dot(fault_server: MakeFault) -> None:
    server = fault_server(message="reply:451 4.3.0 try later")
    with connect(server.address) as client, pytest.raises(smtplib.SMTPDataError) as data:
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    assert data.value.smtp_code == 451
    assert server.messages == []


def test_fault_only_first_connections(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="close", fail_first=1)
    with connect(server.address) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("from@example.test", ["to@example.test"], MESSAGE)
    with connect(server.address) as client:
        assert client.sendmail("from@example.test", ["to@example.test"], MESSAGE) == {}
    assert server.connections == 2
    assert len(server.messages) == 1


def test_fault_only_some_recipients(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 gone", only_recipients={"gone@example.test"})
    with connect(server.address) as client:
        refused = client.sendmail(
            "from@example.test", ["here@example.test", "gone@example.test"], MESSAGE
        )
    assert refused == {"gone@example.test": (550, b"5.1.1 gone")}
    assert server.messages[0].rcpt_tos == ["here@example.test"]


def test_fault_server_counts_concurrent_connections(fault_server: MakeFault) -> None:
    server = fault_server()
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(connect(server.address))
        assert server.active == 5
    assert server.connections == 5
    assert server.max_concurrent == 5
    assert server.wait_idle(timeout=TIMEOUT)


def test_fault_server_stop_ends_silent_connections() -> None:
    server = FaultServer(FaultBehaviour(greeting="silence")).start()
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        assert wait_until(lambda: server.connections == 1, timeout=TIMEOUT)
        server.stop()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""


def test_fault_behaviour_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultBehaviour(rcpt="explode")
    with pytest.raises(ValueError, match="close_mid_data"):
        FaultBehaviour(rcpt="close_mid_data")
    assert FaultBehaviour(data="close_mid_data").data == "close_mid_data"


async def open_many(address: tuple[str, int], count: int) -> int:
    """Hold ``count`` connections open at once; return how many got a 220 greeting."""

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*address)

    opened = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    connections = [c for c in opened if not isinstance(c, BaseException)]
    try:
        greetings = await asyncio.gather(*(reader.readline() for reader, _ in connections))
    finally:
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in connections))
    return sum(greeting.startswith(b"220 ") for greeting in greetings)


async def test_servers_take_250_concurrent_connections(
    smtp_server: MakeSMTP, fault_server: MakeFault
) -> None:
    real, faulty = smtp_server(), fault_server()
    assert await asyncio.wait_for(open_many(real.address, 250), timeout=30) == 250
    assert await asyncio.wait_for(open_many(faulty.address, 250), timeout=30) == 250
    assert real.max_concurrent_sessions == 250
    assert faulty.max_concurrent == 250

"""asmtp under trio: the anyio driver (:mod:`asmtp._io.anyio_driver`) against real
servers on loopback, and the public :func:`asmtp.sendmail` run by ``trio.run``.

The tests are plain functions calling ``trio.run`` so that no pytest plugin (this
project runs pytest-asyncio in auto mode) can mistake them for asyncio tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

import asmtp
from asmtp._core.protocol import ClientProtocol
from asmtp._core.reply import Reply
from asmtp._core.steps import Receive, Steps
from asmtp._io.anyio_driver import StreamConnection, open_best, open_stream_connection
from asmtp._io.asyncio_driver import Connection
from asmtp.errors import (
    CertificateError,
    ConnectError,
    ConnectionLostError,
    LocalProtocolError,
    SMTPTimeoutError,
)
from servers import FaultServer, SMTPTestServer, free_port

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]

TIMEOUT = 5.0
HELO = "client.asmtp.test"
# Dot-stuffed on the wire (RFC 5321 4.5.2); the server un-stuffs it.
WIRE_MESSAGE = b"Subject: from trio\r\n\r\nfirst line\r\n..starts with a dot\r\n.\r\n"
RECEIVED = b"Subject: from trio\r\n\r\nfirst line\r\n.starts with a dot\r\n"


def run_trio(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        assert trio.lowlevel.current_trio_token() is not None
        await test()

    trio.run(main)


@contextlib.asynccontextmanager
async def connection(
    proto: ClientProtocol, host: str, port: int, **options: Any
) -> AsyncIterator[StreamConnection]:
    """A connection that is closed however the test ends (no socket left to the GC)."""
    options.setdefault("timeout", TIMEOUT)
    conn = await open_stream_connection(proto, host, port, **options)
    try:
        yield conn
    finally:
        conn.abort()


async def command(conn: StreamConnection, data: bytes, timeout: float = TIMEOUT) -> int:
    conn.step(timeout)
    conn.write(data)
    return (await conn.read_reply()).code


async def greet_and_ehlo(conn: StreamConnection) -> None:
    greeting = await conn.read_reply()
    assert greeting.code == 220
    assert await command(conn, conn.proto.ehlo(HELO)) == 250


async def send_one(conn: StreamConnection, sender: str, recipients: list[str]) -> None:
    """One transaction: MAIL, every RCPT and DATA in one write when the server offers
    PIPELINING (RFC 2920), one at a time otherwise; then the message."""
    proto = conn.proto
    if proto.capabilities.pipelining:
        conn.step(TIMEOUT)
        conn.write(proto.mail(sender) + b"".join(proto.rcpt(r) for r in recipients) + proto.data())
        codes = [(await conn.read_reply()).code for _ in range(len(recipients) + 2)]
    else:
        codes = [await command(conn, proto.mail(sender))]
        codes += [await command(conn, proto.rcpt(r)) for r in recipients]
        codes.append(await command(conn, proto.data()))
    assert codes == [250] * (len(recipients) + 1) + [354]
    conn.step(TIMEOUT)
    conn.write(proto.message(WIRE_MESSAGE))
    await conn.drain()
    assert (await conn.read_reply()).code == 250


def test_whole_exchange_delivers(smtp_server: MakeServer) -> None:
    server = smtp_server()

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            assert isinstance(conn, StreamConnection)
            assert conn.peer == "127.0.0.1"
            assert conn.tls_version is None
            await greet_and_ehlo(conn)
            await send_one(conn, "sender@example.com", ["ann@example.org", "bob@example.net"])
            assert not conn.closed
            assert await command(conn, proto.quit()) == 221
            assert proto.closed
            conn.close()
            assert conn.closed
            assert not conn.reset_by_peer
            with pytest.raises(ConnectionLostError):
                conn.write(b"NOOP\r\n")

    run_trio(exchange)
    [message] = server.messages
    assert message.mail_from == "sender@example.com"
    assert message.rcpt_tos == ["ann@example.org", "bob@example.net"]
    assert message.content == RECEIVED
    assert message.helo_name == HELO
    assert not message.tls
    assert server.wait_idle(), "close() left the connection open"


def test_pipelined_exchange_delivers(fault_server: MakeFault) -> None:
    server = fault_server()  # offers PIPELINING

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            await greet_and_ehlo(conn)
            assert proto.capabilities.pipelining
            await send_one(conn, "sender@example.com", ["ann@example.org", "bob@example.net"])
            assert await command(conn, proto.quit()) == 221
            conn.close()

    run_trio(exchange)
    [message] = server.messages
    assert message.rcpt_tos == ["ann@example.org", "bob@example.net"]
    assert message.content == RECEIVED
    commands = server.commands
    assert commands[: commands.index("DATA") + 1] == [
        f"EHLO {HELO}",
        "MAIL FROM:<sender@example.com>",
        "RCPT TO:<ann@example.org>",
        "RCPT TO:<bob@example.net>",
        "DATA",
    ]
    assert server.wait_idle()


def test_starttls(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=tls_server_context)

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            await greet_and_ehlo(conn)
            assert proto.capabilities.starttls
            assert await command(conn, proto.starttls()) == 220
            conn.step(TIMEOUT)
            await conn.start_tls(tls_client_context, "localhost")
            assert proto.tls
            assert conn.tls_version is not None and conn.tls_version.startswith("TLS")
            assert await command(conn, proto.ehlo(HELO)) == 250
            assert not proto.capabilities.starttls  # RFC 3207 4.2: asked again, over TLS
            await send_one(conn, "sender@example.com", ["ann@example.org"])
            assert await command(conn, proto.quit()) == 221
            await conn.aclose()  # close_notify both ways, then the socket
            assert conn.closed

    run_trio(exchange)
    [message] = server.messages
    assert message.tls
    assert message.content == RECEIVED
    assert server.wait_idle()


def test_implicit_tls(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)

    async def exchange() -> None:
        proto = ClientProtocol(tls=True)
        async with connection(
            proto, "localhost", server.port, address="127.0.0.1", ssl_context=tls_client_context
        ) as conn:
            assert conn.tls_version is not None and conn.tls_version.startswith("TLS")
            await greet_and_ehlo(conn)
            await send_one(conn, "sender@example.com", ["ann@example.org"])
            assert await command(conn, proto.quit()) == 221
            await conn.aclose()

    run_trio(exchange)
    [message] = server.messages
    assert message.tls


def test_untrusted_certificate_is_a_certificate_error(
    smtp_server: MakeServer, tls_server_context: ssl.SSLContext
) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)

    async def connect() -> None:
        # The system trust store does not know the test CA.
        with pytest.raises(CertificateError) as caught:
            await open_stream_connection(
                ClientProtocol(tls=True),
                "localhost",
                server.port,
                address="127.0.0.1",
                ssl_context=ssl.create_default_context(),
                timeout=TIMEOUT,
            )
        assert caught.value.stage == "connect"
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)

    run_trio(connect)
    assert server.messages == []


def test_silent_server_times_out(fault_server: MakeFault) -> None:
    server = fault_server(ehlo="silence")

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            assert (await conn.read_reply()).code == 220
            with pytest.raises(SMTPTimeoutError) as caught:
                await command(conn, proto.ehlo(HELO), timeout=1.0)
            assert caught.value.stage == "ehlo"
            assert "awaiting the ehlo reply" in str(caught.value)
            with pytest.raises(ConnectionLostError):  # a timed-out connection is closed
                conn.write(b"QUIT\r\n")

    run_trio(exchange)
    assert server.wait_idle()


def test_trickling_server_cannot_stretch_a_step(fault_server: MakeFault) -> None:
    # The EHLO reply is ~70 bytes at one byte per 0.2 s: about 14 s in all, each byte
    # well within 1 s. Only a deadline for the whole step stops it.
    server = fault_server(ehlo="trickle", trickle_interval=0.2)

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            assert (await conn.read_reply()).code == 220
            with pytest.raises(SMTPTimeoutError) as caught:
                await command(conn, proto.ehlo(HELO), timeout=1.0)
            assert caught.value.stage == "ehlo"

    run_trio(exchange)


def test_server_closing_is_connection_lost(fault_server: MakeFault) -> None:
    server = fault_server(mail="close")

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            await greet_and_ehlo(conn)
            with pytest.raises(ConnectionLostError) as caught:
                await command(conn, proto.mail("sender@example.com"))
            assert caught.value.stage == "mail"
            assert proto.closed
            with pytest.raises(ConnectionLostError):
                await conn.drain()

    run_trio(exchange)


def test_reset_while_sending_the_message(fault_server: MakeFault) -> None:
    # The server closes after 354 with most of the message unread: the kernel resets.
    server = fault_server(data="close_mid_data")
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 6000 + b".\r\n"

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            await greet_and_ehlo(conn)
            conn.step(TIMEOUT)
            conn.write(proto.mail("sender@example.com") + proto.rcpt("a@example.org"))
            conn.write(proto.data())
            assert [(await conn.read_reply()).code for _ in range(3)] == [250, 250, 354]
            conn.step(TIMEOUT)
            conn.write(proto.message(body))
            with pytest.raises(ConnectionLostError) as caught:
                await conn.drain()
                # The kernel took it all: then the reply read must show the reset, the
                # session's proof that the end-of-data dot was never read.
                try:
                    await conn.read_reply()
                finally:
                    assert conn.reset_by_peer
            assert caught.value.stage == "message"
            assert conn.closed

    run_trio(exchange)
    assert server.messages == []


def test_server_leaving_an_idle_connection_shows_in_closed(fault_server: MakeFault) -> None:
    # 421 then the server closes (RFC 5321 3.8), while the client reads nothing.
    server = fault_server(ehlo="reply:421 4.3.2 shutting down")

    async def exchange() -> None:
        proto = ClientProtocol()
        async with connection(proto, *server.address) as conn:
            assert (await conn.read_reply()).code == 220
            conn.step(TIMEOUT)
            conn.write(proto.ehlo(HELO))
            await conn.drain()
            for _ in range(500):  # up to ~5 s: the poll is a question, not a wait
                if conn.closed:
                    break
                await trio.sleep(0.01)
            assert conn.closed, "the server's close went unnoticed"
            # The reply that came before the close is still there to read.
            reply = await conn.read_reply()
            assert reply.code == 421
            assert proto.closed

    run_trio(exchange)


def test_refused_connection_is_a_connect_error() -> None:
    port = free_port()  # nothing listens there

    async def connect() -> None:
        with pytest.raises(ConnectError) as caught:
            await open_stream_connection(ClientProtocol(), "127.0.0.1", port, timeout=TIMEOUT)
        assert caught.value.stage == "connect"
        assert "refused" in str(caught.value)
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)

    run_trio(connect)


def greeting() -> Steps[Reply]:
    reply: Reply = yield Receive(TIMEOUT, same_step=True)
    return reply


def test_open_best_picks_the_driver_of_the_running_library(smtp_server: MakeServer) -> None:
    server = smtp_server()

    async def on_trio() -> None:
        conn = await open_best(ClientProtocol(), *server.address, timeout=TIMEOUT)
        try:
            assert isinstance(conn, StreamConnection)
            assert (await conn.read_reply()).code == 220
        finally:
            conn.close()

    async def on_asyncio() -> None:
        conn = await open_best(ClientProtocol(), *server.address, timeout=TIMEOUT)
        try:
            assert isinstance(conn, Connection)
            # the asyncio driver talks through steps only
            assert (await conn.run(greeting())).code == 220
        finally:
            conn.close()
        with pytest.raises(LocalProtocolError):
            await open_stream_connection(ClientProtocol(), *server.address, timeout=TIMEOUT)

    run_trio(on_trio)
    asyncio.run(on_asyncio())
    assert server.wait_idle()


def test_sendmail_under_trio(smtp_server: MakeServer) -> None:
    """The public API end to end under trio (needs session.py to pick the driver with
    ``open_best`` and to keep off asyncio-only calls)."""
    server = smtp_server()
    to = ["ann@example.org", "bob@example.net", "cy@example.com"]
    reports: list[asmtp.Report] = []

    async def send() -> None:
        report = await asmtp.sendmail(
            to=to,
            from_="Sender <sender@example.com>",
            subject="from trio",
            body="Hello from trio.",
            relay=asmtp.Relay(*server.address, tls="none", helo=HELO),
            concurrency=2,
            timeout=TIMEOUT,
        )
        reports.append(report)

    run_trio(send)
    [report] = reports
    assert report.ok, report.failed()
    assert [r.recipient for r in report] == to
    assert all(r.status == "delivered" and r.code == 250 for r in report)
    assert sorted(rcpt for m in server.messages for rcpt in m.rcpt_tos) == sorted(to)
    assert server.wait_idle()

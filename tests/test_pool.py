"""Pooled sessions for web backends: reuse counted on the server side, dead sessions
replaced, limits honoured, concurrent sends kept apart."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from email.message import EmailMessage

import anyio

import asmtp
from servers import FaultServer, SMTPTestServer, free_port

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


def note(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = f"user{n}@example.org"
    msg["Subject"] = f"note {n}"
    msg.set_content(f"body {n}\n")
    return msg


async def test_many_concurrent_sends_share_few_authenticated_sessions(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"app": "pw"})
    relay = asmtp.Relay(
        "localhost", server.port, username="app", password="pw", ssl_context=tls_client_context
    )
    results: dict[int, asmtp.Report] = {}
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_connections=4)) as mailer:

        async def send(n: int) -> None:
            results[n] = await mailer.send(note(n))

        async with anyio.create_task_group() as tg:
            for n in range(120):
                tg.start_soon(send, n)
        assert mailer.sessions_opened <= 4
    assert all(r.ok for r in results.values())
    assert server.sessions_opened <= 4
    assert server.max_concurrent_sessions <= 4
    # never interleaved: each recipient got its own message, intact
    for m in server.messages:
        n = int(m.rcpt_tos[0][4:].split("@")[0])
        assert f"Subject: note {n}".encode() in m.content and f"body {n}".encode() in m.content
    assert len(server.messages) == 120
    assert {m.auth_user for m in server.messages} == {"app"}


async def test_message_cap_opens_a_new_session(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_messages=3)) as mailer:
        for n in range(10):
            assert (await mailer.send(note(n))).ok
    assert server.sessions_opened == 4  # 3 + 3 + 3 + 1


async def test_age_cap_opens_a_new_session(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_age=0.3)) as mailer:
        for n in range(3):
            assert (await mailer.send(note(n))).ok
            await anyio.sleep(0.4)
    assert server.sessions_opened == 3


async def test_idle_sessions_are_closed(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(idle_timeout=0.3)) as mailer:
        assert (await mailer.send(note(1))).ok
        assert server.active_sessions == 1
        await anyio.sleep(1.0)
        assert server.wait_idle(timeout=5)
        assert (await mailer.send(note(2))).ok
    assert server.sessions_opened == 2


async def test_a_server_that_dropped_the_session_is_survived(smtp_server: MakeServer) -> None:
    port = free_port("127.0.0.1")
    first = smtp_server(port=port)
    relay = asmtp.Relay("127.0.0.1", port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(check_after=60), retry=None) as mailer:
        assert (await mailer.send(note(1))).ok
        first.stop()  # drops the pooled connection
        second = smtp_server(port=port)
        report = await mailer.send(note(2))
    assert report.ok, report.failed()
    assert [m.rcpt_tos for m in second.messages] == [["user2@example.org"]]


async def test_checked_before_reuse_after_idling(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(check_after=0.1)) as mailer:
        assert (await mailer.send(note(1))).ok
        await anyio.sleep(0.2)
        assert (await mailer.send(note(2))).ok
    assert server.sessions_opened == 1
    assert [verb for verb, _ in server.commands].count("RSET") == 1


async def test_recipient_deadline_applies_to_pooled_sends(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(
        relay, pool=True, retry=None, timeout=60, recipient_deadline=1.5
    ) as mailer:
        [r] = await mailer.send(note(1))
        assert (r.status, r.stage) == ("transient", "rcpt")
        assert "deadline" in r.message
    assert server.wait_idle(timeout=5)  # the cut-short session was not kept


async def test_a_session_whose_pre_dot_hook_fails_is_never_lent_again(
    smtp_server: MakeServer,
) -> None:
    # The journal's pre-dot line could not be written: the session is in DATA with no
    # content to send, so it is closed (the server drops the transaction), not reused.
    from asmtp.message import prepare_message
    from asmtp.session import Endpoint, Extras, Session

    server = smtp_server()
    endpoint = await Endpoint.for_relay(asmtp.Relay(server.host, server.port, tls="none"))

    async def journal_full(recipients: object) -> None:
        raise asmtp.JournalWriteError("the journal cannot be written: No space left on device")

    session = Session(endpoint, asmtp.Timeouts.of(5.0))
    await session.connect()
    [result] = await session.deliver(
        "app@example.com", ["user1@example.org"], prepare_message(note(1)),
        extras=Extras(before_dot=journal_full),
    )  # fmt: skip
    assert result.status == "transient" and "No space left" in result.message
    assert not session.is_open
    assert server.messages == []

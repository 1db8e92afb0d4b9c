"""Mailer.send to one recipient, as a web backend calls it: sent in the caller's task
(no worker task or result stream per send) with deliver()'s guarantees kept (one result,
the mailer's closing ends a send in flight, a stopped mailer sends nothing), and the same
bytes sent again reused as prepared, not prepared again. Real servers on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

import asmtp
from servers import FaultServer, SMTPTestServer, until

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]

MESSAGE = b"From: app@example.com\r\nSubject: hi\r\n\r\n.dot line\r\nbody\r\n"


async def test_the_same_bytes_go_to_each_recipient_and_new_bytes_as_given(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    other = MESSAGE.replace(b"body", b"another body")
    async with asmtp.Mailer(relay, pool=True, retry=None) as mailer:
        for n in range(3):
            report = await mailer.send(
                MESSAGE, sender="app@example.com", recipients=[f"u{n}@example.org"]
            )
            assert [r.status for r in report] == ["delivered"]
        report = await mailer.send(other, sender="app@example.com", recipients="v@example.org")
        assert [(r.recipient, r.status) for r in report] == [("v@example.org", "delivered")]
    assert [m.rcpt_tos for m in server.messages] == [
        ["u0@example.org"],
        ["u1@example.org"],
        ["u2@example.org"],
        ["v@example.org"],
    ]
    assert [m.content for m in server.messages] == [MESSAGE] * 3 + [other]


async def test_a_send_in_flight_ends_when_the_mailer_closes(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    relay = asmtp.Relay(server.host, server.port, tls="none")
    reports: list[asmtp.Report] = []
    started = time.monotonic()
    mailer = asmtp.Mailer(relay, pool=True, retry=None, timeout=60)

    async def send() -> None:
        reports.append(
            await mailer.send(MESSAGE, sender="a@example.com", recipients="b@example.org")
        )

    async with anyio.create_task_group() as tg, mailer:
        tg.start_soon(send)
        assert await until(lambda: server.connections > 0)
        await anyio.sleep(0.2)  # the RCPT is out, its reply never comes
    assert [len(r) for r in reports] == [0]  # cancelled with the mailer: no result
    assert time.monotonic() - started < 30  # not the 60 s step timeout


async def test_a_stopped_mailer_sends_nothing(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=True) as mailer:
        mailer.stop()
        report = await mailer.send(MESSAGE, sender="a@example.com", recipients="b@example.org")
    assert len(report) == 0
    assert server.messages == [] and server.sessions_opened == 0


async def test_send_outside_async_with_is_refused(smtp_server: MakeServer) -> None:
    server = smtp_server()
    mailer = asmtp.Mailer(asmtp.Relay(server.host, server.port, tls="none"))
    with pytest.raises(asmtp.InputError, match="async with"):
        await mailer.send(MESSAGE, sender="a@example.com", recipients="b@example.org")

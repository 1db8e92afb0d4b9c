"""Fan-out through a relay, end to end, against real servers on loopback: aiosmtpd for
a well-behaved ESMTP server (with TLS from trustme and AUTH), and a byte-level fault
server for everything a misbehaving server can do."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

import asmtp
from servers import FaultServer, SMTPTestServer, server_ssl_context

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


def relay_to(server: SMTPTestServer | FaultServer, **options: object) -> asmtp.Relay:
    options.setdefault("tls", "none")
    options.setdefault("helo", "client.asmtp.test")
    return asmtp.Relay(server.host, server.port, **options)  # type: ignore[arg-type]


def parse(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_200_recipients_at_concurrency_20(smtp_server: MakeServer) -> None:
    server = smtp_server()
    to = [f"user{i:03d}@example.org" for i in range(150)]
    cc = [f"cc{i:02d}@example.net" for i in range(30)]
    bcc = [f"hidden{i:02d}@example.com" for i in range(20)]
    report = await asmtp.sendmail(
        to=to,
        cc=cc,
        bcc=[*bcc, "user000@example.org"],  # named twice: still one copy
        from_="Sender Name <sender@example.com>",
        subject="Quarterly notes",
        body="<h1>Hello</h1>",
        mailtype="html",
        relay=relay_to(server),
        concurrency=20,
        timeout=10,
    )
    assert report.ok, report.failed()
    assert [r.recipient for r in report] == to + cc + bcc
    assert all(r.status == "delivered" and r.code == 250 and r.stage == "message" for r in report)
    assert server.max_concurrent_sessions <= 20
    assert server.sessions_opened == 200
    received = server.messages
    assert sorted(rcpt for m in received for rcpt in m.rcpt_tos) == sorted(to + cc + bcc)
    assert all(len(m.rcpt_tos) == 1 for m in received)
    assert {m.mail_from for m in received} == {"sender@example.com"}
    msg = parse(received[0].content)
    assert msg["Bcc"] is None
    assert b"hidden" not in received[0].content
    assert msg["Subject"] == "Quarterly notes"
    assert msg["From"] == "Sender Name <sender@example.com>"
    assert msg["To"].addresses[0].addr_spec == "user000@example.org"
    assert len(msg["To"].addresses) == 150 and len(msg["Cc"].addresses) == 30
    assert msg.get_content_type() == "text/html"
    assert msg["X-Mailer"] == f"asmtp/{asmtp.__version__}"
    assert msg["Message-ID"] and msg["Date"] and msg["MIME-Version"] == "1.0"
    # the same bytes for every copy: serialized once
    assert len({m.content for m in received}) == 1


async def test_starttls_verified_and_auth_plain(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"alice": "s3cret"})
    relay = asmtp.Relay(
        "localhost",
        server.port,
        username="alice",
        password="s3cret",
        ssl_context=tls_client_context,
        auth_mechanism="PLAIN",
    )
    assert relay.tls == "starttls"
    report = await asmtp.sendmail(
        to="bob@example.org",
        from_="alice@example.com",
        subject="hi",
        body="hello",
        relay=relay,
        timeout=10,
    )
    assert report.ok, report.failed()
    assert report[0].tls == "verified"
    [msg] = server.messages
    assert msg.tls and msg.auth_user == "alice"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", None])
async def test_auth_good_and_bad_credentials(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
    mechanism: str | None,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"alice": "s3cret"})
    common = dict(ssl_context=tls_client_context, auth_mechanism=mechanism)
    good = asmtp.Relay("localhost", server.port, username="alice", password="s3cret", **common)
    bad = asmtp.Relay("localhost", server.port, username="alice", password="wrong", **common)
    ok = await asmtp.sendmail(
        to="bob@example.org", from_="alice@example.com", body="x", relay=good, timeout=10
    )
    assert ok.ok, ok.failed()
    refused = await asmtp.sendmail(
        to="bob@example.org", from_="alice@example.com", body="x", relay=bad, timeout=10
    )
    [r] = refused
    assert (r.status, r.stage, r.code) == ("transient", "auth", 535)
    assert "AUTH refused: 535" in r.message
    assert len(server.messages) == 1


async def test_password_callables_sync_and_async(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"u": "token-2"})
    calls: list[str] = []

    def sync_token() -> str:
        calls.append("sync")
        return "token-2"

    async def async_token() -> str:
        calls.append("async")
        await asyncio.sleep(0)
        return "token-2"

    for password in (sync_token, async_token):
        relay = asmtp.Relay(
            "localhost",
            server.port,
            username="u",
            password=password,
            ssl_context=tls_client_context,
        )
        report = await asmtp.sendmail(
            to=["a@example.org", "b@example.org"],
            from_="u@example.com",
            body="x",
            relay=relay,
            timeout=10,
        )
        assert report.ok, report.failed()
    assert calls == ["sync", "sync", "async", "async"]  # fetched fresh for each session


async def test_implicit_tls(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)
    relay = asmtp.Relay("localhost", server.port, tls="implicit", ssl_context=tls_client_context)
    report = await asmtp.sendmail(
        to="bob@example.org", from_="a@example.com", body="x", relay=relay, timeout=10
    )
    assert report.ok, report.failed()
    assert report[0].tls == "verified"
    assert server.messages[0].tls


async def test_certificate_for_another_name_is_refused(
    smtp_server: MakeServer,
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(
        starttls_context=server_ssl_context(ca, "other.example"), auth={"alice": "s3cret"}
    )
    relay = asmtp.Relay(
        "localhost",
        server.port,
        username="alice",
        password="s3cret",
        ssl_context=tls_client_context,
    )
    report = await asmtp.sendmail(
        to="bob@example.org", from_="a@example.com", body="x", relay=relay, timeout=10
    )
    [r] = report
    assert (r.status, r.stage) == ("transient", "starttls")
    assert "certificate" in r.message
    assert server.messages == []
    assert not any(verb == "AUTH" for verb, _ in server.commands)


async def test_implicit_tls_untrusted_certificate_is_refused(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
) -> None:
    # the default context uses the system trust store, which does not know the test CA
    server = smtp_server(implicit_tls_context=tls_server_context)
    report = await asmtp.sendmail(
        to="bob@example.org",
        from_="a@example.com",
        body="x",
        relay=asmtp.Relay("localhost", server.port, tls="implicit"),
        timeout=10,
    )
    assert (report[0].status, report[0].stage) == ("transient", "connect")
    assert "certificate" in report[0].message


async def test_required_starttls_not_offered_sends_no_auth(smtp_server: MakeServer) -> None:
    server = smtp_server(auth={"alice": "s3cret"}, auth_require_tls=False)
    relay = asmtp.Relay(server.host, server.port, username="alice", password="s3cret")
    report = await asmtp.sendmail(
        to="bob@example.org", from_="a@example.com", body="x", relay=relay, timeout=10
    )
    [r] = report
    assert (r.status, r.stage) == ("transient", "starttls")
    assert "STARTTLS" in r.message
    verbs = [verb for verb, _ in server.commands]
    assert "AUTH" not in verbs and "MAIL" not in verbs


async def test_plaintext_auth_only_when_allowed(smtp_server: MakeServer) -> None:
    server = smtp_server(auth={"alice": "s3cret"}, auth_require_tls=False)
    base = dict(tls="none", username="alice", password="s3cret")
    refused = await asmtp.sendmail(
        to="b@example.org",
        from_="a@example.com",
        body="x",
        relay=relay_to(server, **base),
        timeout=10,
    )
    assert (refused[0].status, refused[0].stage) == ("transient", "auth")
    assert "unencrypted" in refused[0].message
    assert not any(verb == "AUTH" for verb, _ in server.commands)
    allowed = await asmtp.sendmail(
        to="b@example.org",
        from_="a@example.com",
        body="x",
        relay=relay_to(server, allow_plaintext_auth=True, **base),
        timeout=10,
    )
    assert allowed.ok, allowed.failed()
    assert server.messages[0].auth_user == "alice"


async def test_transcript_masks_credentials_and_content(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"alice": "s3cret"})
    relay = asmtp.Relay(
        "localhost",
        server.port,
        username="alice",
        password="s3cret",
        ssl_context=tls_client_context,
        auth_mechanism="LOGIN",
    )
    with caplog.at_level(logging.DEBUG, logger="asmtp"):
        report = await asmtp.sendmail(
            to="bob@example.org",
            from_="a@example.com",
            subject="confidential subject",
            body="secret body",
            relay=relay,
            timeout=10,
        )
    assert report.ok
    text = caplog.text
    assert "> STARTTLS" in text and "> AUTH LOGIN" in text and "< 235" in text
    assert "s3cret" not in text and "czNjcmV0" not in text  # plain and base64
    assert "confidential subject" not in text and "secret body" not in text
    assert "[message:" in text


async def test_ehlo_refused_falls_back_to_helo(smtp_server: MakeServer) -> None:
    server = smtp_server(ehlo_disabled=True)
    report = await asmtp.sendmail(
        to="b@example.org", from_="a@example.com", body="x", relay=relay_to(server), timeout=10
    )
    assert report.ok, report.failed()
    assert server.helo_names == ["client.asmtp.test"]


async def test_rcpt_refused_is_permanent_with_its_reply(smtp_server: MakeServer) -> None:
    def refuse(address: str) -> str | None:
        return "550 5.1.1 no such user" if address.startswith("nobody") else None

    server = smtp_server(rcpt_reply=refuse)
    report = await asmtp.sendmail(
        to="jack@example.org, nobody@example.org",
        from_="a@example.com",
        body="x",
        relay=relay_to(server),
        timeout=10,
    )
    ok, bad = report
    assert ok.status == "delivered"
    assert (bad.status, bad.code, bad.enhanced_status, bad.stage) == (
        "permanent",
        550,
        "5.1.1",
        "rcpt",
    )
    assert bad.message == "RCPT TO refused: 550 5.1.1 no such user"
    assert not report.ok and report.counts() == {"delivered": 1, "permanent": 1}


async def test_message_over_the_servers_size_is_refused_before_data(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server(data_size_limit=2000)
    report = await asmtp.sendmail(
        to="b@example.org",
        from_="a@example.com",
        body="x" * 5000,
        relay=relay_to(server),
        timeout=10,
    )
    [r] = report
    assert (r.status, r.stage) == ("permanent", "mail")
    assert "SIZE" in r.message
    assert not any(verb in ("MAIL", "DATA") for verb, _ in server.commands)


async def test_size_parameter_counts_the_octets_sent(smtp_server: MakeServer) -> None:
    server = smtp_server()
    report = await asmtp.sendmail(
        to="b@example.org",
        from_="a@example.com",
        body="line\n" * 50,
        relay=relay_to(server),
        timeout=10,
    )
    assert report.ok
    [msg] = server.messages
    size = next(o for o in msg.mail_options if o.startswith("SIZE="))
    assert int(size[5:]) == len(msg.content)


async def test_eight_bit_and_utf8_extensions(smtp_server: MakeServer) -> None:
    server = smtp_server()
    raw = "From: a@example.com\r\nTo: jöran@example.org\r\nSubject: hej\r\n\r\nhej då\r\n"
    report = await asmtp.send(
        raw.encode(),
        sender="a@example.com",
        recipients=["jöran@example.org"],
        relay=relay_to(server),
        timeout=10,
    )
    assert report.ok, report.failed()
    [msg] = server.messages
    assert "BODY=8BITMIME" in msg.mail_options and "SMTPUTF8" in msg.mail_options
    assert msg.rcpt_tos == ["jöran@example.org"]


async def test_eight_bit_message_to_a_seven_bit_server_is_permanent(
    fault_server: MakeFault,
) -> None:
    server = fault_server(capabilities=("PIPELINING", "SIZE 100000"))
    report = await asmtp.send(
        b"Subject: x\r\n\r\nh\xc3\xa9\r\n",
        sender="a@example.com",
        recipients=["b@example.org"],
        relay=relay_to(server),
        timeout=10,
    )
    [r] = report
    assert (r.status, r.stage) == ("permanent", "mail")
    assert "8BITMIME" in r.message
    assert server.messages == []


async def test_pipelined_transaction_checks_every_reply(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 unknown user", only_recipients=["x@example.org"])
    report = await asmtp.sendmail(
        to="ok@example.org, x@example.org",
        from_="a@example.com",
        body="x",
        relay=relay_to(server),
        timeout=10,
    )
    ok, bad = report
    assert ok.status == "delivered" and (bad.status, bad.code) == ("permanent", 550)
    # DATA went out in x's session too, before its RCPT was refused: one pipelined group
    assert [c.split(":")[0].split()[0] for c in server.commands].count("DATA") == 2
    assert len(server.messages) == 1
    assert server.recipients == ["ok@example.org"]


async def test_close_after_354_is_transient_others_delivered(fault_server: MakeFault) -> None:
    server = fault_server(data="close_mid_data", only_recipients=["dropped@example.org"])
    report = await asmtp.sendmail(
        to="a@example.org, dropped@example.org, c@example.org",
        from_="s@example.com",
        # more than the server slurps into memory: it closes with some unread (a reset)
        body=("x" * 900 + "\n") * 7000,
        relay=relay_to(server),
        timeout=10,
    )
    a, dropped, c = report
    assert a.status == c.status == "delivered"
    assert dropped.status == "transient", dropped
    assert dropped.stage in ("message", "data")
    assert sorted(m.rcpt_tos[0] for m in server.messages) == ["a@example.org", "c@example.org"]


async def test_close_after_the_dot_is_unknown(fault_server: MakeFault) -> None:
    server = fault_server(message="close", only_recipients=["maybe@example.org"])
    report = await asmtp.sendmail(
        to="a@example.org, maybe@example.org",
        from_="s@example.com",
        body="x",
        relay=relay_to(server),
        timeout=10,
    )
    a, maybe = report
    assert a.status == "delivered"
    assert (maybe.status, maybe.stage, maybe.code) == ("unknown", "message", None)
    assert not report.ok


@pytest.mark.parametrize(
    ("stage", "fault", "status"),
    [
        ("greeting", "reply:421 4.3.2 too busy", "transient"),
        ("greeting", "reply:554 5.7.1 go away", "permanent"),
        ("ehlo", "close", "transient"),
        ("mail", "reply:421 4.3.2 shutting down", "transient"),
        ("mail", "reply:451 4.3.0 try later", "transient"),
        ("rcpt", "reply:421 4.3.2 shutting down", "transient"),
        ("data", "reply:421 4.3.2 shutting down", "transient"),
        ("data", "reply:554 5.6.0 no", "permanent"),
        ("message", "reply:421 4.3.2 shutting down", "transient"),
        ("message", "reply:552 5.3.4 too big", "permanent"),
        ("mail", "garbage", "transient"),
        ("rcpt", "huge", "transient"),
        ("greeting", "close", "transient"),
    ],
)
async def test_every_fault_gives_exactly_one_result(
    fault_server: MakeFault,
    stage: str,
    fault: str,
    status: str,
) -> None:
    server = fault_server(**{stage: fault})
    recipients = [f"r{i}@example.org" for i in range(5)]
    report = await asmtp.sendmail(
        to=recipients,
        from_="s@example.com",
        body="x",
        relay=relay_to(server),
        concurrency=5,
        timeout=5,
    )
    assert [r.recipient for r in report] == recipients
    assert {r.status for r in report} == {status}
    assert {r.stage for r in report} == {stage}
    if fault.startswith("reply:"):
        code = int(fault[6:9])
        assert {r.code for r in report} == {code}


async def test_silence_past_the_timeout(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    report = await asmtp.sendmail(
        to="a@example.org", from_="s@example.com", body="x", relay=relay_to(server), timeout=1
    )
    [r] = report
    assert (r.status, r.stage) == ("transient", "rcpt")
    assert "timed out" in r.message


async def test_trickled_reply_cannot_stretch_the_step(fault_server: MakeFault) -> None:
    # 220 greeting arrives one byte per 0.2 s: about 5 s in all, past a 1.5 s step
    server = fault_server(greeting="trickle", trickle_interval=0.2)
    report = await asmtp.sendmail(
        to="a@example.org", from_="s@example.com", body="x", relay=relay_to(server), timeout=1.5
    )
    assert (report[0].status, report[0].stage) == ("transient", "greeting")
    assert "timed out" in report[0].message


async def test_connection_refused_is_transient() -> None:
    from servers import free_port

    relay = asmtp.Relay("127.0.0.1", free_port("127.0.0.1"), tls="none")
    report = await asmtp.sendmail(
        to="a@example.org, b@example.org", from_="s@example.com", body="x", relay=relay, timeout=5
    )
    assert {(r.status, r.stage) for r in report} == {("transient", "connect")}
    assert "refused" in report[0].message


async def test_cancel_closes_sessions_and_raises(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")

    async def send() -> asmtp.Report:
        return await asmtp.sendmail(
            to=[f"r{i}@example.org" for i in range(10)],
            from_="s@example.com",
            body="x",
            relay=relay_to(server),
            concurrency=10,
            timeout=30,
        )

    task = asyncio.create_task(send())
    for _ in range(200):
        if server.active >= 10:
            break
        await asyncio.sleep(0.05)
    assert server.active == 10
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await server.idle(timeout=5)


async def test_bad_input_refused_before_any_connection(smtp_server: MakeServer) -> None:
    server = smtp_server()
    with pytest.raises(asmtp.InputError, match=r"(?i)subject"):
        await asmtp.sendmail(
            to="a@example.org",
            from_="s@example.com",
            subject="hi\r\nBcc: victim@example.org",
            body="x",
            relay=relay_to(server),
        )
    with pytest.raises(asmtp.InputError):
        await asmtp.sendmail(
            to="a@example.org\r\nRCPT TO:<x@example.org>",
            from_="s@example.com",
            body="x",
            relay=relay_to(server),
        )
    with pytest.raises(asmtp.InputError):
        await asmtp.sendmail(
            to="not an address", from_="s@example.com", body="x", relay=relay_to(server)
        )
    with pytest.raises(asmtp.InputError):
        await asmtp.sendmail(
            to="a@example.org",
            from_="s@example.com",
            body="x",
            headers={"X-Tag": "a\nb"},
            relay=relay_to(server),
        )
    with pytest.raises(asmtp.InputError):
        asmtp.Relay(server.host, server.port, helo="bad\r\nname")
    assert server.sessions_opened == 0
    assert issubclass(asmtp.InputError, asmtp.SMTPError)


async def test_send_an_email_message_built_by_the_caller(smtp_server: MakeServer) -> None:
    server = smtp_server()
    msg = EmailMessage()
    msg["From"] = "Author <author@example.com>"
    msg["Sender"] = "list-bounces@example.com"
    msg["To"] = "a@example.org, b@example.org"
    msg["Cc"] = "c@example.org"
    msg["Bcc"] = "secret@example.org, a@example.org"
    msg["Subject"] = "built by hand"
    msg.set_content("line one\n.leading dot\n")
    report = await asmtp.send(msg, relay=relay_to(server), timeout=10)
    assert [r.recipient for r in report] == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
        "secret@example.org",
    ]
    assert report.ok
    assert msg["Bcc"] is not None  # the caller's message is untouched
    for m in server.messages:
        assert m.mail_from == "list-bounces@example.com"
        parsed = parse(m.content)
        assert parsed["Bcc"] is None
        assert parsed.get_content().replace("\r\n", "\n") == "line one\n.leading dot\n"


async def test_attachments_and_alternative(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    png = tmp_path / "chart.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    report = await asmtp.sendmail(
        to="a@example.org",
        from_="s@example.com",
        subject="report",
        body="<p>see chart</p>",
        mailtype="html",
        alt_text="see chart",
        attachments=[png, ("data.csv", b"a,b\n1,2\n", "text/csv")],
        relay=relay_to(server),
        timeout=10,
    )
    assert report.ok, report.failed()
    msg = parse(server.messages[0].content)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_attachments())
    assert [(p.get_filename(), p.get_content_type()) for p in parts] == [
        ("chart.png", "image/png"),
        ("data.csv", "text/csv"),
    ]
    assert parts[0].get_content() == png.read_bytes()
    body = msg.get_body(("html",))
    assert body is not None and "see chart" in body.get_content()
    plain = msg.get_body(("plain",))
    assert plain is not None and plain.get_content().strip() == "see chart"


async def test_one_session_several_transactions(smtp_server: MakeServer) -> None:
    server = smtp_server(rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("x") else None)
    async with asmtp.connect(relay_to(server), timeout=10) as session:
        first = await session.sendmail(
            "s@example.com", ["a@example.org", "x@example.org"], b"Subject: one\r\n\r\nfirst\r\n"
        )
        second = await session.sendmail(
            "s@example.com", "b@example.org", b"Subject: two\r\n\r\nsecond\r\n"
        )
        all_refused = await session.sendmail(
            "s@example.com", ["x1@example.org"], b"Subject: three\r\n\r\nthird\r\n"
        )
        third = await session.sendmail(
            "s@example.com", ["c@example.org"], b"Subject: four\r\n\r\nfourth\r\n"
        )
        await session.noop()
    assert [r.status for r in first] == ["delivered", "permanent"]
    assert second.ok and third.ok and not all_refused.ok
    assert server.sessions_opened == 1
    assert [m.rcpt_tos for m in server.messages] == [
        ["a@example.org"],
        ["b@example.org"],
        ["c@example.org"],
    ]


async def test_log_file_has_a_line_per_recipient(
    smtp_server: MakeServer,
    tmp_path: Path,
) -> None:
    server = smtp_server(rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("x") else None)
    log = tmp_path / "send.log"
    await asmtp.sendmail(
        to="a@example.org, x@example.org",
        from_="s@example.com",
        body="x",
        relay=relay_to(server, password=None),
        timeout=10,
        log_file=log,
    )
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert "<a@example.org> delivered 250" in lines[0]
    assert "<x@example.org> permanent 550 5.1.1" in lines[1]
    assert all("asmtp[" in line for line in lines)

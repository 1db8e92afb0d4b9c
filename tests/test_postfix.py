"""asmtp against the real Postfix: its smtpd on loopback (tests/postfix.py), as an
authenticated relay (STARTTLS with a trustme certificate, AUTH PLAIN and LOGIN from a
Cyrus sasldb, no AUTH in cleartext), as MX hosts behind the loopback DNS server, and
with its own limits: message_size_limit, smtpd_recipient_limit,
smtpd_client_connection_count_limit, recipient restrictions refusing some RCPTs of a
pipelined group, and SMTPUTF8. Every mail asmtp reports delivered is read back from
the Maildir Postfix's virtual delivery agent wrote, and nothing else is there.

These tests need Postfix, sasl2-bin and root (Postfix's master binds, then drops to
its mail_owner); they run with ``pytest -m postfix`` (.ci/run), not in the default run.
"""

from __future__ import annotations

import random
import re
import ssl
from collections import Counter
from collections.abc import Callable

import pytest
import trustme

import asmtp
from asmtp.config import Direct
from asmtp.results import RecipientResult
from dnsserver import DNSServer
from postfix import HOSTNAME, Listener, PostfixServer, postfix
from servers import client_ssl_context

__all__ = ["postfix"]  # the fixture, used by the tests below

pytestmark = pytest.mark.postfix

MakePostfix = Callable[..., PostfixServer]
MakeDNS = Callable[..., DNSServer]

SENDER = "sender@client.test"
#: lines a careless client would end the message on, or lose a dot of
BODY = "through Postfix\n.\n..two dots\n. one dot and a space\n"
HELO = "client.asmtp.test"


def queue_id(result: RecipientResult) -> str:
    """The queue id in Postfix's reply to the dot: ``250 2.0.0 Ok: queued as 4F3A1B2C3D``."""
    match = re.search(r"queued as (\w+)", result.message)
    assert match is not None, result.message
    return match[1]


def summary(result: RecipientResult) -> tuple[str, str, str, int | None, str | None]:
    return (result.recipient, result.status, result.stage, result.code, result.enhanced_status)


def plain_relay(server: PostfixServer, host: str | None = None) -> asmtp.Relay:
    return asmtp.Relay(host or server.host, server.port, tls="none", helo=HELO)


def direct(dns: DNSServer, server: PostfixServer, **options: object) -> Direct:
    options.setdefault("tls", "none")
    options.setdefault("helo", HELO)
    options.setdefault("rng", random.Random(1))
    return Direct(dns_servers=[dns.spec], port=server.port, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- relay


@pytest.mark.anyio
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_authenticated_relay_over_starttls(
    postfix: MakePostfix, ca: trustme.CA, tls_client_context: ssl.SSLContext, mechanism: str
) -> None:
    server = postfix(
        mailboxes=["ann@example.test", "bob@example.org"],
        users={"alice": "s3cret"},
        ca=ca,
        main={"smtpd_sasl_authenticated_header": "yes"},
    )
    relay = asmtp.Relay(
        "localhost",
        server.port,
        username="alice",
        password="s3cret",
        ssl_context=tls_client_context,
        auth_mechanism=mechanism,
        helo=HELO,
    )
    # example.org is not Postfix's own: only an authenticated client may relay to it
    report = await asmtp.sendmail(
        to=["ann@example.test", "bob@example.org"],
        from_=SENDER,
        subject="relayed",
        body=BODY,
        relay=relay,
        timeout=10,
    )
    assert [summary(r) for r in report] == [
        ("ann@example.test", "delivered", "message", 250, "2.0.0"),
        ("bob@example.org", "delivered", "message", 250, "2.0.0"),
    ]
    assert {r.tls for r in report} == {"verified"}
    await server.settled()
    messages = server.messages()
    assert [(m.mailbox, m.by, m.protocol) for m in messages] == [
        ("ann@example.test", HOSTNAME, "ESMTPSA"),  # ESMTP, TLS (S), AUTH (A)
        ("bob@example.org", HOSTNAME, "ESMTPSA"),
    ]
    assert {m.queue_id for m in messages} == {queue_id(r) for r in report}
    for m in messages:
        received = " ".join(str(m.message["Received"]).split())
        assert f"(Authenticated sender: alice@{HOSTNAME})" in received
        assert "(using TLSv1." in received
        assert m.message["Subject"] == "relayed"
        assert m.message["Return-Path"] == f"<{SENDER}>"
        assert m.message.get_content() == BODY  # dot-stuffed by asmtp, unstuffed by Postfix


async def test_wrong_password_is_refused_once_for_the_run(
    postfix: MakePostfix, ca: trustme.CA, tls_client_context: ssl.SSLContext
) -> None:
    server = postfix(mailboxes=["ann@example.test"], users={"alice": "s3cret"}, ca=ca)
    relay = asmtp.Relay(
        "localhost",
        server.port,
        username="alice",
        password="wrong",
        ssl_context=tls_client_context,
        helo=HELO,
    )
    to = ["ann@example.test", "bob@example.test", "cy@example.test"]
    report = await asmtp.sendmail(
        to=to, from_=SENDER, body="x", relay=relay, concurrency=1, timeout=10
    )
    assert {(r.status, r.stage, r.code, r.enhanced_status) for r in report} == {
        ("transient", "auth", 535, "5.7.8")
    }
    assert "authentication failed" in report[0].message
    # a new run asks again
    [ok] = await asmtp.sendmail(
        to="ann@example.test",
        from_=SENDER,
        body="x",
        relay=relay.with_(password="s3cret"),
        timeout=10,
    )
    assert summary(ok) == ("ann@example.test", "delivered", "message", 250, "2.0.0")
    # asmtp's AuthCache: one AUTH refused, and the first run's other sessions did not
    # connect (smtpd logs auth=accepted/sent per session)
    sessions = await server.sessions(2)
    assert sorted(_auth_stats(stats) for stats in sessions) == ["auth=0/1", "auth=1"]
    await server.settled()
    assert [m.queue_id for m in server.messages()] == [queue_id(ok)]


def _auth_stats(stats: str) -> str:
    match = re.search(r"\bauth=\S+", stats)
    return match[0] if match else ""


async def test_no_credentials_in_cleartext(postfix: MakePostfix, ca: trustme.CA) -> None:
    server = postfix(mailboxes=["ann@example.test"], users={"alice": "s3cret"}, ca=ca)
    # smtpd_tls_auth_only: no AUTH before STARTTLS
    async with asmtp.connect(plain_relay(server)) as session:
        caps = session.capabilities
        assert isinstance(caps, asmtp.Capabilities)
        assert (caps.starttls, caps.auth) == (True, ())
    cleartext = plain_relay(server).with_(username="alice", password="s3cret")
    [refused] = await asmtp.sendmail(
        to="ann@example.test", from_=SENDER, body="x", relay=cleartext, timeout=10
    )
    assert (refused.status, refused.stage, refused.code) == ("transient", "auth", None)
    assert "unencrypted" in refused.message
    # even when allowed to: the server offers no mechanism without TLS
    allowed = cleartext.with_(allow_plaintext_auth=True)
    [none] = await asmtp.sendmail(
        to="ann@example.test", from_=SENDER, body="x", relay=allowed, timeout=10
    )
    assert (none.status, none.stage, none.code) == ("transient", "auth", None)
    assert "server offers: none" in none.message
    sessions = await server.sessions(3)
    assert all("auth" not in stats for stats in sessions), sessions
    await server.settled()
    assert server.messages() == []


async def test_relaying_needs_authentication(
    postfix: MakePostfix, ca: trustme.CA, tls_client_context: ssl.SSLContext
) -> None:
    server = postfix(
        mailboxes=["ann@example.test", "bob@example.org"], users={"alice": "s3cret"}, ca=ca
    )
    relay = asmtp.Relay("localhost", server.port, ssl_context=tls_client_context, helo=HELO)
    report = await asmtp.sendmail(
        to=["ann@example.test", "bob@example.org"], from_=SENDER, body="x", relay=relay, timeout=10
    )
    ann, bob = report
    assert summary(ann) == ("ann@example.test", "delivered", "message", 250, "2.0.0")
    assert summary(bob) == ("bob@example.org", "permanent", "rcpt", 554, "5.7.1")
    assert "Relay access denied" in bob.message
    await server.settled()
    assert [(m.mailbox, m.protocol) for m in server.messages()] == [("ann@example.test", "ESMTPS")]


# --------------------------------------------------------------------------- MX hosts

PRIMARY_BACKUP = """
    @    MX 10 mx1
    @    MX 20 mx2
    mx1  A 127.0.0.2
    mx2  A 127.0.0.3
"""


async def test_postfix_mx_hosts_behind_dns(
    postfix: MakePostfix, dns_server: MakeDNS, ca: trustme.CA
) -> None:
    # One Postfix, two smtpd services: mx1 (preferred) greylists ann, mx2 takes her mail.
    server = postfix(
        listeners=[
            Listener(
                "127.0.0.2",
                {
                    "myhostname": "mx1.example.test",
                    "smtpd_recipient_restrictions": "check_recipient_access "
                    "texthash:$config_directory/greylist",
                },
            ),
            Listener("127.0.0.3", {"myhostname": "mx2.example.test"}),
        ],
        mailboxes=["ann@example.test"],
        maps={"greylist": {"ann@example.test": "450 4.7.1 greylisted, try again later"}},
        ca=ca,
        cert_names=["mx1.example.test", "mx2.example.test"],
    )
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    settings = direct(dns, server, tls="starttls", ssl_context=client_ssl_context(ca))
    [r] = await asmtp.sendmail(
        to="ann@example.test", from_=SENDER, body="via MX", relay=settings, timeout=10
    )
    assert summary(r) == ("ann@example.test", "delivered", "message", 250, "2.0.0")
    assert (r.host, r.tls) == ("mx2.example.test", "verified")
    assert [(a.host, a.address, a.stage, a.code) for a in r.tried] == [
        ("mx1.example.test", "127.0.0.2", "rcpt", 450),
        ("mx2.example.test", "127.0.0.3", "message", 250),
    ]
    assert "greylisted" in r.tried[0].message
    await server.settled()
    [m] = server.messages()
    assert (m.mailbox, m.by, m.protocol, m.queue_id) == (
        "ann@example.test",
        "mx2.example.test",
        "ESMTPS",
        queue_id(r),
    )


# --------------------------------------------------------------------------- limits


async def test_message_size_limit(postfix: MakePostfix) -> None:
    limit = 20_000
    server = postfix(mailboxes=["ann@example.test"], main={"message_size_limit": str(limit)})
    relay = plain_relay(server)

    def message(size: int) -> bytes:
        """A message of exactly ``size`` octets, Date and Message-ID included (asmtp
        adds neither), padded in a header."""
        head = (
            b"Subject: %d octets\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
            b"Message-ID: <size-%d@client.test>\r\n" % (size, size)
        )
        body = (b"y" * 76 + b"\r\n") * ((size - 200) // 78)
        pad = size - len(head) - len(body) - len(b"X-Pad: \r\n\r\n")
        return head + b"X-Pad: " + b"p" * pad + b"\r\n\r\n" + body

    async def send(size: int) -> RecipientResult:
        raw = message(size)
        assert len(raw) == size
        [r] = await asmtp.send(
            raw, sender=SENDER, recipients=["ann@example.test"], relay=relay, timeout=10
        )
        return r

    small = await send(10_000)
    assert summary(small) == ("ann@example.test", "delivered", "message", 250, "2.0.0")
    # larger than the SIZE Postfix announces: asmtp does not send it
    over = await send(limit + 1)
    assert (over.status, over.stage, over.code) == ("permanent", "mail", None)
    assert f"takes at most {limit} (SIZE)" in over.message
    # within SIZE, but Postfix's queue file (with its Received header and envelope
    # records) exceeds the limit: refused after the dot
    edge = await send(limit - 100)
    assert summary(edge) == ("ann@example.test", "permanent", "message", 552, "5.3.4")
    assert "message file too big" in edge.message
    await server.settled()
    assert [m.message["Subject"] for m in server.messages()] == ["10000 octets"]


async def test_recipient_limit_452_then_a_new_transaction(
    postfix: MakePostfix, dns_server: MakeDNS
) -> None:
    to = [f"user{i}@example.test" for i in range(7)]
    server = postfix(
        listeners=[Listener("127.0.0.2")], mailboxes=to, main={"smtpd_recipient_limit": "3"}
    )
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    report = await asmtp.sendmail(
        to=to,
        from_=SENDER,
        body="x",
        relay=direct(dns, server, batch_per_domain=True, chunking=False),
        timeout=10,
    )
    assert [summary(r) for r in report] == [
        (rcpt, "delivered", "message", 250, "2.0.0") for rcpt in to
    ]
    # RCPTs 4 to 7 got "452 4.5.3 Error: too many recipients" and went on in a second
    # transaction on the same session, and the seventh in a third
    ids = [queue_id(r) for r in report]
    assert [ids.count(i) for i in dict.fromkeys(ids)] == [3, 3, 1]
    [stats] = await server.sessions(1)
    assert "mail=3 rcpt=12 data=3" in stats  # 7 + 4 + 1 RCPTs (Postfix counts a 452 as taken)
    await server.settled()
    messages = server.messages()
    assert [m.mailbox for m in messages] == to
    assert Counter(m.queue_id for m in messages) == Counter(ids)
    assert all(m.message["Delivered-To"] == m.mailbox for m in messages)


async def test_restrictions_refuse_some_rcpts_of_a_pipelined_group(
    postfix: MakePostfix, dns_server: MakeDNS
) -> None:
    server = postfix(
        listeners=[Listener("127.0.0.2")],
        mailboxes=["ann@example.test", "bob@example.test", "blocked@example.test"],
        access={
            "blocked@example.test": "REJECT no mail for you",
            "busy@example.test": "450 4.2.1 mailbox busy",
        },
    )
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    to = [
        "ann@example.test",
        "blocked@example.test",
        "ghost@example.test",  # no such mailbox
        "busy@example.test",
        "bob@example.test",
    ]
    report = await asmtp.sendmail(
        to=to,
        from_=SENDER,
        body="x",
        relay=direct(dns, server, batch_per_domain=True, chunking=False),
        timeout=10,
    )
    assert [summary(r) for r in report] == [
        ("ann@example.test", "delivered", "message", 250, "2.0.0"),
        ("blocked@example.test", "permanent", "rcpt", 554, "5.7.1"),
        ("ghost@example.test", "permanent", "rcpt", 550, "5.1.1"),
        ("busy@example.test", "transient", "rcpt", 450, "4.2.1"),
        ("bob@example.test", "delivered", "message", 250, "2.0.0"),
    ]
    assert "no mail for you" in report[1].message
    assert "User unknown in virtual mailbox table" in report[2].message
    # every RCPT refused: Postfix refuses the pipelined DATA too, and nothing is sent
    refused = await asmtp.sendmail(
        to=["blocked@example.test", "ghost@example.test"],
        from_=SENDER,
        body="x",
        relay=direct(dns, server, batch_per_domain=True, chunking=False),
        timeout=10,
    )
    assert [(r.status, r.stage, r.code) for r in refused] == [
        ("permanent", "rcpt", 554),
        ("permanent", "rcpt", 550),
    ]
    # smtpd's count of each session's commands (accepted/sent), in either order. MAIL,
    # the RCPTs and DATA went in one write (RFC 2920), which Postfix (forbidding
    # improper pipelining here) took; in the second, DATA got 554 5.5.1 "no valid
    # recipients" and no content followed.
    stats = " | ".join(await server.sessions(2))
    assert "ehlo=1 mail=1 rcpt=2/5 data=1 quit=1 commands=6/9" in stats
    assert "ehlo=1 mail=1 rcpt=0/2 data=0/1 quit=1 commands=3/6" in stats
    assert "improper command pipelining" not in server.log()
    await server.settled()
    messages = server.messages()
    assert [m.mailbox for m in messages] == ["ann@example.test", "bob@example.test"]
    assert {m.queue_id for m in messages} == {queue_id(report[0])} == {queue_id(report[4])}


async def test_421_in_a_pipelined_group_keeps_the_replies_before_it(
    postfix: MakePostfix, dns_server: MakeDNS
) -> None:
    server = postfix(
        listeners=[Listener("127.0.0.2")],
        mailboxes=["ann@example.test", "bob@example.test"],
        main={"smtpd_hard_error_limit": "3", "smtpd_error_sleep_time": "0"},
    )
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    to = ["ann@example.test", "x1@example.test", "x2@example.test", "x3@example.test"]
    to.append("bob@example.test")
    report = await asmtp.sendmail(
        to=to,
        from_=SENDER,
        body="x",
        # one session per job: what that session's replies give (with shaping, the 421
        # counts as throttling and ann and bob go again at the site)
        relay=direct(dns, server, batch_per_domain=True, shaping=None),
        timeout=10,
    )
    # Postfix: 250 (ann), 550 5.1.1 three times, then "421 4.7.0 mx.asmtp.test Error:
    # too many errors" instead of bob's reply, and it closes the connection
    [stats] = await server.sessions(1)
    assert "mail=1 rcpt=1/4" in stats
    await server.settled()
    assert server.messages() == []
    assert [summary(r) for r in report] == [
        ("ann@example.test", "transient", "rcpt", 421, "4.7.0"),
        ("x1@example.test", "permanent", "rcpt", 550, "5.1.1"),
        ("x2@example.test", "permanent", "rcpt", 550, "5.1.1"),
        ("x3@example.test", "permanent", "rcpt", 550, "5.1.1"),
        ("bob@example.test", "transient", "rcpt", 421, "4.7.0"),
    ]


async def test_connection_count_limit_421_at_the_greeting(postfix: MakePostfix) -> None:
    server = postfix(
        mailboxes=["ann@example.test", "bob@example.test"],
        main={"smtpd_client_connection_count_limit": "2"},
    )
    relay = plain_relay(server)
    # two sessions held open: the client's whole allowance
    async with asmtp.connect(relay) as first, asmtp.connect(relay) as second:
        report = await asmtp.sendmail(
            to=[f"user{i}@example.test" for i in range(3)],
            from_=SENDER,
            body="x",
            relay=relay,
            concurrency=3,
            timeout=10,
        )
        assert {(r.status, r.stage, r.code, r.enhanced_status) for r in report} == {
            ("transient", "greeting", 421, "4.7.0")
        }
        assert "too many connections from 127.0.0.1" in report[0].message
        # the held sessions still deliver
        for session, rcpt in ((first, "ann@example.test"), (second, "bob@example.test")):
            [r] = await session.sendmail(SENDER, [rcpt], b"Subject: held\r\n\r\nx\r\n")
            assert summary(r) == (rcpt, "delivered", "message", 250, "2.0.0")
    await server.settled()
    assert [m.mailbox for m in server.messages()] == ["ann@example.test", "bob@example.test"]


async def test_connection_count_limit_under_concurrency(postfix: MakePostfix) -> None:
    to = [f"user{i}@example.test" for i in range(10)]
    server = postfix(mailboxes=to, main={"smtpd_client_connection_count_limit": "2"})
    report = await asmtp.sendmail(
        to=to, from_=SENDER, body="x", relay=plain_relay(server), concurrency=10, timeout=10
    )
    # How many sessions overlap is the scheduler's choice; each recipient's mail is
    # either in its Maildir or refused at the greeting, never lost or doubled.
    outcomes = {(r.status, r.stage, r.code, r.enhanced_status) for r in report}
    assert outcomes <= {
        ("delivered", "message", 250, "2.0.0"),
        ("transient", "greeting", 421, "4.7.0"),
    }
    await server.settled()
    delivered = [r.recipient for r in report if r.status == "delivered"]
    assert [m.mailbox for m in server.messages()] == delivered
    assert sorted(m.queue_id for m in server.messages()) == sorted(
        queue_id(r) for r in report if r.status == "delivered"
    )


async def test_smtputf8(postfix: MakePostfix) -> None:
    server = postfix(
        listeners=[Listener("127.0.0.1"), Listener("127.0.0.2", {"smtputf8_enable": "no"})],
        mailboxes=["jörg@example.test"],
    )
    report = await asmtp.sendmail(
        to="Jörg <jörg@example.test>",
        from_=SENDER,
        subject="Grüße",
        body="Schöne Grüße",
        relay=plain_relay(server),
        timeout=10,
    )
    [r] = report
    assert summary(r) == ("jörg@example.test", "delivered", "message", 250, "2.0.0")
    # without SMTPUTF8 offered, asmtp does not send an address it cannot carry
    [refused] = await asmtp.sendmail(
        to="jörg@example.test",
        from_=SENDER,
        body="x",
        relay=plain_relay(server, "127.0.0.2"),
        timeout=10,
    )
    assert (refused.status, refused.stage, refused.code) == ("permanent", "mail", None)
    assert "SMTPUTF8" in refused.message
    await server.settled()
    [m] = server.messages()
    assert (m.mailbox, m.protocol, m.queue_id) == ("jörg@example.test", "UTF8SMTP", queue_id(r))
    assert m.message["Delivered-To"] == "jörg@example.test"
    assert m.message["Subject"] == "Grüße"
    assert m.message.get_content().strip() == "Schöne Grüße"

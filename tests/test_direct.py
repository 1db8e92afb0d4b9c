"""Direct delivery (relay=None / asmtp.config.Direct), end to end: a real authoritative
DNS server on loopback (tests/dnsserver.py) names mail exchangers at 127.0.0.2,
127.0.0.3, ... and real SMTP servers (aiosmtpd, or the byte-level fault server) listen
there, all on one port. Also the pure decisions of asmtp._delivery.direct, without sockets.
The integration tests run on asyncio and on trio (the ``anyio`` mark; see conftest.py)."""

from __future__ import annotations

import random
import ssl
from collections import Counter
from collections.abc import Callable, Sequence

import anyio
import pytest
import trustme

import asmtp
from asmtp._core.prepared import prepare_message
from asmtp._delivery.direct import DirectDelivery, next_address_may_help, plan_jobs
from asmtp._delivery.transaction import Extras
from asmtp.config import Direct, Timeouts
from asmtp.results import RecipientResult
from dnsserver import DNSServer
from servers import (
    FaultServer,
    SMTPTestServer,
    client_ssl_context,
    free_port,
    server_ssl_context,
    until,
)

pytestmark = pytest.mark.anyio


MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]
MakeDNS = Callable[..., DNSServer]

MX1, MX2 = "127.0.0.2", "127.0.0.3"

#: two exchangers; the one listed (and named) first has the worse preference
TWO_MX = """
    @    MX 20 mx1
    @    MX 10 mx2
    mx1  A 127.0.0.2
    mx2  A 127.0.0.3
"""
#: mx1 preferred, mx2 the backup
PRIMARY_BACKUP = """
    @    MX 10 mx1
    @    MX 20 mx2
    mx1  A 127.0.0.2
    mx2  A 127.0.0.3
"""
EQUAL_MX = """
    @    MX 10 mx1
    @    MX 10 mx2
    mx1  A 127.0.0.2
    mx2  A 127.0.0.3
"""


def direct(dns: DNSServer, port: int, **options: object) -> Direct:
    """Direct delivery through the test DNS server to ``port``, plaintext unless asked."""
    options.setdefault("tls", "none")
    options.setdefault("helo", "client.asmtp.test")
    options.setdefault("rng", random.Random(1))
    options.setdefault("dns_timeout", 2.0)
    return Direct(dns_servers=[dns.spec], port=port, **options)  # type: ignore[arg-type]


async def send(to: str | list[str], settings: Direct, *, concurrency: int = 100) -> asmtp.Report:
    return await asmtp.sendmail(
        to=to,
        from_="sender@client.test",
        subject="direct",
        body="hello over the MX",
        relay=settings,
        concurrency=concurrency,
        timeout=5,
    )


def rcpts_of(server: SMTPTestServer | FaultServer) -> list[str]:
    return [rcpt for message in server.messages for rcpt in message.rcpt_tos]


# --------------------------------------------------------------------------- MX order


async def test_lower_preference_gets_the_mail(dns_server: MakeDNS, smtp_server: MakeServer) -> None:
    dns = dns_server({"example.test": TWO_MX})
    port = free_port(MX1, MX2)
    worse = smtp_server(host=MX1, port=port)
    better = smtp_server(host=MX2, port=port)
    report = await send(["ann@example.test", "bob@Example.TEST"], direct(dns, port))
    assert report.ok, report.failed()
    assert {r.host for r in report} == {"mx2.example.test"}
    assert sorted(rcpts_of(better)) == ["ann@example.test", "bob@Example.TEST"]
    assert worse.sessions_opened == 0
    [attempt] = report[0].tried
    assert (attempt.host, attempt.address, attempt.stage, attempt.code) == (
        "mx2.example.test",
        MX2,
        "message",
        250,
    )


async def test_equal_preferences_spread_and_seed_repeats_the_split(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": EQUAL_MX})
    port = free_port(MX1, MX2)
    one = smtp_server(host=MX1, port=port)
    two = smtp_server(host=MX2, port=port)
    to = [f"user{i:02d}@example.test" for i in range(40)]

    async def split(seed: int) -> list[str | None]:
        # one at a time: each send draws from the rng in recipient order
        report = await send(to, direct(dns, port, rng=random.Random(seed)), concurrency=1)
        assert report.ok, report.failed()
        return [r.host for r in report]

    first = await split(7)
    counts = Counter(first)
    assert set(counts) == {"mx1.example.test", "mx2.example.test"}
    assert len(one.messages) == counts["mx1.example.test"]
    assert len(two.messages) == counts["mx2.example.test"]
    assert await split(7) == first
    assert len(one.messages) + len(two.messages) == 80


# --------------------------------------------------------------------------- falling back


async def test_refused_connection_moves_to_the_next_mx(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)  # nothing listens on MX1
    backup = smtp_server(host=MX2, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert r.status == "delivered" and r.host == "mx2.example.test"
    assert rcpts_of(backup) == ["ann@example.test"]
    assert [(a.host, a.address, a.stage) for a in r.tried] == [
        ("mx1.example.test", MX1, "connect"),
        ("mx2.example.test", MX2, "message"),
    ]
    assert r.tried[0].code is None and "refused" in r.tried[0].message


@pytest.mark.parametrize(
    "greeting", ["421 4.3.2 shutting down", "451 4.3.0 try later", "554 5.7.1 go away"]
)
async def test_bad_greeting_moves_to_the_next_mx(
    dns_server: MakeDNS, smtp_server: MakeServer, fault_server: MakeFault, greeting: str
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    primary = fault_server(host=MX1, port=port, greeting=f"reply:{greeting}")
    backup = smtp_server(host=MX2, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert r.status == "delivered" and r.host == "mx2.example.test"
    assert primary.connections == 1 and primary.messages == []
    assert rcpts_of(backup) == ["ann@example.test"]
    code = int(greeting[:3])
    assert [(a.host, a.stage, a.code) for a in r.tried] == [
        ("mx1.example.test", "greeting", code),
        ("mx2.example.test", "message", 250),
    ]


async def test_4xx_at_rcpt_moves_to_the_next_mx(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    primary = smtp_server(host=MX1, port=port, rcpt_reply="451 4.3.0 greylisted")
    backup = smtp_server(host=MX2, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert r.status == "delivered" and r.host == "mx2.example.test"
    assert primary.messages == [] and primary.sessions_opened == 1
    assert rcpts_of(backup) == ["ann@example.test"]
    assert [(a.stage, a.code) for a in r.tried] == [("rcpt", 451), ("message", 250)]


async def test_550_at_rcpt_is_final(
    dns_server: MakeDNS, smtp_server: MakeServer, fault_server: MakeFault
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    primary = smtp_server(host=MX1, port=port, rcpt_reply="550 5.1.1 no such user")
    backup = fault_server(host=MX2, port=port)
    [r] = await send("nobody@example.test", direct(dns, port))
    assert (r.status, r.stage, r.code, r.enhanced_status) == ("permanent", "rcpt", 550, "5.1.1")
    assert r.host == "mx1.example.test"
    assert len(r.tried) == 1 and r.tried[0].host == "mx1.example.test"
    assert primary.sessions_opened == 1
    assert backup.connections == 0


async def test_5xx_at_mail_is_final(
    dns_server: MakeDNS, smtp_server: MakeServer, fault_server: MakeFault
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    smtp_server(host=MX1, port=port, mail_reply="553 5.7.1 sender rejected")
    backup = fault_server(host=MX2, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert (r.status, r.stage, r.code) == ("permanent", "mail", 553)
    assert backup.connections == 0


async def test_a_transient_failure_keeps_a_later_5xx_greeting_transient(
    dns_server: MakeDNS, fault_server: MakeFault
) -> None:
    # the primary is down for now; a backup refusing at greeting must not bounce the
    # mail for good: a later try may reach the primary
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    backup = fault_server(host=MX2, port=port, greeting="reply:554 5.7.1 backup only")
    [r] = await send("ann@example.test", direct(dns, port))
    assert r.status == "transient"
    assert (r.host, r.stage, r.code) == ("mx2.example.test", "greeting", 554)
    assert [a.stage for a in r.tried] == ["connect", "greeting"]
    assert backup.connections == 1


async def test_every_mx_refusing_at_greeting_is_permanent(
    dns_server: MakeDNS, fault_server: MakeFault
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    for host in (MX1, MX2):
        fault_server(host=host, port=port, greeting="reply:554 5.7.1 blocked")
    [r] = await send("ann@example.test", direct(dns, port))
    assert (r.status, r.host, r.code) == ("permanent", "mx2.example.test", 554)
    assert [(a.host, a.code) for a in r.tried] == [
        ("mx1.example.test", 554),
        ("mx2.example.test", 554),
    ]


async def test_address_cap(dns_server: MakeDNS) -> None:
    hosts = [f"127.0.0.{n}" for n in range(2, 9)]
    dns = dns_server(
        {
            "example.test": """
                @    MX 10 mx1
                @    MX 20 mx2
                mx1  A 127.0.0.2
                mx1  A 127.0.0.3
                mx1  A 127.0.0.4
                mx1  A 127.0.0.5
                mx2  A 127.0.0.6
                mx2  A 127.0.0.7
                mx2  A 127.0.0.8
            """
        }
    )
    port = free_port(*hosts)  # nothing listens on any of them
    [r] = await send("ann@example.test", direct(dns, port, max_addresses=5))
    assert (r.status, r.stage) == ("transient", "connect")
    assert len(r.tried) == 5
    assert [a.host for a in r.tried] == ["mx1.example.test"] * 4 + ["mx2.example.test"]
    assert len({a.address for a in r.tried}) == 5
    assert {a.address for a in r.tried} <= set(hosts)
    assert r.host == "mx2.example.test"


# --------------------------------------------------------------------------- DNS outcomes


async def test_implicit_mx(dns_server: MakeDNS, smtp_server: MakeServer) -> None:
    dns = dns_server({"example.test": "@ A 127.0.0.2"})
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert r.status == "delivered" and r.host == "example.test"
    assert rcpts_of(server) == ["ann@example.test"]
    assert dns.count("example.test.", "MX") == 1


async def test_null_mx_makes_no_connection(dns_server: MakeDNS, fault_server: MakeFault) -> None:
    dns = dns_server({"example.test": "@ MX 0 .\n@ A 127.0.0.2"})
    port = free_port(MX1)
    server = fault_server(host=MX1, port=port)
    [r] = await send("ann@example.test", direct(dns, port))
    assert (r.status, r.stage, r.enhanced_status) == ("permanent", "dns", "5.1.10")
    assert r.tried == () and r.code is None
    assert server.connections == 0


async def test_nxdomain_is_permanent(dns_server: MakeDNS) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    [r] = await send("ann@nosuch.example.test", direct(dns, free_port(MX1)))
    assert (r.status, r.stage, r.enhanced_status) == ("permanent", "dns", "5.1.2")
    assert "NXDOMAIN" in r.message


async def test_silent_dns_is_transient(dns_server: MakeDNS, fault_server: MakeFault) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    dns.mode = "silent"
    port = free_port(MX1)
    server = fault_server(host=MX1, port=port)
    [r] = await send("ann@example.test", direct(dns, port, dns_timeout=1))
    assert (r.status, r.stage, r.enhanced_status) == ("transient", "dns", "4.4.3")
    assert dns.count("example.test.", "MX") >= 1
    assert server.connections == 0


async def test_500_recipients_over_5_domains_ask_each_mx_once(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    domains = [f"d{n}.test" for n in range(5)]
    dns = dns_server(
        {d: "@ MX 10 mx.example.test." for d in domains} | {"example.test": "mx A 127.0.0.2"}
    )
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    to = [f"user{i:03d}@{domains[i % 5]}" for i in range(500)]
    report = await send(to, direct(dns, port), concurrency=50)
    assert report.ok, report.failed()
    assert dns.count(rdtype="MX") <= 5
    assert {dns.count(f"{d}.", "MX") for d in domains} == {1}
    assert sorted(rcpts_of(server)) == sorted(to)


# --------------------------------------------------------------------------- limits and batches


async def test_per_domain_cap(dns_server: MakeDNS, smtp_server: MakeServer) -> None:
    dns = dns_server(
        {"one.test": "@ MX 10 mx\nmx A 127.0.0.2", "two.test": "@ MX 10 mx\nmx A 127.0.0.3"}
    )
    port = free_port(MX1, MX2)
    one = smtp_server(host=MX1, port=port)
    two = smtp_server(host=MX2, port=port)
    to = [f"u{i:02d}@one.test" for i in range(30)] + [f"u{i:02d}@two.test" for i in range(30)]
    report = await send(to, direct(dns, port, per_domain=2), concurrency=40)
    assert report.ok, report.failed()
    assert one.sessions_opened == two.sessions_opened == 30
    assert 1 <= one.max_concurrent_sessions <= 2
    assert 1 <= two.max_concurrent_sessions <= 2


async def test_batch_per_domain_shares_transactions(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    to = [f"user{i:03d}@example.test" for i in range(300)]
    report = await send(to, direct(dns, port, batch_per_domain=True))
    assert report.ok, report.failed()
    assert [r.recipient for r in report] == to
    messages = server.messages
    assert 1 <= len(messages) <= 3
    assert all(len(m.rcpt_tos) <= 100 for m in messages)
    assert sorted(rcpts_of(server)) == to


async def test_batch_452_moves_the_rest_to_a_new_transaction(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port, max_rcpt_per_transaction=50)
    to = [f"user{i:03d}@example.test" for i in range(300)]
    report = await send(to, direct(dns, port, batch_per_domain=True))
    assert report.ok, report.failed()
    assert len(report) == 300 and all(r.code == 250 for r in report)
    received = rcpts_of(server)
    assert sorted(received) == to  # each recipient exactly once
    assert all(len(m.rcpt_tos) <= 50 for m in server.messages)
    assert len(server.messages) == 6
    assert server.sessions_opened <= 3


async def test_batch_452_then_closed_still_one_result_each(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    # The third recipient is refused with 452 (too many recipients), then the end of
    # data gets 421 and the session is over: it cannot go on in a new transaction there,
    # and the 452 is its result, not a missing one.
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.2"})
    port = free_port(MX1)
    server = smtp_server(
        host=MX1,
        port=port,
        max_rcpt_per_transaction=2,
        data_reply="421 4.3.2 shutting down",
    )
    to = ["ann@example.test", "bob@example.test", "cy@example.test"]
    # shaping=None: a 421 would slow the site down and retry, as it should; not the point
    report = await send(to, direct(dns, port, batch_per_domain=True, shaping=None))
    assert [r.recipient for r in report] == to
    by = {r.recipient: r for r in report}
    assert {by[r].code for r in to[:2]} == {421}
    assert (by["cy@example.test"].code, by["cy@example.test"].stage) == (452, "rcpt")
    assert all(r.status == "transient" for r in report)
    assert server.messages == []  # the 421 took nothing


async def test_connected_session_452_then_closed_still_one_result_each(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server(max_rcpt_per_transaction=1, data_reply="421 4.3.2 shutting down")
    host, port = server.address
    relay = asmtp.Relay(host, port, tls="none")
    to = ["ann@example.test", "bob@example.test"]
    async with asmtp.connect(relay, timeout=5) as connected:
        report = await connected.sendmail("sender@client.test", to, b"Subject: hi\r\n\r\nhi\r\n")
    assert [(r.recipient, r.code, r.stage) for r in report] == [
        ("ann@example.test", 421, "message"),
        ("bob@example.test", 452, "rcpt"),
    ]


async def test_batch_mixed_outcomes_one_result_each(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)

    def primary_rcpt(address: str) -> str | None:
        if address.startswith("grey"):
            return "451 4.7.1 greylisted"
        if address.startswith("gone"):
            return "550 5.1.1 no such user"
        return None

    primary = smtp_server(host=MX1, port=port, rcpt_reply=primary_rcpt)
    backup = smtp_server(host=MX2, port=port)
    to = ["ann@example.test", "grey@example.test", "gone@example.test", "bob@example.test"]
    report = await send(to, direct(dns, port, batch_per_domain=True))
    by = {r.recipient: r for r in report}
    assert [r.recipient for r in report] == to
    assert by["ann@example.test"].host == by["bob@example.test"].host == "mx1.example.test"
    assert by["ann@example.test"].ok and by["bob@example.test"].ok
    assert by["grey@example.test"].ok and by["grey@example.test"].host == "mx2.example.test"
    assert len(by["grey@example.test"].tried) == 2
    assert (by["gone@example.test"].status, by["gone@example.test"].code) == ("permanent", 550)
    assert sorted(rcpts_of(primary)) == ["ann@example.test", "bob@example.test"]
    assert rcpts_of(backup) == ["grey@example.test"]


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    return client_ssl_context(ca)


async def tls_closed(*servers: SMTPTestServer) -> None:
    """Let the TLS shutdowns finish before the test's event loop closes.

    Closing a TLS connection only starts the close_notify exchange: the socket under
    it is closed a few loop turns later. Once every server has seen its sessions end,
    the client's side has its answer too; a few more turns let it act on it.
    """
    await until(lambda: not any(s.active_sessions for s in servers))
    for _ in range(10):
        await anyio.sleep(0.01)


async def test_opportunistic_tls_verified(
    dns_server: MakeDNS, smtp_server: MakeServer, ca: trustme.CA, trusting: ssl.SSLContext
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1)
    server = smtp_server(
        host=MX1, port=port, starttls_context=server_ssl_context(ca, "mx1.example.test")
    )
    settings = direct(dns, port, tls="opportunistic", ssl_context=trusting)
    [r] = await send("ann@example.test", settings)
    await tls_closed(server)
    assert r.status == "delivered" and r.tls == "verified"
    [message] = server.messages
    assert message.tls


async def test_opportunistic_tls_wrong_name_still_delivers_unverified(
    dns_server: MakeDNS, smtp_server: MakeServer, ca: trustme.CA, trusting: ssl.SSLContext
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1)
    # valid for the address, not for the MX name: names are what count
    server = smtp_server(
        host=MX1, port=port, starttls_context=server_ssl_context(ca, "other.test", MX1)
    )
    settings = direct(dns, port, tls="opportunistic", ssl_context=trusting)
    [r] = await send("ann@example.test", settings)
    await tls_closed(server)
    assert r.status == "delivered" and r.tls == "unverified"
    assert r.host == "mx1.example.test"
    [message] = server.messages
    assert message.tls
    assert [(a.stage, a.address) for a in r.tried] == [("starttls", MX1), ("message", MX1)]


async def test_opportunistic_without_starttls_is_plaintext(
    dns_server: MakeDNS, smtp_server: MakeServer, trusting: ssl.SSLContext
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    settings = direct(dns, port, tls="opportunistic", ssl_context=trusting)
    [r] = await send("ann@example.test", settings)
    assert r.status == "delivered" and r.tls == "none"
    [message] = server.messages
    assert not message.tls


async def test_starttls_mode_skips_a_bad_certificate(
    dns_server: MakeDNS, smtp_server: MakeServer, ca: trustme.CA, trusting: ssl.SSLContext
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    bad = smtp_server(host=MX1, port=port, starttls_context=server_ssl_context(ca, "wrong.test"))
    good = smtp_server(
        host=MX2, port=port, starttls_context=server_ssl_context(ca, "mx2.example.test")
    )
    settings = direct(dns, port, tls="starttls", ssl_context=trusting)
    [r] = await send("ann@example.test", settings)
    await tls_closed(bad, good)
    assert r.status == "delivered" and r.tls == "verified"
    assert r.host == "mx2.example.test"
    assert bad.messages == []
    assert rcpts_of(good) == ["ann@example.test"]
    assert [(a.host, a.stage) for a in r.tried] == [
        ("mx1.example.test", "starttls"),
        ("mx2.example.test", "message"),
    ]
    assert "certificate" in r.tried[0].message


async def test_starttls_mode_refuses_plaintext(
    dns_server: MakeDNS, smtp_server: MakeServer, trusting: ssl.SSLContext
) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    settings = direct(dns, port, tls="starttls", ssl_context=trusting)
    [r] = await send("ann@example.test", settings)
    assert (r.status, r.stage) == ("transient", "starttls")
    assert server.messages == []


# --------------------------------------------------------------------------- DirectDelivery


MESSAGE = prepare_message(b"Subject: direct\r\n\r\nhello\r\n")


def delivery(dns: DNSServer, port: int, **options: object) -> DirectDelivery:
    # long step timeouts: only the deadline given to deliver() may end a silent session
    return DirectDelivery(direct(dns, port, **options), Timeouts.uniform(30), helo="c.test")


async def test_deadline_stops_the_walk(dns_server: MakeDNS, fault_server: MakeFault) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    primary = fault_server(host=MX1, port=port, greeting="silence")
    backup = fault_server(host=MX2, port=port)
    deadline = anyio.current_time() + 1.0
    [r] = await delivery(dns, port).deliver(
        "s@c.test", ["ann@example.test"], MESSAGE, deadline=deadline
    )
    assert (r.status, r.stage, r.host) == ("transient", "greeting", "mx1.example.test")
    assert "deadline" in r.message
    assert len(r.tried) == 1
    assert primary.connections == 1
    assert backup.connections == 0  # no new address once the deadline has passed


async def test_deadline_while_waiting_for_the_domain_cap(
    dns_server: MakeDNS, fault_server: MakeFault
) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    port = free_port(MX1)
    server = fault_server(host=MX1, port=port, greeting="silence")
    sender = delivery(dns, port, per_domain=1)
    results: dict[str, RecipientResult] = {}

    async def one(rcpt: str, seconds: float) -> None:
        deadline = anyio.current_time() + seconds
        [results[rcpt]] = await sender.deliver("s@c.test", [rcpt], MESSAGE, deadline=deadline)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "first@example.test", 1.5)
        # the first holds the domain's one session before the second asks for it
        assert await until(lambda: server.connections == 1)
        tg.start_soon(one, "second@example.test", 1.0)
    first, second = results["first@example.test"], results["second@example.test"]
    assert (first.status, first.stage, len(first.tried)) == ("transient", "greeting", 1)
    assert second.status == "transient" and second.tried == ()
    assert "per_domain=1" in second.message
    assert server.connections == 1


async def test_extras_reach_the_session_that_delivers(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": PRIMARY_BACKUP})
    port = free_port(MX1, MX2)
    smtp_server(host=MX1, port=port, rcpt_reply="451 4.7.1 greylisted")
    backup = smtp_server(host=MX2, port=port)
    calls: list[list[str]] = []

    async def before_dot(recipients: Sequence[str]) -> None:
        calls.append(list(recipients))

    [r] = await delivery(dns, port).deliver(
        "s@c.test", ["ann@example.test"], MESSAGE, extras=Extras(before_dot=before_dot)
    )
    assert r.ok and r.host == "mx2.example.test"
    assert calls == [["ann@example.test"]]  # the primary never got as far as the dot
    assert rcpts_of(backup) == ["ann@example.test"]


# --------------------------------------------------------------------------- pure decisions


def result(status: str, stage: str, code: int | None = None) -> RecipientResult:
    return RecipientResult("a@example.test", status, code=code, stage=stage)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "stage", "code", "expected"),
    [
        ("transient", "connect", None, True),
        ("transient", "greeting", 421, True),
        ("permanent", "greeting", 554, True),
        ("transient", "ehlo", 421, True),
        ("transient", "starttls", None, True),
        ("transient", "mail", 451, True),
        ("transient", "rcpt", 452, True),
        ("permanent", "mail", 553, False),
        ("permanent", "rcpt", 550, False),
        ("transient", "data", 451, False),
        ("transient", "message", 451, False),
        ("permanent", "message", 554, False),
        ("unknown", "message", None, False),
        ("delivered", "message", 250, False),
    ],
)
def test_next_address_may_help(status: str, stage: str, code: int | None, expected: bool) -> None:
    assert next_address_may_help(result(status, stage, code)) is expected


def test_plan_jobs_one_recipient_per_job() -> None:
    rcpts = ["a@x.test", "b@x.test", "c@y.test"]
    jobs = plan_jobs(rcpts, Direct())
    assert sorted(i for job in jobs for i in job) == [0, 1, 2]
    assert all(len(job) == 1 for job in jobs)


def test_plan_jobs_batches_by_domain_case_blind() -> None:
    rcpts = ["a@x.test", "b@y.test", "c@X.TEST", "d@x.test", "e@y.test"]
    jobs = plan_jobs(rcpts, Direct(batch_per_domain=True, max_rcpts_per_transaction=2))
    assert sorted(i for job in jobs for i in job) == [0, 1, 2, 3, 4]
    assert sorted(map(sorted, jobs)) == [[0, 2], [1, 4], [3]]


def test_plan_jobs_interleaves_domains() -> None:
    # the pool takes jobs in order: one busy domain at the head of the list must not
    # hold every worker waiting for its per-domain cap
    rcpts = [f"u{i}@big.test" for i in range(6)] + ["a@small.test", "b@other.test"]
    jobs = plan_jobs(rcpts, Direct())
    assert sorted(i for job in jobs for i in job) == list(range(8))
    first_three = {rcpts[job[0]].split("@")[1] for job in jobs[:3]}
    assert first_three == {"big.test", "small.test", "other.test"}

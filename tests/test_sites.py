"""Sites and adaptive shaping end to end: many domains served by the same MX host
(the loopback DNS server names one provider host for all of them), a throttling
server there (tests/throttle_server.py: refuses sessions above K with 421, MAILs above
R per second with 451, can suspend), and ``Direct(shaping=...)``. Each test checks
that every recipient has exactly one result and was delivered exactly once; and what
the client did at the provider (peak sessions, refusals, sessions reused). No timing
assertions: counts only."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import asmtp
from asmtp._core.prepared import prepare_message
from asmtp._core.shaping_rules import Rule, Shaping
from asmtp._delivery.direct import DirectDelivery
from asmtp.config import Direct, Timeouts
from dnsserver import DNSServer
from servers import SMTPTestServer, free_port
from throttle_server import ThrottleServer, throttle_server

__all__ = ["throttle_server"]

#: the limiter's waiting runs on anyio: most tests run on asyncio and trio; the two that
#: take a few seconds of sending run on asyncio alone
anyio_too = pytest.mark.anyio

MakeDNS = Callable[..., DNSServer]
MakeServer = Callable[..., SMTPTestServer]
MX, MX_OTHER = "127.0.0.2", "127.0.0.3"

#: a quick test suspension: the built-in 4.7.28 rule pauses for 10 minutes
QUICK_PAUSE = Rule("gmail-unusual-rate", action="pause", enhanced="4.7.28", seconds=1.0)


def provider_zones(domains: int, *, other: int = 0) -> dict[str, str]:
    """``domains`` customer domains on mx.provider.test, ``other`` on mx.other.test."""
    zones = {
        "provider.test": "mx A 127.0.0.2",
        "other.test": "mx A 127.0.0.3",
    }
    for i in range(domains):
        zones[f"d{i}.test"] = "@ MX 10 mx.provider.test."
    for i in range(other):
        zones[f"o{i}.test"] = "@ MX 10 mx.other.test."
    return zones


def shaped(dns: DNSServer, port: int, shaping: Shaping | None, **options: object) -> Direct:
    return Direct(
        dns_servers=[dns.spec],
        port=port,
        tls="none",
        helo="client.asmtp.test",
        rng=random.Random(1),
        dns_timeout=2.0,
        shaping=shaping,
        **options,  # type: ignore[arg-type]
    )


def recipients(count: int, domains: int, prefix: str = "d") -> list[str]:
    return [f"u{i}@{prefix}{i % domains}.test" for i in range(count)]


async def send(to: list[str], settings: Direct, *, concurrency: int = 100) -> asmtp.Report:
    return await asmtp.sendmail(
        to=to,
        from_="sender@client.test",
        subject="shaped",
        body="hello, provider",
        relay=settings,
        concurrency=concurrency,
        timeout=5,
    )


def delivered_once(report: asmtp.Report, server: ThrottleServer, to: list[str]) -> None:
    assert [r.recipient for r in report] == to  # one result each, in order
    assert report.ok, report.failed()[:3]
    assert set(server.received) == set(to)
    assert max(server.received.values()) == 1  # nobody got it twice


@anyio_too
async def test_domains_on_one_host_share_one_site_and_its_limit(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(20))
    port = free_port(MX)
    server = throttle_server(MX, port, max_sessions=4)
    to = recipients(200, 20)
    shaping = Shaping(initial=2, max_concurrency=3)
    report = await send(to, shaped(dns, port, shaping, per_domain=10))
    delivered_once(report, server, to)
    assert {r.site for r in report} == {"mx.provider.test"}
    # 20 domains x per_domain=10 would be 200 sessions; the site allows 3
    assert server.peak <= 3
    assert server.refused_sessions == 0
    # sessions carry on with the next recipient of the site
    assert server.sessions_opened < len(to) / 4


async def test_adapts_to_a_provider_that_refuses_above_k_sessions(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(50))
    port = free_port(MX)
    server = throttle_server(MX, port, max_sessions=4)
    to = recipients(400, 50)
    # grows from 2 until the provider refuses, then stays below what it refused at
    shaping = Shaping(initial=2, max_concurrency=50, slow_start_threshold=50)
    report = await send(to, shaped(dns, port, shaping), concurrency=200)
    delivered_once(report, server, to)
    assert server.peak == 4
    # a few refusals while probing: far fewer than one per session opened
    assert 0 < server.refused_sessions < server.sessions_opened


async def test_learns_the_rate_a_provider_allows(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(10))
    port = free_port(MX)
    server = throttle_server(MX, port, max_sessions=8, max_rate=100)
    to = recipients(200, 10)
    report = await send(to, shaped(dns, port, Shaping(initial=4)), concurrency=100)
    delivered_once(report, server, to)
    # each throttled recipient was tried again at the site: still delivered once
    assert 0 < server.rate_refusals < len(to) / 5


@anyio_too
async def test_a_suspension_stops_new_sessions_until_it_lifts(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(5))
    port = free_port(MX)
    server = throttle_server(MX, port)
    server.suspend(0.5)
    to = recipients(30, 5)
    shaping = Shaping(initial=3, rules=(QUICK_PAUSE,))
    report = await send(to, shaped(dns, port, shaping), concurrency=30)
    delivered_once(report, server, to)
    # the first sessions met the suspension; the site paused (for the rule's 1 s)
    # instead of hammering, so no session came while the provider was suspended
    # beyond those already on their way
    assert 1 <= server.suspended_refusals <= 3
    assert server.sessions_while_suspended <= 3


@anyio_too
async def test_a_stop_rule_fails_the_site_at_once(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(5))
    port = free_port(MX)
    server = throttle_server(MX, port)
    server.suspend(60)
    stop = Rule("blocked", action="stop", text="unusual rate")
    to = recipients(40, 5)
    report = await send(to, shaped(dns, port, Shaping(initial=2, rules=(stop,))))
    assert [r.recipient for r in report] == to
    assert all(r.status != "delivered" for r in report)
    stopped = [r for r in report if "stopped by rule blocked" in r.message]
    assert len(stopped) >= len(to) - 2 and all(r.status == "permanent" for r in stopped)
    assert server.suspended_refusals <= 2  # no more sessions once stopped


@anyio_too
async def test_two_providers_are_two_sites(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(4, other=4))
    port = free_port(MX, MX_OTHER)
    one = throttle_server(MX, port, max_sessions=2)
    two = throttle_server(MX_OTHER, port, max_sessions=2)
    to = recipients(40, 4) + recipients(40, 4, prefix="o")
    shaping = Shaping(initial=2, max_concurrency=2)
    report = await send(to, shaped(dns, port, shaping))
    assert report.ok, report.failed()[:3]
    assert {r.site for r in report} == {"mx.provider.test", "mx.other.test"}
    assert one.peak == 2 and two.peak == 2  # each site its own limit, side by side
    assert one.refused_sessions == two.refused_sessions == 0


@anyio_too
async def test_sessions_are_reused_up_to_the_message_count(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(3))
    port = free_port(MX)
    server = throttle_server(MX, port)
    to = recipients(60, 3)
    shaping = Shaping(initial=1, max_concurrency=1, max_messages_per_connection=10)
    report = await send(to, shaped(dns, port, shaping), concurrency=10)
    delivered_once(report, server, to)
    assert server.sessions_opened == 6  # 60 messages, 10 per connection, one at a time
    assert server.peak == 1


@anyio_too
async def test_mailer_results_name_their_site_and_json_carries_it(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(3))
    port = free_port(MX)
    throttle_server(MX, port)
    to = recipients(9, 3)
    message = prepare_message(b"Subject: x\r\n\r\nhi\r\n")
    async with asmtp.Mailer(
        shaped(dns, port, Shaping(initial=2)), timeout=5, rate="1000/s"
    ) as mailer:
        results = [
            r async for r in mailer.deliver(asmtp.Job(t, message, sender="s@c.test") for t in to)
        ]
    assert sorted(r.recipient for r in results) == sorted(to)
    assert all(r.ok and r.site == "mx.provider.test" for r in results)
    assert results[0].as_dict()["site"] == "mx.provider.test"


@anyio_too
async def test_a_handed_over_session_the_server_closed_is_replaced(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    """A session kept for the site's next recipient that the server closed meanwhile
    costs that recipient nothing: a fresh session delivers it."""
    dns = dns_server(provider_zones(2))
    port = free_port(MX)
    server = smtp_server(host=MX, port=port)
    settings = shaped(dns, port, Shaping(initial=1, max_concurrency=1))
    delivery = DirectDelivery(settings, Timeouts.of(5.0), helo="client.asmtp.test")
    message = prepare_message(b"Subject: x\r\n\r\nhi\r\n")
    site_results: list[asmtp.RecipientResult] = []

    async def one(rcpt: str) -> None:
        site_results.extend(await delivery.deliver("s@c.test", [rcpt], message))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, f"u{i}@d{i % 2}.test")
    assert all(r.ok for r in site_results) and len(site_results) == 6
    assert server.sessions_opened < 6  # handed on


# --------------------------------------------------------------------------- the CLI

SHAPING_FILE = """
initial = 2
max_concurrency = 3

[[rules]]
name = "gmail-unusual-rate"   # the built-in one pauses 10 minutes: 1 s here
enhanced = "4.7.28"
action = "pause"
seconds = 1
"""


def asmtp_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_cli_send_with_a_shaping_file(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer], tmp_path: Path
) -> None:
    dns = dns_server(provider_zones(10))
    port = free_port(MX)
    server = throttle_server(MX, port, max_sessions=3)
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING_FILE)
    rcpts = tmp_path / "rcpts.txt"
    to = recipients(40, 10)
    rcpts.write_text("\n".join(to) + "\n")
    done = asmtp_cli(
        "send", "--from", "s@client.test", "--recipients", str(rcpts), "--subject", "x",
        "--body", "hi", "--dns-server", dns.spec, "--mx-port", str(port), "--tls", "none",
        "--helo", "client.asmtp.test", "--shaping", str(shaping), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(line["recipient"] for line in lines) == sorted(to)
    assert {line["site"] for line in lines} == {"mx.provider.test"}
    assert max(server.received.values()) == 1 and server.peak <= 3
    assert "site mx.provider.test: 40 delivered" in done.stderr


def test_cli_refuses_a_bad_shaping_file(tmp_path: Path) -> None:
    bad = tmp_path / "shaping.toml"
    bad.write_text("initial = 0\n")
    done = asmtp_cli(
        "send", "--from", "s@client.test", "--to", "a@example.test", "--subject", "x",
        "--body", "hi", "--shaping", str(bad),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--shaping" in done.stderr and "initial" in done.stderr
    relay = asmtp_cli(
        "send", "--from", "s@client.test", "--to", "a@example.test", "--relay", "127.0.0.1:1",
        "--body", "hi", "--shaping", "default",
    )  # fmt: skip
    assert relay.returncode == 2 and "only for direct delivery" in relay.stderr


def test_cli_mx_names_the_site(dns_server: MakeDNS) -> None:
    dns = dns_server(provider_zones(2))
    done = asmtp_cli("mx", "d0.test", "d1.test", "--dns-server", dns.spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("one site with every domain on these hosts") == 2
    json_done = asmtp_cli("mx", "d0.test", "--dns-server", dns.spec, "--json")
    assert json.loads(json_done.stdout)["site"] == "mx.provider.test"


@anyio_too
async def test_batches_per_domain_go_through_the_site(
    dns_server: MakeDNS, throttle_server: type[ThrottleServer]
) -> None:
    dns = dns_server(provider_zones(4))
    port = free_port(MX)
    server = throttle_server(MX, port, max_sessions=2)
    to = recipients(80, 4)
    settings = shaped(dns, port, Shaping(initial=2, max_concurrency=2), batch_per_domain=True)
    report = await send(to, settings)
    delivered_once(report, server, to)
    assert server.messages == 4  # one transaction per domain, 20 RCPTs each
    assert server.peak <= 2 and server.refused_sessions == 0

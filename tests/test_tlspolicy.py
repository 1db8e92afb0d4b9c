"""TLS policy for direct delivery, end to end on loopback: the test DNS server serves
the ``_mta-sts`` TXT records and the MX hosts, an HTTPS server (tests/policy_server.py,
a trustme certificate for ``mta-sts.example.test``) serves the policy and counts the
fetches, and aiosmtpd MX hosts present certificates that match their names or not.
Also the pure plan for one host (:func:`asmtp._delivery.tlspolicy.plan_host`)."""

from __future__ import annotations

import doctest
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import trustme

import asmtp
import asmtp._delivery.tlspolicy
from asmtp._core.dane import TLSARecord
from asmtp._core.mtasts import STSPolicy
from asmtp._core.tlsrpt import TLSReportLog
from asmtp._delivery.tlspolicy import DomainPolicy, HostPlan, plan_host, session_fits
from asmtp._io.resolver import TLSAAnswer
from asmtp.config import Direct
from asmtp.errors import InputError
from dnsserver import DNSServer
from policy_server import PolicyServer, policy_server
from servers import SMTPTestServer, client_ssl_context, free_port, server_ssl_context, until

__all__ = ["policy_server"]  # the fixture, used by name

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]
MakePolicy = Callable[..., PolicyServer]

MX1, MX2, WEB = "127.0.0.2", "127.0.0.3", "127.0.0.9"

#: mx1 preferred; the policy names only mx2
ZONE = """
    @         MX 10 mx1
    @         MX 20 mx2
    mx1       A 127.0.0.2
    mx2       A 127.0.0.3
    mta-sts   A 127.0.0.9
    _mta-sts  TXT "v=STSv1; id=20261206a;"
"""


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}"]
    lines += [f"mx: {m}" for m in mx or ("mx2.example.test",)]
    return "\r\n".join([*lines, f"max_age: {max_age}", ""])


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    return client_ssl_context(ca)


def direct(
    dns: DNSServer, port: int, web: PolicyServer | None, trusting: ssl.SSLContext, **options: object
) -> Direct:
    options.setdefault("helo", "client.asmtp.test")
    options.setdefault("rng", random.Random(1))
    options.setdefault("dns_timeout", 2.0)
    return Direct(  # type: ignore[arg-type]
        dns_servers=[dns.spec],
        port=port,
        ssl_context=trusting,
        sts_port=web.port if web is not None else 443,
        **options,
    )


async def send(to: str | list[str], settings: Direct) -> asmtp.Report:
    return await asmtp.sendmail(
        to=to,
        from_="sender@client.test",
        subject="policy",
        body="hello under a TLS policy",
        relay=settings,
        timeout=5,
    )


async def tls_closed(*servers: SMTPTestServer) -> None:
    """Let the TLS shutdowns finish before the test's event loop closes."""
    await until(lambda: not any(s.active_sessions for s in servers))
    for _ in range(10):
        await anyio.sleep(0.01)


def mx(smtp_server: MakeServer, ca: trustme.CA, host: str, port: int, name: str) -> SMTPTestServer:
    return smtp_server(host=host, port=port, starttls_context=server_ssl_context(ca, name))


# --------------------------------------------------------------------------- enforce


async def test_enforce_refuses_the_mx_the_policy_does_not_name(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    ca: trustme.CA,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mx2.example.test"))
    port = free_port(MX1, MX2)
    unnamed = mx(smtp_server, ca, MX1, port, "mx1.example.test")
    named = mx(smtp_server, ca, MX2, port, "mx2.example.test")
    log = TLSReportLog()
    report = await send(
        ["ann@example.test", "bob@example.test"],
        direct(dns, port, web, trusting, tls_report=log),
    )
    await tls_closed(unnamed, named)
    assert report.ok, report.failed()
    for r in report:
        assert (r.host, r.tls, r.tls_policy) == ("mx2.example.test", "sts", "sts")
        assert [(a.host, a.stage) for a in r.tried] == [
            ("mx1.example.test", "starttls"),
            ("mx2.example.test", "message"),
        ]
        assert "MTA-STS policy of example.test (enforce, id 20261206a)" in r.tried[0].message
        assert r.as_dict()["tls_policy"] == "sts"
    assert unnamed.sessions_opened == 0
    assert web.fetches == 1  # two recipients, one fetch
    assert web.hosts_asked == [f"mta-sts.example.test:{web.port}"]
    [rpt] = log.reports("asmtp tests", "mailto:tlsrpt@client.test")
    [entry] = rpt["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["mx-host"] == ["mx2.example.test"]
    assert entry["summary"] == {
        "total-successful-session-count": 2,
        "total-failure-session-count": 2,
    }
    assert {d["result-type"] for d in entry["failure-details"]} == {"validation-failure"}


async def test_enforce_refuses_a_certificate_for_another_name(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    ca: trustme.CA,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "*.example.test"))
    port = free_port(MX1, MX2)
    wrong = mx(smtp_server, ca, MX1, port, "other.test")
    right = mx(smtp_server, ca, MX2, port, "mx2.example.test")
    [r] = await send("ann@example.test", direct(dns, port, web, trusting))
    await tls_closed(wrong, right)
    assert (r.status, r.host, r.tls) == ("delivered", "mx2.example.test", "sts")
    assert wrong.messages == []  # no unverified second try under enforce
    assert [(a.host, a.stage) for a in r.tried] == [
        ("mx1.example.test", "starttls"),
        ("mx2.example.test", "message"),
    ]
    assert "certificate" in r.tried[0].message
    assert "required by the MTA-STS policy of example.test (enforce" in r.tried[0].message


async def test_a_stripped_starttls_on_an_enforce_domain_is_refused(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    trusting: ssl.SSLContext,
) -> None:
    """An attacker in the path removes STARTTLS from the EHLO reply: the MX then looks
    like a server without TLS. Under enforce the mail waits (transient) rather than
    going out in plaintext."""
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mx1.example.test"))
    port = free_port(MX1)
    stripped = smtp_server(host=MX1, port=port)  # no STARTTLS offered
    [r] = await send("ann@example.test", direct(dns, port, web, trusting))
    assert (r.status, r.stage, r.tls, r.tls_policy) == ("transient", "starttls", "none", "sts")
    assert "does not offer STARTTLS" in r.message
    assert "MTA-STS policy of example.test (enforce, id 20261206a)" in r.message
    assert stripped.messages == []
    assert [c for c, _ in stripped.commands if c == "MAIL"] == []


async def test_no_mx_allowed_is_transient_naming_the_policy(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mail.elsewhere.test"))
    port = free_port(MX1, MX2)
    servers = [smtp_server(host=h, port=port) for h in (MX1, MX2)]
    [r] = await send("ann@example.test", direct(dns, port, web, trusting))
    assert (r.status, r.stage, r.tls_policy) == ("transient", "starttls", "sts")
    assert "mx1.example.test is not an MX host the MTA-STS policy of example.test" in r.message
    assert "mail.elsewhere.test" in r.message
    assert "mx2.example.test is not an MX host" in r.tried[1].message
    assert [a.host for a in r.tried] == ["mx1.example.test", "mx2.example.test"]
    assert all(s.sessions_opened == 0 for s in servers)


# --------------------------------------------------------------------------- testing


async def test_testing_mode_delivers_and_reports(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    ca: trustme.CA,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("testing", "mx2.example.test"))
    port = free_port(MX1)
    # mx1: not named by the policy, and its certificate is for another name
    server = mx(smtp_server, ca, MX1, port, "other.test")
    log = TLSReportLog()
    [r] = await send("ann@example.test", direct(dns, port, web, trusting, tls_report=log))
    await tls_closed(server)
    assert (r.status, r.host, r.tls, r.tls_policy) == (
        "delivered",
        "mx1.example.test",
        "unverified",
        "sts-testing",
    )
    assert [m.tls for m in server.messages] == [True]
    [rpt] = log.reports("asmtp tests", "mailto:tlsrpt@client.test")
    [entry] = rpt["policies"]
    assert entry["summary"]["total-failure-session-count"] == 1
    [detail] = entry["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx1.example.test"
    assert detail["receiving-ip"] == MX1


# --------------------------------------------------------------------------- the cache


async def test_policy_cache_on_disk_and_refresh_on_a_new_id(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    ca: trustme.CA,
    trusting: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mx1.example.test"))
    port = free_port(MX1)
    server = mx(smtp_server, ca, MX1, port, "mx1.example.test")
    cache = tmp_path / "sts"
    settings = direct(dns, port, web, trusting, sts_cache=cache)
    for _ in range(3):  # three runs (three sends): one fetch, the disk cache after it
        [r] = await send("ann@example.test", settings)
        assert (r.status, r.tls) == ("delivered", "sts")
    assert web.fetches == 1
    assert [p.name for p in cache.iterdir()] == ["example.test.json"]
    # the domain publishes a new policy: the TXT id changes, the next run fetches it
    web.policy = policy("enforce", "mx9.example.test")
    dns.add_zone("example.test", ZONE.replace("id=20261206a", "id=20261207b"))
    [r] = await send("ann@example.test", settings)
    assert web.fetches == 2
    assert (r.status, r.stage) == ("transient", "starttls")
    assert "id 20261207b" in r.message
    await tls_closed(server)


async def test_without_a_disk_cache_each_run_fetches_and_a_mailer_remembers(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    ca: trustme.CA,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mx1.example.test"))
    port = free_port(MX1)
    server = mx(smtp_server, ca, MX1, port, "mx1.example.test")
    settings = direct(dns, port, web, trusting)
    for _ in range(2):
        [r] = await send("ann@example.test", settings)
        assert r.tls == "sts"
    assert web.fetches == 2
    async with asmtp.Mailer(relay=settings, timeout=5) as mailer:
        for _ in range(3):
            result = await mailer.send(
                asmtp.build_message(
                    from_="sender@client.test", to="ann@example.test", subject="s", body="b"
                )
            )
            assert result.ok and result[0].tls == "sts"
    assert web.fetches == 3
    await tls_closed(server)


async def test_no_txt_record_means_no_fetch(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE.replace('_mta-sts  TXT "v=STSv1; id=20261206a;"', "")})
    web = policy_server("example.test", policy("enforce", "mx9.example.test"))
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    [r] = await send("ann@example.test", direct(dns, port, web, trusting))
    assert (r.status, r.tls, r.tls_policy) == ("delivered", "none", "opportunistic")
    assert web.fetches == 0
    assert dns.count("_mta-sts.example.test.", "TXT") == 1
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ({"status": 301, "location": "https://evil.test/policy"}, "sts-policy-fetch-error"),
        ({"content_type": "text/html"}, "sts-policy-fetch-error"),
        ({"policy": "version: STSv1\nmode: enforce\n"}, "sts-policy-invalid"),
        ({"names": ("other.test",)}, "sts-webpki-invalid"),
    ],
)
async def test_a_policy_that_cannot_be_had_means_none_and_is_reported(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    trusting: ssl.SSLContext,
    change: dict[str, object],
    kind: str,
) -> None:
    dns = dns_server({"example.test": ZONE})
    change = dict(change)  # the parameter is shared by the asyncio and trio runs
    names = change.pop("names", ())
    web = policy_server(
        "example.test",
        str(change.pop("policy", policy("enforce", "mx9.example.test"))),
        names=names,
    )
    for attribute, value in change.items():
        setattr(web, attribute, value)
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    log = TLSReportLog()
    [r] = await send("ann@example.test", direct(dns, port, web, trusting, tls_report=log))
    # RFC 8461 section 5: no valid policy and none cached: as if there were none
    assert (r.status, r.tls_policy) == ("delivered", "opportunistic")
    assert len(server.messages) == 1
    [rpt] = log.reports("asmtp tests", "mailto:tlsrpt@client.test")
    [entry] = rpt["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert [d["result-type"] for d in entry["failure-details"]] == [kind]


async def test_the_policy_map_overrides_the_level(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    trusting: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ZONE})
    web = policy_server("example.test", policy("enforce", "mx9.example.test"))
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    settings = direct(dns, port, web, trusting, tls_policy={"example.test": "may"})
    [r] = await send("ann@example.test", settings)
    assert (r.status, r.tls_policy) == ("delivered", "opportunistic")
    assert web.fetches == 0 and dns.count("_mta-sts.example.test.") == 0
    assert len(server.messages) == 1


# --------------------------------------------------------------------------- pure


STS = STSPolicy("enforce", ("mx.example.org",), 60)
EE = TLSARecord(3, 1, 1, b"x")


@pytest.mark.parametrize(
    ("domain", "host", "tlsa", "expected"),
    [
        (DomainPolicy("example.org", "none"), "mx", None, (True, "none", "none", False)),
        (
            DomainPolicy("example.org", "opportunistic", STS, "a"),
            "x",
            None,
            (True, "opportunistic", "opportunistic", True),
        ),
        (
            DomainPolicy("example.org", "policy", STS, "a"),
            "evil.test",
            None,
            (False, "sts", "opportunistic", False),
        ),
        (
            DomainPolicy("example.org", "policy", STS, "a"),
            "mx.example.org",
            None,
            (True, "sts", "starttls", False),
        ),
        (
            DomainPolicy(
                "example.org", "policy", STSPolicy("testing", ("mx.example.org",), 60), "a"
            ),
            "evil.test",
            None,
            (True, "sts-testing", "opportunistic", True),
        ),
        (
            DomainPolicy("example.org", "policy", STS, "a"),
            "evil.test",  # DANE first: the STS mx list does not count for a DANE host
            TLSAAnswer((EE,), True),
            (True, "dane", "starttls", False),
        ),
        (
            DomainPolicy("example.org", "policy"),
            "mx.example.org",
            TLSAAnswer((EE,), False),  # not validated: not DANE
            (True, "opportunistic", "opportunistic", True),
        ),
        (
            DomainPolicy("example.org", "dane"),
            "mx.example.org",
            TLSAAnswer(failure="SERVFAIL"),
            (False, "dane", "opportunistic", False),
        ),
    ],
)
def test_plan_host(
    domain: DomainPolicy, host: str, tlsa: TLSAAnswer | None, expected: tuple[object, ...]
) -> None:
    plan = plan_host(domain, host, tlsa)
    assert (plan.use, plan.policy, plan.tls, plan.fallback) == expected
    assert bool(plan.reason) == (not plan.use)


def test_levels_need_what_they_use() -> None:
    with pytest.raises(InputError, match="trust_ad=True"):
        Direct(tls="dane")
    with pytest.raises(InputError, match=r"tls_policy level of x\.test"):
        Direct(tls_policy={"x.test": "maybe"})
    assert Direct().tls == "policy"
    assert Direct(tls_policy={"X.Test.": "secure"}).level_for("x.test") == "starttls"
    assert Direct(tls_policy={".x.test": "none"}).level_for("a.x.test") == "none"
    assert Direct(tls_policy={".x.test": "none"}).level_for("x.test") == "policy"


# --------------------------------------------------------------------------- reused sessions


async def test_a_session_kept_for_one_domain_does_not_carry_a_stricter_domains_mail(
    dns_server: MakeDNS, smtp_server: MakeServer, trusting: ssl.SSLContext
) -> None:
    """With shaping, domains on the same MX host share a site and its kept sessions:
    the plaintext session opened for plain.test (the MX offers no STARTTLS) must not
    take strict.test's mail (its policy map entry asks for verified TLS)."""
    from asmtp._core.shaping_rules import Shaping

    shared = "@ MX 10 mx.provider.test."
    dns = dns_server(
        {"provider.test": "mx A 127.0.0.2", "plain.test": shared, "strict.test": shared}
    )
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)  # no STARTTLS
    settings = direct(
        dns,
        port,
        None,
        trusting,
        tls="opportunistic",
        tls_policy={"strict.test": "starttls"},
        shaping=Shaping(initial=1),
    )
    report = await asmtp.sendmail(
        to=["ann@plain.test", "bob@plain.test", "cat@strict.test"],
        from_="sender@client.test",
        subject="shared site",
        body="hello",
        relay=settings,
        concurrency=1,
        timeout=5,
    )
    plain1, plain2, strict = report
    assert (plain1.status, plain1.tls) == ("delivered", "none")
    assert (plain2.status, plain2.tls) == ("delivered", "none")
    assert (strict.status, strict.stage, strict.tls_policy) == ("transient", "starttls", "starttls")
    assert "does not offer STARTTLS" in strict.message
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        "ann@plain.test",
        "bob@plain.test",
    ]


@pytest.mark.parametrize(
    ("plan", "tls", "requiretls", "fits"),
    [
        (HostPlan(True, "opportunistic"), "none", False, True),
        (HostPlan(True, "opportunistic"), "unverified", True, False),
        (HostPlan(True, "opportunistic"), "verified", True, True),
        (HostPlan(True, "sts", tls="starttls"), "unverified", False, False),
        (HostPlan(True, "sts", tls="starttls"), "verified", False, True),
        (HostPlan(True, "dane", tls="starttls", check="dane"), "verified", False, False),
        (HostPlan(True, "dane", tls="starttls", check="dane"), "dane", False, True),
        (HostPlan(True, "dane", tls="starttls", check="none"), "unverified", False, True),
        (HostPlan(True, "dane", tls="starttls", check="none"), "none", False, False),
        (HostPlan(False, "sts", reason="not named"), "verified", False, False),
    ],
)
def test_session_fits(plan: HostPlan, tls: str, requiretls: bool, fits: bool) -> None:
    assert session_fits(plan, tls, requiretls=requiretls) is fits


def test_doctests() -> None:
    result = doctest.testmod(asmtp._delivery.tlspolicy)
    assert result.attempted > 0 and result.failed == 0

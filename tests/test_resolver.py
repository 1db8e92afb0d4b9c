"""MX resolution against a real authoritative DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter
from collections.abc import Callable

import anyio
import pytest

from asmtp._io.resolver import MXHost, MXResolver, _parse_server, resolve_mx
from asmtp.errors import (
    InputError,
    NoAddressError,
    NoSuchDomainError,
    NullMXError,
    ResolveError,
    TemporaryResolveError,
)
from dnsserver import DNSServer, dns_server  # noqa: F401

MakeServer = Callable[..., DNSServer]

ZONES = {
    "example.test": """
        @        MX 20 mx2
        @        MX 10 mx1
        @        MX 30 mx3
        mx1      A 127.0.0.11
        mx1      AAAA ::1
        mx2      A 127.0.0.12
        mx2      A 127.0.0.13
        mx3      AAAA ::1
        mx       A 127.0.0.14
    """,
    "equal.test": """
        @        MX 10 a
        @        MX 10 b
        @        MX 20 c
        a        A 127.0.0.21
        b        A 127.0.0.22
        c        A 127.0.0.23
    """,
    "implicit.test": """
        @        A 127.0.0.31
        @        AAAA ::1
    """,
    "null.test": """
        @        MX 0 .
    """,
    "skip.test": """
        @        MX 5 gone
        @        MX 10 bare
        @        MX 20 good
        bare     TXT "exists, no address"
        good     A 127.0.0.41
    """,
    "noaddr.test": """
        @        MX 10 bare
        @        MX 20 gone
        bare     TXT "exists, no address"
    """,
    "bare.test": """
        @        TXT "no MX, no address"
    """,
    "cname.test": """
        @        MX 10 alias
        alias    CNAME real
        real     A 127.0.0.51
        mail     CNAME @
        other    CNAME implicit.test.
    """,
    "xn--bcher-kva.test": """
        @        MX 10 mx
        mx       A 127.0.0.61
    """,
    "shared.test": """
        @        MX 10 mx.example.test.
        one      MX 10 mx.example.test.
        two      MX 10 mx.example.test.
    """,
    "zero.test": """
        @    0   MX 10 mx
        mx   0   A 127.0.0.71
    """,
    "tempfail.test": """
        @        MX 10 mx1
        @        MX 20 mx2
        mx1      A 127.0.0.81
        mx2      A 127.0.0.82
    """,
}


@pytest.fixture
def server(dns_server: MakeServer) -> DNSServer:  # noqa: F811
    return dns_server(ZONES)


@pytest.fixture
def resolver(server: DNSServer) -> MXResolver:
    return MXResolver([server.spec], timeout=2.0, rng=random.Random(0))


async def test_hosts_in_preference_order_with_a_then_aaaa(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("example.test")
    assert [(h.name, h.preference) for h in hosts] == [
        ("mx1.example.test", 10),
        ("mx2.example.test", 20),
        ("mx3.example.test", 30),
    ]
    assert hosts[0].addresses == ("127.0.0.11", "::1")
    # two A records: in the order the server gave them
    assert sorted(hosts[1].addresses) == ["127.0.0.12", "127.0.0.13"]
    assert hosts[2].addresses == ("::1",)


async def test_trailing_dot_and_case_do_not_matter(resolver: MXResolver) -> None:
    plain = await resolver.resolve("example.test")
    assert await resolver.resolve("Example.TEST.") == plain


async def test_equal_preferences_spread_over_both_hosts(
    resolver: MXResolver, server: DNSServer
) -> None:
    firsts: Counter[str] = Counter()
    for _ in range(200):
        hosts = await resolver.resolve("equal.test")
        assert [h.preference for h in hosts] == [10, 10, 20]
        assert {h.name for h in hosts[:2]} == {"a.equal.test", "b.equal.test"}
        assert hosts[2].name == "c.equal.test"
        firsts[hosts[0].name] += 1
    assert firsts["a.equal.test"] >= 50
    assert firsts["b.equal.test"] >= 50
    # shuffled on every call, from one cached answer
    assert server.count("equal.test", "MX") == 1


async def test_same_seed_same_order(server: DNSServer) -> None:
    async def orders(seed: int) -> list[list[str]]:
        resolver = MXResolver([server.spec], timeout=2.0, rng=random.Random(seed))
        return [[h.name for h in await resolver.resolve("equal.test")] for _ in range(30)]

    first = await orders(7)
    assert first == await orders(7)
    assert len({tuple(order) for order in first}) == 2  # both orders occur


async def test_implicit_mx_from_a_and_aaaa(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("implicit.test")
    assert hosts == [MXHost("implicit.test", 0, ("127.0.0.31", "::1"))]


async def test_null_mx_is_permanent(resolver: MXResolver) -> None:
    with pytest.raises(NullMXError) as info:
        await resolver.resolve("null.test")
    err = info.value
    assert err.permanent is True
    assert err.enhanced_status == "5.1.10"
    assert err.domain == "null.test"
    assert err.kind == "null_mx"
    assert err.stage == "dns"
    assert "null MX" in str(err)


async def test_nxdomain_is_permanent(resolver: MXResolver) -> None:
    with pytest.raises(NoSuchDomainError) as info:
        await resolver.resolve("nowhere.example.test")
    err = info.value
    assert err.permanent is True
    assert err.enhanced_status == "5.1.2"
    assert str(err) == "nowhere.example.test: no such domain (NXDOMAIN)"


async def test_silent_server_is_temporary_after_timeout(server: DNSServer) -> None:
    server.mode = "silent"
    resolver = MXResolver([server.spec], timeout=1.0)
    with pytest.raises(TemporaryResolveError) as info:
        await resolver.resolve("example.test")
    err = info.value
    assert err.permanent is False
    assert err.enhanced_status == "4.4.3"
    assert "within 1 s" in str(err)
    assert server.count("example.test", "MX") >= 1


async def test_servfail_is_temporary(resolver: MXResolver, server: DNSServer) -> None:
    server.mode = "servfail"
    with pytest.raises(TemporaryResolveError) as info:
        await resolver.resolve("example.test")
    assert info.value.permanent is False
    assert "SERVFAIL" in str(info.value)


async def test_no_server_listening_is_temporary() -> None:
    # a loopback port nobody listens on: no answer within the timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolver = MXResolver([f"127.0.0.1:{port}"], timeout=1.0)
    with pytest.raises(TemporaryResolveError):
        await resolver.resolve("example.test")


async def test_next_server_asked_after_servfail(dns_server: MakeServer) -> None:  # noqa: F811
    failing = dns_server(ZONES)
    failing.mode = "servfail"
    working = dns_server(ZONES)
    resolver = MXResolver([failing.spec, working.spec], timeout=2.0)
    hosts = await resolver.resolve("implicit.test")
    assert hosts[0].addresses == ("127.0.0.31", "::1")
    assert working.count("implicit.test", "MX") == 1


async def test_host_without_address_skipped(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("skip.test")
    assert hosts == [MXHost("good.skip.test", 20, ("127.0.0.41",))]


async def test_all_hosts_without_address(resolver: MXResolver) -> None:
    with pytest.raises(NoAddressError) as info:
        await resolver.resolve("noaddr.test")
    err = info.value
    assert err.permanent is True
    assert err.enhanced_status == "5.1.2"
    assert "bare.noaddr.test" in str(err)
    assert "gone.noaddr.test" in str(err)


async def test_no_mx_and_no_address(resolver: MXResolver) -> None:
    with pytest.raises(NoAddressError) as info:
        await resolver.resolve("bare.test")
    assert "no MX record and no A/AAAA address" in str(info.value)


async def test_address_lookups_failing_is_temporary(
    resolver: MXResolver, server: DNSServer
) -> None:
    server.set_name_mode("mx1.tempfail.test", "servfail")
    server.set_name_mode("mx2.tempfail.test", "servfail")
    with pytest.raises(TemporaryResolveError) as info:
        await resolver.resolve("tempfail.test")
    assert "mx1.tempfail.test" in str(info.value)
    assert info.value.permanent is False


async def test_host_with_failed_lookup_left_out(resolver: MXResolver, server: DNSServer) -> None:
    server.set_name_mode("mx1.tempfail.test", "servfail")
    hosts = await resolver.resolve("tempfail.test")
    assert hosts == [MXHost("mx2.tempfail.test", 20, ("127.0.0.82",))]


async def test_cname_to_mx_host_followed(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("cname.test")
    assert hosts == [MXHost("alias.cname.test", 10, ("127.0.0.51",))]


async def test_domain_cname_followed_for_mx(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("mail.cname.test")
    assert hosts == [MXHost("alias.cname.test", 10, ("127.0.0.51",))]


async def test_domain_cname_across_zones_to_implicit_mx(resolver: MXResolver) -> None:
    hosts = await resolver.resolve("other.cname.test")
    assert hosts == [MXHost("other.cname.test", 0, ("127.0.0.31", "::1"))]


async def test_idn_domain_resolved_by_punycode(resolver: MXResolver, server: DNSServer) -> None:
    hosts = await resolver.resolve("bücher.test")
    assert hosts == [MXHost("mx.xn--bcher-kva.test", 10, ("127.0.0.61",))]
    assert server.count("xn--bcher-kva.test", "MX") == 1


@pytest.mark.parametrize("domain", ["a..b.test", "with space.test", "", ".", "[300.1.1.1]"])
async def test_invalid_domain(resolver: MXResolver, server: DNSServer, domain: str) -> None:
    with pytest.raises(NoSuchDomainError) as info:
        await resolver.resolve(domain)
    assert "not a valid domain name" in str(info.value)
    assert info.value.permanent is True
    assert server.count() == 0


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[127.0.0.1]", "127.0.0.1"), ("[IPv6:0:0::1]", "::1"), ("[ipv6:::1]", "::1")],
)
async def test_address_literal_needs_no_dns(
    resolver: MXResolver, server: DNSServer, literal: str, address: str
) -> None:
    assert await resolver.resolve(literal) == [MXHost(address, 0, (address,))]
    assert server.count() == 0


async def test_second_resolve_served_from_cache(resolver: MXResolver, server: DNSServer) -> None:
    first = await resolver.resolve("example.test")
    queries = len(server.queries)
    assert queries == 7  # MX, then A and AAAA of three hosts
    assert await resolver.resolve("example.test") == first
    assert len(server.queries) == queries


async def test_zero_ttl_not_cached(resolver: MXResolver, server: DNSServer) -> None:
    await resolver.resolve("zero.test")
    await resolver.resolve("zero.test")
    assert server.count("zero.test", "MX") == 2
    assert server.count("mx.zero.test", "A") == 2


async def test_clear_cache_asks_again(resolver: MXResolver, server: DNSServer) -> None:
    await resolver.resolve("implicit.test")
    resolver.clear_cache()
    await resolver.resolve("implicit.test")
    assert server.count("implicit.test", "MX") == 2


@pytest.mark.parametrize(
    ("domain", "error"),
    [("nowhere.example.test", NoSuchDomainError), ("null.test", NullMXError)],
)
async def test_negative_answers_cached(
    resolver: MXResolver, server: DNSServer, domain: str, error: type[ResolveError]
) -> None:
    for _ in range(3):
        with pytest.raises(error):
            await resolver.resolve(domain)
    assert server.count(domain, "MX") == 1


async def test_temporary_failure_not_cached(resolver: MXResolver, server: DNSServer) -> None:
    server.mode = "servfail"
    with pytest.raises(TemporaryResolveError):
        await resolver.resolve("implicit.test")
    server.mode = "normal"
    assert (await resolver.resolve("implicit.test"))[0].name == "implicit.test"
    assert server.count("implicit.test", "MX") == 2


async def test_mx_host_shared_by_domains_looked_up_once(
    resolver: MXResolver, server: DNSServer
) -> None:
    for domain in ("shared.test", "one.shared.test", "two.shared.test"):
        assert await resolver.resolve(domain) == [MXHost("mx.example.test", 10, ("127.0.0.14",))]
    assert server.count("mx.example.test", "A") == 1


async def test_concurrent_resolves_share_one_query(resolver: MXResolver, server: DNSServer) -> None:
    results = await asyncio.gather(*(resolver.resolve("example.test") for _ in range(50)))
    assert all(hosts == results[0] for hosts in results)
    assert len(results[0]) == 3
    assert server.count("example.test", "MX") == 1
    assert server.count("mx1.example.test", "A") == 1
    assert server.count("mx1.example.test", "AAAA") == 1


async def test_many_lookups_over_few_domains(server: DNSServer) -> None:
    resolver = MXResolver([server.spec], timeout=2.0)
    domains = ["example.test", "equal.test", "implicit.test", "skip.test", "cname.test"]
    answers: Counter[str] = Counter()

    async def one(domain: str) -> None:
        hosts = await resolver.resolve(domain)
        assert hosts
        answers[domain] += 1

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(one, domains[i % 5])
    assert sum(answers.values()) == 500
    assert server.count(rdtype="MX") == 5


async def _held(server: DNSServer, count: int) -> None:
    """Wait (up to 5 s) until the server holds ``count`` queries unanswered."""
    assert await anyio.to_thread.run_sync(server.wait_held, count, 5.0)


async def test_failure_delivered_to_all_waiters(resolver: MXResolver, server: DNSServer) -> None:
    server.mode = "hold"
    tasks = [asyncio.create_task(resolver.resolve("example.test")) for _ in range(10)]
    await _held(server, 1)
    await asyncio.sleep(0)
    server.release("servfail")
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TemporaryResolveError) for r in results)
    assert len({id(r) for r in results}) == 10  # each waiter gets its own exception
    assert server.count("example.test", "MX", distinct=True) == 1


async def test_cancelled_asker_does_not_break_waiters(
    resolver: MXResolver, server: DNSServer
) -> None:
    server.mode = "hold"
    asker = asyncio.create_task(resolver.resolve("example.test"))
    await _held(server, 1)
    waiters = [asyncio.create_task(resolver.resolve("example.test")) for _ in range(5)]
    await asyncio.sleep(0)  # the waiters join the query in flight
    asker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asker
    # one waiter asks again; its query is held too
    await _held(server, 2)
    server.release()
    results = await asyncio.gather(*waiters)
    assert all(hosts[0].name == "mx1.example.test" for hosts in results)
    assert server.count("example.test", "MX", distinct=True) == 2


async def test_cancelled_waiter_does_not_break_others(
    resolver: MXResolver, server: DNSServer
) -> None:
    server.mode = "hold"
    tasks = [asyncio.create_task(resolver.resolve("example.test")) for _ in range(4)]
    await _held(server, 1)
    tasks[2].cancel()
    server.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    for i in (0, 1, 3):
        hosts = results[i]
        assert isinstance(hosts, list)
        assert hosts[0].name == "mx1.example.test"
    assert server.count("example.test", "MX", distinct=True) == 1


async def test_resolve_mx_convenience(server: DNSServer) -> None:
    hosts = await resolve_mx("implicit.test", dns_servers=[server.spec], timeout=2.0)
    assert hosts == [MXHost("implicit.test", 0, ("127.0.0.31", "::1"))]


async def test_resolve_mx_address_literal_with_default_resolver() -> None:
    # the default resolver reads resolv.conf; an address literal asks no server
    assert await resolve_mx("[127.0.0.1]") == [MXHost("127.0.0.1", 0, ("127.0.0.1",))]


async def test_ipv6_loopback_server(dns_server: MakeServer) -> None:  # noqa: F811
    try:
        server = dns_server(ZONES, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert server.spec.startswith("[::1]:")
    resolver = MXResolver([server.spec], timeout=2.0)
    assert (await resolver.resolve("implicit.test"))[0].addresses == ("127.0.0.31", "::1")


@pytest.mark.parametrize(
    "servers",
    [["nameserver"], ["127.0.0.1:99999"], ["[::1"], [], "127.0.0.1"],
)
def test_bad_dns_servers(servers: list[str]) -> None:
    with pytest.raises(InputError):
        MXResolver(servers)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_dns_server_specs(spec: str, expected: tuple[str, int]) -> None:
    assert _parse_server(spec) == expected


def test_bad_timeout() -> None:
    with pytest.raises(InputError):
        MXResolver(["127.0.0.1"], timeout=0)


def test_one_process_resolves_on_asyncio_then_trio(server: DNSServer) -> None:
    # dnspython picks its default async backend once per process; asmtp asks the running
    # loop on each query, so a trio lookup after an asyncio one does not fail.
    for backend in ("asyncio", "trio", "asyncio"):
        lookup = MXResolver([server.spec], timeout=2.0).resolve
        hosts = anyio.run(lookup, "example.test", backend=backend)
        assert [h.name for h in hosts] == [f"mx{n}.example.test" for n in (1, 2, 3)]

"""Where to deliver mail for a domain: MX resolution (RFC 5321 section 5.1, RFC 7505).

This module owns every DNS question asmtp asks. It turns a recipient domain into an
ordered list of :class:`MXHost` (lowest preference first, equal preferences shuffled on
each call), handles the implicit MX, the null MX and address literals, and classifies
every DNS failure as one :class:`~asmtp.errors.ResolveError` subclass, permanent or not.

Each (name, type) question is cached for its TTL (negative answers for their SOA minimum)
and asked at most once at a time: concurrent callers share the query in flight, so a
thousand recipients at one domain make one MX query. Layer 2: dnspython's async resolver
does the wire work; anyio primitives keep it usable under asyncio and trio.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import anyio
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver
import dns.rrset

from .._core.dane import TLSARecord
from ..errors import (
    InputError,
    NoAddressError,
    NoSuchDomainError,
    NullMXError,
    TemporaryResolveError,
)

__all__ = ["MXHost", "MXResolver", "TLSAAnswer", "resolve_mx"]

#: how long a negative answer without an SOA record is cached, in seconds
_NEGATIVE_TTL_DEFAULT = 60.0
#: RFC 2308 section 5: negative answers should not be cached longer than this
_NEGATIVE_TTL_MAX = 3 * 3600.0
#: cap on positive TTLs, so a long-lived sender notices moved mail exchangers
_TTL_MAX = 86400.0
#: cache entries kept before expired ones are purged and the oldest dropped
_CACHE_LIMIT = 10_000

_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_MX = dns.rdatatype.MX
_SOA = dns.rdatatype.SOA
_TXT = dns.rdatatype.TXT
_TLSA = dns.rdatatype.TLSA

_Key = tuple[dns.name.Name, dns.rdatatype.RdataType]

# RFC 1035 section 2.3.1 letters, digits and hyphens (and "_", seen in the wild)
_LDH_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
# "IP" / "IP:PORT" / "[IPv6]" / "[IPv6]:PORT"; a bare IPv6 address has no port
_SERVER_SPEC = re.compile(
    r"\[(?P<v6>[^\]]+)\](:(?P<v6port>\d+))?|(?P<v4>[0-9.]+)(:(?P<v4port>\d+))?"
)


@dataclass(frozen=True, slots=True)
class MXHost:
    """One mail exchanger of a domain.

    ``name`` is ASCII (IDNA), without the trailing dot; ``addresses`` lists the host's
    A addresses, then its AAAA addresses. The implicit MX of a domain with no MX record
    has the domain's own name and preference 0.

    >>> MXHost("mx1.example.com", 10, ("192.0.2.1", "2001:db8::1"))
    MXHost(name='mx1.example.com', preference=10, addresses=('192.0.2.1', '2001:db8::1'))
    """

    name: str
    preference: int
    addresses: tuple[str, ...]


class _Status(enum.Enum):
    ANSWER = "answer"
    NODATA = "nodata"  # NOERROR, no record of the type asked
    NXDOMAIN = "nxdomain"
    FAILED = "failed"  # timeout, SERVFAIL, no server answering: temporary


@dataclass(frozen=True, slots=True)
class _Lookup:
    """The outcome of one DNS question, as cached and shared with concurrent askers."""

    status: _Status
    rrset: dns.rrset.RRset | None = None
    ttl: float = 0.0
    reason: str = ""
    #: the answer came with the AD bit from a resolver trusted to validate DNSSEC
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class TLSAAnswer:
    """The TLSA records of ``_PORT._tcp.HOST`` (RFC 7672 section 2.2): ``records``
    (empty: none published), whether the answer is DNSSEC-validated
    (``authenticated``: the AD bit of a trusted resolver; also for "none published"),
    and ``failure``, the reason when the lookup failed (a validating resolver answers
    SERVFAIL for a forged answer: such a host must not be used)."""

    records: tuple[TLSARecord, ...] = ()
    authenticated: bool = False
    failure: str | None = None


@dataclass(slots=True)
class _Flight:
    """A question being asked now; waiters read ``result`` once ``done`` is set.

    ``result`` stays None when the asking task was cancelled: a waiter then asks again.
    """

    done: anyio.Event
    result: _Lookup | None = None


class MXResolver:
    """Resolves recipient domains to their mail exchangers, with a cache.

    ``dns_servers`` lists the servers to ask, each ``"IP"`` or ``"IP:PORT"`` (IPv6 as
    ``"[::1]:5353"``); None reads the system's ``/etc/resolv.conf``. ``trust_ad``: those
    servers validate DNSSEC and the path to them is trusted (a local unbound): queries
    ask for the AD bit and answers carrying it count as authenticated (DANE needs that).
    ``timeout`` is the lifetime of one DNS query in seconds (the MX query and then the
    address queries each get this long). ``rng`` orders mail exchangers of equal
    preference (RFC 5321 section 5.1); pass a seeded :class:`random.Random` for a
    reproducible order.

    One resolver is meant to live as long as the sender: its cache and its sharing of
    queries in flight work across all the recipients it resolves.
    """

    def __init__(
        self,
        dns_servers: Sequence[str] | None = None,
        timeout: float = 5.0,
        rng: random.Random | None = None,
        *,
        trust_ad: bool = False,
    ) -> None:
        if not timeout > 0:
            raise InputError(f"DNS timeout must be a positive number of seconds, not {timeout!r}")
        if dns_servers is None:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as exc:
                raise InputError(
                    "no DNS servers in the system configuration; pass dns_servers"
                ) from exc
        else:
            if isinstance(dns_servers, str):
                raise InputError("dns_servers must be a sequence of strings, not one string")
            servers = [_parse_server(spec) for spec in dns_servers]
            if not servers:
                raise InputError("dns_servers is empty")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in servers
            ]
        resolver.lifetime = timeout
        if trust_ad:
            # RFC 6840 section 5.7: AD in a query asks the resolver to say whether it
            # validated the answer, without the DNSSEC records themselves (no DO).
            resolver.flags = dns.flags.RD | dns.flags.AD
        self.trust_ad = trust_ad
        self._resolver = resolver
        self._timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._cache: dict[_Key, tuple[float, _Lookup]] = {}
        self._in_flight: dict[_Key, _Flight] = {}

    @property
    def timeout(self) -> float:
        """The lifetime of one DNS query, in seconds."""
        return self._timeout

    def clear_cache(self) -> None:
        """Forget every cached answer (queries in flight are not affected)."""
        self._cache.clear()

    async def resolve(self, domain: str) -> list[MXHost]:
        """Return the mail exchangers of ``domain``, most preferred first.

        ``domain`` may be Unicode (converted with IDNA 2008 / UTS 46), may end in a dot,
        or may be an address literal (``"[192.0.2.1]"``, ``"[IPv6:2001:db8::1]"``), which
        is returned as the one host without any DNS query. Hosts without an address are
        left out.

        Raises :class:`~asmtp.errors.NoSuchDomainError` (NXDOMAIN or not a domain name),
        :class:`~asmtp.errors.NullMXError` (RFC 7505), :class:`~asmtp.errors.NoAddressError`
        (no exchanger has an address) or :class:`~asmtp.errors.TemporaryResolveError`
        (timeout, SERVFAIL, no server answering).
        """
        literal = _address_literal(domain)
        if literal is not None:
            return [MXHost(literal, 0, (literal,))]
        name = _domain_name(domain)
        shown = domain.rstrip(".") or domain

        mx = await self._lookup(name, _MX)
        if mx.status is _Status.NXDOMAIN:
            raise NoSuchDomainError(
                f"{shown}: no such domain (NXDOMAIN)",
                domain=shown,
                permanent=True,
                enhanced_status="5.1.2",
            )
        if mx.status is _Status.FAILED:
            raise TemporaryResolveError(
                f"{shown}: MX lookup failed: {mx.reason}",
                domain=shown,
                permanent=False,
                enhanced_status="4.4.3",
            )
        # no MX record: the domain itself is the exchanger (RFC 5321 section 5.1)
        implicit = mx.rrset is None
        targets = [(0, name)] if mx.rrset is None else _mx_targets(mx.rrset)
        if targets is None:
            raise NullMXError(
                f"{shown}: domain does not accept mail (null MX, RFC 7505)",
                domain=shown,
                permanent=True,
                enhanced_status="5.1.10",
            )
        ordered = self._order(targets)

        hosts: list[MXHost] = []
        failures: list[str] = []
        found = await self._addresses([target for _, target in ordered if target != dns.name.root])
        for preference, target in ordered:
            addresses, failure = found.get(target, ((), None))
            if addresses:
                hosts.append(MXHost(_ascii(target), preference, addresses))
            elif failure is not None:
                failures.append(f"{_ascii(target)}: {failure}")
        if hosts:
            return hosts
        if failures:
            raise TemporaryResolveError(
                f"{shown}: address lookup failed for its mail exchangers ({'; '.join(failures)})",
                domain=shown,
                permanent=False,
                enhanced_status="4.4.3",
            )
        if implicit:
            message = f"{shown}: no MX record and no A/AAAA address"
        else:
            names = ", ".join(_ascii(target) for _, target in ordered)
            message = f"{shown}: no mail exchanger has an address ({names})"
        raise NoAddressError(message, domain=shown, permanent=True, enhanced_status="5.1.2")

    async def txt(self, name: str) -> tuple[str, ...] | None:
        """The TXT records of ``name``, each its strings joined (RFC 7208 3.3 style):
        empty when there are none, None when the lookup failed."""
        lookup = await self._lookup(_domain_name(name), _TXT)
        if lookup.status is _Status.FAILED:
            return None
        if lookup.rrset is None:
            return ()
        return tuple(b"".join(rdata.strings).decode("utf-8", "replace") for rdata in lookup.rrset)

    async def tlsa(self, host: str, port: int = 25) -> TLSAAnswer:
        """The TLSA records of ``_PORT._tcp.HOST`` and whether they are authenticated;
        never raises for a DNS failure (see :class:`TLSAAnswer`)."""
        lookup = await self._lookup(_domain_name(f"_{port}._tcp.{host}"), _TLSA)
        if lookup.status is _Status.FAILED:
            return TLSAAnswer(failure=lookup.reason)
        records: tuple[TLSARecord, ...] = ()
        if lookup.rrset is not None:
            records = tuple(
                TLSARecord(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in lookup.rrset
            )
        return TLSAAnswer(records, lookup.authenticated)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The A then AAAA addresses of ``host`` (empty when it has none or the lookups
        failed), through the cache like every other question."""
        name = _domain_name(host)
        found = await self._addresses([name])
        return found[name][0]

    def _order(self, targets: list[tuple[int, dns.name.Name]]) -> list[tuple[int, dns.name.Name]]:
        """Sort by preference; shuffle each group of equal preference (RFC 5321 5.1).

        The input is sorted by name first so that the order depends only on ``rng``,
        not on the order the DNS server listed the records in.
        """
        ordered: list[tuple[int, dns.name.Name]] = []
        group: list[tuple[int, dns.name.Name]] = []
        for item in sorted(targets, key=lambda t: (t[0], t[1].to_text().lower())):
            if group and group[0][0] != item[0]:
                self._rng.shuffle(group)
                ordered.extend(group)
                group = []
            group.append(item)
        self._rng.shuffle(group)
        ordered.extend(group)
        return ordered

    async def _addresses(
        self, hosts: list[dns.name.Name]
    ) -> dict[dns.name.Name, tuple[tuple[str, ...], str | None]]:
        """Look up A and AAAA of every host at once.

        Returns, per host, its addresses (A then AAAA) and the reason a lookup failed
        temporarily (None when both lookups gave a definite answer).
        """
        results: dict[_Key, _Lookup] = {}

        async def one(host: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
            results[host, rdtype] = await self._lookup(host, rdtype)

        async with anyio.create_task_group() as tg:
            for host in dict.fromkeys(hosts):
                tg.start_soon(one, host, _A)
                tg.start_soon(one, host, _AAAA)

        found: dict[dns.name.Name, tuple[tuple[str, ...], str | None]] = {}
        for host in hosts:
            addresses: list[str] = []
            failure: str | None = None
            for rdtype in (_A, _AAAA):
                lookup = results[host, rdtype]
                if lookup.rrset is not None:
                    addresses.extend(rdata.to_text() for rdata in lookup.rrset)
                elif lookup.status is _Status.FAILED:
                    failure = lookup.reason
            found[host] = (tuple(dict.fromkeys(addresses)), failure)
        return found

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """Answer one question from the cache, from a query in flight, or by asking."""
        key = (name, rdtype)
        while True:
            cached = self._cache.get(key)
            if cached is not None:
                expires, lookup = cached
                if time.monotonic() < expires:
                    return lookup
                del self._cache[key]
            flight = self._in_flight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
            # the asking task was cancelled before an answer came: ask again

        flight = _Flight(anyio.Event())
        self._in_flight[key] = flight
        try:
            lookup = await self._query(name, rdtype)
            flight.result = lookup
            if lookup.status is not _Status.FAILED and lookup.ttl > 0:
                self._store(key, lookup)
            return lookup
        finally:
            del self._in_flight[key]
            flight.done.set()

    def _store(self, key: _Key, lookup: _Lookup) -> None:
        now = time.monotonic()
        if len(self._cache) >= _CACHE_LIMIT:
            for stale in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= _CACHE_LIMIT:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + lookup.ttl, lookup)

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """Ask the DNS servers once; never raises a DNS error, returns its class."""
        what = dns.rdatatype.to_text(rdtype)
        try:
            answer = await self._resolver.resolve(
                name,
                rdtype,
                raise_on_no_answer=False,
                lifetime=self._timeout,
                search=False,
                # The running loop's backend, asked each time: dnspython's default is
                # chosen once per process, so a process that runs asyncio and then trio
                # would ask trio's queries through asyncio.
                backend=dns.asyncbackend.get_backend(dns.asyncbackend.sniff()),
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            ttl = _negative_ttl(responses[-1] if responses else None)
            return _Lookup(_Status.NXDOMAIN, ttl=ttl)
        except dns.exception.Timeout:
            return _Lookup(_Status.FAILED, reason=f"no {what} answer within {self._timeout:g} s")
        except dns.resolver.NoNameservers as exc:
            return _Lookup(_Status.FAILED, reason=f"no DNS server answered the {what} query: {exc}")
        except dns.exception.DNSException as exc:
            return _Lookup(_Status.FAILED, reason=f"{what} query failed: {exc}")
        secure = self.trust_ad and bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            ttl = _negative_ttl(answer.response)
            return _Lookup(_Status.NODATA, ttl=ttl, authenticated=secure)
        ttl = min(float(answer.chaining_result.minimum_ttl), _TTL_MAX)
        return _Lookup(_Status.ANSWER, rrset=answer.rrset, ttl=ttl, authenticated=secure)


_default_resolver: MXResolver | None = None


async def resolve_mx(
    domain: str,
    *,
    dns_servers: Sequence[str] | None = None,
    timeout: float = 5.0,
    rng: random.Random | None = None,
) -> list[MXHost]:
    """Return the mail exchangers of ``domain``, most preferred first.

    A convenience over :meth:`MXResolver.resolve`. Without options it uses one shared
    resolver (system DNS configuration, shared cache); with options, a fresh one.

    >>> import anyio
    >>> anyio.run(resolve_mx, "[192.0.2.1]")
    [MXHost(name='192.0.2.1', preference=0, addresses=('192.0.2.1',))]
    """
    global _default_resolver
    if dns_servers is None and timeout == 5.0 and rng is None:
        if _default_resolver is None:
            _default_resolver = MXResolver()
        resolver = _default_resolver
    else:
        resolver = MXResolver(dns_servers, timeout=timeout, rng=rng)
    return await resolver.resolve(domain)


def _mx_targets(rrset: dns.rrset.RRset) -> list[tuple[int, dns.name.Name]] | None:
    """The exchangers of an MX RRset, one per name at its best preference; None for a
    null MX (RFC 7505: a single ``0 .`` record)."""
    records = [cast(dns.rdtypes.ANY.MX.MX, rdata) for rdata in rrset]
    if len(records) == 1 and records[0].exchange == dns.name.root:
        return None
    best: dict[dns.name.Name, int] = {}
    for record in records:
        if record.exchange not in best or record.preference < best[record.exchange]:
            best[record.exchange] = record.preference
    # a "." among other records names no host; it stays, to be skipped for no address
    return [(preference, exchange) for exchange, preference in best.items()]


def _negative_ttl(response: dns.message.Message | None) -> float:
    """How long to cache a negative answer: the SOA minimum (RFC 2308 section 5), or a
    short default when the server sent no SOA."""
    if isinstance(response, dns.message.QueryMessage) and any(
        rrset.rdtype == _SOA for rrset in response.authority
    ):
        try:
            ttl = float(response.resolve_chaining().minimum_ttl)
        except dns.exception.DNSException:
            return _NEGATIVE_TTL_DEFAULT
        return min(ttl, _NEGATIVE_TTL_MAX)
    return _NEGATIVE_TTL_DEFAULT


def _domain_name(domain: str) -> dns.name.Name:
    """The absolute DNS name of a (possibly Unicode) domain, or NoSuchDomainError."""
    shown = domain.rstrip(".") or domain
    try:
        name = dns.name.from_text(
            domain, origin=dns.name.root, idna_codec=dns.name.IDNA_2008_Practical
        )
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise _invalid(shown, str(exc)) from exc
    text = name.to_text(omit_final_dot=True)
    if name == dns.name.root or not _LDH_NAME.fullmatch(text):
        raise _invalid(shown, "only letters, digits, hyphens and dots are allowed")
    return name


def _invalid(shown: str, why: str) -> NoSuchDomainError:
    return NoSuchDomainError(
        f"{shown!r}: not a valid domain name ({why})",
        domain=shown,
        permanent=True,
        enhanced_status="5.1.2",
    )


def _address_literal(domain: str) -> str | None:
    """The address of an RFC 5321 section 4.1.3 address literal, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError as exc:
        raise _invalid(domain, f"bad address literal: {exc}") from exc


def _ascii(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _parse_server(spec: str) -> tuple[str, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::53"``, ``"[::1]:5353"``."""
    text = spec.strip()
    address, port = text, "53"
    match = _SERVER_SPEC.fullmatch(text)
    if match is not None:
        address = match["v6"] or match["v4"]
        port = match["v6port"] or match["v4port"] or "53"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise InputError(f"bad DNS server {spec!r}: expected IP, IP:PORT or [IPv6]:PORT") from exc
    number = int(port)
    if not 0 < number < 65536:
        raise InputError(f"bad DNS server {spec!r}: port out of range")
    return str(ip), number

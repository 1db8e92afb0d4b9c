"""A small authoritative DNS server on loopback for asmtp's tests.

It serves zones given as zone-file text over UDP from a background thread with its own
socket, so it answers tests on any event loop and CLI tests run in a subprocess. It
records every query it receives, so tests can count them, and can be told to stay
silent, to answer SERVFAIL, or to hold queries until released, for the whole server or
for single names.

    server = DNSServer({"example.test": "@ MX 10 mx\\nmx A 127.0.0.2"})
    server.start()
    MXResolver([server.spec])          # server.spec == "127.0.0.1:PORT"
    server.count("example.test.", "MX")
    server.stop()

Answers are authoritative (AA): records of the type asked (following CNAMEs within the
served zones, the chain in the answer section); NOERROR with no answer and the zone's
SOA in the authority section when the name has no record of that type; NXDOMAIN with
the SOA when the name does not exist under a served zone; REFUSED outside them.

``ad=True`` plays a validating resolver (for DANE tests): every answer carries the AD
bit ("authenticated data", RFC 4035 section 3.2.3) except for the names in
:attr:`DNSServer.insecure` (the answers a real resolver could not validate).

The ``dns_server`` fixture yields ``make(zones, **options) -> DNSServer`` and stops
every server it started at teardown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

__all__ = ["MODES", "DNSServer", "dns_server"]

#: what the server does with a query: answer it, ignore it, answer SERVFAIL, or keep it
#: unanswered until :meth:`DNSServer.release`
MODES = ("normal", "silent", "servfail", "hold")

_MAX_CHAIN = 8


class DNSServer:
    """An authoritative UDP DNS server on a loopback address, run in a thread.

    ``zones`` maps each zone's origin ("example.test") to its records in zone-file
    syntax, names relative to the origin (common indentation is removed). A zone
    without an SOA record gets one with minimum TTL ``soa_minimum``; records without
    a TTL get ``default_ttl``.
    """

    def __init__(
        self,
        zones: Mapping[str, str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        default_ttl: int = 300,
        soa_minimum: int = 60,
        ad: bool = False,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test DNS server must listen on loopback, not {host}")
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._held_changed = threading.Condition(self._lock)
        self.zones: dict[dns.name.Name, dns.zone.Zone] = {}
        for origin, text in zones.items():
            self.add_zone(origin, text, default_ttl=default_ttl, soa_minimum=soa_minimum)
        self.mode = "normal"
        #: answers carry the AD bit (a validating resolver's word), unless the name is
        #: in ``insecure`` (names with a final dot, lower case)
        self.ad = ad
        self.insecure: set[str] = set()
        self._name_modes: dict[dns.name.Name, str] = {}
        self._queries: list[tuple[str, str, int]] = []
        self._held: list[tuple[bytes, Any]] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- configuration -------------------------------------------------------------

    def add_zone(
        self, origin: str, text: str, *, default_ttl: int = 300, soa_minimum: int = 60
    ) -> None:
        """Serve (or replace) a zone; safe while the server runs."""
        name = dns.name.from_text(origin)
        zone = dns.zone.from_text(
            f"$TTL {default_ttl}\n{textwrap.dedent(text)}\n",
            origin=name,
            relativize=False,
            check_origin=False,
        )
        if zone.get_rdataset(name, dns.rdatatype.SOA) is None:
            soa = dns.rdataset.from_text(
                "IN",
                "SOA",
                default_ttl,
                f"ns.{name} hostmaster.{name} 1 3600 600 86400 {soa_minimum}",
            )
            zone.find_node(name, create=True).replace_rdataset(soa)
        with self._lock:
            self.zones[name] = zone

    def set_name_mode(self, name: str, mode: str | None) -> None:
        """Treat queries for ``name`` (any type) per ``mode``; None: follow ``self.mode``."""
        key = dns.name.from_text(name)
        with self._lock:
            if mode is None:
                self._name_modes.pop(key, None)
            else:
                _check_mode(mode)
                self._name_modes[key] = mode

    def release(self, mode: str = "normal") -> int:
        """Answer every held query as ``mode`` ("normal" or "servfail") would, set the
        server's mode to it, and return how many were answered."""
        _check_mode(mode)
        with self._lock:
            self.mode = mode
            held, self._held = self._held, []
        for wire, peer in held:
            self._reply(wire, peer, mode)
        return len(held)

    # -- observation ---------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def spec(self) -> str:
        """The server as ``dns_servers`` takes it: "127.0.0.1:PORT" or "[::1]:PORT"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every query received, in order, as (qname with final dot, lower case; type)."""
        with self._lock:
            return [(qname, rdtype) for qname, rdtype, _ in self._queries]

    @property
    def held(self) -> int:
        """How many queries are waiting for :meth:`release`."""
        with self._lock:
            return len(self._held)

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` queries are held (True) or ``timeout`` passes
        (False). From async code: ``await anyio.to_thread.run_sync(server.wait_held)``."""
        with self._held_changed:
            return self._held_changed.wait_for(lambda: len(self._held) >= count, timeout)

    def count(
        self, name: str | None = None, rdtype: str | None = None, *, distinct: bool = False
    ) -> int:
        """How many queries for ``name`` (any if None) of ``rdtype`` (any if None) came.

        ``distinct`` counts different DNS messages (by ID) rather than packets, so a
        client's retransmission of one query counts once.
        """
        qname = _key(name) if name is not None else None
        kind = rdtype.upper() if rdtype is not None else None
        with self._lock:
            matching = [
                (q, t, i)
                for q, t, i in self._queries
                if (qname is None or q == qname) and (kind is None or t == kind)
            ]
        return len(set(matching)) if distinct else len(matching)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # -- running -------------------------------------------------------------------

    def start(self) -> DNSServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, name=f"dns-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                wire, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            query = self._parse(wire)
            if query is None:
                continue
            with self._lock:
                mode = self._name_modes.get(query.question[0].name, self.mode)
                if mode == "hold":
                    self._held.append((wire, peer))
                    self._held_changed.notify_all()
                    continue
            self._reply(wire, peer, mode)

    def _parse(self, wire: bytes) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        question = query.question[0]
        with self._lock:
            self._queries.append(
                (_key(question.name.to_text()), dns.rdatatype.to_text(question.rdtype), query.id)
            )
        return query

    def _reply(self, wire: bytes, peer: Any, mode: str) -> None:
        answer = self.handle(wire, mode)
        sock = self._sock
        if answer is None or sock is None:
            return
        with contextlib.suppress(OSError):
            sock.sendto(answer, peer)

    # -- answering -----------------------------------------------------------------

    def handle(self, wire: bytes, mode: str = "normal") -> bytes | None:
        """The wire answer to one query in ``mode``, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if mode == "silent" or len(query.question) != 1:
            return None
        response = dns.message.make_response(query)
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            with self._lock:
                self._answer(response, query.question[0].name, query.question[0].rdtype)
                if self.ad and _key(query.question[0].name.to_text()) not in self.insecure:
                    response.flags |= dns.flags.AD
        max_size = query.payload if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            # too big for UDP: say so (TC) with empty sections
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire(max_size=max_size)

    def _zone_for(self, name: dns.name.Name) -> tuple[dns.name.Name, dns.zone.Zone] | None:
        best: tuple[dns.name.Name, dns.zone.Zone] | None = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best[0])):
                best = (origin, zone)
        return best

    def _answer(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        found = self._zone_for(qname)
        if found is None:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        origin, zone = found
        for _ in range(_MAX_CHAIN):
            node = zone.get_node(qname)
            if node is None:
                if not any(n != qname and n.is_subdomain(qname) for n in zone.nodes):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                # else an empty non-terminal: it exists, with no records
                self._add_soa(response, origin, zone)
                return
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None:
                response.answer.append(_rrset(qname, rdataset))
                return
            cname = None
            if rdtype != dns.rdatatype.CNAME:
                cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                self._add_soa(response, origin, zone)
                return
            response.answer.append(_rrset(qname, cname))
            qname = next(iter(cname)).target
            found = self._zone_for(qname)
            if found is None:
                return  # the chain leaves the served zones; the resolver goes on
            origin, zone = found

    @staticmethod
    def _add_soa(response: dns.message.Message, origin: dns.name.Name, zone: dns.zone.Zone) -> None:
        soa = zone.get_rdataset(origin, dns.rdatatype.SOA)
        if soa is None:
            return
        # RFC 2308 section 3: the SOA's TTL in a negative answer is its minimum field
        ttl = min(soa.ttl, next(iter(soa)).minimum)
        response.authority.append(dns.rrset.from_rdata_list(origin, ttl, list(soa)))


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))


def _key(name: str) -> str:
    text = name.lower()
    return text if text.endswith(".") else text + "."


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DNSServer]]:
    """``make(zones, host="127.0.0.1", **options)`` starts a :class:`DNSServer`; every
    server started is stopped at teardown."""
    servers: list[DNSServer] = []

    def make(zones: Mapping[str, str], host: str = "127.0.0.1", **options: Any) -> DNSServer:
        server = DNSServer(zones, host=host, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()

"""DANE for SMTP (RFC 7672): TLSA matching as a pure function of DER certificates
(asmtp._core.dane), and end to end on loopback: the test DNS server plays a
validating resolver (the AD bit), MX hosts present certificates from a CA the client
does not trust, and only the TLSA records vouch for them."""

from __future__ import annotations

import datetime
import hashlib
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import asmtp
from asmtp._core.dane import TLSARecord, dane_match, usable
from asmtp.config import Direct
from dnsserver import DNSServer
from policy_server import PolicyServer, policy_server
from servers import SMTPTestServer, client_ssl_context, free_port, server_ssl_context
from test_tlspolicy import ZONE, policy, tls_closed

__all__ = ["policy_server"]  # the fixture, used by name

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]
MakePolicy = Callable[..., PolicyServer]

MX1, MX2 = "127.0.0.2", "127.0.0.3"


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(cert_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.fixture(scope="module")
def own_ca() -> trustme.CA:
    """The MX hosts' own CA: nobody's trust store has it (DANE is what vouches)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(own_ca: trustme.CA) -> trustme.LeafCert:
    return own_ca.issue_cert("mx1.example.test")


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("selector", "matching", "digest"),
    [
        (0, 0, lambda b: b),
        (0, 1, lambda b: hashlib.sha256(b).digest()),
        (0, 2, lambda b: hashlib.sha512(b).digest()),
        (1, 0, lambda b: spki(b)),
        (1, 1, lambda b: hashlib.sha256(spki(b)).digest()),
        (1, 2, lambda b: hashlib.sha512(spki(b)).digest()),
    ],
)
def test_dane_ee_every_selector_and_matching_type(
    leaf: trustme.LeafCert,
    own_ca: trustme.CA,
    selector: int,
    matching: int,
    digest: Callable[[bytes], bytes],
) -> None:
    cert = der(leaf.cert_chain_pems[0].bytes())
    other = der(own_ca.issue_cert("mx2.example.test").cert_chain_pems[0].bytes())
    record = TLSARecord(3, selector, matching, digest(cert))  # selector 1: spki() inside
    assert dane_match([record], [cert], ["anything.test"]).usage == "dane-ee"
    assert not dane_match([record], [other], ["mx1.example.test"]).ok
    # DANE-EE ignores names and dates (RFC 7672 3.1.1)
    later = datetime.datetime(3100, 1, 1, tzinfo=datetime.UTC)
    assert dane_match([record], [cert], ["other.test"], later).ok


def test_dane_ta_chains_to_the_anchor_and_checks_the_name(
    leaf: trustme.LeafCert, own_ca: trustme.CA
) -> None:
    cert, root = der(leaf.cert_chain_pems[0].bytes()), der(own_ca.cert_pem.bytes())
    anchor = TLSARecord(2, 0, 1, hashlib.sha256(root).digest())
    assert dane_match([anchor], [cert, root], ["mx1.example.test"]).usage == "dane-ta"
    assert dane_match([anchor], [cert, root], ["x.test", "mx1.example.test"]).ok
    wrong_name = dane_match([anchor], [cert, root], ["mx2.example.test"])
    assert not wrong_name.ok and "DANE-TA" in wrong_name.reason
    # the anchor must be in the chain the server sent (RFC 7672 3.1.2)
    assert not dane_match([anchor], [cert], ["mx1.example.test"]).ok
    # a certificate from another CA does not chain to this anchor, even if the server
    # sends the anchor along
    stranger = der(trustme.CA().issue_cert("mx1.example.test").cert_chain_pems[0].bytes())
    assert not dane_match([anchor], [stranger, root], ["mx1.example.test"]).ok
    # an anchor by its public key (2 1 1) does as well
    by_key = TLSARecord(2, 1, 1, hashlib.sha256(spki(root)).digest())
    assert dane_match([by_key], [cert, root], ["mx1.example.test"]).ok


def test_unusable_records_are_left_out() -> None:
    records = [
        TLSARecord(0, 0, 1, b"x"),  # PKIX-TA: not for SMTP
        TLSARecord(1, 0, 1, b"x"),  # PKIX-EE: not for SMTP
        TLSARecord(3, 2, 1, b"x"),  # unknown selector
        TLSARecord(3, 1, 9, b"x"),  # unknown matching type
        TLSARecord(3, 1, 1, b"x"),
    ]
    assert usable(records) == [TLSARecord(3, 1, 1, b"x")]
    assert TLSARecord.parse("3 1 1 ABcd 01") == TLSARecord(3, 1, 1, b"\xab\xcd\x01")
    assert not dane_match(records[:4], [b"cert"], ["mx.test"]).ok
    assert dane_match([], [], ["mx.test"]).reason == "the server sent no certificate"


# --------------------------------------------------------------------------- end to end


def dane_zone(*tlsa: str, extra: str = "") -> str:
    records = "\n".join(f"    _25._tcp.mx1 TLSA {t}" for t in tlsa)
    return f"""
    @     MX 10 mx1
    @     MX 20 mx2
    mx1   A 127.0.0.2
    mx2   A 127.0.0.3
{records}
{extra}
"""


def ee_record(leaf: trustme.LeafCert) -> str:
    cert = der(leaf.cert_chain_pems[0].bytes())
    return f"3 1 1 {hashlib.sha256(spki(cert)).hexdigest()}"


def with_anchor(leaf: trustme.LeafCert, ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    """A server context sending its certificate and the CA's (the DANE-TA anchor)."""
    pem = tmp_path / "chain.pem"
    pem.write_bytes(
        leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes() + ca.cert_pem.bytes()
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pem))
    return context


def direct(dns: DNSServer, port: int, **options: object) -> Direct:
    return Direct(  # type: ignore[arg-type]
        dns_servers=[dns.spec],
        port=port,
        helo="client.asmtp.test",
        rng=random.Random(1),
        dns_timeout=2.0,
        **{"trust_ad": True, **options},
    )


async def send(to: str, settings: Direct) -> asmtp.RecipientResult:
    report = await asmtp.sendmail(
        to=to, from_="sender@client.test", subject="dane", body="hi", relay=settings, timeout=5
    )
    return report[0]


@pytest.mark.anyio
async def test_dane_ee_match_delivers_without_any_ca(
    dns_server: MakeDNS, smtp_server: MakeServer, leaf: trustme.LeafCert, ca: trustme.CA
) -> None:
    dns = dns_server({"example.test": dane_zone(ee_record(leaf))}, ad=True)
    port = free_port(MX1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    server = smtp_server(host=MX1, port=port, starttls_context=context)
    # the client trusts the session CA only: the web PKI would refuse this certificate
    r = await send("ann@example.test", direct(dns, port, ssl_context=client_ssl_context(ca)))
    await tls_closed(server)
    assert (r.status, r.host, r.tls, r.tls_policy) == (
        "delivered",
        "mx1.example.test",
        "dane",
        "dane",
    )
    assert [m.tls for m in server.messages] == [True]
    assert dns.count("_25._tcp.mx1.example.test.", "TLSA") == 1


@pytest.mark.anyio
async def test_dane_ee_mismatch_is_not_used_and_the_backup_is_tried(
    dns_server: MakeDNS, smtp_server: MakeServer, own_ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    dns = dns_server({"example.test": dane_zone(ee_record(leaf))}, ad=True)
    port = free_port(MX1, MX2)
    impostor = smtp_server(
        host=MX1, port=port, starttls_context=server_ssl_context(own_ca, "mx1.example.test")
    )
    backup = smtp_server(host=MX2, port=port)  # no TLSA for mx2: opportunistic
    r = await send("ann@example.test", direct(dns, port))
    await tls_closed(impostor, backup)
    assert impostor.messages == []
    assert (r.status, r.host, r.tls_policy) == ("delivered", "mx2.example.test", "opportunistic")
    first = r.tried[0]
    assert (first.host, first.stage) == ("mx1.example.test", "starttls")
    assert "DANE: no TLSA record matches" in first.message
    assert "required by the DANE (TLSA records)" in first.message
    # one try: a DANE failure is not retried without verification
    assert [a.host for a in r.tried] == ["mx1.example.test", "mx2.example.test"]


@pytest.mark.anyio
async def test_dane_only_with_the_ad_bit(
    dns_server: MakeDNS, smtp_server: MakeServer, own_ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    """TLSA records the resolver did not validate are not believed: the impostor's
    certificate goes unchecked by DANE (opportunistic TLS, "unverified")."""
    dns = dns_server({"example.test": dane_zone(ee_record(leaf))}, ad=True)
    dns.insecure.add("_25._tcp.mx1.example.test.")
    port = free_port(MX1)
    server = smtp_server(
        host=MX1, port=port, starttls_context=server_ssl_context(own_ca, "mx1.example.test")
    )
    r = await send("ann@example.test", direct(dns, port))
    await tls_closed(server)
    assert (r.status, r.tls, r.tls_policy) == ("delivered", "unverified", "opportunistic")


@pytest.mark.anyio
async def test_without_trust_ad_no_tlsa_is_asked(
    dns_server: MakeDNS, smtp_server: MakeServer, leaf: trustme.LeafCert
) -> None:
    dns = dns_server({"example.test": dane_zone(ee_record(leaf))}, ad=True)
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    r = await send("ann@example.test", direct(dns, port, trust_ad=False))
    assert r.status == "delivered" and len(server.messages) == 1
    assert dns.count(rdtype="TLSA") == 0


@pytest.mark.anyio
async def test_dane_ta_with_the_anchor_in_the_chain(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    own_ca: trustme.CA,
    leaf: trustme.LeafCert,
    tmp_path: Path,
) -> None:
    root = der(own_ca.cert_pem.bytes())
    dns = dns_server(
        {"example.test": dane_zone(f"2 0 1 {hashlib.sha256(root).hexdigest()}")}, ad=True
    )
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port, starttls_context=with_anchor(leaf, own_ca, tmp_path))
    r = await send("ann@example.test", direct(dns, port))
    await tls_closed(server)
    assert (r.status, r.tls, r.tls_policy) == ("delivered", "dane", "dane")


@pytest.mark.anyio
async def test_dane_takes_precedence_over_mta_sts(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    policy_server: MakePolicy,
    leaf: trustme.LeafCert,
    ca: trustme.CA,
) -> None:
    """The MTA-STS policy (enforce) names only mx2; mx1 has valid DANE: RFC 8461
    section 2 lets DANE decide for mx1, so mx1 takes the mail."""
    zone = ZONE + f"    _25._tcp.mx1 TLSA {ee_record(leaf)}\n"
    dns = dns_server({"example.test": zone}, ad=True)
    web = policy_server("example.test", policy("enforce", "mx2.example.test"))
    port = free_port(MX1, MX2)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    dane_mx = smtp_server(host=MX1, port=port, starttls_context=context)
    sts_mx = smtp_server(host=MX2, port=port)
    settings = direct(dns, port, ssl_context=client_ssl_context(ca), sts_port=web.port)
    r = await send("ann@example.test", settings)
    await tls_closed(dane_mx, sts_mx)
    assert (r.status, r.host, r.tls, r.tls_policy) == (
        "delivered",
        "mx1.example.test",
        "dane",
        "dane",
    )
    assert sts_mx.sessions_opened == 0
    assert web.fetches == 1


@pytest.mark.anyio
async def test_a_failed_tlsa_lookup_rules_the_host_out(
    dns_server: MakeDNS, smtp_server: MakeServer, leaf: trustme.LeafCert
) -> None:
    """A validating resolver answers SERVFAIL for a forged answer: the host is not
    used (RFC 7672 section 2.2), the recipient waits."""
    zone = f"@ MX 10 mx1\nmx1 A 127.0.0.2\n_25._tcp.mx1 TLSA {ee_record(leaf)}"
    dns = dns_server({"example.test": zone}, ad=True)
    dns.set_name_mode("_25._tcp.mx1.example.test.", "servfail")
    port = free_port(MX1)
    server = smtp_server(host=MX1, port=port)
    r = await send("ann@example.test", direct(dns, port, tls="dane"))
    assert (r.status, r.stage) == ("transient", "starttls")
    assert "TLSA lookup for mx1.example.test failed" in r.message
    assert server.sessions_opened == 0

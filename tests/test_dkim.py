"""DKIM signing: signatures made by asmtp._core.dkim verify with dkimpy's verifier against
the public key served by a real DNS server on loopback, both on the prepared bytes and
on what a real SMTP server received; tampering breaks them; bad input is refused."""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable

import dkim
import dns.rdtypes.ANY.TXT
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

import asmtp
from asmtp._core.dkim import DKIM, dns_txt_record
from asmtp._core.message import build_message
from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp._delivery.mailer import Job
from dnsserver import DNSServer
from servers import SMTPTestServer

MakeDNS = Callable[..., DNSServer]
MakeServer = Callable[..., SMTPTestServer]
DnsFunc = Callable[..., bytes]

RAW_MESSAGE = (
    b"From: Jack <jack@example.test>\r\n"
    b"To: ann@example.org\r\n"
    b"Subject: dots and octets\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"X-Mailer: not signed\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e\r\n"
    b"last line\r\n"
)


def zone_value(txt: str) -> str:
    """A TXT value as zone-file strings of at most 255 octets each."""
    return " ".join(f'"{txt[i : i + 255]}"' for i in range(0, len(txt), 255))


def publish(make_dns: MakeDNS, signer: DKIM, txt: str) -> DNSServer:
    name = signer.record_name.removesuffix(f".{signer.domain}")
    return make_dns({signer.domain: f"{name} IN TXT {zone_value(txt)}"})


def dns_lookup(server: DNSServer) -> DnsFunc:
    """dkimpy's dnsfunc, answered by the test DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    host, port = server.address
    resolver.nameservers = [host]
    resolver.port = port

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=max(timeout, 1))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        record = answer[0]
        assert isinstance(record, dns.rdtypes.ANY.TXT.TXT)
        return b"".join(record.strings)

    return lookup


def unstuff(data: bytes) -> bytes:
    """The message a receiver reconstructs from DATA bytes (RFC 5321 4.5.2)."""
    assert data.endswith(b"\r\n.\r\n")
    lines = data[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def signature_tags(content: bytes) -> dict[str, str]:
    header, _, _ = content.partition(b"\r\nFrom:")
    assert header.startswith(b"DKIM-Signature:")
    unfolded = header.removeprefix(b"DKIM-Signature:").replace(b"\r\n", b"").decode("ascii")
    pairs = (part.split("=", 1) for part in unfolded.split(";") if part.strip())
    return {key.strip(): " ".join(value.split()) for key, value in pairs}


def signed_names(content: bytes) -> list[str]:
    return [name.strip() for name in signature_tags(content)["h"].split(":")]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_verifies_against_the_key_served_over_dns(
    dns_server: MakeDNS, algorithm: str
) -> None:
    signer, txt = DKIM.generate("example.test", "sel2024", algorithm)  # type: ignore[arg-type]
    server = publish(dns_server, signer, txt)
    prepared = prepare_message(
        build_message(
            to="Ann <ann@example.org>",
            from_="jack@example.test",
            subject="Hello",
            body="Hi Ann.\n",
        )
    )
    signed = signer.sign(prepared)

    assert signer.algorithm == f"{algorithm}-sha256"
    assert signed.data.endswith(prepared.data)
    assert dkim.verify(unstuff(signed.data), dnsfunc=dns_lookup(server))
    assert server.count("sel2024._domainkey.example.test.", "TXT") >= 1
    tags = signature_tags(unstuff(signed.data))
    assert tags["a"] == f"{algorithm}-sha256"
    assert (tags["c"], tags["d"], tags["s"]) == ("relaxed/relaxed", "example.test", "sel2024")
    if algorithm == "rsa":
        public = serialization.load_der_public_key(base64.b64decode(txt.split("p=")[1]))
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 2048


def test_another_key_in_dns_fails(dns_server: MakeDNS) -> None:
    signer, _ = DKIM.generate("example.test", "sel", "ed25519")
    _, other_txt = DKIM.generate("example.test", "sel", "ed25519")
    server = publish(dns_server, signer, other_txt)
    signed = signer.sign(prepare_message(RAW_MESSAGE))
    assert not dkim.verify(unstuff(signed.data), dnsfunc=dns_lookup(server))


def test_leading_dots_and_8bit_body_keep_their_wire_form(dns_server: MakeDNS) -> None:
    signer, txt = DKIM.generate("example.test", "sel", "rsa")
    server = publish(dns_server, signer, txt)
    prepared = prepare_message(RAW_MESSAGE)
    signed = signer.sign(prepared)

    header = signed.data[: len(signed.data) - len(prepared.data)]
    assert signed.data == header + prepared.data  # the message itself is not re-serialized
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    assert header.isascii() and not any(line.startswith(b".") for line in header.split(b"\r\n"))
    assert b"\r\n...two dots\r\n" in signed.data and b"\r\n..\r\n" in signed.data
    assert signed.size == len(signed.data) - 3
    assert (signed.eight_bit, signed.smtputf8) == (True, False)
    assert unstuff(signed.data) == header + RAW_MESSAGE
    assert dkim.verify(unstuff(signed.data), dnsfunc=dns_lookup(server))


async def test_received_copy_verifies_and_tampering_breaks_it(
    dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    signer, txt = DKIM.generate("example.test", "sel", "ed25519")
    dns = publish(dns_server, signer, txt)
    smtp = smtp_server()
    signed = signer.sign(prepare_message(RAW_MESSAGE))
    relay = asmtp.Relay(smtp.host, smtp.port, tls="none", helo="dkim.asmtp.test")

    # The signed PreparedMessage exactly as signed, and the same message as bytes.
    async with asmtp.Mailer(relay, retry=None, timeout=10) as mailer:
        results = [r async for r in mailer.deliver([Job("ann@example.org", signed, "j@x.test")])]
    report = await asmtp.send(
        unstuff(signed.data), sender="j@x.test", recipients="bob@example.org", relay=relay
    )
    assert [r.status for r in results] == ["delivered"] and report.ok, (results, report)

    lookup = dns_lookup(dns)
    assert len(smtp.messages) == 2
    for received in smtp.messages:
        assert received.content == unstuff(signed.data)
        assert dkim.verify(received.content, dnsfunc=lookup)
    content = smtp.messages[0].content
    changed_body = content.replace(b"cr\xc3\xa8me", b"cr\xc3\xa9me")
    assert changed_body != content
    assert not dkim.verify(changed_body, dnsfunc=lookup)
    changed_header = content.replace(b"Subject: dots", b"Subject: Dots")
    assert not dkim.verify(changed_header, dnsfunc=lookup)
    # From and Subject are signed once more than they occur: a second copy is caught.
    for added in (b"From: evil@attacker.test", b"Subject: pay now"):
        tampered = content.replace(b"\r\nTo:", b"\r\n" + added + b"\r\nTo:", 1)
        assert not dkim.verify(tampered, dnsfunc=lookup), added
    # Unsigned header fields may change in transit.
    changed_unsigned = content.replace(b"X-Mailer: not signed", b"X-Mailer: changed")
    assert dkim.verify(changed_unsigned, dnsfunc=lookup)


def test_only_present_header_fields_are_signed(dns_server: MakeDNS) -> None:
    signer, txt = DKIM.generate("example.test", "sel", "ed25519")
    server = publish(dns_server, signer, txt)
    message = b"To: ann@example.org\r\nfrom: jack@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    content = unstuff(signer.sign(prepare_message(message)).data)
    assert signed_names(content) == ["to", "from", "subject", "to", "from", "subject"]
    assert dkim.verify(content, dnsfunc=dns_lookup(server))

    content = unstuff(signer.sign(prepare_message(RAW_MESSAGE)).data)
    names = signed_names(content)
    assert "x-mailer" not in names and "cc" not in names and "reply-to" not in names
    assert names.count("from") == 2 and names.count("content-type") == 1
    assert set(names) == {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }


def test_chosen_headers_and_from_always(dns_server: MakeDNS) -> None:
    signer, txt = DKIM.generate("example.test", "sel", "ed25519", headers=("X-Mailer", "Cc"))
    server = publish(dns_server, signer, txt)
    assert signer.headers == ("from", "x-mailer", "cc")
    content = unstuff(signer.sign(prepare_message(RAW_MESSAGE)).data)
    assert signed_names(content) == ["from", "x-mailer", "from"]
    assert dkim.verify(content, dnsfunc=dns_lookup(server))


def test_pkcs8_keys_and_txt_records_from_public_keys(dns_server: MakeDNS) -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ed_public_pem = ed_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_raw = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    rsa_public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    ed_txt = dns_txt_record(ed_public_pem)
    assert ed_txt.startswith("v=DKIM1; k=ed25519; p=")
    assert ed_txt == dns_txt_record(ed_raw) == dns_txt_record(base64.b64encode(ed_raw).decode())
    rsa_txt = dns_txt_record(rsa_public_pem)
    assert rsa_txt.startswith("v=DKIM1; k=rsa; p=")

    ed_signer = DKIM("example.test", "ed", ed_pem)
    rsa_signer = DKIM("example.test", "rsa", rsa_pem.replace("\n", "\r\n"))
    assert ed_signer.algorithm == "ed25519-sha256" and rsa_signer.algorithm == "rsa-sha256"
    assert ed_signer.txt_record() == ed_txt and rsa_signer.txt_record() == rsa_txt
    server = dns_server(
        {
            "example.test": f"ed._domainkey IN TXT {zone_value(ed_txt)}\n"
            f"rsa._domainkey IN TXT {zone_value(rsa_txt)}"
        }
    )
    lookup = dns_lookup(server)
    for signer in (ed_signer, rsa_signer):
        assert dkim.verify(unstuff(signer.sign(prepare_message(RAW_MESSAGE)).data), dnsfunc=lookup)


def test_repr_hides_the_private_key() -> None:
    seed = base64.b64encode(bytes(range(32))).decode()
    signer = DKIM("example.test", "sel", seed)
    shown = repr(signer) + str(signer)
    assert seed not in shown and "private_key" not in shown
    assert "example.test" in shown and "ed25519-sha256" in shown
    rsa_signer, _ = DKIM.generate("example.test", "sel", "rsa")
    assert "PRIVATE KEY" not in repr(rsa_signer)


def test_international_domain_is_signed_as_a_labels() -> None:
    signer, _ = DKIM.generate("bücher.example", "sel")
    assert signer.domain == "xn--bcher-kva.example"
    assert signer.record_name == "sel._domainkey.xn--bcher-kva.example"
    content = unstuff(signer.sign(prepare_message(RAW_MESSAGE)).data)
    assert signature_tags(content)["d"] == "xn--bcher-kva.example"


SEED = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"domain": "example.test\r\nX: y"}, "CR, LF or NUL"),
        ({"domain": "exa mple.test"}, "not a valid DNS name"),
        ({"domain": ""}, "non-empty"),
        ({"selector": "sel\x00"}, "CR, LF or NUL"),
        ({"selector": "sel\n"}, "CR, LF or NUL"),
        ({"selector": "sel;x=1"}, "not a valid DNS name"),
        ({"private_key": "not a key"}, "not a PEM key"),
        ({"private_key": base64.b64encode(bytes(31)).decode()}, "32-byte"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, "PEM"),
        ({"private_key": 42}, "bytes or str"),
        ({"headers": "from"}, "tuple of field names"),
        ({"headers": ("Bcc",)}, "must not be signed"),
        ({"headers": ("Received",)}, "must not be signed"),
        ({"headers": ("Bad Name",)}, "not a header field name"),
    ],
)
def test_bad_input_is_refused(options: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {"domain": "example.test", "selector": "s", "private_key": SEED}
    arguments.update(options)
    with pytest.raises(asmtp.InputError, match=fragment):
        DKIM(**arguments)  # type: ignore[arg-type]


def test_short_rsa_key_is_refused() -> None:
    # Mersenne primes 2**521-1 and 2**127-1: a valid 648-bit key (generators refuse one).
    p, q, e = 2**521 - 1, 2**127 - 1, 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    weak = numbers.private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(asmtp.InputError, match="648-bit RSA key is too short"):
        DKIM("example.test", "s", weak)


def test_a_message_without_from_or_not_prepared_is_refused() -> None:
    signer = DKIM("example.test", "s", SEED)
    with pytest.raises(asmtp.InputError, match="no From"):
        signer.sign(prepare_message(b"To: ann@example.org\r\nSubject: x\r\n\r\nbody\r\n"))
    with pytest.raises(asmtp.InputError, match=r"CRLF \. CRLF"):
        signer.sign(
            PreparedMessage(
                data=b"From: a@b.test\r\n\r\nx", size=1, eight_bit=False, smtputf8=False
            )
        )


def test_missing_extra_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = DKIM("example.test", "s", SEED)
    monkeypatch.setitem(sys.modules, "dkim", None)
    with pytest.raises(asmtp.InputError, match=r"pip install 'asmtp\[dkim\]'"):
        DKIM("example.test", "s", SEED)
    with pytest.raises(asmtp.InputError, match=r"needs the dkim extra"):
        signer.sign(prepare_message(RAW_MESSAGE))


def test_raw_utf8_header_fields_verify(dns_server: MakeDNS) -> None:
    signer, txt = DKIM.generate("example.test", "sel", "ed25519")
    server = publish(dns_server, signer, txt)
    message = "From: jörg@example.test\r\nTo: ann@example.org\r\nSubject: grüße\r\n\r\nhi\r\n"
    prepared = prepare_message(message.encode())
    signed = signer.sign(prepared)
    assert (signed.eight_bit, signed.smtputf8) == (True, True)
    assert dkim.verify(unstuff(signed.data), dnsfunc=dns_lookup(server))


@pytest.mark.parametrize("unsubscribe", [None, "https://example.test/u?r={recipient}"])
async def test_mailer_signs_what_it_sends(
    dns_server: MakeDNS, smtp_server: MakeServer, unsubscribe: str | None
) -> None:
    signer, txt = DKIM.generate("example.test", "mailer", "rsa")
    dns = publish(dns_server, signer, txt)
    smtp = smtp_server()
    relay = asmtp.Relay(smtp.host, smtp.port, tls="none", helo="dkim.asmtp.test")
    message = asmtp.build_message(
        to="list@example.test", from_="news@example.test", subject="weekly", body="hello\n"
    )
    async with asmtp.Mailer(relay, dkim=signer, unsubscribe=unsubscribe) as mailer:
        report = await mailer.send(message, recipients=["a@example.org", "b@example.org"])
    assert report.ok, report.failed()
    lookup = dns_lookup(dns)
    for received in smtp.messages:
        assert received.content.startswith(b"DKIM-Signature:")
        assert dkim.verify(received.content, dnsfunc=lookup)
        if unsubscribe:
            assert "list-unsubscribe" in [n.lower() for n in signed_names(received.content)]

"""DANE for SMTP (RFC 7672), the pure part: TLSA records (RFC 6698) and matching them
against the certificates a server presented, as DER bytes.

* DANE-EE (usage 3): the server's own certificate (or its public key) matches a
  record. Names and dates do not count (RFC 7672 section 3.1.1).
* DANE-TA (usage 2): a certificate of the chain the server sent matches a record, and
  the server's certificate chains up to it (signatures, validity dates) and is valid
  for one of the reference names, the MX host name first (section 3.1.2 and 3.2.2).
* Selector 0 is the whole certificate, 1 its SubjectPublicKeyInfo; matching type 0 is
  the data itself, 1 its SHA-256, 2 its SHA-512.
* Usages 0 and 1 (PKIX-TA, PKIX-EE) are not used for SMTP (section 3.1.3): such a
  record, or one with an unknown selector or matching type, is "unusable"; a host whose
  records are all unusable is still owed TLS, not authentication (section 2.2).

Certificates are read with ``cryptography`` (the ``dane`` extra), imported when a
match needs it. Which records to believe (only DNSSEC-validated answers) is the
delivery layer's decision, not this module's.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["DANE_EE", "DANE_TA", "DANEResult", "TLSARecord", "dane_match", "usable"]

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)
_MATCHING = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class TLSARecord:
    """One TLSA record: ``_25._tcp.mx.example.net. IN TLSA 3 1 1 <sha256 hex>``.

    >>> TLSARecord.parse("3 1 1 AB01")
    TLSARecord(usage=3, selector=1, matching=1, data=b'\\xab\\x01')
    """

    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> TLSARecord:
        """From presentation format (``usage selector matching hex``)."""
        usage, selector, matching, *hexdata = text.split()
        return cls(int(usage), int(selector), int(matching), bytes.fromhex("".join(hexdata)))

    @property
    def usable(self) -> bool:
        """Usage 2 or 3 with a known selector and matching type (RFC 7672 3.1.3)."""
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in _SELECTORS
            and self.matching in _MATCHING
        )

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"

    def matches(self, der: bytes) -> bool:
        """Whether the certificate ``der`` (selected and hashed as the record says)
        is the record's data."""
        selected = der if self.selector == 0 else _spki(der)
        if selected is None:
            return False
        if self.matching == 1:
            return hashlib.sha256(selected).digest() == self.data
        if self.matching == 2:
            return hashlib.sha512(selected).digest() == self.data
        return selected == self.data


def usable(records: Iterable[TLSARecord]) -> list[TLSARecord]:
    """The records DANE for SMTP can use (usages 2 and 3, known parameters)."""
    return [r for r in records if r.usable]


@dataclass(frozen=True, slots=True)
class DANEResult:
    """The outcome of matching: ``ok``, the usage that matched, or why none did."""

    ok: bool
    usage: Literal["dane-ee", "dane-ta"] | None = None
    reason: str = ""


def dane_match(
    records: Sequence[TLSARecord],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> DANEResult:
    """Match the usable ``records`` against ``chain`` (DER certificates as the server
    sent them, its own first); ``names`` are the reference identifiers for DANE-TA
    (the MX host name, then the next-hop domain). ``now`` (UTC) is for DANE-TA's
    validity dates.

    >>> dane_match([TLSARecord(3, 0, 0, b"cert")], [b"cert"], ["mx.example.net"]).usage
    'dane-ee'
    >>> dane_match([TLSARecord(3, 0, 0, b"cert")], [b"other"], ["mx.example.net"]).reason
    'no TLSA record matches the certificate (1 DANE-EE, 0 DANE-TA)'
    """
    records = usable(records)
    if not chain:
        return DANEResult(False, reason="the server sent no certificate")
    ee = [r for r in records if r.usage == DANE_EE]
    ta = [r for r in records if r.usage == DANE_TA]
    if any(r.matches(chain[0]) for r in ee):
        return DANEResult(True, "dane-ee")
    anchors = [der for der in chain if any(r.matches(der) for r in ta)]
    reasons = []
    for anchor in anchors:
        problem = _chains_to(chain, anchor, names, now)
        if problem is None:
            return DANEResult(True, "dane-ta")
        reasons.append(problem)
    if reasons:
        return DANEResult(False, reason=f"DANE-TA: {reasons[0]}")
    return DANEResult(
        False,
        reason=f"no TLSA record matches the certificate ({len(ee)} DANE-EE, {len(ta)} DANE-TA)",
    )


def _spki(der: bytes) -> bytes | None:
    """The certificate's SubjectPublicKeyInfo (DER), None when it does not parse."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_der_x509_certificate(der)
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError):
        return None


def _chains_to(
    chain: Sequence[bytes], anchor: bytes, names: Sequence[str], now: datetime.datetime | None
) -> str | None:
    """None when the server's certificate chains up to ``anchor`` (as trust anchor)
    and is valid for one of ``names`` at ``now``; else why not."""
    from cryptography import x509
    from cryptography.x509 import verification

    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
        store = verification.Store([x509.load_der_x509_certificate(anchor)])
    except ValueError as exc:
        return f"a certificate does not parse ({exc})"
    when = now or datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    intermediates = [c for c, der in zip(certs[1:], chain[1:], strict=True) if der != anchor]
    last = "no reference name"
    for name in names:
        # SMTP servers' certificates often come from private CAs: the web PKI's profile
        # of the server certificate's extensions is not asked for, signatures, dates
        # and names are.
        builder = (
            verification.PolicyBuilder()
            .store(store)
            .time(when)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=verification.ExtensionPolicy.permit_all().require_present(
                    x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
                ),
            )
        )
        verifier = builder.build_server_verifier(x509.DNSName(name))
        try:
            verifier.verify(leaf, intermediates)
            return None
        except verification.VerificationError as exc:
            last = f"the chain does not verify up to the TLSA trust anchor for {name} ({exc})"
        except ValueError as exc:
            last = f"{name}: {exc}"
    return last

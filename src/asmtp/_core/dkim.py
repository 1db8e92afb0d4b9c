"""DKIM signing of prepared messages (layer 1, no I/O; optional extra ``dkim``).

This module owns everything asmtp knows about DKIM (RFC 6376): the signing
configuration (:class:`DKIM`: domain, selector, key, which header fields to sign),
adding a ``DKIM-Signature`` header field to a :class:`~asmtp._core.prepared.PreparedMessage`
(:meth:`DKIM.sign`), and the DNS TXT value that publishes a key
(:func:`dns_txt_record`). The cryptography and canonicalization are dkimpy's; asmtp
only decides what is signed and keeps the wire bytes intact.

A message is signed exactly as it goes on the wire: the prepared DATA bytes are
un-dot-stuffed back into the message, signed, and the signature header field is put in
front of the prepared bytes unchanged. No second serialization can drift from what was
signed.

Keys: RSA as PEM (PKCS#1 or PKCS#8; at least 1024 bits, RFC 8301 3.2) gives
``rsa-sha256``; Ed25519 as the base64 of its 32-byte seed, or as PEM PKCS#8 (with the
``cryptography`` package), gives ``ed25519-sha256`` (RFC 8463).

Signing needs ``pip install 'asmtp[dkim]'`` (dkimpy, and PyNaCl for Ed25519); without it
building a :class:`DKIM` raises :class:`~asmtp.errors.InputError` saying so.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import idna

from ..errors import InputError
from .prepared import PreparedMessage
from .wire import MAX_LINE_LENGTH

__all__ = ["DEFAULT_SIGNED_HEADERS", "DKIM", "dns_txt_record"]

#: The header fields signed when present, unless ``headers=`` says otherwise. From is
#: always signed (RFC 6376 5.4).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "in-reply-to",
    "references",
)

# RFC 5322 3.6: fields that may appear at most once. Each present one is named once more
# in h= than it occurs, so a second copy added in transit breaks the signature
# (RFC 6376 8.15).
_SINGLETONS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id"}
    | {"in-reply-to", "references"}
)
# Trace and per-hop fields that change in transit, or must never be on the wire (Bcc):
# RFC 6376 5.4.1. Signing them would break the signature or is refused by dkimpy.
_NEVER_SIGNED = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)
_EXTRA_MISSING = "DKIM signing needs the dkim extra: pip install 'asmtp[dkim]'"
_CRYPTOGRAPHY_MISSING = "needs the cryptography package: pip install cryptography"

_LINE_BREAKS = re.compile("[\r\n\x00]")
# RFC 5321 sub-domain labels; underscore tolerated as in asmtp._core.address.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# RFC 5322 2.2 field-name, and a header line as dkimpy reads it (name, then ':').
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
_PEM = b"-----BEGIN "
_MIN_RSA_BITS = 1024
_ED25519_SEED = 32


def _dkimpy() -> ModuleType:
    """dkimpy, imported on first use so asmtp runs without the extra."""
    try:
        import dkim
    except ImportError:
        raise InputError(_EXTRA_MISSING) from None
    module: ModuleType = dkim
    return module


def _nacl_signing() -> ModuleType:
    try:
        import nacl.signing
    except ImportError:
        raise InputError(_EXTRA_MISSING) from None
    return nacl.signing


def _check_name(what: str, value: object, *, allow_idna: bool) -> str:
    """A DNS name for d= or s=, in ASCII (A-labels)."""
    if not isinstance(value, str) or not value:
        raise InputError(f"DKIM {what} must be a non-empty string, not {value!r}")
    if _LINE_BREAKS.search(value):
        raise InputError(f"DKIM {what}: {value!r} contains CR, LF or NUL")
    name = value
    if not name.isascii():
        if not allow_idna:
            raise InputError(f"DKIM {what}: {value!r} must be ASCII")
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise InputError(f"DKIM {what}: {value!r} is not a valid IDNA name ({exc})") from None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise InputError(f"DKIM {what}: {value!r} is not a valid DNS name")
    return name


def _check_headers(headers: object) -> tuple[str, ...]:
    if isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
        raise InputError(f"DKIM headers must be a tuple of field names, not {headers!r}")
    names: list[str] = []
    for name in headers:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise InputError(f"DKIM headers: {name!r} is not a header field name")
        key = name.lower()
        if key in _NEVER_SIGNED:
            raise InputError(f"DKIM headers: {name!r} must not be signed (RFC 6376 5.4.1)")
        if key not in names:
            names.append(key)
    if "from" not in names:
        names.insert(0, "from")  # RFC 6376 5.4: From MUST be signed
    return tuple(names)


def _key_bytes(what: str, key: object) -> bytes:
    if isinstance(key, str):
        if not key.isascii():
            raise InputError(f"{what}: a key is ASCII text (PEM or base64)")
        return key.encode("ascii")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InputError(f"{what} must be bytes or str, not {type(key).__name__}")


def _ed25519_seed(key: bytes) -> bytes:
    """The base64 seed dkimpy takes, checked with PyNaCl."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != _ED25519_SEED:
        raise InputError("DKIM private_key: not a PEM key nor the base64 of a 32-byte Ed25519 seed")
    _nacl_signing().SigningKey(raw)
    return base64.b64encode(raw)


def _from_pkcs8(pem: bytes) -> tuple[bytes, Literal["rsa-sha256", "ed25519-sha256"]]:
    """A PEM key dkimpy cannot read itself (Ed25519 PKCS#8), converted."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise InputError(f"DKIM private_key: this PEM key {_CRYPTOGRAPHY_MISSING}") from None
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"DKIM private_key: not a usable PEM private key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise InputError(
            f"DKIM private_key: {type(loaded).__name__} keys are not used by DKIM"
            " (RSA or Ed25519 only)"
        )
    raw = loaded.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return _ed25519_seed(base64.b64encode(raw)), "ed25519-sha256"


def _load_private_key(
    private_key: object,
) -> tuple[bytes, Literal["rsa-sha256", "ed25519-sha256"]]:
    """(the key as dkimpy takes it, the algorithm it signs with)."""
    key = _key_bytes("DKIM private_key", private_key)
    dkim = _dkimpy()
    if _PEM not in key:
        return _ed25519_seed(key), "ed25519-sha256"
    # dkimpy's PEM reader expects LF line ends.
    pem = key.strip().replace(b"\r\n", b"\n") + b"\n"
    try:
        parsed = dkim.crypto.parse_pem_private_key(pem)
    except (dkim.crypto.UnparsableKeyError, ValueError, IndexError, TypeError):
        # Not an RSA key dkimpy reads (an Ed25519 PKCS#8 key, say): try converting.
        return _from_pkcs8(pem)
    bits = int(parsed["modulus"]).bit_length()
    if bits < _MIN_RSA_BITS:
        raise InputError(
            f"DKIM private_key: a {bits}-bit RSA key is too short;"
            f" DKIM needs at least {_MIN_RSA_BITS} bits (RFC 8301 3.2), 2048 is usual"
        )
    return pem, "rsa-sha256"


def _content_of(prepared: PreparedMessage) -> bytes:
    """The message as prepared, before dot-stuffing and the final ``.`` (RFC 5321 4.5.2)."""
    data = prepared.data
    if not data.endswith(b"\r\n.\r\n"):
        raise InputError("DKIM: prepared data does not end with CRLF . CRLF")
    content = data[:-3]
    if content.startswith(b".."):
        content = content[1:]
    return content.replace(b"\r\n..", b"\r\n.")


def _header_names(content: bytes) -> list[str]:
    """The field names of the header section, top to bottom, lower case."""
    names = []
    for line in content.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation
        match = _HEADER_LINE.match(line)
        if match is None:
            raise InputError(f"DKIM: {line[:60]!r} is not a header field line")
        names.append(match.group(1).decode("ascii").lower())
    return names


@dataclass(frozen=True, slots=True)
class DKIM:
    """Sign messages for ``domain`` with the key published at
    ``<selector>._domainkey.<domain>`` (RFC 6376, relaxed/relaxed canonicalization).

    ``private_key`` is an RSA key in PEM (``rsa-sha256``), or an Ed25519 key as the
    base64 of its 32-byte seed or as PEM PKCS#8 (``ed25519-sha256``); ``algorithm``
    follows from it. ``headers`` names the header fields to sign when present (default
    :data:`DEFAULT_SIGNED_HEADERS`); From is always signed. Every field present that is
    allowed only once (From, To, Subject, ...) is named once more than it occurs, so a
    copy added later breaks the signature. An internationalized ``domain`` is kept in
    A-labels (as d= carries it). The key never shows in ``repr``.

    >>> signer, txt = DKIM.generate("example.org", "mail")
    >>> signer
    DKIM(domain='example.org', selector='mail', headers=None, canonicalization='relaxed/relaxed', algorithm='ed25519-sha256')
    >>> signer.record_name, txt.startswith("v=DKIM1; k=ed25519; p=")
    ('mail._domainkey.example.org', True)
    """  # noqa: E501

    domain: str
    selector: str
    private_key: bytes | str = field(repr=False)
    headers: tuple[str, ...] | None = None
    canonicalization: Literal["relaxed/relaxed"] = field(default="relaxed/relaxed", init=False)
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = field(default="rsa-sha256", init=False)
    _key: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        domain = _check_name("domain", self.domain, allow_idna=True)
        selector = _check_name("selector", self.selector, allow_idna=False)
        if len(f"{selector}._domainkey.{domain}") > 253:
            raise InputError(f"DKIM: {selector}._domainkey.{domain} is longer than 253")
        if self.headers is not None:
            object.__setattr__(self, "headers", _check_headers(self.headers))
        key, algorithm = _load_private_key(self.private_key)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "_key", key)

    @property
    def record_name(self) -> str:
        """The DNS name of the TXT record holding the public key (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def headers_to_sign(self, content: bytes) -> list[str]:
        """The h= list for a message (``content`` un-stuffed, CRLF line ends): the chosen
        fields that are present, as often as they occur, plus one more of each
        singleton field; From always."""
        chosen = frozenset(self.headers if self.headers is not None else DEFAULT_SIGNED_HEADERS)
        present = _header_names(content)
        if "from" not in present:
            raise InputError("DKIM: the message has no From header field to sign")
        signed = [name for name in present if name in chosen or name == "from"]
        extra = [name for name in dict.fromkeys(signed) if name in _SINGLETONS]
        return signed + extra

    def sign(self, prepared: PreparedMessage) -> PreparedMessage:
        """The same message with a ``DKIM-Signature`` header field in front.

        The prepared bytes are not serialized again: the signature covers exactly the
        message that goes on the wire and is prepended to it, ASCII and folded, so
        dot-stuffing, ``eight_bit`` and ``smtputf8`` stay as they were.
        """
        dkim = _dkimpy()
        content = _content_of(prepared)
        include = [name.encode("ascii") for name in self.headers_to_sign(content)]
        try:
            signature = bytes(
                dkim.sign(
                    content,
                    self.selector.encode("ascii"),
                    self.domain.encode("ascii"),
                    self._key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=self.algorithm.encode("ascii"),
                    include_headers=include,
                )
            )
        except dkim.DKIMException as exc:
            raise InputError(f"DKIM signing failed: {exc}") from exc
        if not signature.endswith(b"\r\n") or any(
            len(line) > MAX_LINE_LENGTH for line in signature.split(b"\r\n")
        ):
            raise InputError("DKIM: the signature header field is malformed")
        return PreparedMessage(
            data=(signature, *prepared.parts),  # the message's own parts, not a copy
            size=prepared.size + len(signature),
            eight_bit=prepared.eight_bit,
            smtputf8=prepared.smtputf8,
        )

    def txt_record(self) -> str:
        """The TXT value publishing this key's public half (see :func:`dns_txt_record`).

        Ed25519 needs only the extra; RSA also needs the ``cryptography`` package.
        """
        if self.algorithm == "ed25519-sha256":
            seed = base64.b64decode(self._key)
            public = bytes(_nacl_signing().SigningKey(seed).verify_key)
            return dns_txt_record(public)
        try:
            from cryptography.hazmat.primitives import serialization
        except ImportError:
            raise InputError(f"DKIM: the TXT value of an RSA key {_CRYPTOGRAPHY_MISSING}") from None
        loaded = serialization.load_pem_private_key(self._key, password=None)
        return dns_txt_record(
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    @classmethod
    def generate(
        cls,
        domain: str,
        selector: str,
        algorithm: Literal["ed25519", "rsa"] = "ed25519",
        *,
        rsa_bits: int = 2048,
        headers: tuple[str, ...] | None = None,
    ) -> tuple[DKIM, str]:
        """A signer with a fresh key, and the TXT value to publish at its
        :attr:`record_name` (for tests and trials; keep real keys outside the code).
        RSA keys need the ``cryptography`` package."""
        if algorithm == "ed25519":
            seed = bytes(_nacl_signing().SigningKey.generate())
            signer = cls(domain, selector, base64.b64encode(seed), headers)
        elif algorithm == "rsa":
            if not isinstance(rsa_bits, int) or rsa_bits < _MIN_RSA_BITS:
                raise InputError(f"DKIM rsa_bits must be at least {_MIN_RSA_BITS}: {rsa_bits!r}")
            try:
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric import rsa
            except ImportError:
                raise InputError(f"DKIM: generating an RSA key {_CRYPTOGRAPHY_MISSING}") from None
            pem = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            signer = cls(domain, selector, pem, headers)
        else:
            raise InputError(f"DKIM algorithm: {algorithm!r} is neither 'ed25519' nor 'rsa'")
        return signer, signer.txt_record()


def dns_txt_record(public_key: bytes | str) -> str:
    """The DKIM key record (RFC 6376 3.6.1) for a public key, as one TXT value.

    ``public_key`` is an Ed25519 public key (32 raw bytes, or their base64), or a PEM
    public key, RSA or Ed25519 (PEM needs the ``cryptography`` package). RSA is
    published as its DER SubjectPublicKeyInfo, Ed25519 as its 32 raw bytes (RFC 8463 4).
    A DNS provider splits a value over 255 octets into several strings itself; in a zone
    file write it as several quoted strings.

    >>> dns_txt_record(bytes(range(32)))
    'v=DKIM1; k=ed25519; p=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8='
    """
    if isinstance(public_key, bytes) and len(public_key) == 32:
        raw = public_key
    else:
        key = _key_bytes("dns_txt_record: public_key", public_key)
        if _PEM in key:
            return _txt_from_pem(key)
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 32:
            raise InputError(
                "dns_txt_record: not a PEM public key nor a 32-byte Ed25519 public key"
            )
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def _txt_from_pem(pem: bytes) -> str:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    except ImportError:
        raise InputError(f"dns_txt_record: a PEM key {_CRYPTOGRAPHY_MISSING}") from None
    try:
        loaded = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InputError(f"dns_txt_record: not a usable PEM public key ({exc})") from None
    if isinstance(loaded, rsa.RSAPublicKey):
        der = loaded.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    if isinstance(loaded, ed25519.Ed25519PublicKey):
        return dns_txt_record(
            loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
    raise InputError(f"dns_txt_record: {type(loaded).__name__} keys are not used by DKIM")

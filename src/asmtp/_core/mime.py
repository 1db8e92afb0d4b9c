"""Header fields and MIME parts written as the email package writes them, without its
header parser (layer 1, sans-IO).

This module owns the fast path of building a message: a field value the email package
would write as it is (ASCII, printable, single-spaced, short enough for one line, not
looking like an RFC 2047 encoded-word) is stored raw (:meth:`email.message.Message.set_raw`)
and parsed only if someone reads it; a text body is encoded by the email package's
rules (:func:`body_octets`); a plain text, HTML, alternative and attachment tree is put
together from parts with raw fields (:func:`content_tree`). Whatever falls outside
(non-ASCII, long or odd values, inline images, calendar invites, unusual file names) is
left to the email package itself by the caller. The email package's header registry is
cached per field name (:data:`BUILD_POLICY`): it would make a new class per field set.

:mod:`~asmtp._core.compiled` writes per-recipient fields with the same rules.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Sequence
from email import policy as email_policy
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from typing import Any

from ..errors import InputError
from .address import split_mailbox

__all__ = [
    "BASE64_BLOCK",
    "BUILD_POLICY",
    "FOLD_AT",
    "SMTPUTF8_POLICY",
    "SMTP_POLICY",
    "address_objects",
    "address_text",
    "base64_lines",
    "body_octets",
    "content_tree",
    "fast_attachment",
    "folded_field",
    "plain_value",
]

#: The email package's line length for fields and 7bit bodies (policy.max_line_length).
FOLD_AT = 78
# RFC 5322 3.2.3 specials: a display name holding one is quoted.
_NEEDS_QUOTING = re.compile(r'[()<>\[\]:;@\\,."]')
# A local part written as it is (dot-atom, RFC 5322 3.2.3).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# A file name written as it is in filename="..." (else RFC 2231, by the email package).
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9 !#$%&'()*+,./:;<=>?@\[\]^_`{|}~-]{1,60}")
#: Octets base64-encoded at once: whole lines of 76 characters (57 octets each), ~1 MiB.
BASE64_BLOCK = 57 * 18_000
# What EmailPolicy.header_fetch_parse takes for a line break in a folded field.
_LINE_BREAK = re.compile(r"\n|\r")


class _CachedRegistry(HeaderRegistry):
    """The email package's header registry, its classes made once per field name
    (``HeaderRegistry.__getitem__`` makes a new class on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


class _BuildPolicy(email_policy.EmailPolicy):
    """``email.policy.default`` whose fields stored raw are parsed once when read, not on
    every read: the generator and the serializer read Content-Type several times per
    part. The parsed field objects are immutable, so copies are shared."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name"):
            return value
        return _parsed(self.header_factory, name, value)


@functools.lru_cache(maxsize=512)
def _parsed(registry: Any, name: str, value: str) -> Any:
    # as EmailPolicy.header_fetch_parse: folded lines joined, then parsed
    return registry(name, "".join(_LINE_BREAK.split(value)))


#: Bodies built here are 7-bit clean (quoted-printable or base64 when the text is not
#: plain short ASCII), so they go to any server, with or without 8BITMIME.
BUILD_POLICY = _BuildPolicy(cte_type="7bit", header_factory=_CachedRegistry())
#: ``email.policy.SMTP`` and ``SMTPUTF8`` with the same caches: the generator reads a
#: message's fields through the policy it writes with.
SMTP_POLICY = BUILD_POLICY.clone(cte_type="8bit", linesep="\r\n")
SMTPUTF8_POLICY = SMTP_POLICY.clone(utf8=True)


def plain_value(name: str, value: str) -> bool:
    """Whether the email package writes ``name: value`` as it is: ASCII, printable,
    single-spaced, not looking like an encoded-word (a reader would decode it), and
    one line."""
    return (
        value.isascii()
        and value.isprintable()
        and "=?" not in value
        and "  " not in value
        and value == value.strip()
        and len(name) + 2 + len(value) <= FOLD_AT
    )


def folded_field(name: str, value: Any) -> str:
    """``name: value`` and its line break, as the email package writes a field set by
    a program: parsed by its header registry and folded (RFC 2047 encoded-words for
    non-ASCII text); with a plain value, the value as it is.

    >>> folded_field("Subject", "Hi Ann")
    'Subject: Hi Ann\\r\\n'
    >>> folded_field("Subject", "Grüße")
    'Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\\r\\n'
    """
    if isinstance(value, str) and plain_value(name, value):
        return f"{name}: {value}\r\n"
    policy = email_policy.SMTP
    folded: str = BUILD_POLICY.header_factory(name, value).fold(policy=policy)
    return folded


def address_text(pairs: Sequence[tuple[str, str]]) -> str | None:
    """(display name, address) pairs as an address list field's value when each can be
    written as it is (ASCII name without specials, dot-atom ASCII local part); else
    None.

    >>> address_text([("Ann Lee", "ann@example.org"), ("", "bo@example.org")])
    'Ann Lee <ann@example.org>, bo@example.org'
    >>> address_text([("Lee, Ann", "ann@example.org")]) is None
    True
    """
    texts = []
    for name, address in pairs:
        local, _, domain = address.rpartition("@")
        if not (address.isascii() and _DOT_ATOM.fullmatch(local) and domain.isascii()):
            return None
        if name and (not plain_value("", name) or _NEEDS_QUOTING.search(name)):
            return None
        texts.append(f"{name} <{address}>" if name else address)
    return ", ".join(texts)


def address_objects(pairs: Sequence[tuple[str, str]]) -> list[Address]:
    """The pairs as the email package's Address objects (a quoted local part unquoted:
    Address() quotes it again as needed)."""
    addresses = []
    for name, addr in pairs:
        local, domain = split_mailbox(addr)
        if local.startswith('"'):
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        addresses.append(Address(display_name=name, username=local, domain=domain))
    return addresses


def body_octets(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) of a UTF-8 text part, LF line endings, by the
    email package's rules: 7bit when ASCII, NUL-free and no line over 78 octets; else
    quoted-printable when it holds a NUL (``=00``, RFC 2045 2.7) or is no longer than
    base64, else base64. (The email package guesses from the first ten lines.)

    >>> body_octets("Hi Ann\\r\\n")
    ('7bit', b'Hi Ann\\n')
    >>> body_octets("Grüße, Ann: your order is on its way = shipped")
    ('quoted-printable', b'Gr=C3=BC=C3=9Fe, Ann: your order is on its way =3D shipped\\n')
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InputError(f"body: not encodable as UTF-8: {exc}") from None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    if data.isascii() and b"\0" not in data and _short_lines(data):
        return "7bit", data
    # RFC 2045 6.7: soft line breaks keep lines at 76 octets; a NUL goes as =00
    quoted = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    if b"\0" in data or len(quoted) <= (len(data) + 2) // 3 * 4 + 1:
        return "quoted-printable", quoted
    return "base64", base64.encodebytes(data)


def _short_lines(data: bytes) -> bool:
    if len(data) <= FOLD_AT:
        return True
    return max(map(len, data.split(b"\n"))) <= FOLD_AT


def _text_part(subtype: str, text: str) -> EmailMessage:
    cte, body = body_octets(text)
    part = EmailMessage(policy=BUILD_POLICY)
    part.set_raw("Content-Type", f'text/{subtype}; charset="utf-8"')
    part.set_raw("Content-Transfer-Encoding", cte)
    part.set_payload(body.decode("ascii"))
    return part


def _multipart(subtype: str, parts: list[EmailMessage]) -> EmailMessage:
    # no boundary yet: serializing chooses one that no body holds
    part = EmailMessage(policy=BUILD_POLICY)
    part.set_raw("Content-Type", f"multipart/{subtype}")
    for child in parts:
        part.attach(child)
    return part


def _attachment_part(filename: str, encoded: str, content_type: str) -> EmailMessage:
    part = EmailMessage(policy=BUILD_POLICY)
    part.set_raw("Content-Type", content_type)
    part.set_raw("Content-Transfer-Encoding", "base64")
    part.set_raw("Content-Disposition", f'attachment; filename="{filename}"')
    part.set_raw("MIME-Version", "1.0")
    part.set_payload(encoded)
    return part


def base64_lines(data: bytes) -> bytearray:
    """RFC 2045 6.8: base64 in lines of 76 characters, as the email package writes it,
    a block of lines at a time into one buffer (the email package and encodebytes hold
    an object per line)."""
    encoded = bytearray()
    for start in range(0, len(data), BASE64_BLOCK):
        encoded += base64.encodebytes(data[start : start + BASE64_BLOCK])
    return encoded


def fast_attachment(filename: str, content_type: str) -> bool:
    """Whether :func:`content_tree` writes this attachment's fields itself: a file
    name that needs no quoting or RFC 2231 encoding, a leaf content type."""
    maintype = content_type.partition("/")[0]
    return (
        maintype not in ("multipart", "message")
        and _PLAIN_FILENAME.fullmatch(filename) is not None
        and '"' not in filename
        and "\\" not in filename
    )


def content_tree(
    msg: EmailMessage,
    body: str,
    mailtype: str,
    alt_text: str | None,
    attachments: list[tuple[str, bytes, str]],
) -> None:
    """Give ``msg`` (its other fields set) its body, alternative and attachments, as
    the email package's set_content, add_alternative and add_attachment would; every
    attachment must pass :func:`fast_attachment`. ``attachments`` is emptied as each is
    encoded (its octets let go of)."""
    subtype = "plain" if mailtype == "text" else "html"
    main = _text_part(subtype, body)
    if alt_text is not None:
        main.set_raw("MIME-Version", "1.0")  # as add_alternative leaves it
        main = _multipart("alternative", [_text_part("plain", alt_text), main])
    if not attachments:
        if alt_text is None:  # one part: its fields are the message's
            for name, value in main.raw_items():
                msg.set_raw(name, value)
            msg.set_raw("MIME-Version", "1.0")
        else:
            msg.set_raw("MIME-Version", "1.0")
            msg.set_raw("Content-Type", "multipart/alternative")
        msg.set_payload(main.get_payload())
        return
    parts = [main]
    attachments.reverse()
    while attachments:  # taken off the list, so that each one's bytes go once encoded
        filename, data, content_type = attachments.pop()
        encoded = base64_lines(data)
        del data  # before the text is made: never the raw, encoded and text at once
        parts.append(_attachment_part(filename, encoded.decode("ascii"), content_type))
        del encoded
    msg.set_raw("MIME-Version", "1.0")
    msg.set_raw("Content-Type", "multipart/mixed")
    for part in parts:
        msg.attach(part)

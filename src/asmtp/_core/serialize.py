"""Writing an :class:`~email.message.EmailMessage` into the octets sent (layer 1, sans-IO).

This module owns serialization: the email package's generator, made to write a block of
lines at a time into a list of pieces (:class:`_PieceGenerator` overrides the
generator's private hooks ``_new_buffer``, ``_write_lines`` and
``_handle_message_delivery_status``, and calls its ``_make_boundary``), the MIME
boundaries (a boundary that a body holds is replaced), ``email.policy.SMTP`` or
``SMTPUTF8``, re-encoding a body part that is not valid 7bit/8bit data, leaving out Bcc,
and the Date and Message-ID a message lacks. The octets go through
:func:`~asmtp._core.wire.to_wire` on the way; :func:`~asmtp._core.prepared.prepare_message`
is the entry point.

Memory: a large message is written, normalized and dot-stuffed a block of lines at a
time and kept as those blocks, never joined; serializing it takes about its own size
and a few blocks more.
"""

from __future__ import annotations

import base64
import copy
import quopri
from collections.abc import Iterator, Sequence
from email import policy as email_policy
from email.generator import BytesGenerator
from email.headerregistry import AddressHeader
from email.message import Message
from email.utils import formatdate, make_msgid
from io import BytesIO
from typing import Any, Self

from ..errors import InputError
from .address import domain_of
from .message import ADDRESS_HEADERS, header_addresses
from .mime import SMTP_POLICY, SMTPUTF8_POLICY
from .wire import BLOCK, MAX_LINE_LENGTH, Wire, first_long_line, to_wire

__all__ = ["serialize_email"]

# The email package folds a field longer than this (policy.max_line_length).
MAX_HEADER_LINE = 78


def _taken(pieces: list[bytes]) -> Iterator[bytes]:
    """The pieces in order, each let go of as it is taken."""
    pieces.reverse()
    while pieces:
        yield pieces.pop()


class _Pieces:
    """What a :class:`_PieceGenerator` writes, kept as a list of pieces: a part written
    into the part around it is moved, not copied (a BytesIO copies a large attachment
    once for each level of nesting, and once more for the caller)."""

    __slots__ = ("pieces",)

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes | _Pieces) -> None:
        if isinstance(data, _Pieces):
            self.pieces.extend(data.pieces)
        elif data:
            self.pieces.append(data)

    def getvalue(self) -> _Pieces:
        return self


class _PieceGenerator(BytesGenerator):
    """The email package's generator writing into :class:`_Pieces`. A text body is
    written as it is, in slices, not split into a list of lines: :func:`to_wire` turns
    its line breaks into CRLF as the generator would have.

    A multipart part must have its boundary before it is written
    (:func:`_new_boundaries`): to choose one, the generator would join its parts.
    message/delivery-status blocks are split and joined as bytes: written flat."""

    _flat = False

    def clone(self, fp: Any) -> Self:
        clone = super().clone(fp)
        clone._flat = self._flat
        return clone

    def _new_buffer(self) -> BytesIO | _Pieces:
        return BytesIO() if self._flat else _Pieces()

    def _write_lines(self, lines: str) -> None:
        if self._flat:
            super()._write_lines(lines)  # type: ignore[misc]  # private, not in the stubs
            return
        for start in range(0, len(lines), BLOCK):
            self.write(lines[start : start + BLOCK])

    def _handle_message_delivery_status(self, msg: Message) -> None:
        self._flat = True
        try:
            super()._handle_message_delivery_status(msg)  # type: ignore[misc]
        finally:
            self._flat = False


def _new_boundaries(message: Message) -> set[str]:
    """Give each multipart part without a boundary a random one, as the generator would
    while writing it; the boundaries given (:func:`_clashes` checks them)."""
    given = set()
    for part in message.walk():
        if part.get_content_maintype() != "multipart" or part.get_boundary():
            continue
        if isinstance(part.get_payload(), str):
            continue  # written as it is, without boundaries
        boundary: str = _PieceGenerator._make_boundary()  # type: ignore[attr-defined]
        _set_boundary(part, boundary)
        given.add(boundary)
    return given


def _set_boundary(part: Message, boundary: str) -> None:
    """``part.set_boundary(boundary)``; a Content-Type stored raw without parameters, as
    the last field (as build_message makes them), is rewritten raw, folded as the email
    package folds it, rather than parsed and stored as a field object."""
    items = list(part.raw_items())
    name, value = items[-1] if items else ("", "")
    if name.lower() != "content-type" or type(value) is not str or ";" in value:
        part.set_boundary(boundary)
        return
    del part["Content-Type"]
    field = f'{value}; boundary="{boundary}"'
    if len("Content-Type: ") + len(field) > MAX_HEADER_LINE:
        field = f'{value};\n boundary="{boundary}"'
    part.set_raw("Content-Type", field)


def _clashes(message: Message, parts: Sequence[bytes], boundaries: set[str]) -> list[Message]:
    """The parts with a boundary given here whose delimiter lines in ``parts`` (blocks
    of whole lines) are not only their own (RFC 2046 5.1.1: one before each body part,
    and the close): a body holds a line that starts with it."""
    clashes: list[Message] = []
    if not boundaries:
        return clashes  # every boundary was there before: the caller's choice
    for part in message.walk():
        boundary = part.get_boundary() if part.get_content_maintype() == "multipart" else None
        if boundary not in boundaries:
            continue
        mark = b"--" + str(boundary).encode("ascii")
        found = sum(p.count(b"\n" + mark) + p.startswith(mark) for p in parts)
        payload = part.get_payload()
        count = len(payload) if isinstance(payload, list) else int(payload is not None)
        if found != max(count, 1) + 1:
            clashes.append(part)
    return clashes


def _has_non_ascii_address(message: Message) -> bool:
    for part in message.walk():
        for name, value in part.raw_items():
            # an ASCII field (stored raw, or parsed and shown decoded) has ASCII addresses
            if name.lower() not in ADDRESS_HEADERS or str(value).isascii():
                continue
            header = value
            if not isinstance(header, AddressHeader):
                header = email_policy.default.header_factory(name, str(value))
            if any(not a.addr_spec.isascii() for a in header.addresses):
                return True
    return False


def _pieces_of(message: Message, policy: email_policy.EmailPolicy[Any]) -> list[bytes]:
    out = _Pieces()
    _PieceGenerator(out, mangle_from_=False, policy=policy).flatten(message)
    return out.pieces


def _serialize(message: Message) -> tuple[list[bytes], bool]:
    """The message's bytes, in pieces, and whether SMTPUTF8 serialization was needed."""
    # Without SMTPUTF8 the email package would put encoded-words into an addr-spec
    # (RFC 2047 5 forbids that) or fail, depending on the Python version.
    if not _has_non_ascii_address(message):
        try:
            return _pieces_of(message, SMTP_POLICY), False
        except UnicodeEncodeError:
            pass
    return _pieces_of(message, SMTPUTF8_POLICY), True


# A clash with a random boundary needs a body that holds it: a second one is plenty.
_BOUNDARY_TRIES = 3


def _write(message: Message, boundaries: set[str]) -> tuple[Wire, bool]:
    """The message written and made ready to send (:func:`to_wire`), and whether
    SMTPUTF8 was needed; a boundary that a body holds is replaced and the message
    written again."""
    for _ in range(_BOUNDARY_TRIES):
        pieces, utf8 = _serialize(message)
        wire = to_wire(_taken(pieces))
        if wire.long_line is not None or wire.nul_line is not None:
            return wire, utf8  # re-encoded and written again, or refused
        clashes = _clashes(message, wire.parts, boundaries)
        if not clashes:
            return wire, utf8
        for part in clashes:
            boundary: str = _PieceGenerator._make_boundary()  # type: ignore[attr-defined]
            part.set_boundary(boundary)
            boundaries.add(boundary)
    raise InputError("message: its bodies hold every MIME boundary tried")


def _needs_reencoding(body: bytes) -> bool:
    # RFC 2045 2.7/2.8: 7bit and 8bit data have lines of at most 998 octets and no NUL.
    return b"\0" in body or first_long_line(body) is not None


def _reencode_parts(message: Message) -> None:
    """Give each leaf part that is not valid 7bit/8bit data (a line over 998 octets,
    a NUL) a 7-bit transfer encoding."""
    for part in message.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte in ("quoted-printable", "base64"):
            continue
        body = part.get_payload(decode=True)
        if not isinstance(body, bytes) or not _needs_reencoding(body):
            continue
        if part.get_content_maintype() == "text":
            # Keep line breaks as line breaks; quoted-printable wraps with soft breaks
            # and writes a NUL as =00.
            text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            encoded, cte = quopri.encodestring(text), "quoted-printable"
        else:
            encoded, cte = base64.encodebytes(body), "base64"
        del part["Content-Transfer-Encoding"]
        part.set_payload(encoded.decode("ascii"))
        part["Content-Transfer-Encoding"] = cte


def _sender_domain(message: Message, fallback: str | None) -> str:
    """The domain for a Message-ID asmtp adds: the author's (Sender, else From), else
    the envelope sender's; never a host name lookup."""
    for name in ("Sender", "From"):
        try:
            found = header_addresses(message, name)
        except InputError:
            continue
        if found:
            return domain_of(found[0])
    return fallback or "localhost"


def _missing_fields(message: Message, domain: str | None) -> bytes:
    """Date and Message-ID lines for a message without them (RFC 5322 3.6: Date is
    required, Message-ID should be there), as build_message writes them."""
    lines = []
    if "Date" not in message:
        lines.append(f"Date: {formatdate(localtime=True)}\r\n")
    if "Message-ID" not in message:
        lines.append(f"Message-ID: {make_msgid(domain=_sender_domain(message, domain))}\r\n")
    return "".join(lines).encode("ascii")


def serialize_email(message: Message, domain: str | None) -> tuple[Wire, bytes, bool]:
    """``message`` written and made ready to send (:func:`~asmtp._core.wire.to_wire`),
    the Date and Message-ID lines it lacks (to go on top; ``domain`` is the envelope
    sender's, for a Message-ID when the message names no author), and whether SMTPUTF8
    is needed. Refuses, with :class:`~asmtp.errors.InputError`, a line too long or a NUL
    outside any body that can be re-encoded, and a control character in the header
    section."""
    to_send = message
    if "Bcc" in message:
        # A shallow copy shares the parts but deleting rebinds the copy's own header
        # list: the caller's message keeps its Bcc.
        to_send = copy.copy(message)
        del to_send["Bcc"]
    boundaries = _new_boundaries(to_send)
    wire, utf8 = _write(to_send, boundaries)
    if wire.long_line is not None or wire.nul_line is not None:
        del wire  # before the copy: never two large results at once
        to_send = copy.deepcopy(message)
        del to_send["Bcc"]
        _reencode_parts(to_send)
        boundaries |= _new_boundaries(to_send)
        wire, utf8 = _write(to_send, boundaries)
        if wire.long_line is not None:
            raise InputError(
                f"message: line {wire.long_line} is longer than {MAX_LINE_LENGTH} octets"
                " and is not in a body that can be re-encoded"
            )
        if wire.nul_line is not None:
            raise InputError(
                f"message: line {wire.nul_line} holds a NUL byte and is not in a body"
                " that can be re-encoded (RFC 2045 2.7: no NUL in 7bit or 8bit data)"
            )
    if wire.head_error is not None:
        raise InputError(wire.head_error)
    # The caller's message is not changed: the missing fields go into the bytes only.
    return wire, _missing_fields(message, domain), utf8 or not wire.head_ascii

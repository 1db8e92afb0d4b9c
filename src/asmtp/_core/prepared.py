"""A message made ready to send (layer 1, sans-IO): :class:`PreparedMessage`.

This module owns the prepared message and what is done with one: preparing it once
from an :class:`~email.message.EmailMessage` or raw bytes (:func:`prepare_message`;
with its envelope, :func:`prepare_envelope`), the bytes DATA sends after its 354 reply
(``data``/``parts``: CRLF line endings, dot-stuffed, ending with ``.``), the chunks BDAT
sends (:meth:`PreparedMessage.chunks`), the flags a session needs for ``SIZE=``,
``BODY=8BITMIME`` and ``SMTPUTF8``, and per-recipient copies that share its octets
(:func:`with_headers`, :class:`MessageIdRemover`). Serializing is
:mod:`~asmtp._core.serialize`'s; the rules for the octets are :mod:`~asmtp._core.wire`'s.

Memory: a large message is kept as the blocks of lines it was prepared in
(:attr:`PreparedMessage.parts`), never joined; copies share them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

from ..errors import InputError
from .address import check_header, check_mailbox, domain_of, parse_address_list, unique_addresses
from .message import envelope_of
from .serialize import serialize_email
from .wire import (
    BDAT_CHUNK,
    BLOCK,
    MAX_LINE_LENGTH,
    Wire,
    check_end_of_data,
    split_chunks,
    to_wire,
    unstuff,
    without_end,
)

__all__ = [
    "MessageIdRemover",
    "PreparedMessage",
    "prepare_envelope",
    "prepare_message",
    "with_headers",
]


@dataclass(frozen=True, slots=True, init=False)
class PreparedMessage:
    """A message ready for DATA, serialized once and reused for every recipient.

    The content (``data``) is written as is after the 354 reply: CRLF line endings,
    dot-stuffed (RFC 5321 4.5.2), ending with ``b"\\r\\n.\\r\\n"``. ``size`` is the
    octets of the content before the final ``.\\r\\n`` (for ``SIZE=``). ``eight_bit``
    is True when any octet is above 127 (``BODY=8BITMIME`` needed); ``smtputf8`` when
    the header section holds raw non-ASCII (``SMTPUTF8`` needed).

    ``parts`` are those bytes in the pieces they are kept in, written one after the
    other: one piece for a small message as prepared, blocks of whole lines (about
    1 MiB each) for a large one; with fields that :func:`with_headers` added in front,
    those and the pieces of the message they came from, shared and never copied (a
    bulk run's per-recipient copies of a large message cost their headers only).
    ``data`` joins them into one bytes object when there are several: a copy, for
    looking at the message, not for sending it.

    BDAT (RFC 3030 CHUNKING) sends the content without dot-stuffing and without the
    final ``.``: :meth:`chunks`.
    """

    parts: tuple[bytes, ...]
    size: int
    eight_bit: bool
    smtputf8: bool
    # The parts with dot-stuffing undone (still ending with the final ".\r\n"), for BDAT:
    # the parts themselves when no line starts with a dot (known when prepared here),
    # else found on first use and kept, so every session sending this message shares them.
    _unstuffed: tuple[bytes, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __init__(
        self, data: bytes | tuple[bytes, ...], size: int, eight_bit: bool, smtputf8: bool
    ) -> None:
        object.__setattr__(self, "parts", data if isinstance(data, tuple) else (data,))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "eight_bit", eight_bit)
        object.__setattr__(self, "smtputf8", smtputf8)
        object.__setattr__(self, "_unstuffed", None)

    @property
    def data(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self, size: int | None = None) -> tuple[tuple[bytes | memoryview, ...], ...]:
        """The content as BDAT sends it (RFC 3030 2): CRLF line endings, no dot-stuffing,
        no final ``.``; in chunks of at most ``size`` octets (default
        :data:`BDAT_CHUNK`), each the pieces to write one after the other. Pieces are
        :attr:`parts` or views of them, never copies, except that a part holding a line
        that starts with a dot is copied once without the dot stuffing added, and kept
        for the next call (every session sending this message shares that copy).

        >>> prepared = prepare_message(b"Subject: hi\\n\\n.hidden\\n")
        >>> prepared.data
        b'Subject: hi\\r\\n\\r\\n..hidden\\r\\n.\\r\\n'
        >>> [b"".join(chunk) for chunk in prepared.chunks()]
        [b'Subject: hi\\r\\n\\r\\n.hidden\\r\\n']
        >>> [bytes(piece) for chunk in prepared.chunks(10) for piece in chunk]
        [b'Subject: h', b'i\\r\\n\\r\\n.hidd', b'en\\r\\n']
        """
        limit = BDAT_CHUNK if size is None else size
        if limit < 1:
            raise InputError(f"a BDAT chunk holds at least one octet: {size!r}")
        pieces = self._unstuffed
        if pieces is None:
            check_end_of_data(self.parts)
            pieces = unstuff(self.parts)
            object.__setattr__(self, "_unstuffed", pieces)
        last = pieces[-1]
        if len(pieces) == 1 and len(last) - 3 <= limit:  # a small message: one chunk
            return ((memoryview(last)[:-3],),)
        return split_chunks(without_end(pieces), limit)


def with_headers(prepared: PreparedMessage, headers: Sequence[tuple[str, str]]) -> PreparedMessage:
    """The same message with header fields added at the top, without serializing it
    again and without copying it: the result's :attr:`~PreparedMessage.parts` are the
    new fields and the message's own (for per-recipient headers such as
    List-Unsubscribe or Message-ID in a bulk run)."""
    lines = []
    for name, value in headers:
        check_header(name, value)
        line = f"{name}: {value}\r\n".encode()
        if len(line) - 2 > MAX_LINE_LENGTH:
            raise InputError(f"header {name!r} is longer than {MAX_LINE_LENGTH} octets")
        lines.append(line)
    extra = b"".join(lines)
    raw_utf8 = not extra.isascii()
    copy = PreparedMessage(
        data=(extra, *prepared.parts) if extra else prepared.parts,
        size=prepared.size + len(extra),
        eight_bit=prepared.eight_bit or raw_utf8,
        smtputf8=prepared.smtputf8 or raw_utf8,
    )
    unstuffed = prepared._unstuffed  # the fields go as they are; the rest is shared
    if unstuffed is None:
        return copy
    if unstuffed is prepared.parts:  # no line starts with a dot: still none
        return _unstuffed_as(copy, copy.parts)
    return _unstuffed_as(copy, (extra, *unstuffed) if extra else unstuffed)


# A Message-ID field in a prepared header section, with its folded continuation lines.
_MESSAGE_ID_FIELD = re.compile(rb"^message-id[ \t]*:(.*\r\n(?:[ \t].*\r\n)*)", re.I | re.M)
_ID_DOMAIN = re.compile(rb"<[^<>@\s]+@([^<>@\s]+)>")


class MessageIdRemover:
    """Takes the Message-ID field out of prepared messages: the base of copies that
    each get their own Message-ID (added with :func:`with_headers`), so that replies
    and bounces name their recipient. Returns the message without it and the domain
    the ID was on (None when there was none).

    Copies for many recipients share the parts of one large message: the part that
    holds the field is split once, and the result reused while copies of it follow.

    >>> base, domain = MessageIdRemover()(prepare_message(
    ...     b"From: a@example.org\\nMessage-ID: <1.2@example.org>\\n\\nHi"))
    >>> base.data, domain
    (b'From: a@example.org\\r\\n\\r\\nHi\\r\\n.\\r\\n', 'example.org')
    """

    def __init__(self) -> None:
        self._last: tuple[bytes, tuple[bytes, ...], str | None] | None = None

    def __call__(self, prepared: PreparedMessage) -> tuple[PreparedMessage, str | None]:
        kept: list[bytes] = []
        domain = None
        parts = prepared.parts
        for index, part in enumerate(parts):
            # Each part holds whole lines: the header section ends at an empty line,
            # which may open a part.
            end = 0 if part.startswith(b"\r\n") else part.find(b"\r\n\r\n")
            if end < 0 or _MESSAGE_ID_FIELD.search(part, 0, end + 2 if end else 0):
                pieces, found = self._split(part, end)
                kept.extend(pieces)
                domain = domain or found
            else:
                kept.append(part)
            if end >= 0:
                kept.extend(parts[index + 1 :])  # the body: shared, never copied
                break
        if len(kept) == len(parts) and all(a is b for a, b in zip(kept, parts, strict=True)):
            return prepared, None
        size = prepared.size - (sum(map(len, parts)) - sum(map(len, kept)))
        base = PreparedMessage(tuple(kept), size, prepared.eight_bit, prepared.smtputf8)
        if prepared._unstuffed is parts:  # no line starts with a dot: still none
            base = _unstuffed_as(base, base.parts)
        return base, domain

    def _split(self, part: bytes, end: int) -> tuple[tuple[bytes, ...], str | None]:
        last = self._last
        if last is not None and last[0] is part:
            return last[1], last[2]
        head_end = len(part) if end < 0 else end + 2
        head = part[:head_end]
        fields = list(_MESSAGE_ID_FIELD.finditer(head))
        if not fields:
            return (part,), None
        found = _ID_DOMAIN.search(fields[0].group(1))
        domain = found.group(1).decode("ascii", "replace") if found else None
        pieces = tuple(p for p in (_MESSAGE_ID_FIELD.sub(b"", head), part[head_end:]) if p)
        self._last = (part, pieces, domain)
        return pieces, domain


def _prepared(wire: Wire, fields: bytes, smtputf8: bool) -> PreparedMessage:
    """The PreparedMessage of ``wire``, with ``fields`` on top and the final ``.``."""
    parts = wire.parts or [b""]
    # A block's copy at most: the first and last blocks are about a block long.
    if fields:
        parts[0] = fields + parts[0]
    last = parts[-1]
    parts[-1] = last + (b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n")
    prepared = PreparedMessage(
        data=tuple(parts),
        size=sum(map(len, parts)) - 3,
        eight_bit=wire.eight_bit,
        smtputf8=smtputf8,
    )
    # No line starts with a dot: BDAT sends the parts as they are (no pass over them).
    return prepared if wire.dot_lines else _unstuffed_as(prepared, prepared.parts)


def _unstuffed_as(prepared: PreparedMessage, parts: tuple[bytes, ...] | None) -> PreparedMessage:
    """``prepared``, told its content without dot-stuffing when that is known."""
    object.__setattr__(prepared, "_unstuffed", parts)
    return prepared


def prepare_message(message: EmailMessage | bytes, *, domain: str | None = None) -> PreparedMessage:
    """Serialize a message once into the exact bytes sent after DATA.

    An :class:`~email.message.EmailMessage` is written with ``email.policy.SMTP``, or
    ``email.policy.SMTPUTF8`` when an address in its headers is non-ASCII. Its Bcc
    header is left out; a missing Date or Message-ID is added in the bytes sent (the
    caller's message is not changed), the Message-ID on the domain of Sender or From,
    else on ``domain`` (the envelope sender's). A body part that is not
    valid 7bit/8bit data (a line longer than 998 octets, a NUL) is re-encoded
    (quoted-printable for text, base64 otherwise); a control character in its header
    section (other than tab) is refused. Raw ``bytes`` are sent as given, line endings
    normalized; a line longer than 998 octets or a NUL byte is refused.

    A large message is prepared a block of lines at a time and kept in
    :attr:`~PreparedMessage.parts`: preparing it takes about its own size in memory
    and a block more.

    >>> prepared = prepare_message(b"Subject: hi\\n\\n.hidden\\nbare\\rCR")
    >>> prepared.data
    b'Subject: hi\\r\\n\\r\\n..hidden\\r\\nbare\\r\\nCR\\r\\n.\\r\\n'
    >>> prepared.size, prepared.eight_bit, prepared.smtputf8
    (35, False, False)
    """
    if isinstance(message, Message):
        return _prepared(*serialize_email(message, domain))
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise InputError(f"message: expected an EmailMessage or bytes, not {type(message)}")
    content = bytes(message)
    wire = to_wire(content[start : start + BLOCK] for start in range(0, len(content), BLOCK))
    if wire.long_line is not None:
        raise InputError(f"message: line {wire.long_line} is longer than {MAX_LINE_LENGTH} octets")
    if wire.nul_line is not None:
        raise InputError(
            f"message: line {wire.nul_line} holds a NUL byte (RFC 2045 2.7: no NUL"
            " in 7bit or 8bit data); give that part a base64 or quoted-printable encoding"
        )
    return _prepared(wire, b"", not wire.head_ascii)


def prepare_envelope(
    message: EmailMessage | bytes,
    sender: str | None,
    recipients: str | Iterable[str] | None,
    *,
    reuse: tuple[bytes, PreparedMessage] | None = None,
) -> tuple[str, list[str], PreparedMessage]:
    """The envelope and the serialized message for a send: from the message's
    headers unless ``sender``/``recipients`` are given; bytes need both. ``reuse``:
    an earlier send's bytes and their preparation, taken again when ``message`` is
    that very bytes object (bytes cannot change; a message object could)."""
    if isinstance(message, EmailMessage):
        env_sender, rcpts = envelope_of(message, sender=sender, recipients=recipients)
    elif isinstance(message, (bytes, bytearray, memoryview)):
        if sender is None or recipients is None:
            raise InputError("a message given as bytes needs sender= and recipients=")
        env_sender = check_mailbox(sender, field="sender", allow_empty=True)
        rcpts = unique_addresses(a for _, a in parse_address_list(recipients, field="recipients"))
        if not rcpts:
            raise InputError("no recipients")
        if reuse is not None and reuse[0] is message:
            return env_sender, rcpts, reuse[1]
        message = bytes(message)
    else:
        raise InputError(f"message must be an EmailMessage or bytes, not {type(message).__name__}")
    return (
        env_sender,
        rcpts,
        prepare_message(message, domain=domain_of(env_sender) if env_sender else None),
    )

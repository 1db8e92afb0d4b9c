"""A message compiled once and filled per recipient (layer 1, sans-IO):
:class:`CompiledMessage`, for personalised bulk runs.

This module owns the fast path of a personalised message: the MIME structure, every
fixed header field, the attachments and their encoding are built and serialized once
(by :func:`~asmtp._core.message.build_message` and
:func:`~asmtp._core.prepared.prepare_message`, with marker texts in place of the
subject and the bodies); each recipient's copy is that serialization with its own To,
Subject, Date, Message-ID and bodies put into the gaps, as bytes, without the email
package. :class:`asmtp.Template` (:mod:`~asmtp._core.template`) and ``asmtp send
--recipients`` fill it alike.
What the email package would decide per message is decided here per recipient, by the
same rules:

* Subject and To: written as they are when ASCII, printable, free of anything that
  reads as an encoded-word and short enough for one line; otherwise folded by the
  email package's own policy (RFC 2047 encoded-words for non-ASCII). A CR, LF, NUL or
  other control character is refused (:func:`~asmtp._core.address.check_header`).
* Bodies: 7bit when the text is ASCII with lines of at most 78 octets and no NUL, as
  the email package writes it; else quoted-printable (soft breaks keep lines under 77
  octets; a NUL is ``=00``) or base64, whichever is shorter (RFC 2045 6.7, 6.8). The
  choice may differ from the email package's guess, which reads the first ten lines.
* Dot-stuffing (RFC 5321 4.5.2) and CRLF line endings for what is filled in.
* A filled body that holds one of the template's MIME boundaries (RFC 2046 5.1.1), a
  recipient whose address is not ASCII (SMTPUTF8), or a template the fast path does not
  cover (inline images, a header section that is not ASCII) take the slow path: the
  message built and serialized whole, as without a template.

Parse-equivalence with the slow path (the email parser reads the same fields and the
same decoded bodies) is what the tests check, over hostile values.
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from collections.abc import Sequence
from email.utils import formatdate, make_msgid
from typing import Any

from .address import check_header
from .message import _date_value, _message_id_value, build_message, envelope_of
from .mime import address_objects, address_text, body_octets, folded_field, plain_value
from .prepared import PreparedMessage, _unstuffed_as, prepare_message

__all__ = ["CompiledMessage"]

# A static piece at least this long is kept as its own part, shared by every copy.
_SHARED_PIECE = 1 << 14


def subject_field(subject: str) -> bytes:
    """The Subject field as sent, folded and encoded as the email package would.

    >>> subject_field("Hi Ann")
    b'Subject: Hi Ann\\r\\n'
    >>> subject_field("Grüße")
    b'Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\\r\\n'
    """
    check_header("Subject", subject)
    return folded_field("Subject", subject).encode("ascii")


def to_field(pairs: Sequence[tuple[str, str]]) -> bytes:
    """The To field for (display name, address) pairs; addresses are ASCII.

    >>> to_field([("Ann Lee", "ann@example.org"), ("", "bo@example.org")])
    b'To: Ann Lee <ann@example.org>, bo@example.org\\r\\n'
    """
    for name, _ in pairs:
        check_header("To", name)
    text = address_text(pairs)
    if text is not None and plain_value("To", text):
        return f"To: {text}\r\n".encode("ascii")
    return folded_field("To", address_objects(pairs)).encode("ascii")


def _wire_body(body: bytes) -> tuple[bytes, bool]:
    """LF-ended lines as DATA sends them: dot-stuffed, CRLF; and whether a line
    started with a dot."""
    stuffed = body.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed.replace(b"\n", b"\r\n"), len(stuffed) != len(body)


# What the gaps of a compiled message are: the fields and bodies filled per recipient
# (_CTE + a body: that body's Content-Transfer-Encoding field).
_TO, _SUBJECT, _MESSAGE_ID, _DATE, _BODY, _ALT, _CTE = 0, 1, 2, 3, 5, 6, 10
_MESSAGE_ID_LINE = re.compile(rb"^Message-ID: <[^<>@\s]+@([^<>@\s]+)>\r\n", re.M)
_DATE_LINE = re.compile(rb"^Date: [^\r\n]+\r\n", re.M)


class _Now:
    """The Date field of a copy made now (RFC 5322 3.6.1: when the message was ready),
    written once a second rather than once a copy."""

    __slots__ = ("field", "second")

    def __init__(self) -> None:
        self.second = -1
        self.field = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.field = f"Date: {formatdate(second, localtime=True)}\r\n".encode("ascii")
            self.second = second
        return self.field


_now = _Now()


class CompiledMessage:
    """A message of :func:`~asmtp._core.message.build_message`'s arguments, compiled
    once; :meth:`fill` makes each recipient's copy, ready to send.

    >>> compiled = CompiledMessage(from_="news@example.org", mailtype="text")
    >>> copy = compiled.fill([("Ann", "ann@example.net")], "Hi Ann", "Dear Ann,\\n.\\n")
    >>> print(copy.data.decode().replace("\\r\\n", "\\n"))  # doctest: +ELLIPSIS
    From: news@example.org
    To: Ann <ann@example.net>
    Subject: Hi Ann
    Date: ...
    Message-ID: <...@example.org>
    X-Mailer: asmtp/...
    Content-Type: text/plain; charset="utf-8"
    Content-Transfer-Encoding: 7bit
    MIME-Version: 1.0
    <BLANKLINE>
    Dear Ann,
    ..
    .
    <BLANKLINE>

    ``options`` are build_message's but ``to``, ``subject``, ``body``, ``alt_text``,
    ``date`` and ``message_id`` (given per copy to :meth:`fill`); ``alternative`` says
    whether copies have an ``alt_text`` (HTML with a plain-text alternative). Every
    option is checked here, once: what cannot be built raises
    :class:`~asmtp.errors.InputError` now, not per recipient. :attr:`sender` is the
    reverse-path the copies give (their Sender, else From).
    """

    def __init__(self, *, alternative: bool = False, **options: Any) -> None:
        self._options = options
        self._alternative = alternative
        self._pieces: list[bytes | int] | None = None
        self._boundaries: tuple[bytes, ...] = ()
        self._domain = "localhost"
        self._dotted = False  # a fixed line starts with a dot
        token = secrets.token_hex(8)
        markers = {
            _SUBJECT: f"asmtp-subject-{token}",
            _BODY: f"asmtp-body-{token}",
            _ALT: f"asmtp-alt-{token}",
        }
        if options.get("inline"):
            self.sender = ""  # not read: nothing is compiled
            return  # the body's cid: references are rewritten: built whole per copy
        built = build_message(
            to=None,
            subject=markers[_SUBJECT],
            body=markers[_BODY],
            alt_text=markers[_ALT] if alternative else None,
            **options,
        )
        self.sender = envelope_of(built, recipients=["placeholder@example.invalid"])[0]
        prepared = prepare_message(built)
        if prepared.eight_bit or prepared.smtputf8:
            return
        self._compile(b"".join(prepared.parts)[:-3], markers)

    def _compile(self, data: bytes, markers: dict[int, str]) -> None:
        """Cut the serialized template at its gaps: (start, end, gap) spans of the
        octets that differ per copy, the fixed octets between them kept as they are."""
        head_end = data.find(b"\r\n\r\n") + 2
        subject = f"Subject: {markers[_SUBJECT]}\r\n".encode("ascii")
        found_id = _MESSAGE_ID_LINE.search(data, 0, head_end)
        found_date = _DATE_LINE.search(data, 0, head_end)
        at = data.find(subject, 0, head_end)
        if at < 0 or found_id is None or found_date is None:
            return
        self._domain = found_id.group(1).decode("ascii")
        cc = data.find(b"\r\nCc:", 0, at)  # To goes before Cc, as build_message writes it
        to_at = at if cc < 0 else cc + 2
        spans = [
            (to_at, to_at, _TO),
            (at, at + len(subject), _SUBJECT),
            (found_id.start(), found_id.end(), _MESSAGE_ID),
            (found_date.start(), found_date.end(), _DATE),
        ]
        cte = b"Content-Transfer-Encoding: 7bit\r\n"
        for gap in (_ALT, _BODY) if self._alternative else (_BODY,):
            mark = f"\r\n\r\n{markers[gap]}\r\n".encode("ascii")
            found = data.find(mark)
            if found < 0 or data.count(mark) != 1:
                return
            # the part's own field: the last one before its body, in the same section
            field = data.rfind(cte, 0, found + 2)
            if field < 0 or data.find(b"\r\n\r\n", field, found) >= 0:
                return
            spans.append((field, field + len(cte), _CTE + gap))
            spans.append((found + 4, found + len(mark), gap))
        spans.sort()
        pieces: list[bytes | int] = []
        position = 0
        for start, stop, gap in spans:
            if start < position:
                return  # overlapping gaps: not a shape this compiles
            if start > position:
                pieces.append(data[position:start])
            pieces.append(gap)
            position = stop
        pieces.append(data[position:])
        self._boundaries = tuple(
            b"--" + found for found in re.findall(rb'boundary="([^"]+)"', data)
        )
        self._dotted = any(
            isinstance(p, bytes) and (p.startswith(b".") or b"\r\n." in p) for p in pieces
        )
        self._pieces = pieces

    @property
    def compiled(self) -> bool:
        """Whether copies take the fast path (else each is built whole)."""
        return self._pieces is not None

    def fill(
        self,
        to: Sequence[tuple[str, str]],
        subject: str,
        body: str,
        alt_text: str | None = None,
        *,
        date: datetime.datetime | str | None = None,
        message_id: str | None = None,
    ) -> PreparedMessage:
        """The copy for ``to`` ((display name, address) pairs) with these texts; its
        Date is ``date`` (build_message's forms), else now; its Message-ID is
        ``message_id``, else a new one on the domain of the template's."""
        pieces = self._pieces
        if pieces is None or not all(address.isascii() for _, address in to):
            return self._whole(to, subject, body, alt_text, date, message_id)
        encoded = {_BODY: body_octets(body)}
        if self._alternative:
            encoded[_ALT] = body_octets(alt_text or "")
        for _, octets in encoded.values():
            if any(mark in octets for mark in self._boundaries):
                # RFC 2046 5.1.1
                return self._whole(to, subject, body, alt_text, date, message_id)
        if date is None:
            date_field = _now()
        else:
            date_field = folded_field("Date", _date_value(date)).encode("ascii")
        if message_id is None:
            id_field = f"Message-ID: {make_msgid(domain=self._domain)}\r\n".encode("ascii")
        else:  # checked as build_message checks it
            id_field = folded_field("Message-ID", _message_id_value(message_id, "")).encode()
            if not id_field.isascii():  # raw UTF-8 in the header section: SMTPUTF8
                return self._whole(to, subject, body, alt_text, date, message_id)
        out: list[bytes] = []
        parts: list[bytes] = []
        dotted = self._dotted
        for piece in pieces:
            if isinstance(piece, bytes):
                if len(piece) >= _SHARED_PIECE:
                    parts += [b"".join(out), piece]
                    out = []
                else:
                    out.append(piece)
            elif piece == _TO:
                if to:
                    out.append(to_field(to))
            elif piece == _SUBJECT:
                out.append(subject_field(subject))
            elif piece == _MESSAGE_ID:
                out.append(id_field)
            elif piece == _DATE:
                out.append(date_field)
            elif piece >= _CTE:
                cte = encoded[piece - _CTE][0]
                out.append(f"Content-Transfer-Encoding: {cte}\r\n".encode("ascii"))
            else:
                octets, stuffed = _wire_body(encoded[piece][1])
                dotted = dotted or stuffed
                out.append(octets)
        out.append(b".\r\n")
        parts.append(b"".join(out))
        parts = [p for p in parts if p]
        size = sum(map(len, parts)) - 3
        prepared = PreparedMessage(tuple(parts), size, False, False)
        return prepared if dotted else _unstuffed_as(prepared, prepared.parts)

    def _whole(
        self,
        to: Sequence[tuple[str, str]],
        subject: str,
        body: str,
        alt_text: str | None,
        date: datetime.datetime | str | None,
        message_id: str | None,
    ) -> PreparedMessage:
        """The slow path: built and serialized whole."""
        message = build_message(
            to=[str(a) for a in address_objects(to)] or None,
            subject=subject,
            body=body,
            alt_text=alt_text if self._alternative else None,
            date=date,
            message_id=message_id,
            **self._options,
        )
        return prepare_message(message)

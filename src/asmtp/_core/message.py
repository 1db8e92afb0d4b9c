"""Message building, envelopes and DATA preparation (layer 1, sans-IO).

This module owns what a message looks like on the wire: building an
:class:`~email.message.EmailMessage` from plain arguments (:func:`build_message`),
deriving the SMTP envelope from a message (:func:`envelope_of`), and turning a message
into the exact bytes sent after DATA's 354 reply (:func:`prepare_message`): CRLF line
endings, dot-stuffing, the terminating ``.``, and the flags a session needs for
``SIZE=``, ``BODY=8BITMIME`` and ``SMTPUTF8``. MIME itself is left to the
:mod:`email` package; nothing here writes MIME by hand. What goes around the body
(attachments, inline images, calendar invites, List-* and priority fields) is checked
in :mod:`~asmtp._core.parts` and put into the tree here.

Line endings: a bare CR and a bare LF each count as one line break, as a CRLF does.
They all leave as CRLF, so no server can be made to see a different end of data than
asmtp meant (SMTP smuggling).

Memory: a large message is written, normalized and dot-stuffed a block of lines at a
time and kept as those blocks (:attr:`PreparedMessage.parts`), never joined; preparing
it takes about its own size and a few blocks more.
"""

from __future__ import annotations

import base64
import copy
import datetime
import quopri
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email import policy as email_policy
from email.generator import BytesGenerator
from email.header import Header, decode_header
from email.headerregistry import Address, AddressHeader
from email.message import EmailMessage, Message
from email.utils import format_datetime, formatdate, make_msgid, parsedate_to_datetime
from io import BytesIO
from typing import Any, Self, TypeAlias

from .._version import __version__
from ..errors import InputError
from .address import (
    check_header,
    check_mailbox,
    domain_of,
    parse_address_list,
    split_mailbox,
    unique_addresses,
)
from .parts import (
    Attachment,
    InlineInput,
    ListHeadersInput,
    Priority,
    calendar_invite,
    inline_parts,
    link_inline_parts,
    list_fields,
    load_attachment,
    priority_fields,
)

__all__ = [
    "X_MAILER",
    "AddressInput",
    "Attachment",
    "HeadersInput",
    "InlineInput",
    "ListHeadersInput",
    "MessageIdRemover",
    "PreparedMessage",
    "Priority",
    "build_message",
    "envelope_of",
    "prepare_envelope",
    "prepare_message",
    "with_headers",
]

X_MAILER = f"asmtp/{__version__}"

#: What To, Cc, From and ``recipients=`` accept: see
#: :func:`~asmtp._core.address.parse_address_list`.
AddressInput: TypeAlias = str | Iterable[str] | None
#: Extra headers: a mapping or (name, value) pairs; a None value drops that header.
HeadersInput: TypeAlias = Mapping[str, str | None] | Iterable[tuple[str, str | None]] | None

# RFC 5321 4.5.3.1.6: at most 998 octets per line before the CRLF.
MAX_LINE_LENGTH = 998

# Bodies built here are 7-bit clean (quoted-printable or base64 when the text is not
# plain short ASCII), so they go to any server, with or without 8BITMIME.
_BUILD_POLICY = email_policy.default.clone(cte_type="7bit")

# Set through build_message's own arguments, or derived from the body.
_RESERVED_HEADERS = {
    "to": "pass to=",
    "cc": "pass cc=",
    "bcc": "pass Bcc recipients to the sender, never as a header",
    "from": "pass from_=",
    "subject": "pass subject=",
    "date": "pass date=",
    "message-id": "pass message_id=",
    "mime-version": "it is set from the body",
    "content-type": "it is set from the body",
    "content-transfer-encoding": "it is set from the body",
}
_ADDRESS_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "sender", "reply-to"}
    | {"resent-from", "resent-to", "resent-cc", "resent-bcc", "resent-sender"}
)
_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_QUOTED_PAIR = re.compile(r"\\(.)")
# Octets base64-encoded at once: whole lines of 76 characters (57 octets each), ~1 MiB.
_BASE64_BLOCK = 57 * 18_000


def _address_objects(pairs: list[tuple[str, str]]) -> list[Address]:
    addresses = []
    for name, addr in pairs:
        local, domain = split_mailbox(addr)
        if local.startswith('"'):
            # Address() takes the local part unquoted and quotes it again as needed.
            local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        addresses.append(Address(display_name=name, username=local, domain=domain))
    return addresses


def _header_items(headers: HeadersInput) -> list[tuple[str, str | list[Address] | None]]:
    if headers is None:
        return []
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    items: list[tuple[str, str | list[Address] | None]] = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InputError(f"headers: {pair!r} is not a (name, value) pair")
        name, value = pair
        check_header(name, "" if value is None else value)
        key = name.lower()
        if key in _RESERVED_HEADERS:
            raise InputError(f"headers: {name!r} cannot be given here: {_RESERVED_HEADERS[key]}")
        if value is not None and key in _ADDRESS_HEADERS:
            # Sender, Reply-To, Resent-*: checked and normalized like To.
            found = parse_address_list(value, field=f"header {name!r}")
            if key in ("sender", "resent-sender") and len(found) != 1:
                raise InputError(f"header {name!r}: exactly one address is required")
            items.append((name, _address_objects(found)))
        else:
            items.append((name, value))
    return items


def _date_value(date: datetime.datetime | str | None) -> str:
    if date is None:
        return formatdate(localtime=True)
    if isinstance(date, datetime.datetime):
        # A naive datetime is taken as local time.
        return format_datetime(date if date.tzinfo is not None else date.astimezone())
    check_header("Date", date)
    try:
        parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise InputError(f"date: {date!r} is not an RFC 5322 date") from None
    return date


def _message_id_value(message_id: str | None, sender: str) -> str:
    if message_id is None:
        # Always with a domain: without one make_msgid() looks up the host name.
        return make_msgid(domain=domain_of(sender))
    check_header("Message-ID", message_id)
    value = message_id.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    if not _MESSAGE_ID.fullmatch(value):
        raise InputError(f"message_id: {message_id!r} is not of the form <left@right>")
    return value


def _field_arguments(
    header_items: list[tuple[str, str | list[Address] | None]],
    reply_to: AddressInput,
    list_headers: ListHeadersInput,
    priority: Priority | None,
) -> list[tuple[str, str | list[Address]]]:
    """The fields of ``reply_to=``, ``list_headers=`` and ``priority=``, checked; a
    field that ``headers=`` names too is refused: it is given in one place."""
    fields: list[tuple[str, str | list[Address], str]] = []
    reply_to_pairs = parse_address_list(reply_to, field="reply_to")
    if reply_to_pairs:
        fields.append(("Reply-To", _address_objects(reply_to_pairs), "reply_to="))
    fields += [(name, value, "list_headers=") for name, value in list_fields(list_headers)]
    fields += [(name, value, "priority=") for name, value in priority_fields(priority)]
    given = {name.lower() for name, _ in header_items}
    for name, _, argument in fields:
        if name.lower() in given:
            raise InputError(f"headers: {name!r} is also set by {argument}: give it in one place")
    return [(name, value) for name, value, _ in fields]


def build_message(
    *,
    to: AddressInput,
    from_: AddressInput,
    subject: str = "",
    body: str = "",
    mailtype: str = "text",
    alt_text: str | None = None,
    cc: AddressInput = None,
    headers: HeadersInput = None,
    attachments: Iterable[Attachment] = (),
    date: datetime.datetime | str | None = None,
    message_id: str | None = None,
    reply_to: AddressInput = None,
    priority: Priority | None = None,
    list_headers: ListHeadersInput = None,
    inline: InlineInput = None,
    calendar: str | bytes | None = None,
) -> EmailMessage:
    """Build a message from plain arguments; every input is checked before building.

    ``to``, ``cc``, ``reply_to`` and ``from_`` take the forms of
    :func:`~asmtp._core.address.parse_address_list` (``from_`` must hold exactly one
    address); display names are kept, comments dropped, IDN domains converted to
    IDNA. ``mailtype`` is "text" (text/plain) or "html" (text/html; with ``alt_text``,
    multipart/alternative with the plain text first). Bodies are UTF-8 and 7-bit clean
    on the wire (a body holding a NUL is quoted-printable, never raw). Bcc is never a
    header: give Bcc recipients to the sender instead. A control character other than
    tab in the subject or another header is refused (:func:`~asmtp._core.address.check_header`).

    ``headers`` adds headers or replaces defaults (X-Mailer); a None value drops that
    header (``{"X-Mailer": None}``). Sender, Reply-To and Resent-* values are checked
    as addresses. ``attachments`` are paths (type guessed from the name,
    application/octet-stream when unknown) or (filename, data, content_type) tuples.
    A path must name a regular file: a device, FIFO, directory or socket is refused.
    Files are read here, synchronously; :func:`asmtp.sendmail` calls this in a worker
    thread, so an event loop never waits for a large attachment.

    ``priority`` ("high", "normal" or "low") writes X-Priority, Importance and
    Priority; ``list_headers`` writes List-Id, List-Unsubscribe and the other List-*
    fields (:func:`~asmtp._core.parts.list_fields`). A field set by ``reply_to``,
    ``priority`` or ``list_headers`` cannot be in ``headers`` too.

    ``inline`` (with ``mailtype="html"``) maps the names the HTML refers to as
    ``cid:NAME`` to images: a path, the image's bytes (PNG, JPEG, GIF, WebP) or a
    (filename, data, content_type) tuple. Each gets a Content-ID made on the sender's
    domain and the HTML's ``cid:NAME`` is rewritten to it; a name of the form
    ``left@right`` is the Content-ID itself and left as it is. A ``cid:`` that names
    no image, or an image the HTML never refers to, is refused. The HTML and its images
    go into multipart/related (RFC 2387), inside the alternative when there is one.

    ``calendar`` is an iCalendar object (str, or UTF-8 bytes; checked by
    :func:`~asmtp._core.parts.calendar_invite`), sent as mail clients expect an invite
    (RFC 6047): a ``text/calendar; method=...`` alternative after the body, and the
    same text as an ``invite.ics`` attachment. With everything, the tree is::

        multipart/mixed
          multipart/alternative
            text/plain                       alt_text
            multipart/related
              text/html                      body
              image/png                      inline, Content-ID <...>
            text/calendar; method=REQUEST    calendar
          application/ics                    invite.ics
          ...                                attachments

    >>> msg = build_message(to="Ann <ann@example.net>", from_="jack@example.org",
    ...                     subject="Hello", body="Hi Ann.\\n")
    >>> msg["To"], msg["From"], msg["Subject"], msg.get_content_type()
    ('Ann <ann@example.net>', 'jack@example.org', 'Hello', 'text/plain')
    >>> msg["Message-ID"].endswith("@example.org>"), msg["X-Mailer"] == X_MAILER
    (True, True)
    """
    # Check everything first: a refusal must not leave a half-built message behind.
    to_pairs = parse_address_list(to, field="to")
    cc_pairs = parse_address_list(cc, field="cc")
    from_pairs = parse_address_list(from_, field="from_")
    if len(from_pairs) != 1:
        raise InputError(f"from_: exactly one address is required, got {len(from_pairs)}")
    check_header("Subject", subject)
    if mailtype not in ("text", "html"):
        raise InputError(f"mailtype: {mailtype!r} is neither 'text' nor 'html'")
    if not isinstance(body, str):
        raise InputError(f"body: must be a str, not {type(body).__name__}")
    if alt_text is not None:
        if mailtype != "html":
            raise InputError("alt_text: only used with mailtype='html'")
        if not isinstance(alt_text, str):
            raise InputError(f"alt_text: must be a str, not {type(alt_text).__name__}")
    header_items = _header_items(headers)
    more_fields = _field_arguments(header_items, reply_to, list_headers, priority)
    date_value = _date_value(date)
    message_id_value = _message_id_value(message_id, from_pairs[0][1])
    if inline and mailtype != "html":
        raise InputError("inline: only used with mailtype='html' (the HTML refers to cid:NAME)")
    images = inline_parts(inline, domain_of(from_pairs[0][1]))
    if images:
        body = link_inline_parts(body, images)
    invite = calendar_invite(calendar) if calendar is not None else None
    loaded = [load_attachment(item) for item in attachments]

    msg = EmailMessage(policy=_BUILD_POLICY)
    try:
        msg["From"] = _address_objects(from_pairs)
        if to_pairs:
            msg["To"] = _address_objects(to_pairs)
        if cc_pairs:
            msg["Cc"] = _address_objects(cc_pairs)
        msg["Subject"] = subject
        msg["Date"] = date_value
        msg["Message-ID"] = message_id_value
        msg["X-Mailer"] = X_MAILER
        for name, field_value in more_fields:
            msg[name] = field_value
        replaced: set[str] = set()
        for name, value in header_items:
            key = name.lower()
            if value is None or key not in replaced:
                # The first value given for a name replaces the default; later ones add.
                del msg[name]
            replaced.add(key)
            if value is not None:
                msg[name] = value
    except ValueError as exc:  # e.g. a second Reply-To: the email package refuses it
        raise InputError(f"headers: {exc}") from exc

    def cte(text: str) -> str | None:
        # RFC 2045 2.7: no NUL in 7bit data; quoted-printable carries it as =00.
        return "quoted-printable" if "\0" in text else None

    try:
        if mailtype == "text":
            msg.set_content(body, subtype="plain", charset="utf-8", cte=cte(body))
        elif alt_text is None:
            msg.set_content(body, subtype="html", charset="utf-8", cte=cte(body))
        else:
            msg.set_content(alt_text, subtype="plain", charset="utf-8", cte=cte(alt_text))
            msg.add_alternative(body, subtype="html", charset="utf-8", cte=cte(body))
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InputError(f"body: not encodable as UTF-8: {exc}") from None
    if images:
        # The HTML part becomes multipart/related holding it, then each image.
        html = msg if alt_text is None else list(msg.iter_parts())[-1]
        for image in images:
            maintype, _, subtype = image.content_type.partition("/")
            html.add_related(
                image.data,
                maintype=maintype,
                subtype=subtype,
                cid=image.content_id,
                disposition="inline",
                filename=image.filename,
            )
    if invite is not None:
        msg.add_alternative(invite.text, subtype="calendar", charset="utf-8")
        *_, calendar_part = msg.iter_parts()
        calendar_part.replace_header("Content-Type", invite.content_type)
        # The same object as a file, as mail clients send it: application/ics, so that
        # a reader does not take it for a second invite (RFC 5545 8.1: CRLF lines).
        msg.add_attachment(
            invite.text.replace("\n", "\r\n").encode("utf-8"),
            maintype="application",
            subtype="ics",
            filename="invite.ics",
            params={"name": "invite.ics"},
        )
    loaded.reverse()
    while loaded:  # taken off the list, so that each one's bytes go once encoded
        filename, data, content_type = loaded.pop()
        maintype, _, subtype = content_type.partition("/")
        try:
            msg.add_attachment(b"", maintype=maintype, subtype=subtype, filename=filename)
        except (TypeError, ValueError) as exc:
            raise InputError(f"attachments: {filename!r}: {exc}") from exc
        # RFC 2045 6.8: base64 in lines of 76 characters, as the email package writes
        # it, a block of lines at a time into one buffer (the email package and
        # encodebytes hold an object per line); the raw bytes go before the text is made.
        encoded = bytearray()
        for start in range(0, len(data), _BASE64_BLOCK):
            encoded += base64.encodebytes(data[start : start + _BASE64_BLOCK])
        del data
        *_, part = msg.iter_parts()
        part.set_payload(encoded.decode("ascii"))
        del encoded
    return msg


_RAW_OCTET = re.compile("[\udc80-\udcff]")


def _from_raw_octets(field: str, text: str) -> str:
    """Undo the surrogate escapes the email parser uses for raw 8-bit header octets."""
    if not _RAW_OCTET.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise InputError(f"{field}: {text!r} holds octets that are not UTF-8") from None


def _compat32_text(name: str, value: object) -> str:
    if isinstance(value, Header):
        # compat32 wraps raw 8-bit header octets in a Header whose str() would replace
        # them with U+FFFD; take the octets back and read them as UTF-8 (RFC 6532).
        try:
            return "".join(
                chunk.decode("utf-8") if isinstance(chunk, bytes) else chunk
                for chunk, _ in decode_header(value)
            )
        except UnicodeError:
            raise InputError(f"{name}: {str(value)!r} holds octets that are not UTF-8") from None
    return str(value)


def _header_addresses(message: Message, name: str) -> list[str]:
    """Every addr-spec in the message's ``name`` headers, checked and normalized."""
    result: list[str] = []
    for value in message.get_all(name, []):
        if isinstance(value, AddressHeader):
            # Parsed by the email package (groups such as "undisclosed-recipients:;" too).
            for address in value.addresses:
                addr = _from_raw_octets(name, address.addr_spec)
                result.append(check_mailbox(addr, field=name))
        else:
            text = _from_raw_octets(name, _compat32_text(name, value))
            result.extend(addr for _, addr in parse_address_list(text, field=name))
    return result


def envelope_of(
    message: EmailMessage,
    *,
    sender: str | None = None,
    recipients: AddressInput = None,
) -> tuple[str, list[str]]:
    """The SMTP envelope (reverse-path, recipients) for a message.

    The sender is ``sender`` if given ("" is the null reverse-path), else the Sender
    header, else From; that header must hold exactly one address. Recipients are
    ``recipients`` if given, else every address in To, Cc and Bcc. Addresses are
    checked, normalized and de-duplicated (first seen kept).

    >>> msg = build_message(to="a@example.net, b@example.net", cc="A@EXAMPLE.NET",
    ...                     from_="Jack <jack@example.org>")
    >>> envelope_of(msg)
    ('jack@example.org', ['a@example.net', 'b@example.net', 'A@EXAMPLE.NET'])
    """
    if sender is not None:
        reverse_path = check_mailbox(sender, field="sender", allow_empty=True)
    else:
        field = "Sender" if "Sender" in message else "From"
        found = _header_addresses(message, field)
        if len(found) != 1:
            raise InputError(
                f"sender: the {field} header holds {len(found)} addresses, not exactly one;"
                " pass sender="
            )
        reverse_path = found[0]
    if recipients is not None:
        forward = [addr for _, addr in parse_address_list(recipients, field="recipients")]
    else:
        forward = [a for name in ("To", "Cc", "Bcc") for a in _header_addresses(message, name)]
    forward = unique_addresses(forward)
    if not forward:
        raise InputError("recipients: none given, and the message has no To, Cc or Bcc")
    return reverse_path, forward


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
            _check_end_of_data(self.parts)
            pieces = _unstuff(self.parts)
            object.__setattr__(self, "_unstuffed", pieces)
        last = pieces[-1]
        if len(pieces) == 1 and len(last) - 3 <= limit:  # a small message: one chunk
            return ((memoryview(last)[:-3],),)
        return _split(_without_end(pieces), limit)


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


def _normalize_line_endings(content: bytes) -> bytes:
    # Three C-speed passes: CRLF -> LF, lone CR -> LF, LF -> CRLF.
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return content.replace(b"\n", b"\r\n")


def _long_line(content: bytes) -> int | None:
    """The 1-based number of the first line longer than 998 octets, if any.

    This runs for every message sent, so it must stay cheap: splitting in C and
    comparing lengths beats a regex that rescans up to 998 octets at every offset."""
    if len(content) <= MAX_LINE_LENGTH:
        return None
    for number, line in enumerate(content.splitlines(), 1):
        if len(line) > MAX_LINE_LENGTH:
            return number
    return None


# A large message is written, normalized and dot-stuffed a block of whole lines at a
# time: preparing it holds the result and about a block more, never a second copy.
_BLOCK = 1 << 20

#: The most octets one BDAT command carries (RFC 3030), unless told otherwise
#: (:meth:`PreparedMessage.chunks`): a message up to this size goes in one
#: ``BDAT n LAST``; a larger one in chunks of this size, views of its blocks.
BDAT_CHUNK = _BLOCK


def _line_blocks(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The octets of ``chunks`` again, in blocks that end with a line break, one each
    time ``size`` octets or more have come: a CR at the end waits for the next block,
    as it may be half of a CRLF. A line over 998 octets is let out wherever it has got to:
    it cannot be sent as it is, so its part is re-encoded or the message refused."""
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held < size:
            continue
        buf = b"".join(pending)
        pending.clear()
        stop = len(buf) - buf.endswith(b"\r")
        cut = max(buf.rfind(b"\n", 0, stop), buf.rfind(b"\r", 0, stop)) + 1
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
        if len(buf) - buf.endswith(b"\r") > MAX_LINE_LENGTH:
            yield buf
            buf = b""
        if buf:
            pending.append(buf)
        held = len(buf)
    if pending:
        yield b"".join(pending)


# RFC 5322 2.2 and 3.2.5: a field body is printable characters and WSP; the other
# US-ASCII controls are obsolete syntax, never generated (a CR or LF here is a CRLF).
_HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _header_error(header: bytes) -> str | None:
    found = _HEADER_CONTROL.search(header)
    if found is None:
        return None
    start = header.rfind(b"\r\n", 0, found.start())
    name = header[start + 2 if start >= 0 else 0 :].split(b":", 1)[0]
    return (
        f"message: header {name.decode('ascii', 'replace')!r} holds the control"
        f" character U+{found.group()[0]:04X}: RFC 5322 allows only printable"
        " characters and tabs"
    )


@dataclass(slots=True)
class _Wire:
    """A message's content as sent after DATA (before the final ``.``), in blocks of
    whole lines, and what was found in it on the way."""

    parts: list[bytes] = field(default_factory=list)
    eight_bit: bool = False
    head_ascii: bool = True
    long_line: int | None = None  # the number of the first line over 998 octets
    nul_line: int | None = None  # the number of the first line holding a NUL
    head_error: str | None = None  # a control character in the header section
    dot_lines: bool = False  # a line starts with a dot (dot-stuffing doubled it)

    def lines_so_far(self) -> int:
        return sum(part.count(b"\n") for part in self.parts)


def _wire(chunks: Iterable[bytes], size: int = _BLOCK) -> _Wire:
    """CRLF line endings and dot-stuffing (RFC 5321 4.5.2) for the octets of
    ``chunks``, with the checks of what may be sent, a block of whole lines at a time:
    the same result as for the chunks joined, without ever joining them."""
    wire = _Wire()
    in_head = True
    for raw in _line_blocks(chunks, size):
        block = _normalize_line_endings(raw)
        del raw  # a block's worth: let it go before the next copy
        if wire.long_line is None and (number := _long_line(block)) is not None:
            wire.long_line = wire.lines_so_far() + number
        if wire.nul_line is None and (nul := block.find(b"\0")) >= 0:
            wire.nul_line = wire.lines_so_far() + block.count(b"\n", 0, nul) + 1
        if in_head:
            # Blocks start at a line: an empty line opening one ends the header section.
            end = 0 if block.startswith(b"\r\n") else block.find(b"\r\n\r\n")
            head = block if end < 0 else block[:end]
            wire.head_ascii = wire.head_ascii and head.isascii()
            wire.head_error = wire.head_error or _header_error(head)
            in_head = end < 0
        length = len(block)
        if block.startswith(b"."):
            block = b"." + block
        block = block.replace(b"\r\n.", b"\r\n..")
        wire.dot_lines = wire.dot_lines or len(block) != length
        wire.eight_bit = wire.eight_bit or not block.isascii()
        wire.parts.append(block)
    return wire


def _check_end_of_data(parts: Sequence[bytes]) -> None:
    """Content made ready for DATA ends with CRLF . CRLF, across pieces."""
    tail = b""
    for part in reversed(parts):  # the last five octets
        tail = part[len(tail) - 5 :] + tail
        if len(tail) >= 5:
            break
    if tail != b"\r\n.\r\n":
        raise InputError("message content must end with CRLF . CRLF")


def _unstuff(parts: Sequence[bytes]) -> tuple[bytes, ...]:
    """``parts`` (content made ready for DATA) with the dot-stuffing undone: the dot
    RFC 5321 4.5.2 added to each line that starts with one, whose stuffed form starts
    with two (``CRLF ..``). A part without such a line is kept, not copied; one with
    them is copied once without the added dots. A line may run across parts."""
    out: list[bytes] = []
    before = b"\r\n"  # the last octets of the parts so far: the content starts a line
    for part in parts:
        # A stuffed line start that runs across the boundary: its second dot is in
        # this part, at most the third octet.
        at = (before + part[:3]).find(b"\r\n..")
        drop = at + 3 - len(before) if 0 <= at < len(before) else -1
        if drop >= 0:
            unstuffed = part[:drop] + part[drop + 1 :]
            out.append(unstuffed.replace(b"\r\n..", b"\r\n."))
        elif b"\r\n.." in part:
            out.append(part.replace(b"\r\n..", b"\r\n."))
        else:
            out.append(part)
        before = (before + part[-3:])[-3:]
    return tuple(out)


def _without_end(pieces: Sequence[bytes]) -> list[bytes | memoryview]:
    """``pieces`` without their last three octets (the final ``.`` line): the last
    piece a view, not a copy."""
    out: list[bytes | memoryview] = list(pieces)
    cut = 3
    while cut:
        last = out.pop()
        if len(last) > cut:
            out.append(memoryview(last)[:-cut])
            break
        cut -= len(last)
    return out


def _split(
    pieces: Sequence[bytes | memoryview], limit: int
) -> tuple[tuple[bytes | memoryview, ...], ...]:
    """``pieces`` in chunks of ``limit`` octets (the last one up to it), each the
    pieces or views of them that make it up: never a copy."""
    chunks: list[tuple[bytes | memoryview, ...]] = []
    chunk: list[bytes | memoryview] = []
    room = limit
    for piece in pieces:
        while len(piece) > room:
            view = memoryview(piece)
            if room:
                chunk.append(view[:room])
            chunks.append(tuple(chunk))
            chunk, piece, room = [], view[room:], limit
        if piece:
            chunk.append(piece)
            room -= len(piece)
    if chunk or not chunks:
        chunks.append(tuple(chunk))
    return tuple(chunks)


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
    written as it is, in slices, not split into a list of lines: :func:`_wire` turns
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
        for start in range(0, len(lines), _BLOCK):
            self.write(lines[start : start + _BLOCK])

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
        part.set_boundary(boundary)
        given.add(boundary)
    return given


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
        for name, value in part.items():
            if name.lower() not in _ADDRESS_HEADERS:
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
            return _pieces_of(message, email_policy.SMTP), False
        except UnicodeEncodeError:
            pass
    return _pieces_of(message, email_policy.SMTPUTF8), True


# A clash with a random boundary needs a body that holds it: a second one is plenty.
_BOUNDARY_TRIES = 3


def _write(message: Message, boundaries: set[str]) -> tuple[_Wire, bool]:
    """The message written and made ready to send (:func:`_wire`), and whether
    SMTPUTF8 was needed; a boundary that a body holds is replaced and the message
    written again."""
    for _ in range(_BOUNDARY_TRIES):
        pieces, utf8 = _serialize(message)
        wire = _wire(_taken(pieces))
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
    return b"\0" in body or _long_line(body) is not None


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
            found = _header_addresses(message, name)
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


def _prepare_email(message: Message, domain: str | None) -> PreparedMessage:
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
    return _prepared(wire, _missing_fields(message, domain), utf8 or not wire.head_ascii)


def _prepared(wire: _Wire, fields: bytes, smtputf8: bool) -> PreparedMessage:
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
        return _prepare_email(message, domain)
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise InputError(f"message: expected an EmailMessage or bytes, not {type(message)}")
    content = bytes(message)
    wire = _wire(content[start : start + _BLOCK] for start in range(0, len(content), _BLOCK))
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
) -> tuple[str, list[str], PreparedMessage]:
    """The envelope and the serialized message for a send: from the message's
    headers unless ``sender``/``recipients`` are given; bytes need both."""
    if isinstance(message, EmailMessage):
        env_sender, rcpts = envelope_of(message, sender=sender, recipients=recipients)
    elif isinstance(message, (bytes, bytearray, memoryview)):
        if sender is None or recipients is None:
            raise InputError("a message given as bytes needs sender= and recipients=")
        env_sender = check_mailbox(sender, field="sender", allow_empty=True)
        rcpts = unique_addresses(a for _, a in parse_address_list(recipients, field="recipients"))
        if not rcpts:
            raise InputError("no recipients")
        message = bytes(message)
    else:
        raise InputError(f"message must be an EmailMessage or bytes, not {type(message).__name__}")
    return (
        env_sender,
        rcpts,
        prepare_message(message, domain=domain_of(env_sender) if env_sender else None),
    )

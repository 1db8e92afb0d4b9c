"""Message building and envelopes (layer 1, sans-IO).

This module owns what a message says: building an :class:`~email.message.EmailMessage`
from plain arguments, every one checked first (:func:`build_message`), and the SMTP
envelope a message implies: its reverse-path and recipients, read from its address
headers (:func:`envelope_of`). The common shapes (text, HTML, an alternative,
attachments) are put together by :mod:`~asmtp._core.mime` from parts whose fields are
stored as the email package would write them, parsed only when read; the rest (inline
images, calendar invites, values it would encode or fold) by the :mod:`email` package
itself. What goes around the body (attachments, inline images, calendar invites,
List-* and priority fields) is checked in :mod:`~asmtp._core.parts` and put into the
tree here. Turning a message into the octets sent is
:mod:`~asmtp._core.prepared`'s (:func:`~asmtp._core.prepared.prepare_message`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from email.header import Header, decode_header
from email.headerregistry import Address, AddressHeader
from email.message import EmailMessage, Message
from email.utils import format_datetime, formatdate, make_msgid, parsedate_to_datetime
from typing import TypeAlias

from .._version import __version__
from ..errors import InputError
from .address import (
    check_header,
    check_mailbox,
    domain_of,
    parse_address_list,
    unique_addresses,
)
from .mime import (
    BASE64_BLOCK,
    BUILD_POLICY,
    address_objects,
    address_text,
    base64_lines,
    content_tree,
    fast_attachment,
    plain_value,
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
    "ADDRESS_HEADERS",
    "X_MAILER",
    "AddressInput",
    "Attachment",
    "HeadersInput",
    "InlineInput",
    "ListHeadersInput",
    "Priority",
    "build_message",
    "envelope_of",
    "header_addresses",
]

X_MAILER = f"asmtp/{__version__}"

#: What To, Cc, From and ``recipients=`` accept: see
#: :func:`~asmtp._core.address.parse_address_list`.
AddressInput: TypeAlias = str | Iterable[str] | None
#: Extra headers: a mapping or (name, value) pairs; a None value drops that header.
HeadersInput: TypeAlias = Mapping[str, str | None] | Iterable[tuple[str, str | None]] | None

# Bodies built here are 7-bit clean (quoted-printable or base64 when the text is not
# plain short ASCII), so they go to any server, with or without 8BITMIME.
_BUILD_POLICY = BUILD_POLICY

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
#: The header fields that hold addresses: checked as addresses when given here, and
#: read for the envelope and for SMTPUTF8.
ADDRESS_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "sender", "reply-to"}
    | {"resent-from", "resent-to", "resent-cc", "resent-bcc", "resent-sender"}
)
_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_QUOTED_PAIR = re.compile(r"\\(.)")
_BASE64_BLOCK = BASE64_BLOCK
_address_objects = address_objects


def _set_field(msg: EmailMessage, name: str, value: str | list[tuple[str, str]]) -> None:
    """``msg[name] = value``, stored raw when the email package would write the value
    as it is (:mod:`~asmtp._core.mime`): parsed when read, not now."""
    text = value if isinstance(value, str) else address_text(value)
    if text is not None and plain_value(name, text):
        msg.set_raw(name, text)
    else:
        msg[name] = text if isinstance(value, str) else _address_objects(value)


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
        if value is not None and key in ADDRESS_HEADERS:
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
        _set_field(msg, "From", from_pairs)
        if to_pairs:
            _set_field(msg, "To", to_pairs)
        if cc_pairs:
            _set_field(msg, "Cc", cc_pairs)
        _set_field(msg, "Subject", subject)
        _set_field(msg, "Date", date_value)
        _set_field(msg, "Message-ID", message_id_value)
        _set_field(msg, "X-Mailer", X_MAILER)
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

    if not images and invite is None and all(fast_attachment(n, t) for n, _, t in loaded):
        # the common shapes, their parts' fields written here (the same as below)
        content_tree(msg, body, mailtype, alt_text, loaded)
        return msg

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
        # the raw bytes go before the text is made (mime.base64_lines: RFC 2045 6.8)
        encoded = base64_lines(data)
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


def header_addresses(message: Message, name: str) -> list[str]:
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
        found = header_addresses(message, field)
        if len(found) != 1:
            raise InputError(
                f"sender: the {field} header holds {len(found)} addresses, not exactly one;"
                " pass sender="
            )
        reverse_path = found[0]
    if recipients is not None:
        forward = [addr for _, addr in parse_address_list(recipients, field="recipients")]
    else:
        forward = [a for name in ("To", "Cc", "Bcc") for a in header_addresses(message, name)]
    forward = unique_addresses(forward)
    if not forward:
        raise InputError("recipients: none given, and the message has no To, Cc or Bcc")
    return reverse_path, forward

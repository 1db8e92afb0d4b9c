"""Message parts and optional fields for :func:`~asmtp._core.message.build_message`
(layer 1, sans-IO but for reading the files it is given).

This module owns what goes around a message's body, each checked before anything is
built: attachments and inline images (files read, types guessed), the ``cid:``
references of an HTML body mapped to their images' Content-IDs (RFC 2392), the text
of a calendar invite (RFC 5545, sent as RFC 6047 iMIP asks), the mailing-list fields
of RFC 2369, 2919 and 8058 (List-Id, List-Unsubscribe...), and the priority fields.
Every refusal is an :class:`~asmtp.errors.InputError` naming the argument.
:mod:`~asmtp._core.message` puts the pieces into the MIME tree.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import re
import stat
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import make_msgid
from pathlib import Path
from typing import Literal, TypeAlias

from ..errors import InputError
from .address import check_header

__all__ = [
    "PRIORITY_FIELDS",
    "Attachment",
    "CalendarInvite",
    "InlineImage",
    "InlineInput",
    "InlinePart",
    "ListHeadersInput",
    "Priority",
    "calendar_invite",
    "inline_parts",
    "link_inline_parts",
    "list_fields",
    "load_attachment",
    "priority_fields",
]

#: A file path, or (filename, data, content type).
Attachment: TypeAlias = str | os.PathLike[str] | tuple[str, bytes, str]
#: An inline image: a file path, its bytes (PNG, JPEG, GIF or WebP, told apart by
#: their first octets), or (filename, data, content type).
InlineImage: TypeAlias = str | os.PathLike[str] | bytes | tuple[str, bytes, str]
#: ``inline=``: the name an HTML body refers to as ``cid:NAME``, and its image.
InlineInput: TypeAlias = Mapping[str, InlineImage] | None
#: ``list_headers=``: a List-* field name and its value (one URL or several for the
#: RFC 2369 fields).
ListHeadersInput: TypeAlias = Mapping[str, str | Sequence[str]] | None
#: ``priority=``: written as X-Priority, Importance and Priority.
Priority: TypeAlias = Literal["high", "normal", "low"]

# RFC 6838 4.2 restricted-name, for type and subtype.
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


# ----------------------------------------------------------------------- files


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_regular_file(path: Path, field: str = "attachments") -> bytes:
    """The bytes of a regular file, or InputError: a device (/dev/zero never ends), a
    FIFO (blocks until a writer comes), a directory or a socket is refused.

    Opened with O_NONBLOCK so that opening a FIFO returns at once, then checked on the
    open descriptor (no window for the path to be swapped between check and read), and
    read for exactly the size fstat reported: a file growing meanwhile is refused."""
    where = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        # A socket cannot be opened at all (ENXIO): say what it is rather than why.
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise InputError(
                    f"{field}: {where!r} is {_file_kind(mode)}, not a regular file"
                ) from None
        raise InputError(f"{field}: cannot read {where!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                f"{field}: {where!r} is {_file_kind(info.st_mode)}, not a regular file"
            )
        with os.fdopen(fd, "rb") as file:
            fd = -1  # the file object owns it now
            data = file.read(info.st_size)
            more = file.read(1)
    except OSError as exc:
        raise InputError(f"{field}: cannot read {where!r}: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if more and info.st_size == 0:
        # /proc and /sys files report size 0 and make up their content as it is read.
        raise InputError(
            f"{field}: {where!r} reports a size of 0 but has content; attach its"
            " bytes as (filename, data, content_type)"
        )
    if len(data) != info.st_size or more:
        raise InputError(f"{field}: {where!r} changed size while it was read")
    return data


def load_attachment(item: Attachment, field: str = "attachments") -> tuple[str, bytes, str]:
    """Return (filename, data, content type) for one attachment, reading a file."""
    if isinstance(item, tuple):
        if len(item) != 3:
            raise InputError(f"{field}: {item!r} is not (filename, data, content_type)")
        filename, data, content_type = item
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"{field}: data for {filename!r} must be bytes")
        data = bytes(data)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        data = _read_regular_file(path, field)
        filename = path.name
        guessed, encoding = mimetypes.guess_type(filename)
        # Unknown, or compressed (.tar.gz): the bytes are opaque to the reader.
        content_type = guessed if guessed and encoding is None else "application/octet-stream"
    else:
        raise InputError(f"{field}: {item!r} is neither a path nor (filename, data, content_type)")
    if not isinstance(filename, str) or not filename:
        raise InputError(f"{field}: filename {filename!r} must be a non-empty string")
    check_header("Content-Disposition", filename)
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        raise InputError(f"{field}: {content_type!r} is not a type/subtype content type")
    return filename, data, content_type.lower()


# ----------------------------------------------------------------------- inline images

# A name the HTML refers to as cid:NAME: URL-safe, so the reference is the name itself.
_INLINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A Content-ID the caller chose (RFC 2392: cid:left@right refers to <left@right>).
_INLINE_ID = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+")
# A cid: URL in HTML (an attribute, url(...) in CSS), not "placid:"; it ends at a quote,
# a bracket, an entity or white space, none of which a name holds.
_CID_URL = re.compile(r"(?<![A-Za-z0-9+.-])cid:([^\s\"'<>()\\&;,]+)", re.IGNORECASE)
# The first octets of the image types an HTML mail shows.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True, slots=True)
class InlinePart:
    """One inline image, checked: ``content_id`` with its angle brackets."""

    name: str
    content_id: str
    filename: str
    data: bytes
    content_type: str


def _sniffed_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if data.startswith(magic)), None)


def _load_inline(name: str, item: InlineImage) -> tuple[str, bytes, str]:
    if not isinstance(item, (bytes, bytearray, memoryview)):
        return load_attachment(item, field=f"inline[{name!r}]")
    data = bytes(item)
    guessed = _sniffed_type(data) or mimetypes.guess_type(name)[0]
    if guessed is None:
        raise InputError(
            f"inline[{name!r}]: cannot tell the type of these bytes;"
            " give (filename, data, content_type)"
        )
    filename = name if "." in name else name + (mimetypes.guess_extension(guessed) or "")
    return filename, data, guessed


def inline_parts(inline: InlineInput, domain: str) -> list[InlinePart]:
    """The inline images of ``inline=``, read and typed, each with its Content-ID: one
    made with :func:`email.utils.make_msgid` on ``domain`` for a plain name (``logo``:
    ``<...logo@domain>``), the name itself for a name of the form ``left@right``."""
    if inline is None:
        return []
    if not isinstance(inline, Mapping):
        raise InputError(f"inline: must be a mapping of name to image, not {type(inline).__name__}")
    parts = []
    for name, item in inline.items():
        if not isinstance(name, str):
            raise InputError(f"inline: the name {name!r} is not a string")
        check_header("Content-ID", name)
        if _INLINE_ID.fullmatch(name):
            content_id = f"<{name}>"
        elif _INLINE_NAME.fullmatch(name):
            content_id = make_msgid(idstring=name, domain=domain)
        else:
            raise InputError(
                f"inline: the name {name!r} is neither a name of letters, digits, '.', '_'"
                " and '-' nor a Content-ID of the form left@right"
            )
        filename, data, content_type = _load_inline(name, item)
        parts.append(InlinePart(name, content_id, filename, data, content_type))
    return parts


def link_inline_parts(html: str, parts: Sequence[InlinePart]) -> str:
    """The HTML with each ``cid:NAME`` turned into ``cid:`` and its part's Content-ID.

    Every reference must name a part and every part must be referred to: a reference
    to nothing is a broken image in every mail reader, and a part nothing refers to is
    shown as an attachment by some and hidden by others; both are refused.

    >>> part = InlinePart("logo", "<1.logo@example.org>", "logo.png", b"", "image/png")
    >>> link_inline_parts('<img src="cid:logo">', [part])
    '<img src="cid:1.logo@example.org">'
    """
    ids = {part.name: part.content_id[1:-1] for part in parts}
    missing: list[str] = []
    used: set[str] = set()

    def replace(found: re.Match[str]) -> str:
        name = urllib.parse.unquote(found.group(1))
        if name not in ids:
            missing.append(name)
            return found.group(0)
        used.add(name)
        return "cid:" + ids[name]

    linked = _CID_URL.sub(replace, html)
    if missing:
        raise InputError(
            f"inline: the body refers to {', '.join(f'cid:{n}' for n in missing)}"
            f" but inline= names only {sorted(ids)}"
        )
    if unused := [name for name in ids if name not in used]:
        raise InputError(f"inline: {unused} not referred to as cid:NAME in the HTML body")
    return linked


# ----------------------------------------------------------------------- calendar invites

# RFC 5545 3.1: a content line holds no control character but HTAB.
_CALENDAR_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
# RFC 5545 3.7.2, as a content line (property parameters allowed), once unfolded.
_METHOD_LINE = re.compile(r"^METHOD(?:;[^:\n]*)?:(.*)$", re.IGNORECASE | re.MULTILINE)
_METHOD_VALUE = re.compile(r"[A-Za-z0-9-]+")


@dataclass(frozen=True, slots=True)
class CalendarInvite:
    """An iCalendar object ready to send: ``text`` with LF line endings (CRLF on the
    wire), ``method`` for the Content-Type's method parameter."""

    text: str
    method: str

    @property
    def content_type(self) -> str:
        return f"text/calendar; method={self.method}; charset=utf-8"


def calendar_invite(calendar: str | bytes) -> CalendarInvite:
    """Check the iCalendar text of ``calendar=`` (str, or bytes in UTF-8).

    It must be one VCALENDAR object (``BEGIN:VCALENDAR`` first, ``END:VCALENDAR``
    last) without control characters other than tab; line endings become CRLF on the
    wire. The method is its METHOD property; without one, ``METHOD:REQUEST`` is added
    after ``BEGIN:VCALENDAR`` (RFC 6047 2.4: the part's method parameter and the
    object's METHOD must agree).

    >>> invite = calendar_invite("BEGIN:VCALENDAR\\r\\nVERSION:2.0\\r\\nEND:VCALENDAR\\r\\n")
    >>> invite.method, invite.text.splitlines()
    ('REQUEST', ['BEGIN:VCALENDAR', 'METHOD:REQUEST', 'VERSION:2.0', 'END:VCALENDAR'])
    """
    if isinstance(calendar, (bytes, bytearray, memoryview)):
        try:
            text = bytes(calendar).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"calendar: not UTF-8 ({exc})") from None
    elif isinstance(calendar, str):
        text = calendar
    else:
        raise InputError(f"calendar: must be str or bytes, not {type(calendar).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InputError(f"calendar: not encodable as UTF-8: {exc}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if found := _CALENDAR_CONTROL.search(text):
        line = text.count("\n", 0, found.start()) + 1
        raise InputError(
            f"calendar: line {line} holds the control character U+{ord(found.group()):04X}"
            " (RFC 5545 3.1 allows none but tab)"
        )
    lines = text.rstrip("\n").split("\n")
    if lines[0].upper() != "BEGIN:VCALENDAR" or lines[-1].upper() != "END:VCALENDAR":
        raise InputError(
            "calendar: must be one iCalendar object, from BEGIN:VCALENDAR to END:VCALENDAR"
        )
    # RFC 5545 3.1: a line starting with a space or tab continues the one before.
    found_method = _METHOD_LINE.search(re.sub(r"\n[ \t]", "", text))
    if found_method is None:
        lines.insert(1, "METHOD:REQUEST")
        method = "REQUEST"
    else:
        method = found_method.group(1).strip()
        if not _METHOD_VALUE.fullmatch(method):
            raise InputError(f"calendar: METHOD {method!r} is not a method name")
    return CalendarInvite("\n".join(lines) + "\n", method.upper())


# ----------------------------------------------------------------------- List-* fields

# RFC 2369: one or more URLs in angle brackets (List-Post may be "NO").
_LIST_URL_FIELDS = (
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
_LIST_FIELDS = {name.lower(): name for name in (*_LIST_URL_FIELDS, "List-Id")} | {
    "list-unsubscribe-post": "List-Unsubscribe-Post"
}
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")
# RFC 2919 2: list-label "." list-id-namespace, dot-atom-text.
_LIST_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)+")
_LIST_ID_VALUE = re.compile(r"(?:(.*?)\s*)?<([^<>]*)>")


def _list_urls(name: str, value: str | Sequence[str]) -> str:
    urls = [value] if isinstance(value, str) else list(value)
    if not urls:
        raise InputError(f"list_headers[{name!r}]: no URL given")
    out = []
    for url in urls:
        if not isinstance(url, str):
            raise InputError(f"list_headers[{name!r}]: {url!r} is not a string")
        check_header(name, url)
        if name == "List-Post" and url.upper() == "NO" and len(urls) == 1:
            return "NO"  # RFC 2369 3.4: posting not allowed
        inner = url[1:-1] if url.startswith("<") and url.endswith(">") else url
        if not _URL.fullmatch(inner) or "<" in inner or ">" in inner:
            raise InputError(
                f"list_headers[{name!r}]: {url!r} is not one ASCII URL with a scheme"
                " (https:, mailto:); give several as a list"
            )
        out.append(f"<{inner}>")
    return ", ".join(out)


def _list_id(value: str | Sequence[str]) -> str:
    if not isinstance(value, str):
        raise InputError(f"list_headers['List-Id']: {value!r} is not a string")
    check_header("List-Id", value)
    found = _LIST_ID_VALUE.fullmatch(value.strip())
    phrase, list_id = (found.group(1), found.group(2)) if found else (None, value.strip())
    if not _LIST_ID.fullmatch(list_id):
        raise InputError(
            f"list_headers['List-Id']: {value!r}: the list's id must look like"
            " 'news.example.org' (RFC 2919: label and namespace)"
        )
    return f"{phrase} <{list_id}>" if phrase else f"<{list_id}>"


def list_fields(list_headers: ListHeadersInput) -> list[tuple[str, str]]:
    """The List-* fields of ``list_headers=``, checked and written as the RFCs say.

    List-Id (RFC 2919) is ``"Description <list.example.org>"`` or the id alone;
    List-Help, -Unsubscribe, -Subscribe, -Post, -Owner and -Archive (RFC 2369) take a
    URL or a list of URLs, with or without angle brackets (List-Post also ``"NO"``);
    List-Unsubscribe-Post (RFC 8058) is ``List-Unsubscribe=One-Click`` and needs an
    https List-Unsubscribe. Field names are matched without regard to case.

    >>> for name, value in list_fields({
    ...     "list-id": "News <news.example.org>",
    ...     "List-Unsubscribe": ["mailto:leave@example.org", "https://example.org/u"],
    ... }):
    ...     print(f"{name}: {value}")
    List-Id: News <news.example.org>
    List-Unsubscribe: <mailto:leave@example.org>, <https://example.org/u>
    """
    if list_headers is None:
        return []
    if not isinstance(list_headers, Mapping):
        raise InputError(
            f"list_headers: must be a mapping of field name to value,"
            f" not {type(list_headers).__name__}"
        )
    fields: dict[str, str] = {}
    for key, value in list_headers.items():
        name = _LIST_FIELDS.get(key.lower()) if isinstance(key, str) else None
        if name is None:
            known = ", ".join(sorted(_LIST_FIELDS.values()))
            raise InputError(f"list_headers: {key!r} is not a List-* field ({known})")
        if name in fields:
            raise InputError(f"list_headers: {name!r} given twice")
        if name == "List-Id":
            fields[name] = _list_id(value)
        elif name == "List-Unsubscribe-Post":
            if not isinstance(value, str) or value.strip() != "List-Unsubscribe=One-Click":
                raise InputError(
                    f"list_headers[{name!r}]: {value!r}: RFC 8058 allows only"
                    " 'List-Unsubscribe=One-Click'"
                )
            fields[name] = "List-Unsubscribe=One-Click"
        else:
            fields[name] = _list_urls(name, value)
    if "List-Unsubscribe-Post" in fields and "<https:" not in fields.get("List-Unsubscribe", ""):
        raise InputError(
            "list_headers: List-Unsubscribe-Post needs a List-Unsubscribe with an https URL"
            " (RFC 8058 3.1)"
        )
    return list(fields.items())


# ----------------------------------------------------------------------- priority

#: The fields priority= writes: X-Priority (most readers), Importance (Outlook,
#: RFC 2156), Priority (RFC 2156: urgent, normal, non-urgent).
PRIORITY_FIELDS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "high": (("X-Priority", "1 (Highest)"), ("Importance", "high"), ("Priority", "urgent")),
    "normal": (("X-Priority", "3 (Normal)"), ("Importance", "normal"), ("Priority", "normal")),
    "low": (("X-Priority", "5 (Lowest)"), ("Importance", "low"), ("Priority", "non-urgent")),
}


def priority_fields(priority: Priority | None) -> tuple[tuple[str, str], ...]:
    """The fields for ``priority=``: none for None.

    >>> priority_fields("high")
    (('X-Priority', '1 (Highest)'), ('Importance', 'high'), ('Priority', 'urgent'))
    """
    if priority is None:
        return ()
    if not isinstance(priority, str) or priority not in PRIORITY_FIELDS:
        raise InputError(f"priority: {priority!r} is not 'high', 'normal' or 'low'")
    return PRIORITY_FIELDS[priority]

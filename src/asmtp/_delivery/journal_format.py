"""What a delivery journal says (layer 4): its lines, reading them back, and run identity.

This module owns the journal's format; :mod:`~asmtp._delivery.journal` owns the file
(its lock, repairing it, appending with fsync). A journal is JSON Lines. The first line
is a header saying which run the journal belongs to; then these kinds of line::

    {"asmtp": "journal", "format": 1, "event": "identity", "version": "0.1.0",
     "sender": "news@example.com", "message": "sha256:9f2c...", "campaign": null, ...}
    {"event": "dot", "key": "a@example.org", "recipient": "a@example.org", "time": ...}
    {"event": "result", "key": "a@example.org", "recipient": ..., "status": "delivered", ...}
    {"event": "bounce", "key": "a@example.org", "recipient": ..., "kind": "hard",
     "status": "5.1.1", "diagnostic": "550 5.1.1 no such user", ...}

(the header is one line in the file). A later "identity" line, written when a mismatch
was overridden, replaces the header's identity. On resume, a key whose last line is a
delivered or permanent result is skipped, and one whose last line is "dot" is "unknown"
(the message may have arrived). A "bounce" line, appended after the run by
:func:`~asmtp._delivery.journal.record_bounce`, records a returned message: a hard one
makes its key "bounced" (reported, never sent again); other kinds change nothing. A
journal without bounce lines reads as before.

Here: encoding a record as one line (never longer than :data:`MAX_LINE`), reading lines
back from a descriptor (streamed: a chunk and one line held at a time; a longer line is
refused without being held), the rules each line must follow (:class:`JournalFormatError`
for a damaged one), which torn last line is kept (a whole record without its newline),
the last :class:`JournalEntry` per key (shared between keys), and a run's
:class:`JournalIdentity` with the digests it is made of (:func:`template_digest`,
:func:`message_digest`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._core.address import check_mailbox
from .._core.recipients import address_key
from ..errors import InputError, JournalFormatError

__all__ = [
    "FORMAT",
    "MARKER",
    "MAX_LINE",
    "Contents",
    "JournalEntry",
    "JournalIdentity",
    "encode_record",
    "journal_key",
    "message_digest",
    "read_contents",
    "read_first",
    "recipient_key",
    "template_digest",
]

#: the journal format this asmtp writes and reads (the header's "format")
FORMAT = 1
#: the longest line read back, in octets; asmtp never writes a longer one
MAX_LINE = 1 << 20
#: how every journal begins: recognised even when the header line is torn
MARKER = b'{"asmtp": "journal"'
_CHUNK = 1 << 16
_STATUSES = frozenset({"delivered", "transient", "permanent", "unknown"})
#: the records that name a key
_KEYED = frozenset({"dot", "result", "bounce"})
_KEY_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def journal_key(key: Any) -> str:
    """The form keys take in the journal (any JSON value; compared as its JSON text)."""
    if type(key) is str:
        return _encode_str(key)  # what the encoder does for a string, without its checks
    return _KEY_ENCODER.encode(key)


# -- identity -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalIdentity:
    """Which run a journal belongs to: the envelope sender and a digest of the message
    (or of the template it is rendered from), or a campaign name the caller gives.

    With a ``campaign`` on either side, the campaigns alone are compared (the caller
    names the run; its message may change, e.g. a corrected template). Otherwise the
    sender and the message digest are, each where both sides know it.

    >>> a = JournalIdentity(sender="news@example.com", message="sha256:1")
    >>> a.differences(JournalIdentity(sender="news@example.com", message="sha256:2"))
    ['the message differs (subject, body, headers or attachments changed)']
    """

    sender: str | None = None
    message: str | None = None
    campaign: str | None = None

    def differences(self, journal: JournalIdentity) -> list[str]:
        """What differs between ``journal`` (recorded) and this identity, in words."""
        if self.campaign is not None or journal.campaign is not None:
            if self.campaign == journal.campaign:
                return []
            return [
                f"the campaign differs (journal: {_shown(journal.campaign)}, "
                f"this run: {_shown(self.campaign)})"
            ]
        out = []
        if None not in (self.sender, journal.sender) and self.sender != journal.sender:
            out.append(
                f"the sender differs (journal: {_shown(journal.sender)}, "
                f"this run: {_shown(self.sender)})"
            )
        if None not in (self.message, journal.message) and self.message != journal.message:
            out.append("the message differs (subject, body, headers or attachments changed)")
        return out

    def record(self) -> dict[str, Any]:
        return {"sender": self.sender, "message": self.message, "campaign": self.campaign}


def _shown(value: str | None) -> str:
    return "none" if value is None else json.dumps(value, ensure_ascii=False)


def template_digest(*pieces: str | bytes | Path) -> str:
    """A digest of the pieces a message is made from (subject, body, a file's content
    for a :class:`~pathlib.Path`): ``"sha256:<hex>"``. A path that is not a regular
    file is digested by its name (it is refused elsewhere, and never read here)."""
    digest = hashlib.sha256()
    for piece in pieces:
        if isinstance(piece, Path):
            try:
                if not stat.S_ISREG(piece.stat().st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                with piece.open("rb") as file:
                    data = b"F" + hashlib.file_digest(file, "sha256").digest()
            except OSError:
                data = b"P" + os.fsencode(piece)
        elif isinstance(piece, str):
            data = b"S" + piece.encode("utf-8", "surrogatepass")
        else:
            data = b"B" + bytes(piece)
        digest.update(len(data).to_bytes(8, "big") + data)
    return "sha256:" + digest.hexdigest()


# Fields that differ between copies of one message or between runs of it: the date and
# id, the per-recipient addressing and unsubscribe link, a signature, the mailer's version.
_VOLATILE = frozenset(
    b"date message-id to cc bcc list-unsubscribe list-unsubscribe-post "
    b"dkim-signature received return-path x-mailer".split()
)
_BOUNDARY = re.compile(rb'boundary\s*=\s*"?([^";\s]+)', re.IGNORECASE)


def message_digest(data: bytes, *, prepared: bool = False) -> str:
    """A digest of a message that is the same for every copy and every run of it:
    ``"sha256:<hex>"``. ``data`` is the message as sent (``prepared``: dot-stuffed and
    ending in ``.\\r\\n``, as :class:`~asmtp._core.prepared.PreparedMessage` holds it). Header
    fields that differ per copy or per run (Date, Message-ID, To, Cc, unsubscribe
    links, DKIM-Signature, X-Mailer) are left out, and MIME boundaries (random each
    time a message is serialized) are replaced by fixed ones."""
    text = bytes(data).replace(b"\r\n", b"\n")
    if prepared:
        text = text.removesuffix(b".\n").replace(b"\n..", b"\n.")
        if text.startswith(b".."):
            text = text[1:]
    head, _, body = text.partition(b"\n\n")
    kept: list[bytes] = []
    keep = True
    for line in head.split(b"\n"):
        if line[:1] not in (b" ", b"\t"):  # a continuation line goes with its field
            keep = line.partition(b":")[0].strip().lower() not in _VOLATILE
        if keep:
            kept.append(line)
    canonical = b"\n".join(kept) + b"\n\n" + body
    seen: dict[bytes, None] = {}
    for found in _BOUNDARY.finditer(text):
        seen.setdefault(found.group(1), None)
    for n, boundary in enumerate(seen):
        canonical = canonical.replace(boundary, b"asmtp-boundary-%d" % n)
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the journal says last about one key, as far as a resume needs it: "dot"
    (the message may have arrived), a "result" with its status (and, for an unknown
    one, the host), or a hard "bounce" (``status``: its enhanced status, ``detail``: the
    server's words). Shared between keys: a million keys hold a handful of these."""

    event: str  # "dot", "result" or "bounce"
    status: str | None  # the result's status, for a "result" line; a bounce's "5.1.1"
    host: str | None = None
    detail: str | None = None  # a bounce's diagnostic


_DOT = JournalEntry("dot", None)


@dataclass(slots=True)
class Contents:
    """A journal read back: what resume decides with, and how to repair the file."""

    entries: dict[str, JournalEntry]
    #: the identity in force (the header's, or the last "identity" line's)
    identity: JournalIdentity | None = None
    #: no record at all: a new journal (the header is still to be written)
    empty: bool = True
    #: octets of whole lines; anything after them is a torn last line
    size: int = 0
    #: the last line is a whole record without its newline: add it
    needs_newline: bool = False
    #: for :func:`read_contents`'s ``find``: the keys (as written) of the records
    #: naming each recipient sought, by :func:`recipient_key`
    found: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Reader:
    """Reads a journal line by line from a file descriptor, never holding more than
    one line (at most :data:`MAX_LINE`) and a chunk."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.end = os.fstat(fd).st_size  # what is there now; nothing is appended meanwhile

    def lines(self) -> Iterator[tuple[int, bytes, int, bool]]:
        """(line number, line without newline, offset of its start, whole?)"""
        pending = bytearray()
        start = pos = 0
        number = 0
        while pos < self.end:
            chunk = os.pread(self.fd, min(_CHUNK, self.end - pos), pos)
            if not chunk:
                break  # shrank meanwhile: read what is there
            at = 0
            while (newline := chunk.find(b"\n", at)) != -1:
                number += 1
                if pending:
                    pending += chunk[at:newline]
                    line = bytes(pending)
                    pending.clear()
                else:
                    line = chunk[at:newline]
                self._bound(line, number)
                yield number, line, start, True
                start = pos + newline + 1
                at = newline + 1
            pending += chunk[at:]
            self._bound(pending, number + 1)
            pos += len(chunk)
        if pending:
            yield number + 1, bytes(pending), start, False

    def _bound(self, line: bytes | bytearray, number: int) -> None:
        if len(line) > MAX_LINE:
            raise JournalFormatError(
                f"the journal {self.path}: line {number} is longer than {MAX_LINE} octets: "
                "not a journal record (is this an asmtp journal?); it was not changed"
            )


_DECODER = json.JSONDecoder()


def _parse(line: bytes) -> Any:
    """A line's JSON value, or None when it is not JSON text (any way it can fail)."""
    try:
        text = line.decode("utf-8")
        value, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        return None
    if end != len(text) and not text[end:].isspace():
        return None  # more after the value
    return value


class _Scan:
    """The rules of reading a journal back, record by record."""

    def __init__(self, path: Path, find: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.contents = Contents({})
        self._shared: dict[tuple[str, str | None], JournalEntry] = {}
        self._find = find

    def damaged(self, number: int, why: str) -> JournalFormatError:
        return JournalFormatError(
            f"the journal {self.path}: line {number} {why}; asmtp cannot tell what it "
            "recorded, so it neither resumes nor changes the file (fix or delete that line)"
        )

    def first(self, number: int, line: bytes, whole: bool) -> bool:
        """The first line: the header, or a record of a journal from before headers.
        False for a torn header (cut off: the journal is new)."""
        value = _parse(line)
        if isinstance(value, dict) and value.get("asmtp") == "journal":
            self.header(number, value)
            return True
        if line.startswith(MARKER) or (not whole and MARKER.startswith(line)):
            if not whole:
                return False  # the header was being written: nothing was recorded yet
            raise self.damaged(number, "is a damaged header")
        if isinstance(value, dict) and value.get("event") in _KEYED:
            self.record(number, value)  # from before headers: identity stays None
            return True
        raise JournalFormatError(
            f"the journal {self.path} is not an asmtp journal (its first line is not a "
            "journal header); asmtp never writes to such a file: give a new file"
        )

    def header(self, number: int, value: dict[str, Any]) -> None:
        form = value.get("format")
        if not isinstance(form, int) or isinstance(form, bool) or form < 1:
            raise self.damaged(number, "is a damaged header (no journal format)")
        if form > FORMAT:
            raise JournalFormatError(
                f"the journal {self.path} was written by a newer asmtp (journal format "
                f"{form}; this asmtp reads format {FORMAT}): resume it with that version"
            )
        self.identity(number, value)
        self.contents.empty = False

    def identity(self, number: int, value: dict[str, Any]) -> None:
        fields = [value.get(name) for name in ("sender", "message", "campaign")]
        if not all(f is None or isinstance(f, str) for f in fields):
            raise self.damaged(number, "is a damaged identity record")
        self.contents.identity = JournalIdentity(*fields)

    def record(self, number: int, value: Any) -> None:
        if not isinstance(value, dict):
            raise self.damaged(number, "is not a journal record")
        event = value.get("event")
        if "asmtp" in value or (event not in _KEYED and event != "identity"):
            raise self.damaged(number, "is not a journal record")
        if event == "identity":
            self.identity(number, value)
            return
        if "key" not in value:
            raise self.damaged(number, "is a record without a key")
        try:
            key = journal_key(value["key"])
        except (ValueError, RecursionError):
            raise self.damaged(number, "has a key that cannot be read") from None
        if self._find:
            self._note(key, value)
        entry: JournalEntry | None = _DOT
        if event == "bounce":
            entry = self._bounce(number, value)
            self.contents.empty = False
            if entry is None:
                return  # not a hard bounce: the key's entry stays as it was
        elif event == "result":
            status, host = value.get("status"), value.get("host")
            if status not in _STATUSES or not (host is None or isinstance(host, str)):
                raise self.damaged(number, "is a result without a valid status")
            entry = self._entry(status, host)
        self.contents.empty = False
        if entry is None:
            self.contents.entries.pop(key, None)
        else:
            self.contents.entries[key] = entry

    def _note(self, key: str, value: dict[str, Any]) -> None:
        """Remember the key of a record naming a recipient sought."""
        recipient = value.get("recipient")
        if isinstance(recipient, str):
            sought = recipient_key(recipient)
            if sought in self._find:
                self.contents.found.setdefault(sought, {}).setdefault(key, value["key"])

    def _bounce(self, number: int, value: dict[str, Any]) -> JournalEntry | None:
        kind, status, diagnostic = (value.get(n) for n in ("kind", "status", "diagnostic"))
        if not isinstance(kind, str) or not all(
            f is None or isinstance(f, str) for f in (status, diagnostic)
        ):
            raise self.damaged(number, "is a damaged bounce record")
        if kind != "hard":
            return None
        return JournalEntry("bounce", status, None, diagnostic)

    def _entry(self, status: str, host: str | None) -> JournalEntry | None:
        if status == "transient":
            return None  # tried and failed for now: the next run tries again
        if status != "unknown":
            host = None  # only an unknown result's host is told on resume
        shape = (status, host)
        entry = self._shared.get(shape)
        if entry is None:
            entry = self._shared[shape] = JournalEntry("result", status, host)
        return entry


def read_contents(fd: int, path: Path, *, find: frozenset[str] = frozenset()) -> Contents:
    """The journal open on ``fd`` read back (the caller holds its lock or only looks):
    the last entry per key, the identity in force, and where its whole lines end;
    ``find``: recipients (as :func:`recipient_key` gives them) whose keys to collect in
    :attr:`Contents.found`. Raises :class:`JournalFormatError` for a file that is not a
    journal or a damaged line."""
    reader = _Reader(fd, path)
    scan = _Scan(path, find)
    contents = scan.contents
    for number, line, start, whole in reader.lines():
        if whole:
            if number == 1:
                scan.first(number, line, whole)
            else:
                scan.record(number, _parse(line))
            contents.size = start + len(line) + 1
            continue
        # The last line, torn (killed mid-write): its step had not gone ahead. A whole
        # record missing only its newline is kept, to err on the side of "unknown".
        if number == 1:
            kept = scan.first(number, line, whole)
        else:
            value = _parse(line)
            kept = isinstance(value, dict) and value.get("event") in _KEYED
            if kept:
                try:
                    scan.record(number, value)
                except JournalFormatError:
                    kept = False
        if kept:
            contents.size = start + len(line)
            contents.needs_newline = True
    return contents


def recipient_key(address: str) -> str:
    """A recipient as journal records are matched to a bounce: the checked address
    (IDN domain in A-labels) with its domain in lower case; what is no address is
    compared as written, its domain lower-cased."""
    with contextlib.suppress(InputError):
        address = check_mailbox(address, field="recipient")
    return address_key(address)


def read_first(fd: int, path: Path) -> bool:
    """Whether the first line is a journal's (False: a torn header alone). Raises
    :class:`JournalFormatError` for a file that is not a journal."""
    for number, line, _, whole in _Reader(fd, path).lines():
        return _Scan(path).first(number, line, whole)
    return False


# -- writing ------------------------------------------------------------------------


def encode_record(record: dict[str, Any]) -> bytes:
    """``record`` as one journal line, newline included: UTF-8 JSON, never longer than
    :data:`MAX_LINE` (a result's prose is cut to fit)."""
    line = json.dumps(record, ensure_ascii=False, default=str)
    try:
        data = line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a key: escaped, it reads back the same
        data = json.dumps(record, default=str).encode("ascii")
    if len(data) >= MAX_LINE and record.get("event") == "result":
        # Never write a line too long to read back: keep the outcome, cut the prose.
        record = {**record, "message": str(record.get("message", ""))[:1000], "tried": []}
        data = json.dumps(record, default=str).encode("ascii")
    return data + b"\n"

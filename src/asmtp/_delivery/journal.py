"""The delivery journal: an append-only JSON Lines file that lets a bulk run be killed at
any moment and resumed without losing or repeating a recipient.

Owns the journal's format, its lock, its identity check, reading it back for a resume
(streamed, bounded, repairing a torn last line) and writing it (group commit). The
first line is a header saying which run the journal belongs to; then two kinds of
line, each flushed and fsync'd before the step it records goes ahead::

    {"asmtp": "journal", "format": 1, "event": "identity", "version": "0.1.0",
     "sender": "news@example.com", "message": "sha256:9f2c...", "campaign": null, ...}
    {"event": "dot", "key": "a@example.org", "recipient": "a@example.org", "time": ...}
    {"event": "result", "key": "a@example.org", "recipient": ..., "status": "delivered", ...}

(the header is one line in the file). The "dot" line is written just before the
end-of-data dot is sent; the "result" line when the recipient's outcome is final. On
resume, a key whose last line is a delivered or permanent result is skipped, and one
whose last line is "dot" is "unknown" (the message may have arrived). Writers share
fsyncs (group commit): many recipients in flight cost one fsync per batch, not one
each, and the fsync runs in a worker thread.

The guarantees:

* **One writer.** The file is locked (``flock``) from :meth:`Journal.open` to
  :meth:`Journal.aclose`; the kernel drops the lock when the process dies. A second
  opener, in another process or this one, gets :class:`JournalLockedError`, naming the
  holder's pid when the system can tell (a POSIX record lock on one byte far past the
  end of the file, read back with ``F_GETLK``, advertises it).
* **Identity.** A resume whose :class:`JournalIdentity` differs from the header's (or a
  later "identity" line's, written when a mismatch was overridden) is refused with
  :class:`JournalIdentityError` saying what differs. A journal from before headers is
  refused the same way; overriding adopts it (an "identity" line is appended).
* **Never someone else's file.** A file that is not an asmtp journal, is not a regular
  file, or holds a damaged line is refused (:class:`JournalFormatError`) and never
  written to. Only an empty file or a real journal is appended to.
* **Torn lines.** A last line without its newline (killed mid-write) is cut off before
  anything is appended, unless it is a whole record, which is kept. Its step had not
  gone ahead, since each step waits for its line; keeping a whole one is the careful
  choice (a kept "dot" reports the recipient ``unknown`` rather than sending again).
* **Bounded reading.** The file is read in chunks; a line longer than
  :data:`MAX_LINE` octets is refused without being held; per key only what the resume
  decides with is kept (a shared :class:`JournalEntry`).
* **Write failures.** The first failed write or fsync leaves the journal failed: every
  later write raises :class:`JournalWriteError` and nothing more is written (so a torn
  fragment is only ever the last line).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ..errors import (
    JournalFormatError,
    JournalIdentityError,
    JournalLockedError,
    JournalRefusedError,
    JournalWriteError,
)
from ..results import RecipientResult

__all__ = [
    "FORMAT",
    "MAX_LINE",
    "Journal",
    "JournalEntry",
    "JournalIdentity",
    "journal_key",
    "message_digest",
    "read_journal",
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
    ending in ``.\\r\\n``, as :class:`~asmtp._core.message.PreparedMessage` holds it). Header
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
    (the message may have arrived), or a "result" with its status (and, for an unknown
    one, the host). Shared between keys: a million keys hold a handful of these."""

    event: str  # "dot" or "result"
    status: str | None  # the result's status, for a "result" line
    host: str | None = None


_DOT = JournalEntry("dot", None)


@dataclass(slots=True)
class _Contents:
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

    def __init__(self, path: Path) -> None:
        self.path = path
        self.contents = _Contents({})
        self._shared: dict[tuple[str, str | None], JournalEntry] = {}

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
        if isinstance(value, dict) and value.get("event") in ("dot", "result"):
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
        if "asmtp" in value or event not in ("dot", "result", "identity"):
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
        entry: JournalEntry | None = _DOT
        if event == "result":
            status, host = value.get("status"), value.get("host")
            if status not in _STATUSES or not (host is None or isinstance(host, str)):
                raise self.damaged(number, "is a result without a valid status")
            entry = self._entry(status, host)
        self.contents.empty = False
        if entry is None:
            self.contents.entries.pop(key, None)
        else:
            self.contents.entries[key] = entry

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


def _read(fd: int, path: Path) -> _Contents:
    reader = _Reader(fd, path)
    scan = _Scan(path)
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
            kept = isinstance(value, dict) and value.get("event") in ("dot", "result")
            if kept:
                try:
                    scan.record(number, value)
                except JournalFormatError:
                    kept = False
        if kept:
            contents.size = start + len(line)
            contents.needs_newline = True
    return contents


def read_journal(path: str | os.PathLike[str]) -> dict[str, JournalEntry]:
    """The last entry per key, read without locking or changing the file (for a look
    at a journal; :class:`Journal` reads it under its lock). A missing file is empty;
    a file that is not a journal raises :class:`JournalFormatError`."""
    target = Path(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise JournalRefusedError(f"cannot read the journal {target}: {exc.strerror}") from exc
    _require_regular(target, st)
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(target, os.fstat(fd))
        return _read(fd, target).entries
    finally:
        os.close(fd)


def _require_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a pipe"
            if stat.S_ISFIFO(st.st_mode)
            else "not a plain file"
        )
        raise JournalFormatError(f"the journal {path} is {kind}: a journal must be a regular file")


# -- the lock -----------------------------------------------------------------------

# flock() excludes other processes and other opens in this one, and survives other
# descriptors of the file being closed; it cannot name its holder. So the holder also
# takes a POSIX record lock on one byte far past any end of file, which F_GETLK reports
# with its pid (best effort: closing any descriptor of the file in the holder drops it).
_PID_BYTE = 1 << 62
if sys.platform.startswith("linux"):
    _FLOCK = "@hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    _FIELDS = (0, 1, 2, 3, 4)
elif sys.platform == "darwin" or "bsd" in sys.platform:
    _FLOCK = "@qqihh"  # l_start, l_len, l_pid, l_type, l_whence
    _FIELDS = (3, 4, 0, 1, 2)
else:  # pragma: no cover
    _FLOCK = ""
    _FIELDS = ()

#: journals open in this process, by (device, inode): a second open is refused
#: before it touches the file (closing a descriptor would drop the POSIX lock)
_held: dict[tuple[int, int], int] = {}
_held_lock = threading.Lock()


def _advertise(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _PID_BYTE, os.SEEK_SET)


def _holder(fd: int) -> int | None:
    """The pid holding the journal, when the system says."""
    if not _FLOCK:  # pragma: no cover
        return None
    values = [0] * 5
    for slot, value in zip(_FIELDS, (fcntl.F_WRLCK, os.SEEK_SET, _PID_BYTE, 1, 0), strict=True):
        values[slot] = value
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, *values))
    except OSError:
        return None
    got = struct.unpack(_FLOCK, answer)
    kind, pid = got[_FIELDS[0]], got[_FIELDS[4]]
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def _locked(path: Path, pid: int | None, *, here: bool = False) -> JournalLockedError:
    who = "another Mailer in this process" if here else "another asmtp run"
    held = f" (pid {pid})" if pid is not None else ""
    return JournalLockedError(
        f"the journal {path} is in use by {who}{held}: one run writes a journal at a time; "
        "wait for it to end, or give another file"
    )


# -- writing ------------------------------------------------------------------------


class Journal:
    """An open, locked journal. Use :meth:`open` and :meth:`aclose`; after opening,
    :meth:`claim` the journal for this run's identity before writing records."""

    def __init__(self, fd: int, path: Path, contents: _Contents, key: tuple[int, int]) -> None:
        self._fd = fd
        self.path = path
        self._key = key
        #: the last entry per key read back on resume (empty for a new journal)
        self.entries = contents.entries
        self._contents = contents
        self._claimed = False
        self._pending: list[bytes] = []
        self._batch = anyio.Event()
        self._flushing = False
        self._failure: OSError | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, resume: bool = False) -> Journal:
        """Open and lock ``path`` (created when missing); with ``resume``, read it back
        and cut off a torn last line. Without ``resume`` the file must be empty. Raises
        a :class:`~asmtp.errors.JournalRefusedError` (nothing written) when the journal
        cannot be used."""
        target = Path(path)
        return await anyio.to_thread.run_sync(cls._open, target, resume)

    @classmethod
    def _open(cls, path: Path, resume: bool) -> Journal:
        with _held_lock:
            try:
                st: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise JournalRefusedError(
                    f"cannot open the journal {path}: {exc.strerror}"
                ) from exc
            created = st is None
            if st is not None:
                _require_regular(path, st)  # before opening: a FIFO would block
                if (st.st_dev, st.st_ino) in _held:
                    raise _locked(path, os.getpid(), here=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(path, flags | os.O_NOCTTY, 0o666)
            except OSError as exc:
                raise JournalRefusedError(
                    f"cannot open the journal {path}: {exc.strerror}"
                ) from exc
            try:
                st = os.fstat(fd)
                _require_regular(path, st)
                key = (st.st_dev, st.st_ino)
                if key in _held:
                    raise _locked(path, os.getpid(), here=True)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _locked(path, _holder(fd)) from None
                except OSError as exc:
                    raise JournalRefusedError(
                        f"cannot lock the journal {path}: {exc.strerror}"
                    ) from exc
                _advertise(fd)
                contents = cls._prepare(fd, path, resume)
                if created:
                    _sync_folder(path)  # the new file's name survives a crash too
            except BaseException:
                os.close(fd)
                raise
            _held[key] = fd
            return cls(fd, path, contents, key)

    @staticmethod
    def _prepare(fd: int, path: Path, resume: bool) -> _Contents:
        size = os.fstat(fd).st_size
        if not resume and size and _read_first(fd, path):
            raise JournalFormatError(
                f"the journal {path} holds an earlier run: resume it (its recipients "
                "done are skipped), or give a new file"
            )
        # Without resume, only an empty file or a torn header alone gets here.
        contents = _read(fd, path) if size else _Contents({})
        try:
            if contents.size < size:
                # A torn last line: cut off before anything is appended after it. No
                # fsync needed: if the cut is lost, the line is torn again next time.
                os.ftruncate(fd, contents.size)
            if contents.needs_newline:
                _write_all(fd, b"\n")
        except OSError as exc:
            raise JournalRefusedError(
                f"cannot repair the torn last line of the journal {path}: {exc.strerror}"
            ) from exc
        return contents

    @property
    def recorded(self) -> JournalIdentity | None:
        """The identity the journal holds (None: new, or from before headers)."""
        return self._contents.identity

    async def claim(self, identity: JournalIdentity, *, ignore_identity: bool = False) -> None:
        """Check that the journal belongs to the run ``identity`` describes, and record
        it: the header of a new journal, or (``ignore_identity``) an "identity" line
        that makes a differing or header-less journal this run's. Raises
        :class:`~asmtp.errors.JournalIdentityError` when it belongs to another run."""
        if self._claimed:
            return
        contents = self._contents
        record: dict[str, Any] | None = None
        if contents.empty:
            record = {"asmtp": "journal", "format": FORMAT, "event": "identity"}
        elif contents.identity is None:
            if not ignore_identity:
                raise JournalIdentityError(
                    f"the journal {self.path} was written by an asmtp from before journals "
                    "recorded their run (no header): it cannot say which sender and message "
                    "it belongs to",
                    differences=("the journal records no identity",),
                )
            record = {"event": "identity"}
        else:
            differences = identity.differences(contents.identity)
            if differences:
                if not ignore_identity:
                    raise JournalIdentityError(
                        f"the journal {self.path} belongs to another run: "
                        + "; ".join(differences)
                        + ". Its recipients marked done would be skipped without ever "
                        "getting this run's message",
                        differences=tuple(differences),
                    )
                record = {"event": "identity"}
        if record is not None:
            from .._version import __version__  # at call time: the package imports this module

            record.update(version=__version__, **identity.record(), time=_now())
            await self._write(record)
            contents.identity = identity
            contents.empty = False
        self._claimed = True

    async def dot(self, key: Any, recipient: str) -> None:
        """Record that the end-of-data dot for ``recipient`` is about to be sent."""
        await self._write({"event": "dot", "key": key, "recipient": recipient, "time": _now()})

    async def result(self, result: RecipientResult) -> None:
        record = result.as_dict()
        record["key"] = result.key if result.key is not None else result.recipient
        record["event"] = "result"
        record["time"] = _now()
        await self._write(record)

    @property
    def failed(self) -> JournalWriteError | None:
        """The write failure that stopped the journal, if any."""
        failure = self._failure
        if failure is None:
            return None
        return JournalWriteError(
            f"the journal {self.path} cannot be written ({failure.strerror or failure}): "
            "sending stopped; resume the run once it can be written",
            errno=failure.errno,
        )

    async def _write(self, record: dict[str, Any]) -> None:
        if (failed := self.failed) is not None:
            raise failed
        self._pending.append(_encode(record))
        batch = self._batch
        if self._flushing:
            await batch.wait()
        else:
            self._flushing = True
            # Group commit: this writer flushes every line queued meanwhile too, and
            # wakes their writers, even if it is cancelled meanwhile.
            with anyio.CancelScope(shield=True):
                try:
                    while self._pending:
                        lines, self._pending = self._pending, []
                        done, self._batch = self._batch, anyio.Event()
                        try:
                            if self._failure is None:
                                await anyio.to_thread.run_sync(self._append, b"".join(lines))
                        except OSError as exc:
                            # Nothing more is written: a torn fragment stays the last line.
                            self._failure = exc
                        finally:
                            done.set()
                finally:
                    self._flushing = False
        if (failed := self.failed) is not None:
            raise failed

    def _append(self, data: bytes) -> None:
        _write_all(self._fd, data)
        os.fsync(self._fd)

    async def aclose(self) -> None:
        """Close the file and release the lock."""
        await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with _held_lock:
            if _held.get(self._key) == self._fd:
                os.close(self._fd)
                del _held[self._key]


def _read_first(fd: int, path: Path) -> bool:
    """Whether the first line is a journal's (False: a torn header alone). Raises
    :class:`JournalFormatError` for a file that is not a journal."""
    for number, line, _, whole in _Reader(fd, path).lines():
        return _Scan(path).first(number, line, whole)
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _sync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _encode(record: dict[str, Any]) -> bytes:
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

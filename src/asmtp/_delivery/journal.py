"""The delivery journal's file (layer 4): an append-only JSON Lines file that lets a bulk
run be killed at any moment and resumed without losing or repeating a recipient.

Owns the file: opening it, its lock, repairing a torn last line, and writing it (group
commit). What its lines say, and reading them back, is
:mod:`~asmtp._delivery.journal_format`'s. Each line is flushed and fsync'd before the
step it records goes ahead: the "dot" line just before the end-of-data dot is sent, the
"result" line when the recipient's outcome is final. Writers share fsyncs (group
commit): many recipients in flight cost one fsync per batch, not one each, and the
fsync runs in a worker thread.

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
  :data:`~asmtp._delivery.journal_format.MAX_LINE` octets is refused without being
  held; per key only what the resume decides with is kept (a shared
  :class:`~asmtp._delivery.journal_format.JournalEntry`).
* **Write failures.** The first failed write or fsync leaves the journal failed: every
  later write raises :class:`JournalWriteError` and nothing more is written (so a torn
  fragment is only ever the last line).

After a run, :func:`record_bounce` appends what a returned message says about a
recipient ("bounce" lines, against the keys the journal holds for that recipient), under
the same lock: a journal in use by a running send is waited for briefly, then refused
with :class:`JournalLockedError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._core.bounce import Bounce
from ..errors import (
    JournalFormatError,
    JournalIdentityError,
    JournalLockedError,
    JournalRefusedError,
    JournalWriteError,
)
from ..results import RecipientResult
from .journal_format import (
    FORMAT,
    Contents,
    JournalEntry,
    JournalIdentity,
    encode_record,
    read_contents,
    read_first,
    recipient_key,
)

__all__ = ["Journal", "read_journal", "record_bounce", "record_bounces"]

#: how long record_bounce waits for a journal in use by a running send, by default
BOUNCE_WAIT = 5.0
#: the longest diagnostic kept in a bounce record, in characters
_DIAGNOSTIC = 1000


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
        return read_contents(fd, target).entries
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

    def __init__(self, fd: int, path: Path, contents: Contents, key: tuple[int, int]) -> None:
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
    def _open(cls, path: Path, resume: bool, find: frozenset[str] = frozenset()) -> Journal:
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
                contents = cls._prepare(fd, path, resume, find)
                if created:
                    sync_folder(path)  # the new file's name survives a crash too
            except BaseException:
                os.close(fd)
                raise
            _held[key] = fd
            return cls(fd, path, contents, key)

    @staticmethod
    def _prepare(fd: int, path: Path, resume: bool, find: frozenset[str]) -> Contents:
        size = os.fstat(fd).st_size
        if not resume and size and read_first(fd, path):
            raise JournalFormatError(
                f"the journal {path} holds an earlier run: resume it (its recipients "
                "done are skipped), or give a new file"
            )
        # Without resume, only an empty file or a torn header alone gets here.
        contents = read_contents(fd, path, find=find) if size else Contents({})
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

    async def dots(self, dots: Iterable[tuple[Any, str]]) -> None:
        """Record several ``(key, recipient)`` dots at once (one batch of the group commit)."""
        now = _now()
        await self._write(
            *[{"event": "dot", "key": k, "recipient": r, "time": now} for k, r in dots]
        )

    async def result(self, result: RecipientResult) -> None:
        await self._write(_result_record(result))

    async def results(self, results: Iterable[RecipientResult]) -> None:
        """Record several results at once (one batch of the group commit)."""
        await self._write(*[_result_record(result) for result in results])

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

    async def _write(self, *records: dict[str, Any]) -> None:
        if (failed := self.failed) is not None:
            raise failed
        self._pending.extend(encode_record(record) for record in records)
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


# -- bounces after the run ------------------------------------------------------------


def record_bounce(
    path: str | os.PathLike[str], bounce: Bounce, *, wait: float = BOUNCE_WAIT
) -> bool:
    """Append a "bounce" record for ``bounce`` to the journal at ``path``, against every
    key the journal holds for its recipient (matched as addresses are: the domain
    case-insensitively). False when the journal names no such recipient (or the bounce
    names none, or there is no journal). A hard bounce makes a later resume report its
    recipient ``permanent`` ("bounced: 5.1.1 ...") without sending again.

    Blocking (call it in a worker thread from async code). A journal in use by a
    running send is waited for up to ``wait`` seconds, then refused with
    :class:`~asmtp.errors.JournalLockedError`; one in use in this process is refused
    at once. A file that is not a journal raises
    :class:`~asmtp.errors.JournalFormatError`."""
    return record_bounces(path, [bounce], wait=wait)[0]


def record_bounces(
    path: str | os.PathLike[str], bounces: Iterable[Bounce], *, wait: float = BOUNCE_WAIT
) -> list[bool]:
    """:func:`record_bounce` for many bounces at once: the journal is read once, and the
    records appended with one fsync. One bool per bounce, in order."""
    bounces = list(bounces)
    target = Path(path)
    sought = [recipient_key(b.recipient) if b.recipient else None for b in bounces]
    if not any(sought) or not target.exists():
        return [False] * len(bounces)
    journal = _open_waiting(target, frozenset(k for k in sought if k), wait)
    try:
        found = journal._contents.found
        lines: list[bytes] = []
        done: list[bool] = []
        for bounce, key in zip(bounces, sought, strict=True):
            keys = found.get(key, {}) if key else {}
            done.append(bool(keys))
            for raw_key in keys.values():
                lines.append(encode_record(_bounce_record(raw_key, bounce)))
        if lines:
            try:
                journal._append(b"".join(lines))
            except OSError as exc:
                raise JournalWriteError(
                    f"the journal {target} cannot be written ({exc.strerror or exc}): "
                    "the bounces were not recorded",
                    errno=exc.errno,
                ) from exc
        return done
    finally:
        journal._close()


def _open_waiting(path: Path, find: frozenset[str], wait: float) -> Journal:
    deadline = time.monotonic() + wait
    while True:
        try:
            return Journal._open(path, True, find)
        except JournalLockedError as exc:
            here = "in this process" in exc.message
            if here or time.monotonic() >= deadline:
                raise JournalLockedError(
                    f"{exc.message}. Bounces are recorded when the send has ended"
                ) from None
        time.sleep(0.05)


def _result_record(result: RecipientResult) -> dict[str, Any]:
    record = result.as_dict()
    record["key"] = result.key if result.key is not None else result.recipient
    record["event"] = "result"
    record["time"] = _now()
    return record


def _bounce_record(key: Any, bounce: Bounce) -> dict[str, Any]:
    diagnostic = bounce.diagnostic
    if diagnostic is not None and len(diagnostic) > _DIAGNOSTIC:
        diagnostic = diagnostic[:_DIAGNOSTIC] + "..."
    return {
        "event": "bounce",
        "key": key,
        "recipient": bounce.recipient,
        "kind": bounce.kind,
        "status": bounce.status,
        "diagnostic": diagnostic,
        "action": bounce.action,
        "message_id": bounce.message_id,
        "source": bounce.source,
        "time": _now(),
    }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def sync_folder(path: Path) -> None:
    """fsync the folder holding ``path``: a new file's name survives a crash (best effort)."""
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

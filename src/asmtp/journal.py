"""The delivery journal: an append-only JSON Lines file that lets a bulk run be killed at
any moment and resumed without losing or repeating a recipient.

Two kinds of line, each flushed and fsync'd before the step it records goes ahead::

    {"event": "dot", "key": "a@example.org", "recipient": "a@example.org", "time": ...}
    {"event": "result", "key": "a@example.org", "recipient": ..., "status": "delivered", ...}

The "dot" line is written just before the end-of-data dot is sent; the "result" line
when the recipient's outcome is final. On resume, a key whose last line is a delivered
or permanent result is skipped, and one whose last line is "dot" is "unknown" (the
message may have arrived). Writers share fsyncs (group commit): many recipients in
flight cost one fsync per batch, not one each, and the fsync runs in a worker thread.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread

from .errors import JournalError
from .results import RecipientResult

__all__ = ["Journal", "JournalEntry", "journal_key", "read_journal"]


def journal_key(key: Any) -> str:
    """The form keys take in the journal (any JSON value; compared as its JSON text)."""
    return json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """The last thing the journal says about one key."""

    event: str  # "dot" or "result"
    status: str | None  # the result's status, for a "result" line
    record: dict[str, Any]


def read_journal(path: str | os.PathLike[str]) -> dict[str, JournalEntry]:
    """The last entry per key. A torn last line (the process was killed while writing
    it) is ignored: its step had not gone ahead, since each step waits for its line."""
    entries: dict[str, JournalEntry] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "key" not in record:
            continue
        event = record.get("event")
        if event not in ("dot", "result"):
            continue
        status = record.get("status") if event == "result" else None
        entries[journal_key(record["key"])] = JournalEntry(event, status, record)
    return entries


class Journal:
    """An open journal file. Use :meth:`open` (off the event loop) and :meth:`aclose`."""

    def __init__(self, file: IO[str], path: Path) -> None:
        self._file = file
        self.path = path
        self._pending: list[str] = []
        self._batch = anyio.Event()
        self._flushing = False
        self._error: OSError | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Journal:
        target = Path(path)

        def opener() -> IO[str]:
            return target.open("a", encoding="utf-8")

        try:
            file = await anyio.to_thread.run_sync(opener)
        except OSError as exc:
            raise JournalError(f"cannot open the journal {target}: {exc.strerror}") from exc
        return cls(file, target)

    async def dot(self, key: Any, recipient: str) -> None:
        """Record that the end-of-data dot for ``recipient`` is about to be sent."""
        await self._write({"event": "dot", "key": key, "recipient": recipient, "time": _now()})

    async def result(self, result: RecipientResult) -> None:
        record = result.as_dict()
        record["key"] = result.key if result.key is not None else result.recipient
        record["event"] = "result"
        record["time"] = _now()
        await self._write(record)

    async def _write(self, record: dict[str, Any]) -> None:
        if self._error is not None:
            raise JournalError(f"the journal {self.path} cannot be written: {self._error}")
        self._pending.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        batch = self._batch
        if self._flushing:
            await batch.wait()
        else:
            self._flushing = True
            try:
                # Group commit: this writer flushes every line queued meanwhile too.
                while self._pending:
                    lines, self._pending = self._pending, []
                    done, self._batch = self._batch, anyio.Event()
                    try:
                        await anyio.to_thread.run_sync(self._append, "".join(lines))
                    except OSError as exc:
                        self._error = exc
                    finally:
                        done.set()
            finally:
                self._flushing = False
        if self._error is not None:
            raise JournalError(f"the journal {self.path} cannot be written: {self._error}")

    def _append(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._file.close)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

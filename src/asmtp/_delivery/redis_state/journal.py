"""The journal of a campaign in Redis: per recipient key, a dot record written before
the dot and the final result after, as the file journal keeps them.

Owns writing and reading those states. Writes are grouped (group commit, as the file
journal's fsyncs are): the dot records and results of many sessions at once cost one
round trip to Redis, one Lua call that updates the states, the counts by state and the
stream of results atomically; the batch's results are encoded once, as one JSON array
of rows (:mod:`.rows`), which Lua passes to the stream without reading it. A dot waits
for its record. A result does not: it goes out at once, in the write under way or in
a task of its own when there is none, and :meth:`RedisJournal.flush` waits for every
result given so far (the worker flushes before it calls a chunk done). The first
failed write fails the journal: every later write raises
:class:`~asmtp.errors.JournalWriteError`, so no dot goes out unrecorded (the Mailer
stops taking jobs), and so does :meth:`~RedisJournal.flush`.

Resume reads the states of a chunk's keys in one round trip (:meth:`RedisJournal.load`)
and gives the Mailer the same entries a file journal would: delivered and permanent
skipped, a dot without result (or an ``unknown`` result) reported ``unknown``, a
transient result tried again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis

from ...errors import JournalWriteError
from ...results import RecipientResult
from ..journal_format import JournalEntry, JournalIdentity, journal_key
from .keys import RECORD, prefix
from .rows import result_row

__all__ = ["STREAM_LENGTH", "RedisJournal", "parse_state", "resume_entry"]

#: entries kept in a campaign's stream for followers (about; older ones are trimmed):
#: one per journal write, each with the results of that write (up to the sessions
#: of one worker process at once)
STREAM_LENGTH = 200_000
_ROWS = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":"))

_DOT = JournalEntry("dot", None)
_FINAL = {s: JournalEntry("result", s) for s in ("delivered", "permanent", "unknown")}
#: a key with a result of the run taking it up: skipped (resume's "skip")
_DONE = _FINAL["delivered"]


def parse_state(value: str | None) -> tuple[str | None, int, str]:
    """A key's state: (its status or "dot", the run that wrote it, the host of an
    unknown result). ``dot|3``, ``delivered|3|``, ``unknown|3|mx.example.org``.

    >>> parse_state("unknown|3|mx.example.org"), parse_state(None)
    (('unknown', 3, 'mx.example.org'), (None, 0, ''))
    """
    if value is None:
        return None, 0, ""
    status, _, rest = value.partition("|")
    run_text, _, host = rest.partition("|")
    return status, int(run_text) if run_text.isdigit() else 0, host


def resume_entry(status: str | None, run: int, host: str, *, this_run: int) -> JournalEntry | None:
    """What the Mailer's resume is to read for a key in state (``status``, ``run``,
    ``host``) when run ``this_run`` takes it up: a dot of any run: "dot" (reported
    unknown); a result of this very run (a chunk handed out again): done, whatever it
    said, so that no key has two results in one run; of an earlier run, as the file
    journal says it (delivered and permanent skipped, unknown reported again,
    transient tried again)."""
    if status is None:
        return None
    if status == "dot":
        return _DOT
    if run == this_run:
        return _DONE
    if status == "unknown" and host:
        return JournalEntry("result", "unknown", host)
    return _FINAL.get(status)


class RedisJournal:
    """One campaign's journal in Redis, for the jobs of run ``run``. Fill
    :attr:`entries` with :meth:`load` before handing a chunk's jobs to the Mailer."""

    def __init__(self, redis: Redis, campaign: str, run: int) -> None:
        self._redis = redis
        self.campaign = campaign
        self.run = run
        base = prefix(campaign)
        self._keys = [base + "j", base + "n", base + "out"]
        self._record = redis.register_script(RECORD)
        self._head = [str(run), str(STREAM_LENGTH)]
        self.entries: MutableMapping[str, JournalEntry] = {}
        #: "key\nstate\n" of each record not yet written, and its result rows
        self._pending: list[str] = []
        self._rows: list[list[Any]] = []
        #: set when the records pending now are written (or failed)
        self._batch = anyio.Event()
        self._flushing = False
        #: set when no write is under way
        self._idle = anyio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None

    async def load(self, keys: Sequence[str]) -> int:
        """Read the states of ``keys`` (journal keys) into :attr:`entries`, replacing
        what was there; returns how many were done in an earlier run (skipped, not
        counted again by this run's followers)."""
        self.entries.clear()
        if not keys:
            return 0
        values = await self._redis.hmget(self._keys[0], list(keys))
        earlier = 0
        for key, raw in zip(keys, values, strict=True):
            status, run, host = parse_state(raw.decode() if isinstance(raw, bytes) else raw)
            entry = resume_entry(status, run, host, this_run=self.run)
            if entry is not None:
                self.entries[key] = entry
                if run != self.run and status in ("delivered", "permanent"):
                    earlier += 1
        return earlier

    @property
    def failed(self) -> JournalWriteError | None:
        if self._failure is None:
            return None
        return JournalWriteError(
            f"the campaign {self.campaign}'s journal in Redis cannot be written "
            f"({self._failure}): sending stopped; the chunk is taken up again"
        )

    async def claim(self, identity: JournalIdentity, *, ignore_identity: bool = False) -> None:
        """Checked when the run was enqueued (:meth:`CampaignStore.open_run`)."""

    async def dot(self, key: Any, recipient: str) -> None:
        """Record the dot for ``key``; returns once Redis has it."""
        if (failed := self.failed) is not None:
            raise failed
        self._pending.append(f"{journal_key(key)}\ndot|{self.run}\n")
        if self._flushing:
            await self._batch.wait()
        else:
            self._started()
            await self._flush()  # group commit: this writer sends what others queue meanwhile
        if (failed := self.failed) is not None:
            raise failed

    async def result(self, result: RecipientResult) -> None:
        """Record ``result`` as its key's final state; returns at once (the write is
        under way: :meth:`flush` waits for it)."""
        if (failed := self.failed) is not None:
            raise failed
        key = result.key if result.key is not None else result.recipient
        host = (result.host or "") if result.status == "unknown" else ""
        self._pending.append(f"{journal_key(key)}\n{result.status}|{self.run}|{host}\n")
        self._rows.append(result_row(result))
        if not self._flushing:
            self._started()
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def flush(self) -> None:
        """Wait until every record given so far is written; raise
        :class:`~asmtp.errors.JournalWriteError` if one could not be."""
        while self._flushing or self._pending:
            if self._flushing:
                await self._idle.wait()
            else:
                self._started()
                await self._flush()
        if (failed := self.failed) is not None:
            raise failed

    async def aclose(self) -> None:
        """Write what is pending (the worker's Redis connection outlives the Mailer)."""
        await self.flush()

    def _started(self) -> None:
        self._flushing = True
        self._idle = anyio.Event()

    async def _flush(self) -> None:
        """Write the pending records, a batch per round trip, until none are left;
        wake each batch's writers, even if cancelled meanwhile (after :meth:`_started`)."""
        with anyio.CancelScope(shield=True):
            try:
                while self._pending:
                    records, self._pending = self._pending, []
                    rows, self._rows = self._rows, []
                    done, self._batch = self._batch, anyio.Event()
                    try:
                        if self._failure is None:
                            encoded = _ROWS.encode(rows) if rows else ""
                            args = [*self._head, encoded, "".join(records)]
                            await self._record(keys=self._keys, args=args)
                    except Exception as exc:  # any failure: not written, the journal fails
                        self._failure = str(exc) or type(exc).__name__
                    finally:
                        done.set()
            finally:
                self._flushing = False
                self._task = None
                self._idle.set()

"""One worker process of :class:`~asmtp._delivery.workers.Workers` (layer 4), and the link
between it and its parent.

Owns the worker's side of a run on every core: the messages on the link (length-prefixed
pickles over a Unix socket pair, between a parent and the processes it forked, never
over a network), the worker's :class:`~asmtp._delivery.mailer.Mailer` over its share of
the jobs, and dying with the parent.

The parent keeps the run's single journal, its one lock and its identity, and the
global rate; the worker's Mailer sees them through the shared-state protocols of
:mod:`~asmtp._delivery.shared_state`. So a worker:

* sends no end-of-data dot before the parent says that dot's record is durable (it asks
  with ``("dot", n, key, recipient)`` and waits for ``("acks", [n, ...])``, or
  ``("fail", n, message, errno)``: the dot is then not sent, as when a single process
  cannot write its journal);
* waits for ``("token", n)`` from the parent before each try when the run has a global
  rate (per-domain rates hold locally: one domain is always one worker's);
* reports its results as ``("results", [(result, journaled, number), ...], low mark,
  taken, skipped, bounced)``, those completed in one turn of its event loop together
  (numbers and low mark: see :func:`share_of`); the parent records each, then shows it;
* ends with ``("done", taken, skipped, bounced)``, or ``("error", exception)`` when its
  Mailer failed as a whole (the relay's name did not resolve, the journal failed).

It dies with its parent: ``PR_SET_PDEATHSIG`` on Linux, and the end of the link
everywhere (then it exits at once: a dot never goes out unrecorded, since every dot waits
for the parent's ack).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pickle
import signal
import socket
import struct
import sys
import zlib
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TypeAlias

import anyio
import anyio.abc

from .._core.address import domain_of
from ..errors import InputError, JournalWriteError, SMTPError
from ..results import RecipientResult
from .jobs import Job
from .journal import read_journal
from .journal_format import JournalEntry, JournalIdentity, journal_key
from .mailer import Mailer
from .resume import resume_action
from .retry import LocalRates, Rate
from .shared_state import no_lease

__all__ = ["Link", "Numbered", "Runner", "run_worker", "shard_of", "share_of"]

#: runs a worker's coroutine on a new event loop (``asyncio.run``, or the CLI's uvloop)
Runner = Callable[[Coroutine[Any, Any, None]], Any]

_HEADER = struct.Struct(">I")
#: the most read from a link at once
_READ = 1 << 16
#: the largest message on a link (a result with a long reply text is a few kB)
_MAX_MESSAGE = 64 << 20
#: Linux prctl(2) option: a signal for this process when its parent thread ends
_PR_SET_PDEATHSIG = 1


def shard_of(recipient: str, workers: int) -> int:
    """The worker (0 to ``workers - 1``) that sends to ``recipient``: a stable hash of
    its domain (lower-cased, IDNA applied), so one domain is always one worker's and
    its per-domain limits hold as in one process.

    >>> shard_of("ann@Example.ORG", 4) == shard_of("bob@example.org", 4)
    True
    """
    # every worker places every job: the domain as written is looked up once
    return _domain_hash(recipient.rpartition("@")[2]) % workers


@functools.lru_cache(maxsize=4096)
def _domain_hash(written: str) -> int:
    try:
        domain = domain_of(f"postmaster@{written}")
    except (InputError, ValueError):  # a refused row: its job fails alone, anywhere stable
        domain = written.lower()
    # crc32: the same in every process and run (str hashes are salted per process)
    return zlib.crc32(domain.encode("utf-8", "surrogatepass"))


class Link:
    """Messages (tuples) between a parent and a worker over one end of a socket pair:
    each a 4-byte length and a pickle. Sends are serialized; one task receives."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._ended = False
        self._pending: list[bytes] = []
        self._writing = False
        self._written = anyio.Event()

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        """A link over ``sock``, one end of a socket pair (in the running event loop)."""
        return cls(await anyio.abc.SocketStream.from_socket(sock))

    async def send(self, *message: Any) -> None:
        """Send ``message``; a link whose other end is gone raises
        :class:`anyio.BrokenResourceError` (or ``ClosedResourceError``).

        Messages sent while a write is under way go out together in the next one (as
        the journal's group commit shares fsyncs): one system call for many acks."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._pending.append(_HEADER.pack(len(data)) + data)
        if self._writing:
            await self._written.wait()  # the writer's next write takes it
            return
        self._writing = True
        try:
            while self._pending:
                chunk, self._pending = b"".join(self._pending), []
                written, self._written = self._written, anyio.Event()
                try:
                    await self._stream.send(chunk)
                finally:
                    written.set()
        finally:
            self._writing = False

    async def try_send(self, *message: Any) -> bool:
        """Send ``message`` unless the other end is gone (then False)."""
        try:
            await self.send(*message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end is gone."""
        while (message := self.receive_nowait()) is None:
            if self._ended:
                return None
            try:
                self._buffer += await self._stream.receive(_READ)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                self._ended = True
                return None
        return message

    def receive_nowait(self) -> tuple[Any, ...] | None:
        """The next message if it has arrived whole, else None (without waiting)."""
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(buffer)
        if size > _MAX_MESSAGE:
            self._ended = True  # not a message of ours: the link is broken
            return None
        end = _HEADER.size + size
        if len(buffer) < end:
            return None
        message = pickle.loads(memoryview(buffer)[_HEADER.size : end])
        del buffer[:end]
        assert isinstance(message, tuple)
        return message

    async def aclose(self) -> None:
        await self._stream.aclose()


# -- the worker's stand-ins for the parent's journal and rate --------------------------


class _Requests:
    """Requests to the parent that wait for its answer, by number."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._next = 0
        self._waiting: dict[int, tuple[anyio.Event, list[tuple[Any, ...]]]] = {}

    async def ask(self, *message: Any) -> tuple[Any, ...]:
        self._next += 1
        n = self._next
        event, answer = anyio.Event(), list[tuple[Any, ...]]()
        self._waiting[n] = (event, answer)
        try:
            await self.link.send(message[0], n, *message[1:])
            await event.wait()
        finally:
            self._waiting.pop(n, None)
        return answer[0]

    def answered(self, message: tuple[Any, ...]) -> None:
        """An answer: ``(kind, n, ...)``, or ``("acks", [n, ...])`` for many dots."""
        if message[0] == "acks":
            for n in message[1]:
                self._answer(n, ("ack", n))
        else:
            self._answer(message[1], message)

    def _answer(self, n: int, message: tuple[Any, ...]) -> None:
        waiting = self._waiting.get(n)
        if waiting is not None:
            waiting[1].append(message)
            waiting[0].set()


class _ParentJournal:
    """The run's journal as a worker's Mailer sees it (a
    :class:`~asmtp._delivery.shared_state.SharedJournal`): the parent holds the file.
    A dot's record is durable once the parent acks it; a result is recorded by the
    parent when the worker reports it, so here it is only marked for that report."""

    def __init__(self, requests: _Requests, entries: dict[str, JournalEntry]) -> None:
        self._requests = requests
        #: what earlier runs did, read from the file before this run wrote to it
        self.entries: MutableMapping[str, JournalEntry] = entries
        #: results the Mailer journals, by id() until they are reported
        self.journaled: set[int] = set()

    async def claim(self, identity: JournalIdentity, *, ignore_identity: bool = False) -> None:
        pass  # the parent claimed the journal for the run before the workers started

    async def dot(self, key: Any, recipient: str) -> None:
        answer = await self._requests.ask("dot", key, recipient)
        if answer[0] == "fail":
            _, _, message, errno = answer
            raise JournalWriteError(message, errno=errno)

    async def result(self, result: RecipientResult) -> None:
        self.journaled.add(id(result))  # reported (and journaled) as it is yielded

    async def aclose(self) -> None:
        pass


class _ParentRate:
    """The run's rates as a worker's Mailer sees them (a
    :class:`~asmtp._delivery.shared_state.SharedLimits`): each token of the global rate
    comes from the parent's one bucket, so N workers together send at the rate one
    process would; a domain's rate is this worker's alone (its domains are its own)."""

    def __init__(self, requests: _Requests, per_domain: Rate | None) -> None:
        self._requests = requests
        self._own = LocalRates(None, per_domain)

    async def take(self, domain: str) -> None:
        await self._requests.ask("token")
        await self._own.take(domain)

    def connection(self, domain: str) -> contextlib.AbstractAsyncContextManager[None]:
        return no_lease()  # sessions to a domain: the worker's own Mailer caps them


# -- the worker ---------------------------------------------------------------------


def run_worker(
    index: int,
    workers: int,
    sock: socket.socket,
    inherited: list[socket.socket],
    settings: Mailer,
    share: int,
    jobs: Callable[[], Iterable[Job]],
    runner: Runner,
) -> None:
    """The body of worker ``index`` (a forked process): its share of the jobs through a
    Mailer with ``settings`` and ``share`` sessions at once."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the parent decides, and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for other in inherited:
        other.close()  # the parent's ends: the link must end when the parent does
    runner(_work(index, workers, sock, settings, share, jobs))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # the parent may have died before the prctl: reparented already
    if os.getppid() == 1:
        os._exit(1)


async def _work(
    index: int,
    workers: int,
    sock: socket.socket,
    settings: Mailer,
    share: int,
    jobs: Callable[[], Iterable[Job]],
) -> None:
    link = await Link.over(sock)
    go = await link.receive()
    if go is None or go[0] != "go":
        return
    journal_path = go[1]
    # What earlier runs did, read before any record of this run is written (the
    # parent waits for every worker's "ready" before it says "start").
    done: dict[str, JournalEntry] = read_journal(journal_path) if go[2] else {}
    await link.send("ready")
    start = await link.receive()
    if start is None or start[0] != "start":
        return
    requests = _Requests(link)
    parent_journal = _ParentJournal(requests, done) if journal_path is not None else None
    limits = _ParentRate(requests, settings.rate_per_domain) if settings.rate is not None else None
    mailer = _worker_mailer(settings, share, parent_journal, limits)
    own = _Share(share_of(jobs, workers, index, done, settings.retry.retry_unknown))

    async def listen() -> None:
        while (message := await link.receive()) is not None:
            if message[0] == "stop":
                mailer.stop()
            else:
                requests.answered(message)
        # The parent is gone: stop now. Every dot waits for the parent's ack, so none
        # can go out unrecorded; the resumed run reports those in flight unknown.
        os._exit(1)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            outbox = _Outbox(link, tg, lambda: (own.watermark, *own.counts(mailer)))
            try:
                async with mailer:
                    async for result in mailer.deliver(own):
                        journaled = parent_journal is not None and (
                            id(result) in parent_journal.journaled
                        )
                        if journaled:
                            assert parent_journal is not None
                            parent_journal.journaled.discard(id(result))
                        await outbox.add(result, journaled, own.finished(result))
            except SMTPError as exc:
                await outbox.flush()
                await link.send("error", _portable(exc))
            else:
                await outbox.flush()
                await link.send("done", *own.counts(mailer))
            tg.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            await link.aclose()


#: a job of a worker's share: its number among those sent (None: skipped, done in an
#: earlier run), the job, and its journal key
Numbered: TypeAlias = tuple[int | None, Job, str]


def share_of(
    jobs: Callable[[], Iterable[Job]],
    workers: int,
    index: int,
    done: Mapping[str, JournalEntry],
    retry_unknown: bool,
) -> Iterator[Numbered]:
    """Worker ``index``'s share of the jobs, in order, numbered: the worker and, when
    the worker dies, the parent number them alike, so that the parent can tell which
    jobs the worker had reported from a few numbers (the jobs before the worker's low
    mark, and the few reported after it), not from every key."""
    n = 0
    for job in jobs():
        if not isinstance(job, Job):
            yield None, job, ""  # the Mailer refuses it (InputError)
            return
        if shard_of(job.recipient, workers) != index:
            continue
        known = journal_key(job.key if job.key is not None else job.recipient)
        if resume_action(done.get(known), retry_unknown=retry_unknown) == "skip":
            yield None, job, known  # done in an earlier run: no result
            continue
        yield n, job, known
        n += 1


class _Share:
    """A worker's share as its Mailer takes it: the jobs skipped for an earlier run
    counted here (the Mailer gets only jobs that end in a result), and the numbers of
    the jobs in flight, whose lowest is the low mark the parent is told."""

    def __init__(self, numbered: Iterator[Numbered]) -> None:
        self._numbered = numbered
        #: jobs of the share taken so far (skipped included)
        self.taken = 0
        self.skipped = 0
        self._next = 0
        self._in_flight: dict[str, list[int]] = {}

    def __iter__(self) -> Iterator[Job]:
        for number, job, known in self._numbered:
            self.taken += 1
            if number is None:
                if known:
                    self.skipped += 1
                    continue
                yield job  # not a Job: the Mailer says so
                return
            self._in_flight.setdefault(known, []).append(number)
            self._next = number + 1
            yield job

    def finished(self, result: RecipientResult) -> int:
        """The number of the job ``result`` ends."""
        known = journal_key(result.key if result.key is not None else result.recipient)
        numbers = self._in_flight[known]
        number = numbers.pop(0)
        if not numbers:
            del self._in_flight[known]
        return number

    @property
    def watermark(self) -> int:
        """Every job numbered below has been reported."""
        return min((numbers[0] for numbers in self._in_flight.values()), default=self._next)

    def counts(self, mailer: Mailer) -> tuple[int, int, int]:
        return self.taken, self.skipped, mailer.bounced


class _Outbox:
    """Results on their way to the parent, sent together: those that complete in one
    turn of the event loop go in one message (one pickle, one write), with the low
    mark and the counts as they stand after the last of them."""

    def __init__(
        self, link: Link, tg: anyio.abc.TaskGroup, state: Callable[[], tuple[int, ...]]
    ) -> None:
        self._link = link
        self._tg = tg
        self._state = state
        self._results: list[tuple[RecipientResult, bool, int]] = []
        self._sending = anyio.Lock()
        #: results not yet sent, at most (then the worker waits for the link)
        self._limit = 256

    async def add(self, result: RecipientResult, journaled: bool, number: int) -> None:
        self._results.append((result, journaled, number))
        if len(self._results) == 1:
            self._tg.start_soon(self.flush)
        elif len(self._results) >= self._limit:
            await self.flush()

    async def flush(self) -> None:
        async with self._sending:
            if self._results:
                results, self._results = self._results, []
                await self._link.send("results", results, *self._state())


def _worker_mailer(
    settings: Mailer, share: int, journal: _ParentJournal | None, limits: _ParentRate | None
) -> Mailer:
    """A Mailer with ``settings``'s, but ``share`` sessions at once, and the parent's
    journal and global rate."""
    return Mailer(
        settings.relay,
        concurrency=share,
        timeout=settings.timeouts,
        retry=settings.retry,
        rate_per_domain=settings.rate_per_domain if limits is None else None,
        journal=journal,
        shared_limits=limits,
        recipient_deadline=settings.recipient_deadline,
        dsn=settings.dsn,
        requiretls=settings.requiretls,
        unsubscribe=settings.unsubscribe,
        verp=settings.verp,
        pool=settings.pool or False,
        dkim=settings.dkim,
        debug=settings.debug,
        suppress=settings.suppress,
    )


def _portable(error: SMTPError) -> SMTPError:
    """``error``, or its text in a plain SMTPError when it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return SMTPError(str(error))
    return error

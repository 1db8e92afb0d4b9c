"""A bulk run on every core of one machine: :class:`Workers` forks N worker processes
(:mod:`~asmtp._delivery.worker_process`), each a :class:`~asmtp._delivery.mailer.Mailer`
over its share of the jobs, and is their parent (layer 4). No broker: the parent and
the workers talk over Unix socket pairs.

Owns what makes N processes one run:

* **Sharding.** A job goes to the worker its recipient's domain hashes to
  (:func:`~asmtp._delivery.worker_process.shard_of`), so per-domain limits (rates,
  sessions to one domain) hold as in one process. Each worker calls the jobs function
  itself and keeps its own share: messages are rendered by the workers, not the parent.
* **One journal.** The parent opens and locks it, checks the run's identity, and is its
  only writer: a worker asks it to record each dot and sends that dot only once the
  record is durable (group commit batches the workers' records into shared fsyncs). The
  file and its resume rules are exactly a single process's: ``kill -9`` of the parent
  or of any worker loses nothing and sends nothing twice.
* **Global limits.** The global rate is the parent's one token bucket (a worker asks
  for each token); ``concurrency`` is divided between the workers
  (:func:`concurrency_shares`).
* **One result per recipient.** Results reach the caller through the parent, once
  recorded; the parent keeps a few numbers per worker to know which it reported, not
  every key (:func:`~asmtp._delivery.worker_process.share_of`). A worker that dies:
  its recipients whose dot was recorded are reported ``unknown`` (the message may
  have arrived), the rest of its share ``transient`` ("not sent") or, for those an
  earlier run finished, as a resume reports them. They are not given to another worker
  (a job that killed one worker could kill the next); a resume sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from ..errors import InputError, JournalError, RunningLoopError, SMTPError
from ..results import RecipientResult
from .jobs import Job
from .journal import Journal
from .journal_format import JournalEntry, journal_key
from .mailer import Mailer
from .personalise import Personaliser
from .resume import (
    bounced_in_earlier_run,
    identity_of,
    resume_action,
    suppressed,
    unknown_from_earlier_run,
)
from .retry import TokenBucket
from .shared_state import SharedJournal
from .worker_process import Link, Runner, run_worker, share_of

__all__ = ["Workers", "concurrency_shares"]

#: batches of a worker's results being recorded at once, at most
_BATCHES = 8
#: how long a worker may take to exit once its link ended, in seconds, before SIGKILL
_EXIT_WAIT = 5.0


def concurrency_shares(concurrency: int, workers: int) -> list[int]:
    """Sessions at once for each worker: ``concurrency`` divided as evenly as it goes,
    never more in all.

    >>> concurrency_shares(100, 3)
    [34, 33, 33]
    """
    if workers > concurrency:
        raise InputError(
            f"{workers} workers need a concurrency of at least {workers} (one session "
            f"each): {concurrency}"
        )
    base, extra = divmod(concurrency, workers)
    return [base + (1 if n < extra else 0) for n in range(workers)]


@dataclass
class _Worker:
    """The parent's view of one worker process."""

    index: int
    process: Any  # multiprocessing.process.BaseProcess (fork context)
    sock: socket.socket
    link: Link | None = None
    #: set in the parent's event loop (see Workers.__aenter__)
    ready: anyio.Event = field(init=False)
    finished: anyio.Event = field(init=False)
    #: "done" or "error" said: the worker ended on purpose
    ended: bool = False
    taken: int = 0
    skipped: int = 0
    bounced: int = 0
    #: journal key -> (job key, recipient): dot recorded, no result yet
    dotted: dict[str, tuple[Any, str]] = field(default_factory=dict)
    #: every job of the share numbered below this was reported (see share_of)
    watermark: int = 0
    #: the numbers of the jobs reported at or above the watermark
    reported: set[int] = field(default_factory=set)


class Workers:
    """Deliver jobs from N processes on this machine as one run: ``mailer``'s settings,
    the journal, rates and caps shared as in one process, one result per job.

    >>> mailer = asmtp.Mailer(asmtp.Relay("smtp.example.com"), rate="200/s",
    ...                       journal="run.jsonl", resume=True)
    >>> def jobs():  # called in each worker: each keeps its share
    ...     for row in rows():
    ...         yield asmtp.Job(row.email, template.bind(row.fields))
    >>> workers = asmtp.Workers(mailer, jobs, workers=4)  # forks now
    >>> async def main() -> None:
    ...     async with workers:
    ...         async for result in workers.deliver():
    ...             print(result.key, result.status)
    >>> asyncio.run(main())

    ``mailer``: a :class:`~asmtp.Mailer` (not entered) whose settings every worker
    uses; its ``concurrency`` is divided between the workers, its journal, identity
    and ``rate`` are the parent's. ``jobs``: a function returning the jobs (an iterable
    of :class:`~asmtp.Job`), called once in each worker and again in the parent only
    if a worker dies (to report its share): it must give the same jobs each time.
    ``workers``: processes (each needs a session of ``concurrency`` at least).

    The workers are forked here, so create ``Workers`` before the event loop (and any
    other thread) starts. They end with the parent (Linux: at once; elsewhere when
    their link to it closes), and when leaving ``async with``. A recipient's domain
    decides its worker: a run to one domain uses one worker.
    """

    def __init__(
        self,
        mailer: Mailer,
        jobs: Callable[[], Iterable[Job]],
        *,
        workers: int,
        runner: Runner = asyncio.run,
    ) -> None:
        if not isinstance(mailer, Mailer):
            raise InputError(f"Workers takes an asmtp.Mailer's settings: {mailer!r}")
        if not callable(jobs):
            raise InputError(
                f"Workers takes a function returning the jobs (each worker calls it): {jobs!r}"
            )
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be a whole number, 1 or more: {workers!r}")
        if isinstance(mailer.journal_path, SharedJournal):
            raise InputError("Workers keep a journal file: journal= must be a file's path")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # none: good, the workers must not inherit a running one
        else:
            raise RunningLoopError(
                "asmtp.Workers forks its processes: create it before the event loop starts"
            )
        self.mailer = mailer
        self.jobs = jobs
        self.shares = concurrency_shares(mailer.concurrency, workers)
        # skipped and bounced recipients of the shares of workers that died
        self._skipped = self._bounced = 0
        self._stopping = False
        self._error: SMTPError | None = None
        self._journal: Journal | None = None
        self._entries: dict[str, JournalEntry] = {}
        self._bucket: TokenBucket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop_asked: anyio.Event | None = None
        self._delivered = False
        self._workers = self._fork(workers, runner)

    def _fork(self, n: int, runner: Runner) -> list[_Worker]:
        context = multiprocessing.get_context("fork")
        pairs = [socket.socketpair() for _ in range(n)]
        # what the parent has buffered must not be written again by each worker
        sys.stdout.flush()
        sys.stderr.flush()
        workers = []
        try:
            for index, (mine, theirs) in enumerate(pairs):
                # the parent's ends, and the other workers' ends: closed in the worker
                inherited = [m for m, _ in pairs]
                inherited += [t for i, (_, t) in enumerate(pairs) if i != index]
                process = context.Process(
                    target=run_worker,
                    args=(
                        index,
                        n,
                        theirs,
                        inherited,
                        self.mailer,
                        self.shares[index],
                        self.jobs,
                        runner,
                    ),
                    name=f"asmtp-worker-{index}",
                    daemon=True,
                )
                process.start()
                workers.append(_Worker(index, process, mine))
        except BaseException:
            for worker in workers:
                worker.process.kill()
            raise
        finally:
            for _, theirs in pairs:
                theirs.close()
        return workers

    def close(self) -> None:
        """End the worker processes of a Workers never entered (``async with`` does
        this on leaving)."""
        for worker in self._workers:
            if worker.link is None:
                worker.sock.close()
            worker.process.kill()
            worker.process.join(_EXIT_WAIT)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, in worker order."""
        return [w.process.pid for w in self._workers]

    def stop(self) -> None:
        """Take no new jobs; those in flight finish (or time out) as usual."""
        self._stopping = True
        if self._stop_asked is not None:
            # may be called from a signal handler, outside any task: a task tells them
            self._stop_asked.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def skipped(self) -> int:
        """Recipients skipped because the journal shows them done (resume)."""
        return self._skipped + sum(w.skipped for w in self._workers)

    @property
    def bounced(self) -> int:
        """Recipients reported, not sent, for a hard bounce the journal records (resume)."""
        return self._bounced + sum(w.bounced for w in self._workers)

    @property
    def taken(self) -> int:
        """Jobs the workers took so far (all but those not attempted)."""
        return sum(w.taken for w in self._workers)

    # -- lifetime -----------------------------------------------------------------

    async def __aenter__(self) -> Workers:
        mailer = self.mailer
        path = mailer.journal_path
        assert not isinstance(path, SharedJournal)  # refused in __init__
        if path is not None:
            self._journal = await Journal.open(path, resume=mailer.resume)
            self._entries = self._journal.entries
        if mailer.rate is not None:
            self._bucket = TokenBucket(mailer.rate)
        for worker in self._workers:
            worker.link = await Link.over(worker.sock)
            worker.ready, worker.finished = anyio.Event(), anyio.Event()
        self._stop_asked = anyio.Event()
        if self._stopping:
            self._stop_asked.set()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._end_processes()
                journal, self._journal = self._journal, None
                if journal is not None:
                    await journal.aclose()
        if self._error is not None and exc[1] is None:
            raise self._error
        return None

    async def _end_processes(self) -> None:
        for worker in self._workers:
            if worker.link is not None:
                with contextlib.suppress(Exception):
                    await worker.link.aclose()
            else:
                worker.sock.close()
        for worker in self._workers:
            await anyio.to_thread.run_sync(self._end, worker)

    @staticmethod
    def _end(worker: _Worker) -> None:
        process = worker.process
        process.join(_EXIT_WAIT if worker.ended else 0.1)
        if process.is_alive():
            process.kill()
            process.join(_EXIT_WAIT)

    # -- the run ------------------------------------------------------------------

    async def deliver(self) -> AsyncIterator[RecipientResult]:
        """Deliver every job, yielding each result once it is recorded (completion
        order; ``result.key`` says which job). Once per Workers."""
        tg = self._tg
        if tg is None:
            raise InputError("use Workers as `async with asmtp.Workers(...) as workers:`")
        if self._delivered:
            raise InputError("Workers.deliver() runs once: its processes end with the run")
        self._delivered = True
        await self._claim()
        send, receive = anyio.create_memory_object_stream[RecipientResult](
            max(self.mailer.concurrency, 1)
        )
        for worker in self._workers:
            tg.start_soon(self._follow, worker, send.clone())
        journal_path = str(self.mailer.journal_path) if self._journal is not None else None
        for worker in self._workers:
            assert worker.link is not None
            await worker.link.try_send("go", journal_path, self.mailer.resume)
        for worker in self._workers:  # every worker has read what earlier runs did
            await _first(worker.ready, worker.finished)
        for worker in self._workers:
            assert worker.link is not None
            await worker.link.try_send("start")
        tg.start_soon(self._pass_stop)
        tg.start_soon(self._finish, send)
        async with receive:
            async for result in receive:
                yield result

    async def _pass_stop(self) -> None:
        """Tell every worker once :meth:`stop` was called (after "start": a worker
        reads "start" before anything else)."""
        assert self._stop_asked is not None
        await self._stop_asked.wait()
        for worker in self._workers:
            if worker.link is not None:
                await worker.link.try_send("stop")

    async def _claim(self) -> None:
        """The journal is this run's: the Mailer's identity, else its first job's."""
        journal, mailer = self._journal, self.mailer
        if journal is None:
            return
        identity = mailer.identity
        if identity is None:
            first = next(iter(self.jobs()), None)
            if first is None:
                return
            sender_of = Personaliser(
                unsubscribe=mailer.unsubscribe, verp=mailer.verp, dkim=mailer.dkim
            ).sender_of
            identity = identity_of(first.message, first.sender, sender_of=sender_of)
        await journal.claim(identity, ignore_identity=mailer.ignore_identity)

    async def _follow(self, worker: _Worker, out: MemoryObjectSendStream[RecipientResult]) -> None:
        """Serve one worker's requests and pass on its results until its link ends."""
        link = worker.link
        assert link is not None
        # batches of results waiting for their record: bounded, so that a worker
        # cannot outrun the journal
        slots = anyio.Semaphore(_BATCHES)
        try:
            async with out, anyio.create_task_group() as tg:
                message = await link.receive()
                while message is not None:
                    kind, following = message[0], None
                    if kind == "dot":
                        # the dots that arrived together are recorded together
                        dots = [message]
                        while (following := link.receive_nowait()) is not None:
                            if following[0] != "dot":
                                break
                            dots.append(following)
                        for _, _, key, recipient in dots:
                            worker.dotted[journal_key(key)] = (key, recipient)
                        tg.start_soon(self._record_dots, link, dots)
                    elif kind == "token":
                        tg.start_soon(self._grant, link, message[1])
                    elif kind == "results":
                        _, results, low, worker.taken, worker.skipped, worker.bounced = message
                        to_record = []
                        for result, journaled, number in results:
                            key = journal_key(
                                result.key if result.key is not None else result.recipient
                            )
                            worker.dotted.pop(key, None)
                            if number >= low:
                                worker.reported.add(number)
                            if journaled and self._journal is not None:
                                to_record.append(result)
                            else:
                                await _send(out, result)
                        if low > worker.watermark:
                            worker.watermark = low
                            worker.reported = {x for x in worker.reported if x >= low}
                        if to_record:
                            # recorded meanwhile: their lines join the journal's next
                            # group commit, with other workers' dots and results
                            await slots.acquire()
                            tg.start_soon(self._pass_on, to_record, out.clone(), slots)
                    elif kind == "ready":
                        worker.ready.set()
                    elif kind == "done":
                        _, worker.taken, worker.skipped, worker.bounced = message
                        worker.ended = True
                    elif kind == "error":
                        worker.ended = True
                        if self._error is None:
                            self._error = message[1]
                        self.stop()
                    message = following if following is not None else await link.receive()
        finally:
            worker.finished.set()

    async def _record_dots(self, link: Link, dots: list[tuple[Any, ...]]) -> None:
        """Record ``("dot", n, key, recipient)`` requests; ack them once durable."""
        assert self._journal is not None
        try:
            await self._journal.dots([(key, recipient) for _, _, key, recipient in dots])
        except JournalError as exc:
            self._journal_failed(exc)
            errno = getattr(exc, "errno", None)
            for _, n, _, _ in dots:
                await link.try_send("fail", n, f"not sent: {exc.message}", errno)
            return
        await link.try_send("acks", [n for _, n, _, _ in dots])

    async def _grant(self, link: Link, n: int) -> None:
        assert self._bucket is not None
        await self._bucket.take()
        await link.try_send("token", n)

    async def _pass_on(
        self,
        results: list[RecipientResult],
        out: MemoryObjectSendStream[RecipientResult],
        slots: anyio.Semaphore,
    ) -> None:
        try:
            async with out:
                journal = self._journal
                if journal is not None and not isinstance(self._error, JournalError):
                    try:
                        await journal.results(results)
                    except JournalError as exc:
                        self._journal_failed(exc)
                for result in results:
                    await _send(out, result)
        finally:
            slots.release()

    async def _record(self, result: RecipientResult, journaled: bool = True) -> None:
        if journaled and self._journal is not None and not isinstance(self._error, JournalError):
            try:
                await self._journal.result(result)
            except JournalError as exc:
                self._journal_failed(exc)

    def _journal_failed(self, error: JournalError) -> None:
        """No dot may go out unrecorded: the run stops, and leaving ``async with``
        raises ``error``."""
        if not isinstance(self._error, JournalError):
            self._error = error
        self.stop()

    async def _finish(self, out: MemoryObjectSendStream[RecipientResult]) -> None:
        """Once every worker's link has ended: the shares of those that died, then the
        end of the results."""
        async with out:
            for worker in self._workers:
                await worker.finished.wait()
            for worker in self._workers:
                if worker.ended:
                    continue
                exitcode = await anyio.to_thread.run_sync(_exit_code, worker)
                worker.skipped = 0  # its share is counted again below
                for result, journaled in self._left_by(worker, exitcode):
                    await self._record(result, journaled)
                    await _send(out, result)

    def _left_by(
        self, worker: _Worker, exitcode: int | None
    ) -> Iterator[tuple[RecipientResult, bool]]:
        """One result for each job of a dead worker's share that it did not report, and
        whether it is journaled (a bounce recorded earlier stays the key's last line)."""
        how = (
            f"was killed by signal {-exitcode}"
            if exitcode is not None and exitcode < 0
            else f"exited with status {exitcode}"
            if exitcode is not None
            else "stopped answering"
        )
        ended = f"worker process {worker.index} (pid {worker.process.pid}) {how}"
        for key, recipient in worker.dotted.values():
            unknown = RecipientResult(
                recipient=recipient,
                status="unknown",
                stage="message",
                message=f"{ended} after the end-of-data dot was recorded: the message "
                "may have been delivered",
                key=key,
            )
            yield unknown, True
        dotted, worker.dotted = worker.dotted, {}
        if self._stopping:
            return  # the run stopped: the rest were not attempted, as in one process
        n = len(self._workers)
        mailer = self.mailer
        retry_unknown = mailer.retry.retry_unknown
        for number, job, known in share_of(
            self.jobs, n, worker.index, self._entries, retry_unknown
        ):
            if number is None:
                self._skipped += 1 if known else 0  # done in an earlier run
                continue
            if number < worker.watermark or number in worker.reported or known in dotted:
                continue  # reported by the worker, or above
            prior = self._entries.get(known)
            action = resume_action(prior, retry_unknown=retry_unknown)
            if action == "unknown":
                assert prior is not None
                yield unknown_from_earlier_run(job.recipient, prior, job.key), True
                continue
            if action == "bounced":
                assert prior is not None
                self._bounced += 1
                yield bounced_in_earlier_run(job.recipient, prior, job.key), False
                continue
            if mailer.suppress is not None and (why := mailer.suppress.why(job.recipient)):
                suppressed_result = suppressed(job.recipient, why, job.key)
                yield suppressed_result, True
                continue
            not_sent = RecipientResult(
                recipient=job.recipient,
                status="transient",
                stage="connect",
                message=f"not sent: {ended} before it sent this message; a resumed run sends it",
                key=job.key,
            )
            yield not_sent, True


async def _send(out: MemoryObjectSendStream[RecipientResult], result: RecipientResult) -> None:
    """Pass ``result`` on (without a trip round the loop while there is room); a caller
    that stopped iterating is nobody to tell."""
    try:
        out.send_nowait(result)
    except anyio.WouldBlock:
        with contextlib.suppress(anyio.BrokenResourceError):
            await out.send(result)
    except anyio.BrokenResourceError:
        pass


def _exit_code(worker: _Worker) -> int | None:
    worker.process.join(_EXIT_WAIT)
    code: int | None = worker.process.exitcode
    return code


async def _first(*events: anyio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)

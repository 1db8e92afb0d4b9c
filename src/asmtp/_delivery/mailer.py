"""The long-lived sender: :class:`Mailer` holds the settings (relay or direct delivery,
limits, TLS, AUTH, retries, rate limits, journal) and sends one message
(:meth:`Mailer.send`) or a stream of jobs of any length (:meth:`Mailer.deliver`).

Owns bulk sending: a bounded pool of workers pulling jobs lazily (a million jobs from a
generator never become a million tasks or queued results), retries of transient
failures with backoff, rate limits, the journal and resuming from it, and stopping
gracefully. Each job ends in exactly one result.

It orchestrates decisions taken elsewhere, without I/O where they can be: what the
journal means for a job (:mod:`~asmtp._delivery.resume`), each recipient's envelope
and copy (:mod:`~asmtp._delivery.personalise`), when to retry
(:mod:`~asmtp._delivery.retry`), and a send on a pooled session
(:meth:`~asmtp._delivery.pool.SessionPool.deliver`); jobs reach the workers through
:mod:`~asmtp._delivery.jobs`.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import AsyncIterable, AsyncIterator, Iterable, MutableMapping, Sequence
from dataclasses import replace
from email.message import EmailMessage
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from .._core.address import domain_of
from .._core.dkim import DKIM
from .._core.prepared import PreparedMessage, prepare_envelope
from ..config import DSN, Direct, Relay, Timeouts, TimeoutSpec, check_number
from ..errors import InputError, JournalError, JournalWriteError
from ..results import RecipientResult, Report, internal_error
from . import telemetry
from .direct import DirectDelivery
from .dispatch import run_session
from .endpoint import Endpoint, default_helo
from .jobs import Job, JobSource, Run
from .journal import Journal
from .journal_format import JournalEntry, JournalIdentity, journal_key
from .personalise import Personaliser, check_personalisation
from .pool import Pool, SessionPool
from .resume import (
    bounced_in_earlier_run,
    identity_of,
    resume_action,
    suppressed,
    unknown_from_earlier_run,
)
from .retry import LocalRates, Rate, Retry
from .session import enable_debug
from .shared_state import SharedJournal, SharedLimits
from .sites import SiteLimiter
from .suppress import SuppressionList
from .transaction import Extras

__all__ = ["Job", "Mailer"]

logger = logging.getLogger("asmtp")


class Mailer:
    """A sender for many messages: use ``async with asmtp.Mailer(...) as mailer``.

    >>> async def main() -> None:
    ...     async with asmtp.Mailer(asmtp.Relay("smtp.example.com"), journal="run.jsonl",
    ...                             resume=True, rate="50/s") as mailer:
    ...         async for result in mailer.deliver(jobs):
    ...             print(result.key, result.status)

    ``relay``: an :class:`~asmtp.Relay`, an :class:`~asmtp.Direct`, or None (direct).
    ``timeout``: seconds per network step or a :class:`~asmtp.Timeouts`; by default
    30 s per step through a relay and RFC 5321's figures for direct delivery.
    ``retry``: a :class:`~asmtp.Retry` (default: 3 tries) or None for no retries.
    ``rate``/``rate_per_domain``: "50/s", "1000/h". ``recipient_deadline``: seconds that
    bound all of one recipient's tries. ``journal``: a file that records each
    recipient's progress (see :mod:`asmtp._delivery.journal`); ``resume=True`` continues the run
    it holds (delivered and permanently refused recipients are skipped; one whose dot
    went out with no result recorded is reported ``unknown``, not sent again).
    The journal is locked while the Mailer is open (another Mailer or process gets
    :class:`~asmtp.errors.JournalLockedError`) and its first line says which run it belongs
    to: ``campaign="spring-sale"`` names the run (then only the name is compared on
    resume, and the message may change between runs); without one, the run is the
    envelope sender and a digest of the message (Subject, other fixed headers, body
    and attachments; not Date, Message-ID, To, Cc or per-recipient headers) of the
    first job, or ``identity=`` (a :class:`~asmtp._delivery.journal.JournalIdentity`, as the CLI
    gives for its template). A resume of another run raises
    :class:`~asmtp.errors.JournalIdentityError` saying what differs (when the identity comes
    from the first job: on leaving ``async with``, with nothing sent);
    ``ignore_identity=True`` continues it anyway, and accepts a journal from before
    headers. A file that is not a journal, or not a regular file, is refused
    (:class:`~asmtp.errors.JournalFormatError`). If the journal cannot be written, no further
    dot is sent, the Mailer stops taking jobs, and leaving ``async with`` raises
    :class:`~asmtp.errors.JournalWriteError`.
    ``dsn``: an :class:`~asmtp.DSN`. ``requiretls``: each message goes only over
    authenticated TLS to servers offering REQUIRETLS (RFC 8689), with that MAIL
    parameter; elsewhere the recipient fails (permanent once no MX host could take it,
    enhanced status 5.7.30 in the message). ``dkim``: an :class:`~asmtp.DKIM` signer (the
    ``dkim`` extra): each message is signed once, over exactly the bytes sent.
    ``pool``: True or an :class:`~asmtp.Pool` to keep sessions to the relay open and
    reuse them (web backends). ``unsubscribe``: a URL template ("{recipient}")
    for one-click unsubscribe headers (RFC 8058). ``verp``: a sender template such as
    "bounces+{token}@example.com" ({token}: the recipient as local=domain) so bounces
    name their recipient. With either, each copy gets its own Message-ID (on the
    domain of the message's own), so replies and bounces can be matched to their
    recipient; a message rendered per job (``Job(message=callable)``) keeps its own.
    ``suppress``: addresses never to send to (a suppression list file's path, an
    :class:`~asmtp.SuppressionList`, or addresses): each gets one result, ``permanent``
    at stage "input" ("suppressed: <reason>"), with no connection made. On resume, a
    recipient whose hard bounce was recorded in the journal
    (:func:`~asmtp._delivery.journal.record_bounce`) is reported ``permanent``
    ("bounced: 5.1.1 ...") and not sent again (counted in :attr:`bounced`).
    ``journal`` may also be a :class:`~asmtp._delivery.shared_state.SharedJournal` and
    ``shared_limits`` a :class:`~asmtp._delivery.shared_state.SharedLimits`: state held
    with other processes (:mod:`asmtp.celery`'s workers keep both in Redis); then
    ``rate``/``rate_per_domain`` are the shared limits' business.
    """

    def __init__(
        self,
        relay: Relay | Direct | None = None,
        *,
        concurrency: int = 100,
        timeout: TimeoutSpec | types.EllipsisType = ...,
        retry: Retry | None = Retry(),  # noqa: B008 (frozen, shared safely)
        rate: str | Rate | None = None,
        rate_per_domain: str | Rate | None = None,
        recipient_deadline: float | None = None,
        journal: str | os.PathLike[str] | SharedJournal | None = None,
        resume: bool = False,
        campaign: str | None = None,
        identity: JournalIdentity | None = None,
        ignore_identity: bool = False,
        dsn: DSN | None = None,
        requiretls: bool = False,
        unsubscribe: str | None = None,
        verp: str | None = None,
        pool: bool | Pool = False,
        dkim: DKIM | None = None,
        debug: bool = False,
        suppress: str | os.PathLike[str] | SuppressionList | Iterable[str] | None = None,
        shared_limits: SharedLimits | None = None,
    ) -> None:
        check_number("concurrency", concurrency, integer=True)
        if relay is not None and not isinstance(relay, (Relay, Direct)):
            raise InputError(f"relay must be an asmtp.Relay, an asmtp.Direct or None: {relay!r}")
        if resume and journal is None:
            raise InputError("resume=True needs a journal")
        if journal is None and (campaign is not None or identity is not None):
            raise InputError("campaign= and identity= name the run in its journal: give journal=")
        if ignore_identity and not resume:
            raise InputError("ignore_identity=True goes with resume=True")
        if campaign is not None and (not isinstance(campaign, str) or not campaign.strip()):
            raise InputError(f"campaign must be a non-empty name: {campaign!r}")
        if identity is not None and not isinstance(identity, JournalIdentity):
            raise InputError(f"identity must be an asmtp.JournalIdentity: {identity!r}")
        check_number("recipient_deadline (seconds)", recipient_deadline, optional=True)
        check_personalisation(unsubscribe, verp)
        self.relay: Relay | Direct = relay if relay is not None else Direct()
        self.pool = Pool() if pool is True else (pool or None)
        if self.pool is not None and not isinstance(self.relay, Relay):
            raise InputError("pool= keeps sessions to a relay; direct delivery has none to keep")
        if timeout is ...:
            timeout = Timeouts.rfc5321() if isinstance(self.relay, Direct) else 30.0
        self.timeouts = Timeouts.of(timeout)
        self.concurrency = concurrency
        self.retry = retry or Retry(attempts=1)
        self.rate = Rate.parse(rate) if rate is not None else None
        self.rate_per_domain = Rate.parse(rate_per_domain) if rate_per_domain else None
        self.recipient_deadline = recipient_deadline
        self.journal_path = journal
        self.resume = resume
        if campaign is not None:
            identity = JournalIdentity(
                identity.sender if identity else None,
                identity.message if identity else None,
                campaign,
            )
        #: the run the journal belongs to; None: from the first job
        self.identity = identity
        self.ignore_identity = ignore_identity
        self.dsn = dsn
        self.requiretls = requiretls
        self.unsubscribe = unsubscribe
        self.verp = verp
        self.dkim = dkim
        self.debug = debug
        if debug:
            enable_debug()
        #: recipients skipped because the journal shows them done (resume)
        self.skipped = 0
        #: recipients reported, not sent, for a hard bounce the journal records (resume)
        self.bounced = 0
        #: addresses not sent to (None: none)
        self.suppress = (
            suppress
            if suppress is None or isinstance(suppress, SuppressionList)
            else SuppressionList(suppress)
        )
        self._stopping = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._runs: set[Run] = set()
        self._last_bytes: tuple[bytes, PreparedMessage] | None = None  # send()'s last
        self._endpoint: Endpoint | None = None
        self._direct: DirectDelivery | None = None
        self._journal: Journal | SharedJournal | None = None
        #: rates and connection caps shared with other processes (asmtp.celery's workers)
        self._shared_limits = shared_limits
        self._done: MutableMapping[str, JournalEntry] = {}
        self._journal_error: JournalError | None = None
        self._claim = anyio.Lock()
        self._claimed = False
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._rates = LocalRates(self.rate, self.rate_per_domain)
        self._personalise = Personaliser(unsubscribe=unsubscribe, verp=verp, dkim=dkim)
        self._pool: SessionPool | None = None
        # made on entering: a Mailer may be made outside an event loop (asmtp.Workers)
        self._reaper: anyio.CancelScope | None = None

    # -- lifetime -----------------------------------------------------------------

    async def __aenter__(self) -> Mailer:
        if self.journal_path is not None:
            # First: a journal in use, of another run or not a journal at all is
            # refused before any I/O on the network.
            await self._open_journal(self.journal_path)
        try:
            if isinstance(self.relay, Relay):
                self._endpoint = await Endpoint.for_relay(self.relay)
            else:
                helo = self.relay.helo or await default_helo()
                self._direct = DirectDelivery(
                    self.relay, self.timeouts, helo=helo, debug=self.debug
                )
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            await self._close_journal()
            raise
        if self.pool is not None:
            assert self._endpoint is not None
            self._pool = SessionPool(self._endpoint, self.timeouts, self.pool, debug=self.debug)
            self._reaper = anyio.CancelScope()
            self._tg.start_soon(self._reap, self._pool, self._reaper)
        return self

    async def _open_journal(self, path: str | os.PathLike[str] | SharedJournal) -> None:
        journal: Journal | SharedJournal
        if isinstance(path, SharedJournal):
            journal = path  # held elsewhere (Redis): its owner fills its entries
        else:
            journal = await Journal.open(path, resume=self.resume)
        try:
            if self.identity is not None:
                await journal.claim(self.identity, ignore_identity=self.ignore_identity)
                self._claimed = True
        except BaseException:
            await journal.aclose()
            raise
        self._journal = journal
        self._done = journal.entries

    async def _close_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.aclose()

    async def _reap(self, pool: SessionPool, scope: anyio.CancelScope) -> None:
        with scope:
            await pool.reap()

    @property
    def sites(self) -> SiteLimiter | None:
        """Direct delivery with shaping: the sites of this run (None otherwise)."""
        return self._direct.sites if self._direct is not None else None

    @property
    def sessions_opened(self) -> int:
        """Pooled sessions opened so far (0 without a pool)."""
        return self._pool.opened if self._pool is not None else 0

    async def __aexit__(self, *exc: Any) -> bool | None:
        for run in list(self._runs):
            run.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        tg, self._tg = self._tg, None
        try:
            if self._pool is not None:
                await self._pool.aclose()
            if tg is not None:
                _, exc_value, _ = exc
                if exc_value is not None and not isinstance(
                    exc_value, anyio.get_cancelled_exc_class()
                ):
                    # The caller's own error in the `async with` body: end the workers
                    # and let it propagate as it is, not wrapped in an ExceptionGroup.
                    tg.cancel_scope.cancel()
                    await tg.__aexit__(None, None, None)
                    return None
                suppress = await tg.__aexit__(*exc)
                if self._journal_error is not None and exc_value is None:
                    # The run stopped for the journal: say so once, not as a result.
                    raise self._journal_error
                return suppress
            return None
        finally:
            await self._close_journal()

    def stop(self) -> None:
        """Take no new jobs; those in flight finish (or time out) as usual."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- sending ------------------------------------------------------------------

    async def send(
        self,
        message: EmailMessage | bytes,
        *,
        sender: str | None = None,
        recipients: str | Iterable[str] | None = None,
    ) -> Report:
        """One message to its recipients (envelope as for :func:`asmtp.send`), with
        this mailer's retries, limits and journal. One result per recipient, in order."""
        last = self._last_bytes
        env_sender, rcpts, prepared = prepare_envelope(message, sender, recipients, reuse=last)
        if type(message) is bytes and (last is None or last[0] is not message):
            self._last_bytes = (message, prepared)  # the same bytes sent again: reused
        order = {r: i for i, r in enumerate(rcpts)}
        jobs = [Job(r, prepared, sender=env_sender) for r in rcpts]
        if len(jobs) == 1:
            return Report(tuple(r for r in [await self._send_one(jobs[0])] if r is not None))
        results: list[RecipientResult | None] = [None] * len(rcpts)
        async for result in self.deliver(jobs):
            results[order[result.recipient]] = result
        return Report(tuple(r for r in results if r is not None))

    async def _send_one(self, job: Job) -> RecipientResult | None:
        """One job in the caller's task (a web backend's usual send): what deliver()
        does for it, without a worker task and a result stream per send."""
        if self._tg is None:
            raise InputError("use the Mailer as `async with asmtp.Mailer(...) as mailer:`")
        if self._stopping:
            return None
        run = Run()  # cancelled with the others when the mailer closes
        self._runs.add(run)
        try:
            with run.scope():
                return await self._run_job(job)
            return None  # the run was cancelled
        finally:
            self._runs.discard(run)

    async def deliver(
        self, jobs: Iterable[Job] | AsyncIterable[Job]
    ) -> AsyncIterator[RecipientResult]:
        """Deliver every job, yielding each result as it is final (completion order;
        ``result.key`` says which job). Jobs are pulled as workers free up; results
        wait for the consumer (at most ``concurrency`` of them are buffered)."""
        if self._tg is None:
            raise InputError("use the Mailer as `async with asmtp.Mailer(...) as mailer:`")
        source = JobSource(jobs, lambda: self._stopping)
        send, receive = anyio.create_memory_object_stream[RecipientResult](self.concurrency)
        run = Run()
        self._runs.add(run)
        # While some workers sleep before a retry, others keep the sessions busy.
        workers = self.concurrency * (2 if self.retry.attempts > 1 else 1)
        if isinstance(jobs, Sequence):
            workers = min(workers, len(jobs)) or 1

        async def worker(out: MemoryObjectSendStream[RecipientResult]) -> None:
            async with out:
                with run.scope():
                    while (job := await source.next()) is not None:
                        result = await self._run_job(job)
                        if result is None:
                            continue
                        try:
                            try:
                                out.send_nowait(result)  # no loop trip while there is room
                            except anyio.WouldBlock:
                                await out.send(result)
                        except anyio.BrokenResourceError:
                            return  # the consumer stopped iterating: nobody to tell

        for _ in range(workers):
            self._tg.start_soon(worker, send.clone())
        send.close()
        try:
            async with receive:
                while True:
                    try:
                        result = receive.receive_nowait()
                    except anyio.WouldBlock:
                        try:
                            result = await receive.receive()
                        except anyio.EndOfStream:
                            break
                    except anyio.EndOfStream:
                        break
                    yield result
        finally:
            run.cancel()
            self._runs.discard(run)

    # -- one job ------------------------------------------------------------------

    async def _run_job(self, job: Job) -> RecipientResult | None:
        key = job.key if job.key is not None else job.recipient
        if self._journal is not None and not await self._journal_ready(job):
            return None  # of another run, or it cannot be written: not attempted
        prior = self._done.get(journal_key(key)) if self._done else None
        action = resume_action(prior, retry_unknown=self.retry.retry_unknown)
        if action == "skip":
            self.skipped += 1  # done in an earlier run
            return None
        if action == "unknown":
            assert prior is not None
            result = unknown_from_earlier_run(job.recipient, prior, job.key)
            await self._record(result)
            return result
        if action == "bounced":
            assert prior is not None
            self.bounced += 1
            # not journaled: the bounce stays the key's last line, so that every
            # resume reports it alike
            result = bounced_in_earlier_run(job.recipient, prior, job.key)
            await self._record(result, journal=False)
            return result
        if self.suppress is not None and (why := self.suppress.why(job.recipient)) is not None:
            result = suppressed(job.recipient, why, job.key)
            await self._record(result)
            return result
        try:
            try:
                sender, recipient, prepared = self._personalise.prepare(
                    job.recipient, job.message, job.sender
                )
            except InputError as exc:
                result = RecipientResult(
                    recipient=job.recipient,
                    status="permanent",
                    message=exc.message,
                    stage="input",
                    key=job.key,
                )
            else:
                tried = await self._with_retries(job, key, sender, recipient, prepared)
                if tried is None:
                    return None
                result = tried
        except Exception as exc:  # a bug must not cost the other jobs their results
            logger.exception("asmtp internal error on job %r", key)
            result = internal_error(job.recipient, exc, key=job.key)  # no session: "connect"
        await self._record(result)
        return result

    async def _record(self, result: RecipientResult, *, journal: bool = True) -> None:
        """Every job's result passes here: to the journal, and to telemetry."""
        if telemetry.hooks is not None:
            telemetry.hooks.outcomes((result,))
        if journal and self._journal is not None and self._journal_error is None:
            try:
                await self._journal.result(result)
            except JournalError as exc:
                self._journal_failed(exc)

    def _journal_failed(self, error: JournalError) -> None:
        """The journal cannot be written (or belongs to another run): no dot may go out
        unrecorded, so the run stops taking jobs, sessions in flight end before their
        dot, and leaving ``async with`` raises ``error``."""
        if self._journal_error is None:
            self._journal_error = error
        self.stop()

    async def _journal_ready(self, job: Job) -> bool:
        """The journal is this run's and can be written; the first job claims it when
        the caller gave no identity (its sender and message say which run it is)."""
        if not self._claimed:
            async with self._claim:
                if not self._claimed:
                    assert self._journal is not None
                    try:
                        await self._journal.claim(
                            identity_of(
                                job.message, job.sender, sender_of=self._personalise.sender_of
                            ),
                            ignore_identity=self.ignore_identity,
                        )
                    except JournalError as exc:
                        self._journal_failed(exc)
                    self._claimed = True
        return self._journal_error is None

    async def _with_retries(
        self, job: Job, key: Any, sender: str, recipient: str, prepared: PreparedMessage
    ) -> RecipientResult | None:
        """Try, and retry transient failures; None when the mailer stopped before the
        first try."""
        start = time.monotonic()  # for elapsed; deadlines are in the event loop's time
        deadline = (
            anyio.current_time() + self.recipient_deadline if self.recipient_deadline else None
        )
        journal = self._journal

        async def before_dot(recipients: Sequence[str]) -> None:
            if journal is not None:
                for rcpt in recipients:
                    try:
                        await journal.dot(key, rcpt)
                    except JournalError as exc:
                        # Never a dot without its line: this recipient is not sent.
                        self._journal_failed(exc)
                        errno = exc.errno if isinstance(exc, JournalWriteError) else None
                        raise JournalWriteError(
                            f"not sent: {exc.message}", errno=errno, stage="message"
                        ) from exc

        extras = Extras(
            dsn=self.dsn,
            before_dot=before_dot if journal is not None else None,
            requiretls=self.requiretls,
        )
        tries = 0
        result: RecipientResult | None = None
        while True:
            await self._throttle(recipient)
            # Uncontended, take the slot without a checkpoint (a trip round the event
            # loop per job costs more than the bookkeeping of a whole session).
            try:
                self._limiter.acquire_nowait()
            except anyio.WouldBlock:
                await self._limiter.acquire()
            try:
                if self._stopping:
                    # Stopped while this job waited for its turn: it was not attempted
                    # (or keeps its last result); a resumed run takes it from here.
                    break
                tries += 1
                if self._shared_limits is not None:
                    # a connection slot of the domain's, across every process of the run
                    async with self._shared_limits.connection(domain_of(recipient)):
                        result = await self._attempt(sender, recipient, prepared, extras, deadline)
                else:
                    result = await self._attempt(sender, recipient, prepared, extras, deadline)
            finally:
                self._limiter.release()
            elapsed = time.monotonic() - start
            wait = self.retry.next_delay(result, tries, elapsed)
            if (
                wait is not None
                and deadline is not None
                and anyio.current_time() + wait >= deadline
            ):
                wait = None
            if wait is None or self._stopping:
                break
            logger.info("retrying %s in %.1f s after: %s", recipient, wait, result.message)
            if telemetry.hooks is not None:
                telemetry.hooks.retry(result)
            await anyio.sleep(wait)
        if result is None:
            return None
        return replace(result, key=job.key, attempts=tries, elapsed=time.monotonic() - start)

    async def _attempt(
        self,
        sender: str,
        recipient: str,
        prepared: PreparedMessage,
        extras: Extras,
        deadline: float | None,
    ) -> RecipientResult:
        if self._direct is not None:
            [result] = await self._direct.deliver(
                sender, [recipient], prepared, extras=extras, deadline=deadline
            )
            return result
        if self._pool is not None:
            sending = self._pool.deliver(
                sender, recipient, prepared, extras=extras, deadline=deadline
            )
            if telemetry.hooks is not None:
                return await telemetry.hooks.pooled_send(self._pool.endpoint, sending)
            return await sending
        assert self._endpoint is not None
        results, _ = await run_session(
            self._endpoint,
            self.timeouts,
            sender,
            [recipient],
            prepared,
            debug=self.debug,
            extras=extras,
            deadline=deadline,
        )
        return results[0]

    async def _throttle(self, recipient: str) -> None:
        await (self._shared_limits or self._rates).take(domain_of(recipient))

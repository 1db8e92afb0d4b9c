"""Many machines: asmtp's delivery task on Celery, with Redis as broker and as the
campaign's shared state (the ``celery`` extra).

Owns what is Celery's and nothing more; the state (journal, rates, connection caps,
runs) is :mod:`asmtp._delivery.redis_state`'s and imports no Celery.

* :func:`register` adds asmtp's task to **your** Celery app (no second app needed);
  ``celery -A asmtp.celery worker`` (or ``asmtp worker --broker ...``) runs asmtp's
  own :data:`app`, built on first use from ``ASMTP_BROKER``.
* Each worker process runs one long-lived event loop (started on
  ``worker_process_init``, closed on ``worker_process_shutdown``: pooled sessions say
  QUIT), and keeps one Mailer per campaign on it, so pooled sessions to the relay
  serve chunk after chunk.
* The task acknowledges late and is rejected (so redelivered) when its worker
  process dies: the next worker skips what the journal says is done and reports
  ``unknown`` the recipients whose dot went out without a recorded reply.
* :func:`enqueue` (sync) and :func:`enqueue_async` put a campaign's jobs (the same
  :class:`asmtp.Job` items as :meth:`asmtp.Mailer.deliver`) in the queue in chunks.

>>> from celery import Celery
>>> app = Celery("shop", broker="redis://127.0.0.1:6379/0")
>>> asmtp.celery.register(app)
>>> campaign = asmtp.celery.enqueue(app, "spring-sale", jobs, relay=asmtp.Relay("smtp.x"))
"""

from __future__ import annotations

import email.message
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import celery
import celery.signals
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import sync
from ._core.prepared import PreparedMessage, prepare_message
from ._core.template import BoundMessage
from ._delivery.jobs import Job
from ._delivery.journal_format import JournalIdentity
from ._delivery.personalise import envelope_sender
from ._delivery.redis_state import CampaignSpec, CampaignStore, ChunkRunner, RunProgress
from ._delivery.redis_state.campaign import message_blob
from ._delivery.retry import Rate, Retry
from .config import DSN, Direct, Relay, Timeouts, TimeoutSpec
from .errors import InputError, JournalError
from .results import RecipientResult

__all__ = [
    "BROKER_ENV",
    "TASK_NAME",
    "VISIBILITY_ENV",
    "VISIBILITY_TIMEOUT",
    "Campaign",
    "cancel",
    "configure",
    "enqueue",
    "enqueue_async",
    "follow",
    "register",
    "status",
]

#: the task's name on every app it is registered on
TASK_NAME = "asmtp.deliver_chunk"
#: where ``celery -A asmtp.celery worker`` finds its broker (and the shared state)
BROKER_ENV = "ASMTP_BROKER"
#: recipients per task by default
CHUNK = 500
#: seconds after which Redis hands out again a chunk whose worker vanished (its
#: machine lost: nobody acknowledged or rejected it); longer than a chunk takes
VISIBILITY_TIMEOUT = 600.0
#: where ``celery -A asmtp.celery worker`` finds a visibility timeout of its own
VISIBILITY_ENV = "ASMTP_VISIBILITY_TIMEOUT"
#: seconds a task waits for Redis to answer again after a failed step, and how many
#: times it takes its chunk up again
REDIS_WAIT = 60.0
_REDIS_TRIES = 5
#: how long a task may wait for its chunk (a day: Celery's time limits are yours)
_CALL_TIMEOUT = 86_400.0


# ----------------------------------------------------------------------- the task


class _Process:
    """This worker process's state, living on its event loop (asmtp.sync's)."""

    runner: ChunkRunner | None = None
    redis: Redis | None = None


def _runner(app: celery.Celery) -> ChunkRunner:
    if _Process.runner is None:
        url = state_url(app)
        _Process.redis = Redis.from_url(url)
        source = app.conf.get("asmtp_source_address")
        _Process.runner = ChunkRunner(_Process.redis, source_address=source)
    return _Process.runner


def state_url(app: celery.Celery) -> str:
    """The Redis that holds asmtp's shared state for ``app``: ``asmtp_redis_url`` in
    its configuration, else its broker (a ``redis://`` or ``rediss://`` URL)."""
    url = app.conf.get("asmtp_redis_url") or app.conf.broker_url or ""
    if not str(url).startswith(("redis://", "rediss://", "unix://")):
        raise InputError(
            "asmtp keeps a campaign's state in Redis: give the app a redis:// broker, "
            f"or asmtp.celery.register(app, redis_url=...) (broker: {url!r})"
        )
    return str(url)


def _deliver_chunk(
    task: celery.Task, campaign: str, run: int, index: int, items: list[list[Any]]
) -> dict[str, Any]:
    runner = _runner(task.app)
    for _ in range(_REDIS_TRIES):
        try:
            outcome = sync.run(
                runner.run_chunk(campaign, run, index, items), call_timeout=_CALL_TIMEOUT
            )
            break
        except (JournalError, RedisError, OSError):
            # Redis could not record a step (restarting?): once it answers again, the
            # chunk is taken up again here (a retry could not be queued without it);
            # what its dot records say decides, as on any resume
            if not sync.run(_redis_back(REDIS_WAIT), call_timeout=REDIS_WAIT + 10):
                raise  # not acknowledged: handed out again after the visibility timeout
    else:
        raise JournalError(f"the campaign {campaign}'s chunk {index}: Redis keeps failing")
    if outcome.status == "busy":
        # another worker holds the chunk's lease (a second delivery of the task)
        raise task.retry(countdown=2, max_retries=None)
    return {"status": outcome.status, "results": outcome.results, "skipped": outcome.skipped}


async def _redis_back(wait: float) -> bool:
    """Whether this process's Redis answers within ``wait`` seconds."""
    redis = _Process.redis
    assert redis is not None
    with anyio.move_on_after(wait):
        while True:
            try:
                if await redis.ping():
                    return True
            except (RedisError, OSError):
                pass
            await anyio.sleep(0.5)
    return False


def register(
    app: celery.Celery, *, redis_url: str | None = None, source_address: str | None = None
) -> celery.Task:
    """Register asmtp's delivery task on ``app`` and return it. ``redis_url``: where the
    shared state lives (default: the app's broker); ``source_address``: this machine's
    sending address for every campaign its workers send (one IP per machine)."""
    if redis_url is not None:
        app.conf.asmtp_redis_url = redis_url
    if source_address is not None:
        app.conf.asmtp_source_address = source_address
    existing = app.tasks.get(TASK_NAME) if app.finalized else None
    if existing is not None:
        return existing
    task: celery.Task = app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # a chunk whose task failed stays in the queue's unacknowledged set: handed out
        # again after the visibility timeout, never lost
        acks_on_failure_or_timeout=False,
        serializer="json",
        max_retries=None,
    )(_deliver_chunk)
    return task


def configure(app: celery.Celery, *, visibility_timeout: float = VISIBILITY_TIMEOUT) -> None:
    """The worker settings asmtp's task expects: one task reserved at a time per
    process (a chunk is long), JSON only, late acknowledgement, and a chunk whose
    worker's machine died handed out again after ``visibility_timeout`` seconds (10
    minutes, not Redis's default hour; a chunk still being sent when handed out again
    waits for its lease). The workers look for such chunks every tenth of that time
    (at most every 10 s; Redis's default: every 100 s)."""
    if not (isinstance(visibility_timeout, int | float) and visibility_timeout > 0):
        raise InputError(f"visibility_timeout must be a number of seconds: {visibility_timeout!r}")
    app.conf.update(
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": min(10.0, max(0.5, visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
        },
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )


def make_app(
    broker: str,
    *,
    source_address: str | None = None,
    visibility_timeout: float = VISIBILITY_TIMEOUT,
) -> celery.Celery:
    """asmtp's own Celery app on ``broker`` (a redis:// URL), task registered."""
    made = celery.Celery("asmtp", broker=broker, set_as_current=False)
    configure(made, visibility_timeout=visibility_timeout)
    register(made, source_address=source_address)
    return made


def __getattr__(name: str) -> Any:
    # ``celery -A asmtp.celery worker`` looks for ``app``: made on first use only, so
    # importing asmtp.celery (to register on your own app) makes no second app
    if name == "app":
        made = make_app(
            os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"),
            source_address=os.environ.get("ASMTP_SOURCE_ADDRESS") or None,
            visibility_timeout=float(os.environ.get(VISIBILITY_ENV) or VISIBILITY_TIMEOUT),
        )
        globals()["app"] = made
        return made
    raise AttributeError(name)


def _process_started(**_: Any) -> None:
    # a forked pool process: its own event loop and Redis connection, made on first use
    _Process.runner = None
    _Process.redis = None


def _process_ending(**_: Any) -> None:
    runner, redis = _Process.runner, _Process.redis
    _Process.runner = _Process.redis = None
    if runner is not None and redis is not None:

        async def close() -> None:
            await runner.aclose()
            await redis.aclose()

        try:
            sync.run(close(), call_timeout=10)
        finally:
            sync.shutdown()


celery.signals.worker_process_init.connect(_process_started, weak=False)
celery.signals.worker_process_shutdown.connect(_process_ending, weak=False)


# ----------------------------------------------------------------------- enqueueing


@dataclass(frozen=True)
class Campaign:
    """A run of a campaign in the queue: ``resumed`` when it is an earlier run still
    under way (followed, not enqueued again); ``recipients`` and ``chunks`` enqueued."""

    name: str
    run: int
    resumed: bool
    recipients: int
    chunks: int
    redis_url: str


async def enqueue_async(
    app: celery.Celery,
    campaign: str,
    jobs: Iterable[Job] | AsyncIterable[Job],
    *,
    relay: Relay | Direct | None,
    chunk: int = CHUNK,
    concurrency: int = 100,
    timeout: TimeoutSpec | None = None,
    retry: Retry | None = Retry(),  # noqa: B008 (frozen, shared safely)
    rate: str | Rate | None = None,
    rate_per_domain: str | Rate | None = None,
    connections_per_domain: int | None = None,
    dsn: DSN | None = None,
    unsubscribe: str | None = None,
    verp: str | None = None,
    lease_ttl: float = 30.0,
    ignore_identity: bool = False,
) -> Campaign:
    """Put campaign ``campaign``'s ``jobs`` in ``app``'s queue, ``chunk`` recipients a
    task; the other settings are the :class:`asmtp.Mailer`'s, for every worker
    (``concurrency``: deliveries at once in each worker process;
    ``connections_per_domain``: to one domain at once across all workers). Running it
    again resumes: recipients done are skipped, those whose dot went out without a
    recorded reply are reported ``unknown``. While the campaign's last run is still
    under way, that run is returned (``resumed``) and nothing is enqueued."""
    if not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a whole number from 1: {chunk!r}")
    task = register(app)
    spec = CampaignSpec(
        identity=JournalIdentity(campaign=campaign),
        relay=relay if relay is not None else Direct(),
        concurrency=concurrency,
        timeout=Timeouts.of(timeout) if timeout is not None else None,
        retry=retry,
        rate=Rate.parse(rate) if rate is not None else None,
        rate_per_domain=Rate.parse(rate_per_domain) if rate_per_domain is not None else None,
        connections_per_domain=connections_per_domain,
        dsn=dsn,
        unsubscribe=unsubscribe,
        verp=verp,
        lease_ttl=lease_ttl,
    )
    url = state_url(app)
    redis = Redis.from_url(url)
    try:
        store = CampaignStore(redis, campaign)
        run, resumed = await store.open_run(spec, ignore_identity=ignore_identity)
        if resumed:
            progress = await store.progress(run)
            return Campaign(
                campaign, run, True, progress.recipients or 0, progress.chunks or 0, url
            )
        items = _items(jobs)
        stored: set[str] = set()
        chunks = recipients = 0
        batch: list[list[Any]] = []
        async for item, ref, blob in items:
            if ref not in stored:
                await store.put_messages({ref: blob})
                stored.add(ref)
            batch.append(item)
            if len(batch) >= chunk:
                await _publish(task, campaign, run, chunks, batch)
                chunks, recipients, batch = chunks + 1, recipients + len(batch), []
        if batch:
            await _publish(task, campaign, run, chunks, batch)
            chunks, recipients = chunks + 1, recipients + len(batch)
        await store.enqueued(run, chunks=chunks, recipients=recipients)
        return Campaign(campaign, run, False, recipients, chunks, url)
    finally:
        await redis.aclose()


async def _publish(
    task: celery.Task, campaign: str, run: int, index: int, items: list[list[Any]]
) -> None:
    args = [campaign, run, index, items]
    await anyio.to_thread.run_sync(lambda: task.apply_async(args=args))


async def _items(
    jobs: Iterable[Job] | AsyncIterable[Job],
) -> AsyncIterator[tuple[list[Any], str, bytes]]:
    """Each job as ``[recipient, key, sender, message reference]`` with its stored
    message; a message shared by consecutive jobs is prepared (and its sender read)
    once."""
    last: tuple[object, str, bytes] | None = None
    read: tuple[object, str] | None = None  # the last message's own sender
    source: AsyncIterable[Job] = jobs if isinstance(jobs, AsyncIterable) else _aiter(jobs)
    async for job in source:
        if not isinstance(job, Job):
            raise InputError(f"enqueue takes asmtp.Job items, not {type(job).__name__}")
        bound_sender = None
        message: Any
        if isinstance(job.message, BoundMessage):
            # a Template's copy: filled into its compiled message, not built whole
            bound_sender, message = job.message.prepare()
        else:
            message = job.message() if callable(job.message) else job.message
        if last is None or last[0] is not message:
            prepared = message if isinstance(message, PreparedMessage) else prepare_message(message)
            last = (message, *message_blob(prepared))
        _, ref, blob = last
        sender = job.sender if job.sender is not None else bound_sender
        if sender is None:
            if not isinstance(message, email.message.EmailMessage):
                raise InputError("a message given as bytes needs the job's sender")
            if read is None or read[0] is not message:
                read = (message, envelope_sender(message))
            sender = read[1]
        key = job.key
        if type(key) not in _PLAIN_KEYS:
            try:
                json.dumps(key)
            except (TypeError, ValueError):
                raise InputError(
                    f"a job's key must be a JSON value to be queued: {key!r}"
                ) from None
        yield [job.recipient, key, sender, ref], ref, blob


#: key types that are JSON values as they are (the rest are checked one by one)
_PLAIN_KEYS = frozenset({str, int, type(None)})


async def _aiter(jobs: Iterable[Job]) -> AsyncIterator[Job]:
    for job in jobs:
        yield job


def enqueue(app: celery.Celery, campaign: str, jobs: Iterable[Job], **settings: Any) -> Campaign:
    """:func:`enqueue_async` from sync code (a view, a script, another task)."""
    return sync.run(enqueue_async(app, campaign, jobs, **settings), call_timeout=_CALL_TIMEOUT)


# ----------------------------------------------------------------------- following


async def follow(campaign: Campaign) -> AsyncIterator[RecipientResult]:
    """Each result of ``campaign``'s run as the workers record it, until it ends."""
    redis = Redis.from_url(campaign.redis_url)
    try:
        store = CampaignStore(redis, campaign.name)
        async for result in store.follow(campaign.run):
            yield result
    finally:
        await redis.aclose()


async def status(redis_url: str, name: str) -> tuple[dict[str, int], RunProgress | None]:
    """Campaign ``name``'s recipients by state, and where its last run stands (None:
    no such campaign)."""
    redis = Redis.from_url(redis_url)
    try:
        store = CampaignStore(redis, name)
        if not await store.exists():
            return {}, None
        run = await store.last_run()
        progress = await store.progress(run) if run is not None else None
        return await store.counts(), progress
    finally:
        await redis.aclose()


async def cancel(redis_url: str, name: str) -> int | None:
    """Stop campaign ``name``'s last run taking new chunks (those under way finish);
    returns the run's number, None when there is no such campaign."""
    redis = Redis.from_url(redis_url)
    try:
        store = CampaignStore(redis, name)
        if not await store.exists():
            return None
        return await store.cancel()
    finally:
        await redis.aclose()

"""A worker process's side of a campaign: :class:`ChunkRunner` takes a chunk of jobs
handed out by a queue engine and delivers it through a Mailer over the campaign's
shared state.

Owns the worker's lifetimes: one open Mailer per campaign (pooled sessions to a relay
reused from chunk to chunk), built from the campaign's settings in Redis; one chunk at
a time per Mailer, under the chunk's lease (a chunk handed out twice at once is sent
by one worker, the other is told "busy"); the leases renewed while it runs; cancel
watched; and a chunk marked done only when each of its jobs has its result (or was
skipped). A chunk whose journal writes failed raises, so the engine hands it out
again; what its dot records say then decides, as on any resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ...config import Relay
from ...errors import JournalError
from ..jobs import Job
from ..journal_format import journal_key
from ..mailer import Mailer
from ..pool import Pool
from ..retry import Retry
from .campaign import CampaignStore
from .journal import RedisJournal
from .limits import LeaseKeeper, RedisLimits
from .spec import CampaignSpec

__all__ = ["ChunkOutcome", "ChunkRunner"]

logger = logging.getLogger("asmtp")

#: seconds between looks at whether the run was cancelled, while a chunk runs
CANCEL_POLL = 1.0
#: prepared messages kept per campaign in a worker process
_MESSAGES = 256


@dataclass(frozen=True)
class ChunkOutcome:
    """What became of a chunk: "done" (every job has its result or was skipped),
    "busy" (another worker holds it: hand it out again later), "cancelled"."""

    status: Literal["done", "busy", "cancelled"]
    results: int = 0
    skipped: int = 0


class _Campaign:
    """One campaign's open Mailer in this process, for one run."""

    def __init__(self, store: CampaignStore, run: int, spec: CampaignSpec) -> None:
        self.store = store
        self.run = run
        self.spec = spec
        self.keeper = LeaseKeeper(store.redis, ttl=spec.lease_ttl)
        self.journal = RedisJournal(store.redis, store.name, run)
        self.limits = RedisLimits(
            self.keeper,
            store.name,
            rate=spec.rate,
            rate_per_domain=spec.rate_per_domain,
            connections_per_domain=spec.connections_per_domain,
        )
        relay = spec.relay
        self.mailer = Mailer(
            relay,
            concurrency=spec.concurrency,
            timeout=spec.timeout if spec.timeout is not None else ...,
            retry=spec.retry or Retry(attempts=1),
            journal=self.journal,
            identity=spec.identity,
            dsn=spec.dsn,
            unsubscribe=spec.unsubscribe,
            verp=spec.verp,
            pool=Pool(max_connections=spec.concurrency) if isinstance(relay, Relay) else False,
            # no limits set: none asked for per message (no domain parsed twice for nothing)
            shared_limits=self.limits if self.limits.active else None,
        )
        self.messages: dict[str, Any] = {}
        self.lock = anyio.Lock()  # one chunk at a time: the journal's entries are the chunk's
        self._closing = anyio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the Mailer in a task of its own that outlives each chunk's call (its
        task group is entered and left in that one task)."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._hold(ready))
        await ready

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        try:
            async with self.mailer:
                ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif not isinstance(exc, JournalError | asyncio.CancelledError):
                logger.exception("asmtp: closing the campaign %s's Mailer", self.store.name)

    async def aclose(self) -> None:
        self._closing.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


class ChunkRunner:
    """Delivers chunks of campaigns' jobs in one worker process; ``source_address``:
    this machine's sending address for every campaign. Close with :meth:`aclose`."""

    def __init__(self, redis: Redis, *, source_address: str | None = None) -> None:
        self.redis = redis
        self.source_address = source_address
        self._campaigns: dict[str, _Campaign] = {}

    async def run_chunk(
        self, campaign: str, run: int, index: int, items: Sequence[Sequence[Any]]
    ) -> ChunkOutcome:
        """Deliver chunk ``index`` of ``run``: ``items`` are ``[recipient, key, sender,
        message reference]``. Raises :class:`~asmtp.errors.JournalError` when the
        journal could not be written (the chunk is to be handed out again)."""
        store = CampaignStore(self.redis, campaign)
        if await store.cancelled(run):
            await store.chunk_done(run, index, skipped=0)
            return ChunkOutcome("cancelled")
        state = await self._campaign(store, run)
        lease = store.chunk_lease(run, index)
        async with state.lock:
            if not await state.keeper.take_chunk(lease):
                return ChunkOutcome("busy")
            try:
                outcome = await self._deliver(state, index, items)
            finally:
                # Redis away: the lease expires by itself
                with anyio.CancelScope(shield=True), contextlib.suppress(RedisError, OSError):
                    await state.keeper.release_chunk(lease)
        return outcome

    async def _deliver(
        self, state: _Campaign, index: int, items: Sequence[Sequence[Any]]
    ) -> ChunkOutcome:
        store, run, mailer = state.store, state.run, state.mailer
        jobs = await self._jobs(state, items)
        skipped = await state.journal.load(
            [journal_key(job.key if job.key is not None else job.recipient) for job in jobs]
        )
        results = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(state.keeper.keep)
            tg.start_soon(self._watch_cancel, store, run, mailer)
            async for _ in mailer.deliver(jobs):
                results += 1
            tg.cancel_scope.cancel()
        try:
            await state.journal.flush()  # every result written before the chunk is done
        except JournalError:
            mailer.stop()
        if mailer.stopping:
            # cancelled, or the journal failed: this Mailer takes no more jobs
            del self._campaigns[store.name]
            failed = state.journal.failed
            await state.aclose()
            if failed is not None:
                raise failed
        await store.chunk_done(run, index, skipped=skipped)
        return ChunkOutcome("done", results, skipped)

    async def _watch_cancel(self, store: CampaignStore, run: int, mailer: Mailer) -> None:
        while True:
            await anyio.sleep(CANCEL_POLL)
            with contextlib.suppress(Exception):  # Redis away: the journal says so
                if await store.cancelled(run):
                    mailer.stop()
                    return

    async def _campaign(self, store: CampaignStore, run: int) -> _Campaign:
        state = self._campaigns.get(store.name)
        if state is not None and state.run == run:
            return state
        if state is not None:  # a newer (or older) run: its settings may differ
            del self._campaigns[store.name]
            await state.aclose()
        text = await store.spec_text()
        if text is None:
            raise JournalError(f"the campaign {store.name} has no settings in Redis")
        spec = CampaignSpec.from_json(text, source_address=self.source_address)
        state = _Campaign(store, run, spec)
        await state.open()
        self._campaigns[store.name] = state
        return state

    async def _jobs(self, state: _Campaign, items: Sequence[Sequence[Any]]) -> list[Job]:
        messages = state.messages
        missing = sorted({item[3] for item in items} - messages.keys())
        if missing:
            if len(messages) + len(missing) > _MESSAGES:
                messages.clear()
            for ref in missing:
                prepared = await state.store.message(ref)
                if prepared is None:
                    raise JournalError(f"the campaign {state.store.name} lost message {ref}")
                messages[ref] = prepared
        return [
            Job(recipient, messages[ref], sender=sender, key=key)
            for recipient, key, sender, ref in items
        ]

    async def aclose(self) -> None:
        """Close every campaign's Mailer (pooled sessions say QUIT)."""
        campaigns, self._campaigns = self._campaigns, {}
        for state in campaigns.values():
            await state.aclose()

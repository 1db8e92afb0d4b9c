"""A campaign's runs in Redis: :class:`CampaignStore`.

Owns what the sender of a campaign and its followers see: the campaign's identity and
settings (:class:`~.spec.CampaignSpec`; a later run of another message is refused as a
file journal's resume is), its messages (stored once each, by digest), its runs (a
run is one enqueueing of the campaign's jobs, in chunks; a chunk is done once, however
often the queue hands it out), following a run's results as they are recorded,
counts by state, and cancelling.

Re-running a campaign whose last run is unfinished follows that run (its results
from the start) instead of enqueueing it again; one whose last run is finished or
cancelled starts a new run, in which the journal skips what is done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._core.prepared import PreparedMessage
from ...errors import InputError, JournalIdentityError
from ...results import RecipientResult
from ..journal_format import JournalIdentity
from .keys import prefix
from .rows import result_from_row
from .spec import CampaignSpec

__all__ = [
    "CampaignStore",
    "RunProgress",
    "chunked",
    "message_blob",
    "message_from_blob",
]


def message_blob(prepared: PreparedMessage) -> tuple[str, bytes]:
    """A prepared message as stored: (its reference, the bytes to store)."""
    head = json.dumps([prepared.size, prepared.eight_bit, prepared.smtputf8]).encode()
    blob = head + b"\n" + prepared.data
    return hashlib.sha256(blob).hexdigest()[:32], blob


def message_from_blob(blob: bytes) -> PreparedMessage:
    head, _, data = blob.partition(b"\n")
    size, eight_bit, smtputf8 = json.loads(head)
    return PreparedMessage(data, size, eight_bit, smtputf8)


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands: its chunks (None while still being enqueued), those done,
    recipients skipped as done in an earlier run, and whether it was cancelled."""

    run: int
    chunks: int | None
    recipients: int | None
    done: int
    skipped: int
    cancelled: bool

    @property
    def finished(self) -> bool:
        return self.chunks is not None and self.done >= self.chunks


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class CampaignStore:
    """Campaign ``name``'s runs, messages and counts in ``redis``."""

    def __init__(self, redis: Redis, name: str) -> None:
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "{}"):
            raise InputError(f"a campaign name is a non-empty name without braces: {name!r}")
        self.redis = redis
        self.name = name
        self._base = prefix(name)

    def key(self, suffix: str) -> str:
        return self._base + suffix

    def chunk_lease(self, run: int, index: int) -> str:
        return self.key(f"lease:{run}:{index}")

    # -- starting a run -------------------------------------------------------------

    async def open_run(
        self, spec: CampaignSpec, *, ignore_identity: bool = False
    ) -> tuple[int, bool]:
        """Start a run of the campaign with ``spec`` (its settings replace the last
        run's), or find the last run unfinished: (run, True) to follow it. Raises
        :class:`~asmtp.errors.JournalIdentityError` when the campaign is another
        message's and :class:`~asmtp.errors.InputError` when its last run was cancelled
        and chunks of it are still being sent."""
        redis = self.redis
        text = spec.to_json()
        if not await redis.set(self.key("spec"), text, nx=True):
            earlier = json.loads(await redis.get(self.key("spec")) or "{}")
            recorded = JournalIdentity(**earlier.get("identity", {}))
            differences = spec.identity.differences(recorded)
            if differences and not ignore_identity:
                raise JournalIdentityError(
                    f"the campaign {self.name} in Redis belongs to another run: "
                    + "; ".join(differences),
                    differences=tuple(differences),
                )
            last = await self.last_run()
            if last is not None:
                progress = await self.progress(last)
                if not progress.finished and not progress.cancelled:
                    return last, True
                if not progress.finished and await self._leases_alive(last):
                    raise InputError(
                        f"the campaign {self.name}'s run {last} was cancelled and chunks "
                        "of it are still being sent: start it again once they end"
                    )
            await redis.set(self.key("spec"), text)
        run = int(await redis.incr(self.key("runs")))
        newest = await redis.xrevrange(self.key("out"), count=1)
        start = _text(newest[0][0]) if newest else "0-0"
        await redis.hset(self.key(f"run:{run}"), mapping={"start": start or "0-0"})
        return run, False

    async def _leases_alive(self, run: int) -> bool:
        async for _ in self.redis.scan_iter(match=self.key(f"lease:{run}:*"), count=1000):
            return True
        return False

    async def put_messages(self, blobs: dict[str, bytes]) -> None:
        if blobs:
            await self.redis.hset(self.key("msg"), mapping=blobs)  # type: ignore[arg-type]

    async def enqueued(self, run: int, *, chunks: int, recipients: int) -> None:
        """Every chunk of ``run`` is in the queue: the run ends when they are done."""
        await self.redis.hset(
            self.key(f"run:{run}"), mapping={"chunks": chunks, "recipients": recipients}
        )

    # -- the workers' side ------------------------------------------------------------

    async def spec_text(self) -> bytes | None:
        value = await self.redis.get(self.key("spec"))
        return value.encode() if isinstance(value, str) else value

    async def message(self, ref: str) -> PreparedMessage | None:
        blob = await self.redis.hget(self.key("msg"), ref)
        if blob is None:
            return None
        return message_from_blob(blob if isinstance(blob, bytes) else blob.encode())

    async def chunk_done(self, run: int, index: int, *, skipped: int) -> None:
        """Chunk ``index`` of ``run`` is done (once: a chunk done again counts once)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(f"run:{run}:skipped"), str(index), skipped)
            pipe.sadd(self.key(f"run:{run}:done"), index)
            await pipe.execute()

    async def cancelled(self, run: int) -> bool:
        return bool(await self.redis.hget(self.key(f"run:{run}"), "cancel"))

    # -- followers ----------------------------------------------------------------------

    async def last_run(self) -> int | None:
        value = await self.redis.get(self.key("runs"))
        return int(value) if value is not None else None

    async def progress(self, run: int) -> RunProgress:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key(f"run:{run}"))
            pipe.scard(self.key(f"run:{run}:done"))
            pipe.hvals(self.key(f"run:{run}:skipped"))
            answers: Any = await pipe.execute()
            info, done, skipped = answers
        fields = {_text(k): _text(v) for k, v in info.items()}
        chunks, recipients = fields.get("chunks"), fields.get("recipients")
        return RunProgress(
            run=run,
            chunks=int(chunks) if chunks is not None else None,
            recipients=int(recipients) if recipients is not None else None,
            done=int(done),
            skipped=sum(int(v) for v in skipped),
            cancelled=bool(fields.get("cancel")),
        )

    async def follow(
        self,
        run: int,
        *,
        poll: float = 0.2,
        pace: float = 0.1,
        batch: int = 1000,
        patience: float = 60.0,
    ) -> AsyncIterator[RecipientResult]:
        """Every result of ``run`` (from its start), as recorded, until the run ends
        (all its chunks done). Results arrive in entries of many; after a read that
        found some but fewer than ``batch`` entries, the next waits ``pace`` seconds,
        so that a busy run costs a few reads a second, each of many results. Redis
        away (restarting) is waited for, up to ``patience`` seconds at a time."""
        started = await self.redis.hget(self.key(f"run:{run}"), "start")
        last = _text(started) or "0-0"
        tag = str(run).encode()
        finished = False
        away: float | None = None
        while True:
            block = None if finished else max(1, int(poll * 1000))
            try:
                answer: Any = await self.redis.xread(
                    {self.key("out"): last}, count=batch, block=block
                )
                if not answer and not finished:
                    # Chunks are marked done after their results are recorded: once
                    # the run is finished, one more read finds every result there is.
                    finished = (await self.progress(run)).finished
                    continue
            except (RedisConnectionError, RedisTimeoutError, OSError):
                now = anyio.current_time()
                away = now if away is None else away
                if now - away > patience:
                    raise
                await anyio.sleep(poll)
                continue
            away = None
            entries = answer[0][1] if answer else []
            if not entries:
                return  # finished, and nothing more to read
            for entry_id, fields in entries:
                last = _text(entry_id) or last
                if fields.get(b"run") == tag:
                    for row in json.loads(fields[b"rs"]):
                        yield result_from_row(row)
            if len(entries) < batch and not finished:
                await anyio.sleep(pace)

    async def counts(self) -> dict[str, int]:
        """How many recipients are in each state (delivered, ..., "dot": in flight)."""
        raw = await self.redis.hgetall(self.key("n"))
        return {_text(k) or "": int(v) for k, v in raw.items() if int(v)}

    async def cancel(self) -> int | None:
        """Stop the last run taking new chunks; returns its number (None: no run)."""
        run = await self.last_run()
        if run is not None:
            await self.redis.hset(self.key(f"run:{run}"), "cancel", 1)
        return run

    async def exists(self) -> bool:
        return bool(await self.redis.exists(self.key("spec")))


def chunked(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

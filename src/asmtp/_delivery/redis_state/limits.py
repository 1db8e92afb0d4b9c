"""Limits that hold across every worker of a campaign, kept in Redis: the overall rate
and each domain's (GCRA, :data:`~.keys.TAKE`), and each domain's cap on connections
(leases, :data:`~.keys.ACQUIRE`).

Owns taking tokens and leases, and keeping leases alive. No message costs a round
trip for its token: a worker takes tokens in small batches (about 20 ms worth of the
rate) and hands them out locally, so the rate holds across workers within a batch per
worker and the burst. A connection lease is an entry in the domain's sorted set with
an expiry; the :class:`LeaseKeeper` of each worker process renews those it holds every
third of their lifetime, so a worker that dies (``kill -9``, a lost machine) frees its
slots when they expire, and never before.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from ..retry import Rate
from .keys import ACQUIRE, RELEASE_LEASE, RENEW, RENEW_LEASE, TAKE, prefix

__all__ = ["LEASE_TTL", "LeaseKeeper", "RedisLimits", "rate_batch"]

#: seconds a lease lives unless renewed: how long a dead worker's slots stay taken
LEASE_TTL = 30.0
#: how long to wait between tries at a full domain's connection slots, at most
_POLL = 0.05


def rate_batch(rate: Rate) -> tuple[int, int]:
    """(tokens taken per round trip, burst) for ``rate``: 20 ms and 100 ms worth of
    it, at least one token each.

    >>> rate_batch(Rate(50)), rate_batch(Rate(5000))
    ((1, 5), (100, 500))
    """
    per_second = rate.per_second
    batch = max(1, int(per_second / 50))
    return batch, max(batch, int(per_second / 10))


class LeaseKeeper:
    """The leases one worker process holds, renewed by :meth:`keep` while it runs:
    chunk leases (a key holding this process's token) and connection leases."""

    def __init__(self, redis: Redis, *, ttl: float = LEASE_TTL) -> None:
        self.redis = redis
        self.ttl = ttl
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._chunks: set[str] = set()
        #: connection lease id -> its sorted set
        self.connections: dict[str, str] = {}
        self._renew = redis.register_script(RENEW)
        self._renew_lease = redis.register_script(RENEW_LEASE)
        self._release = redis.register_script(RELEASE_LEASE)
        self._serial = 0

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def lease_id(self) -> str:
        self._serial += 1
        return f"{self.token}:{self._serial}"

    async def take_chunk(self, key: str) -> bool:
        """Take the lease ``key`` (a chunk's) if nobody holds it."""
        taken = await self.redis.set(key, self.token, nx=True, px=self.ttl_ms)
        if taken:
            self._chunks.add(key)
        return bool(taken)

    async def release_chunk(self, key: str) -> None:
        self._chunks.discard(key)
        await self._release(keys=[key], args=[self.token])

    async def renew(self) -> None:
        """Renew every lease held, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._chunks:
                await self._renew_lease(keys=[key], args=[self.token, self.ttl_ms], client=pipe)
            held = list(self.connections.items())
            if held:
                await self._renew(
                    keys=[zset for _, zset in held],
                    args=[self.ttl_ms, *(lease for lease, _ in held)],
                    client=pipe,
                )
            await pipe.execute()

    async def keep(self) -> None:
        """Renew the leases every third of their lifetime, until cancelled."""
        while True:
            await anyio.sleep(self.ttl / 3)
            with contextlib.suppress(Exception):  # the next round tries again
                await self.renew()


class _Bucket:
    """Tokens of one GCRA key taken in batches and handed out here."""

    def __init__(self, take: Callable[..., Awaitable[Any]], key: str, rate: Rate) -> None:
        self._take = take
        self._key = key
        self._interval = 1_000_000 / rate.per_second  # microseconds between tokens
        self._batch, self._burst = rate_batch(rate)
        self._tokens = 0
        self._lock = anyio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while self._tokens == 0:
                got, wait = await self._take(
                    keys=[self._key], args=[f"{self._interval:.3f}", self._burst, self._batch]
                )
                self._tokens = int(got)
                if not self._tokens:
                    await anyio.sleep(max(int(wait), 1000) / 1_000_000)
            self._tokens -= 1


class _NoCap:
    """A connection slot that is always free."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_CAP = _NoCap()


class RedisLimits:
    """The rates and per-domain connection cap of one campaign, shared by every
    worker through Redis (a :class:`~asmtp._delivery.shared_state.SharedLimits`)."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        campaign: str,
        *,
        rate: Rate | None,
        rate_per_domain: Rate | None,
        connections_per_domain: int | None,
    ) -> None:
        redis = keeper.redis
        self._keeper = keeper
        self._base = prefix(campaign)
        self._take = redis.register_script(TAKE)
        self._acquire = redis.register_script(ACQUIRE)
        self._rate_per_domain = rate_per_domain
        self._overall = _Bucket(self._take, self._base + "rate", rate) if rate else None
        self._domains: dict[str, _Bucket] = {}
        self.cap = connections_per_domain
        self._local: dict[str, anyio.Semaphore] = {}

    @property
    def active(self) -> bool:
        """Whether any rate or cap is set (else every message may go at once)."""
        limits = (self._overall, self._rate_per_domain, self.cap)
        return any(limit is not None for limit in limits)

    async def take(self, domain: str) -> None:
        if self._overall is not None:
            await self._overall.take()
        if self._rate_per_domain is not None:
            bucket = self._domains.get(domain)
            if bucket is None:
                key = self._base + "rate:" + domain.lower()
                bucket = self._domains[domain] = _Bucket(self._take, key, self._rate_per_domain)
            await bucket.take()

    def connection(self, domain: str) -> contextlib.AbstractAsyncContextManager[None]:
        if self.cap is None:
            return _NO_CAP  # no cost per message without a cap
        return self._lease(domain, self.cap)

    @contextlib.asynccontextmanager
    async def _lease(self, domain: str, cap: int) -> AsyncIterator[None]:
        # at most `cap` of this process's deliveries ask Redis for the domain at once
        local = self._local.get(domain)
        if local is None:
            local = self._local[domain] = anyio.Semaphore(cap)
        async with local:
            zset = self._base + "conn:" + domain.lower()
            lease = self._keeper.lease_id()
            keeper = self._keeper
            while not await self._acquire(keys=[zset], args=[cap, keeper.ttl_ms, lease]):  # noqa: ASYNC110 (polling another process)
                await anyio.sleep(random.uniform(_POLL / 5, _POLL))
            keeper.connections[lease] = zset
            try:
                yield
            finally:
                del keeper.connections[lease]
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await keeper.redis.zrem(zset, lease)

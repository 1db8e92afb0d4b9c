"""Retry policy and rate limits for bulk sending: what to retry and when (pure
decisions on results, no I/O), and token buckets for messages per second.

A failure is retried only when it is transient and happened before the end-of-data
dot, and is not a 5xx to AUTH (the relay refused the credentials: a run does not ask it
again); an "unknown" outcome (the dot went out, no reply came: RFC 5321 section 6.1,
the message may have arrived) is retried only when the caller opts in.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import anyio

from ..config import check_number
from ..errors import InputError
from ..results import RecipientResult

__all__ = ["Rate", "Retry", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class Retry:
    """How transient failures are retried: up to ``attempts`` tries in all, waiting
    ``backoff`` seconds after the first failure, times ``multiplier`` after each next
    one, at most ``max_backoff``, each wait shortened by up to ``jitter`` (a fraction)
    at random so that retries do not arrive in lockstep; no new try once ``deadline``
    seconds have passed since the first. ``Retry(attempts=1)`` never retries.

    >>> [Retry(jitter=0).delay(n) for n in (1, 2, 3)]
    [1.0, 2.0, 4.0]
    """

    attempts: int = 3
    backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 300.0
    jitter: float = 0.5
    deadline: float | None = None
    retry_unknown: bool = False
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_number("Retry attempts", self.attempts, integer=True)
        check_number("Retry backoff", self.backoff, above=False)
        check_number("Retry multiplier", self.multiplier, minimum=1, above=False)
        check_number("Retry max_backoff", self.max_backoff, above=False)
        check_number("Retry jitter", self.jitter, above=False)
        if self.jitter > 1:
            raise InputError(f"Retry jitter must be between 0 and 1: {self.jitter!r}")
        check_number("Retry deadline", self.deadline, optional=True)

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failed try (1 for the first)."""
        try:
            grown = self.backoff * self.multiplier ** (failures - 1)
        except OverflowError:  # many attempts with a steep multiplier
            grown = math.inf
        base = min(self.max_backoff, grown) if self.backoff else 0.0
        if self.jitter:
            base *= 1 - self.jitter * (self.rng or random).random()
        return base

    def retryable(self, result: RecipientResult) -> bool:
        if result.status == "transient":
            # A 5xx to AUTH is the relay's verdict on the credentials: the rest of the
            # run fails fast on it (asmtp._delivery.endpoint.AuthCache), so a retry would only wait.
            return not (result.stage == "auth" and (result.code or 0) >= 500)
        return result.status == "unknown" and self.retry_unknown

    def next_delay(self, result: RecipientResult, tries: int, elapsed: float) -> float | None:
        """Seconds to wait before the next try, or None when ``result`` is final
        (``tries`` made so far, ``elapsed`` seconds since the first began)."""
        if tries >= self.attempts or not self.retryable(result):
            return None
        wait = self.delay(tries)
        if self.deadline is not None and elapsed + wait >= self.deadline:
            return None
        return wait


_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", re.I)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate such as ``Rate.parse("50/s")`` or ``"1000/h"``: ``count`` per ``per``
    seconds."""

    count: float
    per: float = 1.0

    @classmethod
    def parse(cls, value: str | Rate) -> Rate:
        if isinstance(value, Rate):
            return value
        m = _RATE.fullmatch(value) if isinstance(value, str) else None
        # 400 digits parse as float("inf"): not finite, refused like "0/s"
        if m is None or not 0 < float(m.group(1)) < math.inf:
            raise InputError(f"a rate looks like 50/s, 300/m or 1000/h: {value!r}")
        return cls(float(m.group(1)), _PER[m.group(2)[0].lower()])

    def __post_init__(self) -> None:
        check_number("Rate count", self.count)
        check_number("Rate per (seconds)", self.per)

    @property
    def per_second(self) -> float:
        return self.count / self.per


class TokenBucket:
    """Messages per second with a burst of up to one second's worth (at least 1).
    :meth:`take` waits for a token; waiters are served in arrival order."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate.per_second
        self.capacity = max(1.0, math.floor(self.rate))
        self._tokens = self.capacity
        self._stamp = anyio.current_time()
        self._lock = anyio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = anyio.current_time()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await anyio.sleep((1 - self._tokens) / self.rate)


class LocalRates:
    """The overall rate and each domain's, kept in this process (what
    :class:`~asmtp._delivery.shared_state.SharedLimits` gives across processes):
    :meth:`take` waits for a token of each. Buckets are made on first use, inside
    the running event loop."""

    def __init__(self, rate: Rate | None, per_domain: Rate | None) -> None:
        self._rate = rate
        self._per_domain = per_domain
        self._bucket: TokenBucket | None = None
        self._domains: dict[str, TokenBucket] = {}

    async def take(self, domain: str) -> None:
        if self._rate is not None:
            if self._bucket is None:
                self._bucket = TokenBucket(self._rate)
            await self._bucket.take()
        if self._per_domain is not None:
            bucket = self._domains.get(domain)
            if bucket is None:
                bucket = self._domains[domain] = TokenBucket(self._per_domain)
            await bucket.take()

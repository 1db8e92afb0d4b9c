"""Latency statistics of ``asmtp bench``: one :class:`LatencyRecorder` per stage.

Owns the samples, the percentiles and the histogram behind them, and how a latency
reads in milliseconds (:func:`format_ms`, shared by the table and the HTML report).

Percentiles are exact (nearest rank over every sample) up to :data:`EXACT_SAMPLES`
samples per stage. Beyond that (long ``--duration`` runs) they come from a log-bucket
histogram whose buckets are 1% wide, so each figure is within 1% of the exact one and
memory stays bounded; the output says ``"exact": false`` then. The histogram also draws
the HTML report's pictures.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["EXACT_SAMPLES", "PERCENTILES", "LatencyRecorder", "format_ms", "percentile_key"]

#: samples kept per stage for exact percentiles (8 bytes each); beyond, the histogram
EXACT_SAMPLES = 1_000_000
#: the percentiles reported, besides min, mean and max
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

# The log-bucket histogram: bucket 0 holds everything up to 1 µs; bucket i >= 1 holds
# (FLOOR * GROWTH**(i-1), FLOOR * GROWTH**i]; the last one everything beyond an hour.
_FLOOR = 1e-6
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = int(math.log(3600.0 / _FLOOR) / _LOG_GROWTH) + 2


class LatencyRecorder:
    """Latency samples of one stage, in seconds: every sample up to ``exact_limit`` of
    them (exact percentiles), then a 1%-wide log-bucket histogram (bounded memory).

    >>> r = LatencyRecorder()
    >>> for ms in range(1, 101):
    ...     r.add(ms / 1000)
    >>> r.percentile(50.0), r.percentile(99.0), r.max
    (0.05, 0.099, 0.1)
    """

    __slots__ = ("_buckets", "_count", "_limit", "_max", "_min", "_samples", "_sorted", "_total")

    def __init__(self, exact_limit: int = EXACT_SAMPLES) -> None:
        self._limit = exact_limit
        self._samples: array.array[float] | None = array.array("d")
        self._sorted: list[float] = []
        # the histogram and its totals, used once the samples are given up
        self._buckets: list[int] = []
        self._count = 0
        self._total = 0.0
        self._min = math.inf
        self._max = 0.0

    def add(self, seconds: float) -> None:
        # The hot path is one append: sorting and bucketing wait for the report.
        samples = self._samples
        if samples is not None:
            if len(samples) < self._limit:
                samples.append(seconds)
                return
            self._samples = None  # from now on the histogram answers
            self._sorted = []
            self._buckets = self._histogram(samples)
            self._count, self._total = len(samples), math.fsum(samples)
            self._min, self._max = min(samples), max(samples)
        self._count += 1
        self._total += seconds
        if seconds > self._max:
            self._max = seconds
        if seconds < self._min:
            self._min = seconds
        self._buckets[_bucket_of(seconds)] += 1

    @staticmethod
    def _histogram(samples: Sequence[float]) -> list[int]:
        buckets = [0] * _BUCKETS
        for seconds in samples:
            buckets[_bucket_of(seconds)] += 1
        return buckets

    def _ordered(self) -> list[float]:
        samples = self._samples
        assert samples is not None
        if len(self._sorted) != len(samples):
            self._sorted = sorted(samples)
        return self._sorted

    @property
    def exact(self) -> bool:
        """The percentiles are computed from every sample (not from the histogram)."""
        return self._samples is not None

    @property
    def count(self) -> int:
        return len(self._samples) if self._samples is not None else self._count

    @property
    def total(self) -> float:
        return math.fsum(self._samples) if self._samples is not None else self._total

    @property
    def min(self) -> float:
        if self._samples is not None:
            return self._ordered()[0] if self._samples else math.inf
        return self._min

    @property
    def max(self) -> float:
        if self._samples is not None:
            return self._ordered()[-1] if self._samples else 0.0
        return self._max

    @property
    def mean(self) -> float:
        count = self.count
        return self.total / count if count else 0.0

    def percentile(self, p: float) -> float:
        """The nearest-rank ``p``-th percentile: the smallest sample with at least ``p``%
        of all samples at or below it (0.0 when there are none). From the histogram:
        the upper edge of the sample's bucket, within 1% above it."""
        count = self.count
        if not count:
            return 0.0
        rank = max(1, math.ceil(p / 100.0 * count))
        if self._samples is not None:
            return self._ordered()[rank - 1]
        seen = 0
        for index, n in enumerate(self._buckets):
            seen += n
            if seen >= rank:
                upper = _FLOOR * _GROWTH**index
                return min(max(upper, self._min), self._max)
        return self._max  # pragma: no cover - the buckets hold every sample

    def bins(self, count: int = 48) -> list[tuple[float, float, int]]:
        """The histogram regrouped into at most ``count`` bins of equal log width
        between the fastest and the slowest sample: ``(low, high, samples)`` in seconds."""
        samples = self._samples
        buckets = self._histogram(samples) if samples is not None else self._buckets
        used = [i for i, n in enumerate(buckets) if n]
        if not used:
            return []
        fastest, slowest = self.min, self.max
        first, last = used[0], used[-1]
        per_bin = max(1, math.ceil((last - first + 1) / count))
        out: list[tuple[float, float, int]] = []
        for start in range(first, last + 1, per_bin):
            stop = min(start + per_bin, last + 1)
            low = 0.0 if start == 0 else _FLOOR * _GROWTH ** (start - 1)
            high = _FLOOR * _GROWTH ** (stop - 1)
            out.append((max(low, fastest), min(high, slowest), sum(buckets[start:stop])))
        return out

    def summary(self) -> dict[str, Any]:
        """count, min, mean, the :data:`PERCENTILES` and max in milliseconds (None
        without samples), and whether the percentiles are exact."""
        out: dict[str, Any] = {"count": self.count}
        keys = ("min", "mean", *(percentile_key(p) for p in PERCENTILES), "max")
        if not self.count:
            out.update(dict.fromkeys(keys))
        else:
            values = (self.min, self.mean, *(self.percentile(p) for p in PERCENTILES), self.max)
            out.update({k: round(v * 1000.0, 4) for k, v in zip(keys, values, strict=True)})
        out["exact"] = self.exact
        return out


def _bucket_of(seconds: float) -> int:
    if seconds <= _FLOOR:
        return 0
    index = int(math.log(seconds / _FLOOR) / _LOG_GROWTH) + 1
    return index if index < _BUCKETS else _BUCKETS - 1


def percentile_key(p: float) -> str:
    """The summary's key of the ``p``-th percentile: ``p50``, ``p99.9``."""
    return f"p{p:g}"


def format_ms(value: float | None, *, fine: bool = False) -> str:
    """A latency in milliseconds, about three figures (``-`` for none); ``fine`` shows
    one more decimal below 0.1 ms (the HTML report).

    >>> format_ms(1234.5), format_ms(12.34), format_ms(0.0123), format_ms(0.0123, fine=True)
    ('1,234', '12.3', '0.01', '0.012')
    """
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1 or not fine:
        return f"{value:.2f}"
    return f"{value:.3f}"

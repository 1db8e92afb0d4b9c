"""``asmtp bench``: a load generator for load-testing your own SMTP server.

Owns the benchmark: its options, the workers, the latency statistics, and the report
as a table, one JSON object or (through :mod:`asmtp.cli.bench.report`) a self-contained
HTML file. The workers speak SMTP through :class:`~asmtp._delivery.session.Session`'s own steps,
the ones every send takes (set-up, transaction, QUIT: the same policy, not a copy of
it), and time each stage through the session's ``on_stage`` observer, called in the
read callback as each reply is parsed.

Two ways to load a server:

* closed loop (default): ``--concurrency C`` workers, each sending its next message as
  soon as the last one is answered. Throughput is what the server (or the client) can do.
* open loop (``--rate R/s``): message *i* is due at ``start + i/R``, whatever happened to
  the ones before it, and its latency is measured from that *scheduled* time. A server
  that falls behind cannot hide its queueing: the wait shows in the latencies (and in
  the ``queue`` stage, which is the wait for a free worker alone).

Stages (latency of those that succeeded; milliseconds in the output):

=========  ===================================================================
connect    TCP connect (plus the TLS handshake with ``--tls implicit``)
greeting   connected to the server's 220
ehlo       EHLO to its 250 (HELO too, when the server refuses EHLO)
starttls   STARTTLS, the TLS handshake and the second EHLO (``starttls``/``opportunistic``)
auth       AUTH to 235 (with ``--user``)
envelope   MAIL FROM to DATA's 354 (MAIL, the RCPTs and DATA in one write when the
           server offers PIPELINING)
message    the content and the dot to the reply after the dot
session    per delivered message: from its start (its scheduled time with ``--rate``,
           else when a worker took it) to the reply after the dot. Without ``--reuse``
           that is connect to the reply after the dot; a message sent on an open session
           (``--reuse``) counts from MAIL. QUIT is not part of it.
quit       QUIT to 221 (outside ``session``)
queue      ``--rate`` only: the scheduled start to the moment a worker took the message
=========  ===================================================================

Percentiles are exact (nearest rank over every sample) up to :data:`EXACT_SAMPLES`
samples per stage. Beyond that (long ``--duration`` runs) they come from a log-bucket
histogram whose buckets are 1% wide, so each figure is within 1% of the exact one and
memory stays bounded; the output says ``"exact": false`` then. The histogram also draws
the HTML report's pictures.

Exit status: 0 every message accepted; 1 any message failed; 2 bad usage (no
``--messages`` and no ``--duration``, a bad option, a host that does not resolve; nothing
sent); 130 interrupted (the results so far are still printed).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

from ..._core.message import PreparedMessage, prepare_message
from ..._core.protocol import SUCCESS_CODES, State
from ..._core.sanitize import printable
from ..._core.steps import Steps
from ..._delivery.session import Endpoint, Session, reply_error
from ..._version import __version__
from ...config import TLS_MODES, Timeouts, TLSMode
from ...errors import InputError, MessageRejectedError, ReplyError, SMTPError
from ..options import positive_float, positive_int

# The replies the session's steps return rather than raise, judged here as the session
# judges them (from the one table in asmtp._core.protocol).
_MESSAGE_OK = SUCCESS_CODES["message"]
_QUIT_OK = SUCCESS_CODES["quit"]

__all__ = [
    "DEFAULT_SIZE",
    "EXACT_SAMPLES",
    "PERCENTILES",
    "BenchConfig",
    "BenchResult",
    "LatencyRecorder",
    "add_bench_parser",
    "build_bench_message",
    "main_bench",
    "parse_rate",
    "parse_size",
    "run_bench",
    "standalone_main",
]

_T = TypeVar("_T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: the default message size in octets (headers and body, before the final dot)
DEFAULT_SIZE = 2048
#: samples kept per stage for exact percentiles (8 bytes each); beyond, the histogram
EXACT_SAMPLES = 1_000_000
#: the percentiles reported, besides min, mean and max
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: the order stages are reported in
STAGES = (
    "queue",
    "connect",
    "greeting",
    "ehlo",
    "starttls",
    "auth",
    "envelope",
    "message",
    "session",
    "quit",
)
#: the key of a message still running when the run was stopped (grace over, Ctrl-C)
UNFINISHED = "Unfinished"

# The log-bucket histogram: bucket 0 holds everything up to 1 µs; bucket i >= 1 holds
# (FLOOR * GROWTH**(i-1), FLOOR * GROWTH**i]; the last one everything beyond an hour.
_FLOOR = 1e-6
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = int(math.log(3600.0 / _FLOOR) / _LOG_GROWTH) + 2

# Stamps come from perf_counter, not loop.time(): uvloop's clock moves in whole
# milliseconds, coarser than a loopback reply.
_now = time.perf_counter


# ----------------------------------------------------------------------- statistics


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
        keys = ("min", "mean", *(_pkey(p) for p in PERCENTILES), "max")
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


def _pkey(p: float) -> str:
    return f"p{p:g}"


# ----------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything one benchmark run needs, checked when made (:class:`InputError`).

    At least one of ``messages`` and ``duration`` bounds the run; with both, whichever
    comes first. ``rate`` (messages per second) makes the run open loop.
    """

    host: str
    port: int = 25
    messages: int | None = None
    duration: float | None = None
    concurrency: int = 10
    size: int = DEFAULT_SIZE
    recipients_per_message: int = 1
    reuse: bool = False
    rate: float | None = None
    tls: TLSMode = "none"
    verify: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    allow_plaintext_auth: bool = False
    sender: str = "bench@example.test"
    to_domain: str = "example.test"
    helo: str = "bench.asmtp.invalid"
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.messages is None and self.duration is None:
            raise InputError("give --messages N or --duration SECONDS (or both)")
        if self.messages is not None and self.messages < 1:
            raise InputError(f"messages must be at least 1: {self.messages}")
        if self.duration is not None and not 0 < self.duration < math.inf:
            raise InputError(f"duration must be a positive number of seconds: {self.duration}")
        for name in ("concurrency", "recipients_per_message", "port"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1: {getattr(self, name)}")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise InputError(f"rate must be a positive number: {self.rate}")
        if not 0 < self.timeout < math.inf:
            raise InputError(f"timeout must be a positive number of seconds: {self.timeout}")
        if self.tls not in TLS_MODES:
            raise InputError(f"tls must be one of {', '.join(TLS_MODES)}: {self.tls!r}")
        if self.username is not None:
            if self.password is None:
                raise InputError("--user needs a password (--password-env VAR)")
            if self.tls == "none" and not self.allow_plaintext_auth:
                raise InputError(
                    "refusing to send credentials without TLS (use --tls, or "
                    "--allow-plaintext-auth)"
                )
        for what, value in (("helo", self.helo), ("from", self.sender)):
            if not value or any(c in value for c in " \r\n\0<>"):
                raise InputError(f"{what} must not be empty or hold spaces or <>: {value!r}")
        domain = self.to_domain
        if not domain or any(c in domain for c in " \r\n\0<>@"):
            raise InputError(f"to-domain must be a domain: {domain!r}")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (system trust store, or no checks with verify=False)."""
        if self.tls == "none":
            return None
        context = ssl.create_default_context()
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


#: the Message-ID's number field in the bench message: each transaction writes its own
#: number there (:func:`numbered`), so no two messages of a run share a Message-ID
#: (servers and filters that drop duplicates would otherwise skew the load).
_NUMBER = b"000000000000"


def build_bench_message(size: int, sender: str, to_domain: str) -> PreparedMessage:
    """The message every transaction sends: plain ASCII text of exactly ``size``
    octets (headers, body and the CRLF before the dot), built once; each transaction
    numbers its Message-ID (:func:`numbered`).

    >>> build_bench_message(600, "a@example.test", "example.test").size
    600
    """
    head = (
        f"From: <{sender}>\r\n"
        f"To: <rcpt@{to_domain}>\r\n"
        "Subject: asmtp bench\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: <bench.{os.getpid()}.{time.time_ns()}.{_NUMBER.decode()}@asmtp.invalid>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    remaining = size - len(head)
    if remaining < 2:
        raise InputError(f"size must be at least {len(head) + 2} octets (the headers): {size}")
    filler = b"asmtp bench padding line, the same text every time. 0123456789 abcdefghijkl"
    lines = []
    while remaining > 0:
        n = min(len(filler) + 2, remaining)
        if remaining - n == 1:  # leave room for one whole CRLF line
            n -= 1
        lines.append(filler[: n - 2] + b"\r\n")
        remaining -= n
    prepared = prepare_message(head + b"".join(lines))
    assert prepared.size == size, (prepared.size, size)
    return prepared


def numbered(message: PreparedMessage) -> Callable[[int], PreparedMessage]:
    """The message :func:`build_bench_message` made, numbered: a function of the
    number giving the same message with that number in its Message-ID. The content
    is split once around the number, so each numbered copy is three parts (the
    headers before the number, the number, the rest) sharing the same bytes: no
    message is serialized or copied again.

    >>> number = numbered(build_bench_message(600, "a@example.test", "example.test"))
    >>> copy = number(42)
    >>> b".000000000042@" in copy.data, copy.size, len(copy.parts)
    (True, 600, 3)
    """
    data = message.data
    at = data.index(b"." + _NUMBER + b"@") + 1
    head, tail, size = data[:at], data[at + len(_NUMBER) :], message.size

    def copy(number: int) -> PreparedMessage:
        part = b"%012d" % (number % 10**12)
        return PreparedMessage(data=(head, part, tail), size=size, eight_bit=False, smtputf8=False)

    return copy


# ----------------------------------------------------------------------- the run


@dataclass(slots=True)
class _Error:
    count: int = 0
    example: str = ""


# Which stage's latency a stage's time adds to, and (_WITHIN) the stages that belong to
# the one before them: the second EHLO is part of STARTTLS, RCPT and DATA of the envelope.
_LATENCY_OF = {
    "connect": "connect",
    "greeting": "greeting",
    "ehlo": "ehlo",
    "starttls": "starttls",
    "auth": "auth",
    "mail": "envelope",
    "message": "message",
    "quit": "quit",
}
_WITHIN = {"starttls": ("ehlo",), "mail": ("rcpt", "data")}


class _Watch:
    """One worker's stage times, from its sessions' ``on_stage`` calls
    (:class:`~asmtp._delivery.session.Session`). A stage's time is recorded when the next one
    begins (it succeeded: the session went on); the stage that ends at ``"idle"`` is
    left in ``ended``/``took`` for the worker, which records it once it knows the
    outcome (a 5xx after the dot also ends the message stage)."""

    __slots__ = ("ended", "recorders", "since", "stage", "took")

    def __init__(self, recorders: dict[str, LatencyRecorder]) -> None:
        self.recorders = recorders
        self.stage = "idle"
        self.since = 0.0  # when it began
        self.ended = ""
        self.took = 0.0

    def __call__(self, stage: str, at: float) -> None:
        current = self.stage
        if stage in _WITHIN.get(current, ()):
            return
        took = at - self.since
        self.stage, self.since = stage, at
        if stage == "idle":
            self.ended, self.took = current, took
        elif current != "idle":
            self.recorders[_LATENCY_OF[current]].add(took)

    def forget(self) -> None:
        """The stage under way failed: it is not recorded (whatever begins next)."""
        self.stage = "idle"

    def record_ended(self) -> None:
        """Record the stage that ended at the last ``"idle"``."""
        self.recorders[_LATENCY_OF[self.ended]].add(self.took)


class _Slot:
    """One worker's state: its open session (kept with --reuse) and its stage times."""

    __slots__ = ("done_at", "ready", "session", "watch")

    def __init__(self, watch: _Watch) -> None:
        self.session: Session | None = None
        self.watch = watch
        self.ready = False  # greeting, EHLO, STARTTLS and AUTH done
        self.done_at = 0.0  # when the message's final reply came

    def stage_of(self, error: SMTPError | None) -> str:
        """The stage a failure is counted under: the error's (else the session's),
        except that the TLS handshake and the EHLO after it count as STARTTLS's."""
        if self.watch.stage == "starttls":
            return "starttls"
        if error is not None and error.stage:
            return error.stage
        return self.session.stage if self.session is not None else "connect"

    async def close(self) -> None:
        """End the session (after QUIT)."""
        session, self.session, self.ready = self.session, None, False
        if session is not None:
            await session.close()

    def drop(self) -> None:
        """End the session at once, without QUIT."""
        session, self.session, self.ready = self.session, None, False
        if session is not None:
            session.abort()


@dataclass(slots=True)
class BenchResult:
    """A finished run: ``summary`` (what ``--json`` prints) and, per stage, the
    histogram bins ``(low_ms, high_ms, samples)`` for the HTML report."""

    summary: dict[str, Any]
    histograms: dict[str, list[tuple[float, float, int]]]

    @property
    def failed(self) -> int:
        return int(self.summary["messages"]["failed"])

    @property
    def interrupted(self) -> bool:
        return bool(self.summary["interrupted"])


class _Run:
    """The state of one run, shared by its workers (one event loop: no locks)."""

    def __init__(self, config: BenchConfig, address: str, message: PreparedMessage) -> None:
        self.config = config
        self.address = address
        self.message = message
        self.numbered = numbered(message)
        self.endpoint = Endpoint(
            host=config.host,
            port=config.port,
            helo=config.helo,
            tls=config.tls,
            ssl_context=config.ssl_context(),
            addresses=(address,),
            username=config.username,
            password=config.password,
            allow_plaintext_auth=config.allow_plaintext_auth,
        )
        self.timeouts = Timeouts.uniform(config.timeout)
        self.recorders = {stage: LatencyRecorder() for stage in STAGES}
        self.errors: dict[str, dict[str, _Error]] = {}
        self.quit_errors: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.accepted = 0
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.sessions_attempted = 0
        self.sessions_ready = 0
        self.next_index = 0
        self.limit = config.messages if config.messages is not None else sys.maxsize
        self.interval = 1.0 / config.rate if config.rate is not None else None
        self.start = 0.0
        self.deadline = math.inf
        self.last_done = 0.0
        self.stopping = False
        # per-second buckets from the start: completions, and session latency sum/max
        self.tl_ok: list[int] = []
        self.tl_failed: list[int] = []
        self.tl_sum: list[float] = []
        self.tl_max: list[float] = []

    # -- bookkeeping ----------------------------------------------------------------

    def _second(self, t: float) -> int:
        second = max(0, int(t - self.start))
        while len(self.tl_ok) <= second:
            self.tl_ok.append(0)
            self.tl_failed.append(0)
            self.tl_sum.append(0.0)
            self.tl_max.append(0.0)
        return second

    def _done_ok(self, t_start: float, t_end: float) -> None:
        self.ok += 1
        self.last_done = t_end
        latency = t_end - t_start
        self.recorders["session"].add(latency)
        second = self._second(t_end)
        self.tl_ok[second] += 1
        self.tl_sum[second] += latency
        if latency > self.tl_max[second]:
            self.tl_max[second] = latency

    def _done_failed(self, stage: str, key: str, example: str) -> None:
        self.failed += 1
        now = _now()
        self.last_done = now
        self.tl_failed[self._second(now)] += 1
        entry = self.errors.setdefault(stage, {}).setdefault(key, _Error())
        entry.count += 1
        if not entry.example:
            entry.example = example

    def _claim(self) -> tuple[int, float | None] | None:
        """The next message to send and its scheduled start (open loop), or None when
        the run is over for this worker."""
        if self.stopping:
            return None
        index = self.next_index
        if index >= self.limit:
            return None
        if self.interval is None:
            if _now() >= self.deadline:
                return None
            self.next_index = index + 1
            return index, None
        scheduled = self.start + index * self.interval
        if scheduled >= self.deadline:
            return None
        self.next_index = index + 1
        return index, scheduled

    # -- the workers ----------------------------------------------------------------

    async def worker(self) -> None:
        slot = _Slot(_Watch(self.recorders))
        try:
            while (claim := self._claim()) is not None:
                index, scheduled = claim
                if scheduled is None:
                    t_start = _now()
                else:
                    await _sleep_until(scheduled)
                    t_start = scheduled
                    self.recorders["queue"].add(max(0.0, _now() - scheduled))
                await self._send_one(slot, index, t_start)
            if slot.session is not None:
                await self._quit(slot)
        finally:
            slot.drop()

    async def _send_one(self, slot: _Slot, index: int, t_start: float) -> None:
        """One message: connect and set up if no session is open, the transaction and,
        without --reuse, QUIT, all as one run of the session's steps (each stage timed
        by the session's observer as its reply is parsed, in the read callback)."""
        self.sent += 1
        try:
            if slot.session is None:
                await self._connect(slot)
            assert slot.session is not None
            await slot.session.run(self._message_steps(slot, slot.session, index))
        except SMTPError as exc:
            key = str(exc.code) if isinstance(exc, ReplyError) else type(exc).__name__
            self._done_failed(slot.stage_of(exc), key, str(exc))
            slot.watch.forget()
            session = slot.session
            kept = isinstance(exc, ReplyError | MessageRejectedError)
            if session is None or session.proto.closed or not kept:
                slot.drop()
            elif not slot.ready:
                await self._quit(slot)  # never reuse a session that failed to set up
            elif self.config.reuse:
                await self._rset(slot, session)
            else:
                await self._quit(slot)
        except asyncio.CancelledError:
            # stopped from outside: the grace after --duration is over, or Ctrl-C
            self._done_failed(
                slot.stage_of(None), UNFINISHED, "still running when the run was stopped"
            )
            raise
        else:
            self._done_ok(t_start, slot.done_at)
            if not self.config.reuse or slot.session is None or slot.session.proto.closed:
                await slot.close()  # QUIT said (or tried), or the server ended the session

    async def _connect(self, slot: _Slot) -> None:
        self.sessions_attempted += 1
        slot.ready = False
        session = slot.session = Session(
            self.endpoint, self.timeouts, on_stage=slot.watch, clock=_now
        )
        await session.open()

    def _message_steps(self, slot: _Slot, session: Session, index: int) -> Steps[None]:
        """The session's own steps: the set-up when the session is new, the
        transaction, and QUIT without --reuse."""
        if not slot.ready:
            yield from session.greet()
            slot.watch.record_ended()
            slot.ready = True
            self.sessions_ready += 1
        per = self.config.recipients_per_message
        first = index * per + 1
        recipients = [f"rcpt-{n}@{self.config.to_domain}" for n in range(first, first + per)]
        refused, final = yield from session.transaction_steps(
            self.config.sender, recipients, self.numbered(index + 1)
        )
        self.accepted += per - len(refused)
        for reply in refused.values():
            key = str(reply.code)
            self.refused[key] = self.refused.get(key, 0) + 1
        if len(refused) == per:
            raise reply_error(next(iter(refused.values())), "rcpt")
        if final.code not in _MESSAGE_OK:
            raise reply_error(final, "message")
        slot.watch.record_ended()
        slot.done_at = slot.watch.since
        if not self.config.reuse:
            yield from self._quit_steps(slot, session)

    async def _rset(self, slot: _Slot, session: Session) -> None:
        """After a failed transaction on a session kept for more (--reuse): RSET, or
        give the session up."""
        proto = session.proto
        try:
            if proto.state in (State.READY, State.MAIL) and proto.awaiting is None:
                await session.reset()
                return
        except SMTPError:
            pass
        slot.drop()

    def _quit_steps(self, slot: _Slot, session: Session) -> Steps[None]:
        """QUIT, timed; a failure is counted apart (the message was already sent)."""
        try:
            reply = yield from session.quit_steps()
        except SMTPError as exc:
            key = type(exc).__name__
            self.quit_errors[key] = self.quit_errors.get(key, 0) + 1
            slot.watch.forget()
            return
        if reply is None:
            return
        if reply.code in _QUIT_OK:
            slot.watch.record_ended()
        else:
            key = str(reply.code)
            self.quit_errors[key] = self.quit_errors.get(key, 0) + 1

    async def _quit(self, slot: _Slot) -> None:
        session = slot.session
        assert session is not None
        try:
            if session.is_open:
                await session.run(self._quit_steps(slot, session))
        finally:
            await slot.close()

    # -- the whole run --------------------------------------------------------------

    async def run(self) -> bool:
        """Run the workers to the end; True when interrupted (Ctrl-C)."""
        config = self.config
        self.start = _now()
        if config.duration is not None:
            self.deadline = self.start + config.duration
        workers = [asyncio.create_task(self.worker()) for _ in range(config.concurrency)]
        interrupted = False
        try:
            await self._wait(workers)
        except asyncio.CancelledError:
            interrupted = True
        finally:
            self.stopping = True
            for task in workers:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, Exception):
                raise outcome
        return interrupted

    async def _wait(self, workers: list[asyncio.Task[None]]) -> None:
        """Wait for the workers; with --duration, in-flight messages get at most one
        --timeout past the deadline before they are stopped (as "Unfinished")."""
        pending: set[asyncio.Task[None]] = set(workers)
        limit = math.inf
        if self.deadline != math.inf:
            limit = self.deadline + self.config.timeout
        while pending:
            left = limit - _now()
            if left <= 0:
                return
            done, pending = await asyncio.wait(
                pending,
                timeout=None if left == math.inf else left,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    return  # a bug: run() re-raises it after stopping the others

    def result(self, *, interrupted: bool, started: datetime, loop_name: str) -> BenchResult:
        config = self.config
        end = self.last_done or _now()
        elapsed = max(end - self.start, 1e-9)
        shown = [s for s in STAGES if self._stage_applies(s)]
        latency = {stage: self.recorders[stage].summary() for stage in shown}
        errors = {
            stage: {
                key: {"count": e.count, "example": e.example}
                for key, e in sorted(entries.items(), key=lambda kv: -kv[1].count)
            }
            for stage, entries in sorted(self.errors.items(), key=_stage_order)
        }
        timeline = [
            {
                "second": i,
                "ok": self.tl_ok[i],
                "failed": self.tl_failed[i],
                "session_mean_ms": (
                    round(self.tl_sum[i] / self.tl_ok[i] * 1000.0, 4) if self.tl_ok[i] else None
                ),
                "session_max_ms": round(self.tl_max[i] * 1000.0, 4) if self.tl_ok[i] else None,
            }
            for i in range(len(self.tl_ok))
        ]
        recipients_sent = self.accepted + sum(self.refused.values())
        summary: dict[str, Any] = {
            "command": "asmtp bench",
            "version": __version__,
            "target": {
                "host": config.host,
                "port": config.port,
                "address": self.address,
                "tls": config.tls,
            },
            "settings": {
                "messages": config.messages,
                "duration_s": config.duration,
                "concurrency": config.concurrency,
                "size": self.message.size,
                "recipients_per_message": config.recipients_per_message,
                "reuse": config.reuse,
                "rate_per_s": config.rate,
                "timeout_s": config.timeout,
                "from": config.sender,
                "to_domain": config.to_domain,
                "helo": config.helo,
                "auth": config.username is not None,
                "event_loop": loop_name,
            },
            "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "elapsed_s": round(elapsed, 6),
            "interrupted": interrupted,
            "messages": {"sent": self.sent, "ok": self.ok, "failed": self.failed},
            "recipients": {
                "sent": recipients_sent,
                "accepted": self.accepted,
                "refused": dict(sorted(self.refused.items())),
            },
            "sessions": {
                "attempted": self.sessions_attempted,
                "ready": self.sessions_ready,
                "quit_errors": dict(sorted(self.quit_errors.items())),
            },
            "throughput": {
                "messages_per_s": round(self.ok / elapsed, 3),
                "sent_per_s": round(self.sent / elapsed, 3),
                "bytes_per_s": round(self.ok * self.message.size / elapsed, 1),
            },
            "latency_ms": latency,
            "errors": errors,
            "timeline": timeline,
        }
        histograms = {
            stage: [(lo * 1000.0, hi * 1000.0, n) for lo, hi, n in self.recorders[stage].bins()]
            for stage in shown
        }
        return BenchResult(summary=summary, histograms=histograms)

    def _stage_applies(self, stage: str) -> bool:
        config = self.config
        if stage == "queue":
            return config.rate is not None
        if stage == "starttls":
            return config.tls in ("starttls", "opportunistic")
        if stage == "auth":
            return config.username is not None
        return True


async def _sleep_until(when: float) -> None:
    """Wait until ``when`` (a perf_counter time): never wake early, nor late either.
    uvloop's timers fire to the millisecond, so sleep to within one, then yield."""
    # ASYNC110: this waits for a time, not for a condition an Event could signal.
    while (delay := when - _now()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay - 0.001 if delay > 0.002 else 0)


def _stage_order(item: tuple[str, object]) -> int:
    order = ("connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data")
    return order.index(item[0]) if item[0] in order else len(order)


async def _resolve(host: str, port: int) -> str:
    """The address to connect to, looked up once before the run (not per connection)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InputError(f"cannot resolve {host}: {exc}") from None
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise InputError(f"cannot resolve {host}")
    return str(infos[0][4][0])


async def run_bench(config: BenchConfig) -> BenchResult:
    """Run one benchmark on the running event loop and return its result.

    The message is built and the host resolved before the clock starts. The run ends
    by itself: after ``messages`` messages, or at ``duration`` (no new message starts
    then; those in flight get one ``timeout`` more), whichever comes first.
    """
    message = build_bench_message(config.size, config.sender, config.to_domain)
    address = await _resolve(config.host, config.port)
    run = _Run(config, address, message)
    started = datetime.now(UTC)
    loop = asyncio.get_running_loop()
    loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    interrupted = await run.run()
    return run.result(interrupted=interrupted, started=started, loop_name=loop_name)


# ----------------------------------------------------------------------- option types


def parse_rate(value: str) -> float:
    """Messages per second from ``R``, ``R/s``, ``R/m`` or ``R/h``.

    >>> parse_rate("50/s"), parse_rate("120/m"), parse_rate("7200/h"), parse_rate("2.5")
    (50.0, 2.0, 2.0, 2.5)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a rate (R/s, R/m or R/h): {value!r}")
    number = float(m.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    if not number > 0:
        raise argparse.ArgumentTypeError(f"rate must be above zero: {value!r}")
    return number


def parse_size(value: str) -> int:
    """Octets from ``N``, ``Nk`` (x1024) or ``NM`` (x1048576).

    >>> parse_size("2048"), parse_size("2k"), parse_size("1M")
    (2048, 2048, 1048576)
    """
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size in octets (N, Nk, NM): {value!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def _host_port(value: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address (port 25)."""
    host, port_text = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
    if not port_text:
        return host, 25
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {value!r}")
    return host, int(port_text)


# ----------------------------------------------------------------------- the command

_DESCRIPTION = (
    "Load-test an SMTP server you run: send many messages, concurrently, and report "
    "throughput, latency percentiles for each stage of the exchange and errors by reply "
    "code. Give --messages, --duration or both. Messages go to rcpt-N@DOMAIN, N counting "
    "up from 1; the same message (--size octets) is sent every time."
)
_EPILOG = (
    "Latency stages: connect (TCP, plus TLS with --tls implicit), greeting, ehlo, starttls, "
    "auth, envelope (MAIL to DATA's 354), message (content to the reply after the dot), "
    "session (a message's start to the reply after the dot: QUIT not included), quit, and "
    "queue (--rate: scheduled start to a free worker). Exit status: 0 all accepted, 1 some "
    "failed, 2 bad usage (nothing sent), 130 interrupted."
)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", type=_host_port, metavar="HOST[:PORT]", help="the server (port default 25)"
    )
    bound = parser.add_argument_group("how much (at least one)")
    bound.add_argument("--messages", type=positive_int, metavar="N", help="send N messages")
    bound.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="start messages for this long, then wait for those in flight (at most --timeout)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=positive_int,
        default=10,
        metavar="C",
        help="messages (and sessions) in flight at once (default 10)",
    )
    load.add_argument(
        "--rate",
        type=parse_rate,
        metavar="R/s",
        help="open loop: start messages on a fixed schedule (R/s, R/m or R/h) and measure "
        "latency from each scheduled start; default: closed loop, each worker sends its "
        "next message as soon as the last is answered",
    )
    load.add_argument(
        "--reuse",
        action="store_true",
        help="keep each worker's session for message after message (default: a new "
        "session per message)",
    )
    message = parser.add_argument_group("message")
    message.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        metavar="OCTETS",
        help=f"message size, headers included (N, Nk, NM; default {DEFAULT_SIZE})",
    )
    message.add_argument(
        "--recipients-per-message",
        type=positive_int,
        default=1,
        metavar="R",
        help="RCPTs per message (default 1)",
    )
    message.add_argument(
        "--from",
        dest="sender",
        default="bench@example.test",
        metavar="ADDR",
        help="MAIL FROM (default bench@example.test)",
    )
    message.add_argument(
        "--to-domain",
        default="example.test",
        metavar="DOMAIN",
        help="recipients are rcpt-N@DOMAIN (default example.test)",
    )
    session = parser.add_argument_group("session")
    session.add_argument(
        "--tls",
        choices=TLS_MODES,
        default="none",
        help="default none: plain SMTP, as a local server is usually load-tested; "
        "starttls (required), opportunistic (when offered) or implicit (TLS from the "
        "first byte, port-465 style)",
    )
    session.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the server's certificate (your own self-signed one)",
    )
    session.add_argument("--user", metavar="USER", help="AUTH as USER on every session")
    session.add_argument(
        "--password-env", metavar="VAR", help="the environment variable holding the password"
    )
    session.add_argument(
        "--allow-plaintext-auth", action="store_true", help="allow AUTH with --tls none"
    )
    session.add_argument(
        "--helo",
        default="bench.asmtp.invalid",
        metavar="NAME",
        help="the EHLO name (default bench.asmtp.invalid)",
    )
    session.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="per network step (default 30)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the results as one JSON object")
    output.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help="also write a self-contained HTML report (latency histograms, throughput over time)",
    )


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand to ``asmtp``'s subparsers; the parsed namespace
    carries ``handler=main_bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test an SMTP server: throughput, latency per stage, errors",
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    _add_options(parser)
    parser.set_defaults(handler=main_bench)


def _config(args: argparse.Namespace) -> BenchConfig:
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            raise InputError(
                f"--password-env: the environment variable {args.password_env} is not set"
            )
    elif args.user:
        raise InputError("--user needs --password-env VAR")
    host, port = args.target
    return BenchConfig(
        host=host,
        port=port,
        messages=args.messages,
        duration=args.duration,
        concurrency=args.concurrency,
        size=args.size,
        recipients_per_message=args.recipients_per_message,
        reuse=args.reuse,
        rate=args.rate,
        tls=args.tls,
        verify=not args.no_verify,
        username=args.user,
        password=password,
        allow_plaintext_auth=args.allow_plaintext_auth,
        sender=args.sender,
        to_domain=args.to_domain,
        helo=args.helo,
        timeout=args.timeout,
    )


def main_bench(args: argparse.Namespace) -> int:
    """Run ``asmtp bench`` from parsed options; print the results; return the exit
    status (0 all accepted, 1 some failed, 2 bad usage, 130 interrupted)."""
    try:
        config = _config(args)
        if args.report is not None and not args.report.parent.is_dir():
            raise InputError(f"--report: no such folder: {args.report.parent}")
        # Built here too, so a bad --size fails before anything is sent.
        build_bench_message(config.size, config.sender, config.to_domain)
        result = _run(run_bench(config))
    except InputError as exc:
        print(f"asmtp bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.report is not None:
        from .report import render_report

        args.report.write_text(render_report(result.summary, result.histograms), "utf-8")
    try:
        if args.json:
            sys.stdout.write(json.dumps(result.summary) + "\n")
        else:
            print_table(result.summary)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if result.interrupted:
        print("asmtp bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if result.failed else EXIT_OK


def standalone_main(argv: Sequence[str] | None = None) -> int:
    """``asmtp bench`` on its own (``argv`` without the word ``bench``)."""
    parser = argparse.ArgumentParser(prog="asmtp bench", description=_DESCRIPTION, epilog=_EPILOG)
    _add_options(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return main_bench(args)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on a new event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: _T = uvloop.run(coro)
    return result


# ----------------------------------------------------------------------- the table


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(summary: dict[str, Any]) -> None:
    """The human form of a run's summary: a headline and rich tables."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = None
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        width = 120
    console = Console(file=sys.stdout, width=width, highlight=False)
    target, settings = summary["target"], summary["settings"]
    messages, throughput = summary["messages"], summary["throughput"]
    rate = settings["rate_per_s"]
    loop = f"open loop at {rate:g}/s" if rate else "closed loop"
    bounds = []
    if settings["messages"] is not None:
        bounds.append(f"{settings['messages']:,} messages")
    if settings["duration_s"] is not None:
        bounds.append(f"{settings['duration_s']:g} s")
    console.print(
        f"[bold]asmtp bench[/] {target['host']}:{target['port']} ({target['address']}), "
        f"tls {target['tls']}, {' or '.join(bounds)}, concurrency {settings['concurrency']}, "
        f"{loop}, {settings['size']:,}-octet messages to {settings['recipients_per_message']} "
        f"recipient(s), {'sessions reused' if settings['reuse'] else 'a session per message'}"
        f", {settings['event_loop']}"
    )
    sessions = summary["sessions"]
    style = "green" if not messages["failed"] else "red"
    console.print(
        f"[{style}]{messages['sent']:,} sent: {messages['ok']:,} ok, "
        f"{messages['failed']:,} failed[/] in {summary['elapsed_s']:.2f} s: "
        f"[bold]{throughput['messages_per_s']:,.1f} messages/s[/] "
        f"({throughput['bytes_per_s'] / 1e6:,.2f} MB/s); sessions: "
        f"{sessions['attempted']:,} opened, {sessions['ready']:,} ready"
        + (
            "; QUIT problems: " + ", ".join(f"{k} x{v}" for k, v in sessions["quit_errors"].items())
            if sessions["quit_errors"]
            else ""
        )
        + (" [magenta](interrupted)[/]" if summary["interrupted"] else "")
    )
    refused = summary["recipients"]["refused"]
    if refused:
        console.print(
            "recipients refused: " + ", ".join(f"{code} x{n:,}" for code, n in refused.items())
        )

    table = Table(title="latency (ms)", title_justify="left")
    table.add_column("stage")
    table.add_column("count", justify="right")
    for name in ("min", "mean", *(_pkey(p) for p in PERCENTILES), "max"):
        table.add_column(name, justify="right")
    table.add_column("errors", justify="right")
    errors_of = _errors_by_latency_stage(summary["errors"])
    approximate = False
    for stage, stats in summary["latency_ms"].items():
        approximate = approximate or not stats["exact"]
        errors = errors_of.get(stage, 0)
        table.add_row(
            stage,
            f"{stats['count']:,}",
            *(_ms(stats[k]) for k in ("min", "mean", *(_pkey(p) for p in PERCENTILES), "max")),
            f"[red]{errors:,}[/]" if errors else "0",
        )
    if approximate:
        table.caption = "percentiles from a 1% log histogram (too many samples to keep)"
    console.print(table)

    if summary["errors"]:
        errs = Table(title="errors", title_justify="left")
        errs.add_column("stage")
        errs.add_column("error")
        errs.add_column("count", justify="right")
        errs.add_column("example", overflow="fold")
        for stage, entries in summary["errors"].items():
            for key, entry in entries.items():
                # the server's own words: shown as text (no markup), control characters
                # escaped, so a reply cannot restyle or repaint the terminal
                errs.add_row(
                    stage,
                    Text(printable(key)),
                    f"{entry['count']:,}",
                    Text(printable(entry["example"])),
                )
        console.print(errs)


#: the latency stage whose row shows the errors of each error stage
_ERROR_ROW = {"mail": "envelope", "rcpt": "envelope", "data": "envelope"}


def _errors_by_latency_stage(errors: dict[str, dict[str, dict[str, Any]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stage, entries in errors.items():
        row = _ERROR_ROW.get(stage, stage)
        out[row] = out.get(row, 0) + sum(e["count"] for e in entries.values())
    return out

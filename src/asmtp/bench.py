"""``asmtp bench``: a load generator for load-testing your own SMTP server.

Owns the benchmark: its options, the workers that drive the sans-IO
:class:`~asmtp.protocol.ClientProtocol` over :class:`~asmtp.transport.Connection`
directly (so every stage is time-stamped exactly where its reply arrives), the latency
statistics, and the report as a table, one JSON object or (through
:mod:`asmtp.bench_report`) a self-contained HTML file.

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
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .argtypes import positive_float, positive_int
from .config import TLS_MODES, TLSMode
from .errors import (
    InputError,
    ReplyError,
    SMTPError,
    TLSUnavailableError,
)
from .message import PreparedMessage, prepare_message
from .protocol import SUCCESS_CODES, ClientProtocol, State
from .reply import Reply
from .sanitize import printable
from .sasl import choose_mechanism, make_mechanism
from .session import authenticate, exchange, hello, reply_error
from .steps import Await, Command, Receive, Send, Steps
from .transport import Connection, open_connection

# Each command's success replies, from the one table the session uses too.
_GREETING_OK = SUCCESS_CODES["greeting"]
_STARTTLS_OK = SUCCESS_CODES["starttls"]
_MAIL_OK = SUCCESS_CODES["mail"]
_RCPT_OK = SUCCESS_CODES["rcpt"]
_DATA_OK = SUCCESS_CODES["data"]
_MESSAGE_OK = SUCCESS_CODES["message"]
_RSET_OK = SUCCESS_CODES["rset"]
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


def numbered(data: bytes, at: int, number: int) -> bytes:
    """``data`` with the Message-ID number field at ``at`` set to ``number``.

    >>> m = build_bench_message(600, "a@example.test", "example.test").data
    >>> b".000000000042@" in numbered(m, m.index(b".000000000000@") + 1, 42)
    True
    """
    return b"%s%012d%s" % (data[:at], number % 10**12, data[at + len(_NUMBER) :])


# ----------------------------------------------------------------------- the run


@dataclass(slots=True)
class _Error:
    count: int = 0
    example: str = ""


class _Slot:
    """One worker's state: its open session (kept with --reuse) and the stage it is in."""

    __slots__ = ("conn", "done_at", "mail_params", "proto", "ready", "since", "stage")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.proto: ClientProtocol | None = None
        self.stage = "connect"
        self.mail_params: tuple[str, ...] = ()
        self.ready = False  # greeting, EHLO, STARTTLS and AUTH done
        self.since = 0.0  # when the connection was made
        self.done_at = 0.0  # when the message's final reply came

    def close(self) -> None:
        """End the session (after QUIT)."""
        if self.conn is not None:
            self.conn.close()
        self._forget()

    def drop(self) -> None:
        """End the session at once, without QUIT."""
        if self.conn is not None:
            self.conn.abort()
        self._forget()

    def _forget(self) -> None:
        self.conn = None
        self.proto = None
        self.ready = False


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
        self.number_at = message.data.index(b"." + _NUMBER + b"@") + 1
        self.ssl_context = config.ssl_context()
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
        slot = _Slot()
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
            if slot.conn is not None:
                await self._quit(slot)
        finally:
            slot.drop()

    async def _send_one(self, slot: _Slot, index: int, t_start: float) -> None:
        """One message: connect and set up if no session is open, the transaction and,
        without --reuse, QUIT, all as one run of steps (each stage timed as its reply
        is parsed, in the connection's read callback)."""
        self.sent += 1
        try:
            if slot.conn is None:
                await self._connect(slot)
            assert slot.conn is not None
            await slot.conn.run(self._message_steps(slot, index))
        except SMTPError as exc:
            key = str(exc.code) if isinstance(exc, ReplyError) else type(exc).__name__
            self._done_failed(slot.stage, key, str(exc))
            if slot.proto is None or slot.proto.closed or not isinstance(exc, ReplyError):
                slot.drop()
            elif not slot.ready:
                await self._quit(slot)  # never reuse a session that failed to set up
            elif self.config.reuse:
                await self._rset(slot)
            else:
                await self._quit(slot)
        except asyncio.CancelledError:
            # stopped from outside: the grace after --duration is over, or Ctrl-C
            self._done_failed(slot.stage, UNFINISHED, "still running when the run was stopped")
            raise
        else:
            self._done_ok(t_start, slot.done_at)
            if not self.config.reuse or slot.proto is None or slot.proto.closed:
                slot.close()  # QUIT said (or tried), or the server ended the session

    def _message_steps(self, slot: _Slot, index: int) -> Steps[None]:
        if not slot.ready:
            yield from self._set_up(slot)
        yield from self._transaction(slot, index)
        slot.done_at = _now()
        if not self.config.reuse:
            yield from self._quit_steps(slot)

    async def _connect(self, slot: _Slot) -> None:
        config = self.config
        implicit = config.tls == "implicit"
        proto = ClientProtocol(tls=implicit)
        self.sessions_attempted += 1
        slot.stage = "connect"
        slot.proto = proto
        slot.ready = False
        t0 = _now()
        slot.conn = await open_connection(
            proto,
            config.host,
            config.port,
            address=self.address,
            ssl_context=self.ssl_context if implicit else None,
            server_hostname=config.host,
            timeout=config.timeout,
        )
        slot.since = _now()
        self.recorders["connect"].add(slot.since - t0)

    def _set_up(self, slot: _Slot) -> Steps[None]:
        """Greeting, EHLO, STARTTLS and AUTH as configured; each stage timed."""
        config = self.config
        rec = self.recorders
        proto = slot.proto
        assert proto is not None
        t1 = slot.since
        slot.stage = "greeting"
        reply: Reply = yield Receive(config.timeout, same_step=True)
        if reply.code not in _GREETING_OK:
            raise reply_error(reply, "greeting")
        t2 = _now()
        rec["greeting"].add(t2 - t1)

        slot.stage = "ehlo"
        yield from hello(proto, self.config.helo, self.config.timeout)
        t3 = _now()
        rec["ehlo"].add(t3 - t2)

        if config.tls in ("starttls", "opportunistic"):
            slot.stage = "starttls"
            if (yield from self._starttls(slot, proto)):
                t4 = _now()
                rec["starttls"].add(t4 - t3)
                t3 = t4
        if config.username is not None:
            slot.stage = "auth"
            yield from self._auth(proto)
            rec["auth"].add(_now() - t3)

        caps = proto.capabilities
        slot.mail_params = (f"SIZE={self.message.size}",) if "SIZE" in caps else ()
        slot.ready = True
        self.sessions_ready += 1

    def _starttls(self, slot: _Slot, proto: ClientProtocol) -> Steps[bool]:
        """STARTTLS, the handshake and EHLO again; False when opportunistic TLS
        carries on in plaintext (STARTTLS not offered)."""
        mode = self.config.tls
        if not proto.capabilities.starttls:
            if mode == "starttls":
                raise TLSUnavailableError(
                    f"{self.config.host} does not offer STARTTLS", stage="starttls"
                )
            return False
        reply: Reply = yield Command(proto.starttls(), self.config.timeout)
        if reply.code not in _STARTTLS_OK:
            # Offered but refused: as the session does, even opportunistic TLS does not
            # carry on in the clear (plaintext only when STARTTLS is not offered).
            raise reply_error(reply, "starttls")
        conn, context = slot.conn, self.ssl_context
        assert conn is not None and context is not None

        async def handshake() -> None:
            conn.step(self.config.timeout)
            await conn.start_tls(context, self.config.host)

        yield Await(handshake)
        yield from hello(proto, self.config.helo, self.config.timeout)
        return True

    def _auth(self, proto: ClientProtocol) -> Steps[None]:
        config = self.config
        assert config.username is not None and config.password is not None
        name = choose_mechanism(proto.capabilities.auth, None)
        mech = make_mechanism(name, config.username, config.password)
        yield from authenticate(proto, name, mech, config.timeout)

    def _transaction(self, slot: _Slot, index: int) -> Steps[None]:
        """MAIL, the RCPTs and DATA (pipelined when offered), then the content."""
        proto = slot.proto
        assert proto is not None
        config = self.config
        timeout = config.timeout
        per = config.recipients_per_message
        domain = config.to_domain
        first = index * per + 1
        recipients = [f"rcpt-{n}@{domain}" for n in range(first, first + per)]
        rec = self.recorders
        refused: list[Reply] = []

        slot.stage = "mail"
        t0 = _now()
        if proto.capabilities.pipelining:
            # RFC 2920: MAIL, every RCPT and DATA in one write; then each reply in turn.
            out = proto.mail(config.sender, slot.mail_params)
            out += b"".join([proto.rcpt(r) for r in recipients])
            out += proto.data()
            mail_reply: Reply = yield Command(out, timeout)
            if proto.closed:
                raise reply_error(mail_reply, "mail")
            slot.stage = "rcpt"
            for _ in recipients:
                reply: Reply = yield Receive(timeout)
                if proto.closed:
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused.append(reply)
            slot.stage = "data"
            data_reply: Reply = yield Receive(timeout)
        else:
            mail_reply = yield Command(proto.mail(config.sender, slot.mail_params), timeout)
            if mail_reply.code not in _MAIL_OK:
                slot.stage = "mail"
                raise reply_error(mail_reply, "mail")
            slot.stage = "rcpt"
            for rcpt in recipients:
                reply = yield Command(proto.rcpt(rcpt), timeout)
                if proto.closed:
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused.append(reply)
            if len(refused) == per:
                self._count_recipients(refused, per)
                raise reply_error(refused[0], "rcpt")
            slot.stage = "data"
            data_reply = yield Command(proto.data(), timeout)
        mail_ok = mail_reply.code in _MAIL_OK
        if mail_ok:  # after a refused MAIL, RCPT replies say nothing
            self._count_recipients(refused, per)
        if not mail_ok or len(refused) == per:
            if data_reply.code in _DATA_OK:
                # RFC 2920 3.1: DATA was accepted with nobody to deliver to; send an
                # empty message so the session stays in step.
                yield Command(proto.message(b"\r\n.\r\n"), timeout)
            if not mail_ok:
                slot.stage = "mail"
                raise reply_error(mail_reply, "mail")
            slot.stage = "rcpt"
            raise reply_error(refused[0], "rcpt")
        if data_reply.code not in _DATA_OK:
            raise reply_error(data_reply, "data")
        t1 = _now()
        rec["envelope"].add(t1 - t0)

        slot.stage = "message"
        content = numbered(self.message.data, self.number_at, index + 1)
        yield Send(proto.message(content), timeout, drain=True)
        reply = yield Receive(timeout)
        if reply.code not in _MESSAGE_OK:
            raise reply_error(reply, "message")
        rec["message"].add(_now() - t1)

    def _count_recipients(self, refused: list[Reply], per: int) -> None:
        self.accepted += per - len(refused)
        for reply in refused:
            key = str(reply.code)
            self.refused[key] = self.refused.get(key, 0) + 1

    async def _rset(self, slot: _Slot) -> None:
        """After a failed transaction on a session kept for more (--reuse): RSET, or
        give the session up."""
        conn, proto = slot.conn, slot.proto
        assert conn is not None and proto is not None
        try:
            if proto.state in (State.READY, State.MAIL) and proto.awaiting is None:
                reply = await conn.run(exchange(proto.rset(), self.config.timeout))
                if reply.code in _RSET_OK:
                    return
        except SMTPError:
            pass
        slot.drop()

    def _quit_steps(self, slot: _Slot) -> Steps[None]:
        """QUIT, timed; a failure is counted apart (the message was already sent)."""
        proto = slot.proto
        assert proto is not None
        if proto.closed or proto.awaiting is not None:
            return
        try:
            t0 = _now()
            reply: Reply = yield Command(proto.quit(), self.config.timeout)
        except SMTPError as exc:
            key = type(exc).__name__
            self.quit_errors[key] = self.quit_errors.get(key, 0) + 1
            return
        if reply.code in _QUIT_OK:
            self.recorders["quit"].add(_now() - t0)
        else:
            key = str(reply.code)
            self.quit_errors[key] = self.quit_errors.get(key, 0) + 1

    async def _quit(self, slot: _Slot) -> None:
        conn = slot.conn
        assert conn is not None
        try:
            await conn.run(self._quit_steps(slot))
        finally:
            slot.close()

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
        from .bench_report import render_report

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

"""The load of ``asmtp bench``: its workers, what they count, and the run's result.

Owns the run (:func:`run_bench`): the workers, the closed or open loop that feeds them,
and the counts, errors and timeline that become the summary ``--json`` prints. The
workers speak SMTP through :class:`~asmtp._delivery.session.Session`'s own steps, the
ones every send takes (set-up, transaction, QUIT: the same policy, not a copy of it),
and time each stage through the session's ``on_stage`` observer, called in the read
callback as each reply is parsed.

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
"""

from __future__ import annotations

import asyncio
import math
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..._core.prepared import PreparedMessage
from ..._core.protocol import SUCCESS_CODES, State
from ..._core.steps import Steps
from ..._delivery.endpoint import Endpoint
from ..._delivery.session import Session
from ..._delivery.transaction import reply_error
from ..._version import __version__
from ...config import Timeouts
from ...errors import InputError, MessageRejectedError, ReplyError, SMTPError
from .config import BenchConfig, build_bench_message, numbered
from .stats import LatencyRecorder
from .watch import Slot, Watch

__all__ = ["STAGES", "UNFINISHED", "BenchResult", "run_bench"]

# The replies the session's steps return rather than raise, judged here as the session
# judges them (from the one table in asmtp._core.protocol).
_MESSAGE_OK = SUCCESS_CODES["message"]
_QUIT_OK = SUCCESS_CODES["quit"]

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

# Stamps come from perf_counter, not loop.time(): uvloop's clock moves in whole
# milliseconds, coarser than a loopback reply.
_now = time.perf_counter


@dataclass(slots=True)
class _Error:
    count: int = 0
    example: str = ""


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
            proxy=config.proxy,
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
        slot = Slot(Watch(self.recorders))
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

    async def _send_one(self, slot: Slot, index: int, t_start: float) -> None:
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

    async def _connect(self, slot: Slot) -> None:
        self.sessions_attempted += 1
        slot.ready = False
        session = slot.session = Session(
            self.endpoint, self.timeouts, on_stage=slot.watch, clock=_now
        )
        await session.open()

    def _message_steps(self, slot: Slot, session: Session, index: int) -> Steps[None]:
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

    async def _rset(self, slot: Slot, session: Session) -> None:
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

    def _quit_steps(self, slot: Slot, session: Session) -> Steps[None]:
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

    async def _quit(self, slot: Slot) -> None:
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
    # through a proxy, the proxy resolves the host
    address = config.host if config.proxy else await _resolve(config.host, config.port)
    run = _Run(config, address, message)
    started = datetime.now(UTC)
    loop = asyncio.get_running_loop()
    loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    interrupted = await run.run()
    return run.result(interrupted=interrupted, started=started, loop_name=loop_name)

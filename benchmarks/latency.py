"""Latency benchmark: the fan-out against a sink one emulated round trip away, where round
trips, not CPU, decide.

This file owns the benchmark: which clients run against which sink, the worker mode that
runs one client once, the parent that runs them in interleaved rounds and measures each run
(with the sink's own counts: messages, round trips, BDAT), and the report. The sink is
``asmtp sink --rtt MS`` in its own process: every batch of replies is written one round
trip after the read that asked for it (this kernel has no netem), so a client pays one
round trip each time it writes and waits. What fanout.py and _common.py already have is
imported from them: the message, the recipients, the asmtp, aiosmtplib and bare-client
runners, the worker protocol, CPU pinning, the report's header and formatting.

The work: N messages of about 2 KB (N = --waves x C unless --messages), each to its own
recipient, at most C connections (or sessions) at once; RTT 20 and 50 ms, C = 200 and 1000.

    python benchmarks/latency.py --quick            # RTT 50 ms, C = 200: under a minute
    python benchmarks/latency.py                    # RTT 20 and 50, C = 200 and 1000, 2 rounds
    python benchmarks/latency.py --rtt 50 --concurrency 200 --only asmtp-uvloop,smtp-source

Rows: fresh sessions with PIPELINING offered; the same with CHUNKING offered too (asmtp
sends BDAT where it can; the BDAT column shows what it did); and connection reuse (asmtp's
pooled Mailer, aiosmtplib with one client per task, smtp-source -d).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fanout
from _common import (
    HELO,
    HERE,
    HOST,
    REPO,
    SENDER,
    add_run_options,
    cpu_self,
    emit,
    ensure_asmtp_importable,
    exit_reason,
    fmt,
    header,
    machine,
    machine_busy,
    percentile,
    place,
    process_cpu,
    reap,
    run_worker_process,
    select_clients,
    tail,
    wait_for_quiet,
)

MESSAGE_TIMEOUT = 30.0  # seconds, per message (per send for the reuse rows), in every client
MAX_MESSAGES = 50_000
MAX_CONCURRENCY = 1_000
MAX_RTT_MS = 500.0
SINK_LIFETIME = 3600.0  # seconds: the sink's own --duration, so it stops even if we die

#: name -> (event loop, what the sink offers, what it is)
CLIENTS: dict[str, tuple[str, str, str]] = {
    "asmtp": ("asyncio", "pipelining", "asmtp.send, a session per message"),
    "asmtp-uvloop": ("uvloop", "pipelining", "the same on uvloop"),
    "aiosmtplib": ("asyncio", "pipelining", "aiosmtplib.send per recipient under a semaphore"),
    "bare-uvloop": ("uvloop", "pipelining", "bare_client.py: one command per write"),
    "bare-pipelining": ("uvloop", "pipelining", "bare_client.py: MAIL+RCPT+DATA in one write"),
    "smtp-source": ("C", "pipelining", "Postfix's smtp-source, a session per message"),
    "asmtp-chunking": ("asyncio", "chunking", "asmtp.send; the sink offers CHUNKING too"),
    "asmtp-uvloop-chunking": ("uvloop", "chunking", "the same on uvloop"),
    "asmtp-reuse": ("asyncio", "pipelining", "asmtp.Mailer(pool=Pool(max_connections=C))"),
    "asmtp-uvloop-reuse": ("uvloop", "pipelining", "the same on uvloop"),
    "asmtp-uvloop-reuse-chunking": ("uvloop", "chunking", "the same; CHUNKING offered too"),
    "aiosmtplib-reuse": ("asyncio", "pipelining", "C aiosmtplib.SMTP clients, each reused"),
    "smtp-source-reuse": ("C", "pipelining", "smtp-source -d: sessions reused"),
}
BASELINE = "smtp-source"

# What asmtp aims for at RTT 50 ms and C = 200: (what, asmtp on uvloop, on asyncio, ratio
# to smtp-source's msgs/s). smtp-source waits for every reply: seven round trips a message.
TARGETS = (
    ("PIPELINING: at least 1.7x smtp-source", "asmtp-uvloop", "asmtp", 1.7),
    ("CHUNKING offered: at least 2.2x smtp-source", "asmtp-uvloop-chunking", "asmtp-chunking",
     2.2),
    ("connection reuse: at least 5x smtp-source", "asmtp-uvloop-reuse", "asmtp-reuse", 5.0),
    ("reuse, CHUNKING offered: at least 5x smtp-source", "asmtp-uvloop-reuse-chunking", None,
     5.0),
)  # fmt: skip
TARGET_CELL = (50.0, 200)


# ---------------------------------------------------------------------------- worker side

Outcomes = fanout.Outcomes


OnSent = Callable[[Outcomes], None]


async def run_asmtp_reuse(
    port: int, message: bytes, recipients: list[str], concurrency: int, on_sent: OnSent
) -> Outcomes:
    """C tasks share one pooled Mailer (at most C sessions), each sending its next message
    as soon as the last is answered; a session serves message after message. ``on_sent``
    is called once every send has its result, before the Mailer closes its sessions."""
    import asmtp

    relay = asmtp.Relay(HOST, port, tls="none", helo=HELO)
    pool = asmtp.Pool(max_connections=concurrency, max_messages=len(recipients))
    outcomes: list[tuple[bool, float, str]] = [(False, 0.0, "not sent")] * len(recipients)
    work = iter(enumerate(recipients))  # shared by the tasks; next() never interleaves
    mailer = asmtp.Mailer(
        relay, concurrency=concurrency, pool=pool, retry=None, timeout=MESSAGE_TIMEOUT
    )
    async with mailer:

        async def task() -> None:
            for index, recipient in work:
                start = time.perf_counter()
                result = (await mailer.send(message, sender=SENDER, recipients=[recipient]))[0]
                ok = result.status == "delivered"
                error = "" if ok else f"{result.status} {result.code} at {result.stage}"
                outcomes[index] = (ok, time.perf_counter() - start, error)

        await asyncio.gather(*(task() for _ in range(min(concurrency, len(recipients)))))
        on_sent(outcomes)
    return outcomes


async def run_aiosmtplib_reuse(
    port: int, message: bytes, recipients: list[str], concurrency: int, on_sent: OnSent
) -> Outcomes:
    """C tasks, each with its own aiosmtplib.SMTP connection, sending message after message
    on it (reconnecting when it was lost); then every connection QUITs, all at once."""
    import aiosmtplib

    outcomes: list[tuple[bool, float, str]] = [(False, 0.0, "not sent")] * len(recipients)
    work = iter(enumerate(recipients))
    clients: list[aiosmtplib.SMTP] = []

    async def task() -> None:
        client = aiosmtplib.SMTP(
            hostname=HOST, port=port, local_hostname=HELO, timeout=MESSAGE_TIMEOUT,
            use_tls=False, start_tls=False,
        )  # fmt: skip
        clients.append(client)
        for index, recipient in work:
            start = time.perf_counter()
            try:
                if not client.is_connected:
                    await client.connect()
                await client.sendmail(SENDER, [recipient], message)
            except (aiosmtplib.SMTPException, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                outcomes[index] = (False, time.perf_counter() - start, error)
                continue
            outcomes[index] = (True, time.perf_counter() - start, "")

    async def close(client: aiosmtplib.SMTP) -> None:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()

    await asyncio.gather(*(task() for _ in range(min(concurrency, len(recipients)))))
    on_sent(outcomes)
    await asyncio.gather(*(close(client) for client in clients))
    return outcomes


RUNNERS: dict[str, Callable[..., Any]] = {
    "asmtp": fanout.run_asmtp,
    "asmtp-reuse": run_asmtp_reuse,
    "aiosmtplib": fanout.run_aiosmtplib,
    "aiosmtplib-reuse": run_aiosmtplib_reuse,
    "bare": fanout.bare_runner(pipelining=False),
    "bare-pipelining": fanout.bare_runner(pipelining=True),
}


def runner_of(client: str) -> str:
    """The RUNNERS key of a Python client: its name less the loop and the sink's offer."""
    return client.replace("-uvloop", "").replace("-chunking", "")


def check_available(client: str) -> str | None:
    """None when the client can run in this interpreter, else why not."""
    try:
        if CLIENTS[client][0] == "uvloop":
            import uvloop  # noqa: F401
        if client.startswith("asmtp"):
            import asmtp

            if not all(hasattr(asmtp, name) for name in ("send", "Relay", "Mailer", "Pool")):
                return "this asmtp has no send, Relay, Mailer or Pool"
        elif client.startswith("aiosmtplib"):
            import aiosmtplib  # noqa: F401
    except ImportError as exc:
        return f"cannot import: {exc}"
    return None


def version_of(client: str) -> str:
    if client.startswith("asmtp"):
        import asmtp

        return f"asmtp {asmtp.__version__} ({Path(asmtp.__file__).parent})"
    if client.startswith("aiosmtplib"):
        import aiosmtplib

        return f"aiosmtplib {aiosmtplib.__version__}"
    return ""


def worker_main(client: str, port: int, count: int, concurrency: int, skip_close: bool) -> int:
    """Run one client once, with _common's worker protocol: ``{"ready"...}``, wait for
    ``go`` on stdin, ``{"result"...}``. The reuse rows report how long closing their
    sessions took apart (``close_seconds``); with ``skip_close`` they report as soon as
    every send has its result and exit without closing (the sink sees the connections
    drop)."""
    sys.path.insert(0, str(HERE))  # bare_client
    if client.startswith("asmtp"):
        ensure_asmtp_importable()
    why = check_available(client)
    if why is not None:
        emit({"unavailable": why})
        return 0
    message = fanout.build_message()
    recipients = fanout.build_recipients(count)
    run = RUNNERS[runner_of(client)]
    sent_at: list[float] = []

    def result(outcomes: Outcomes, close_seconds: float | None) -> dict[str, Any]:
        errors = Counter(error for ok, _, error in outcomes if not ok)
        return {
            "result": True,
            "cpu": cpu_self(),
            "delivered": sum(1 for ok, _, _ in outcomes if ok),
            "failed": sum(1 for ok, _, _ in outcomes if not ok),
            "errors": dict(errors.most_common(5)),
            "latencies": [round(elapsed, 6) for ok, elapsed, _ in outcomes if ok],
            "close_seconds": close_seconds,
        }

    def on_sent(outcomes: Outcomes) -> None:
        sent_at.append(time.perf_counter())
        if skip_close:
            emit(result(outcomes, None))
            os._exit(0)  # no QUIT, no waiting: the parent has what it measures

    emit({"ready": True, "cpu": cpu_self(), "version": version_of(client)})
    if sys.stdin.readline().strip() != "go":
        return 1
    reuse = {"on_sent": on_sent} if client.endswith(("-reuse", "-reuse-chunking")) else {}
    coro = run(port, message, recipients, concurrency, **reuse)
    if CLIENTS[client][0] == "uvloop":
        import uvloop

        outcomes = uvloop.run(coro)
    else:
        outcomes = asyncio.run(coro)
    close_seconds = time.perf_counter() - sent_at[0] if sent_at else None
    emit(result(outcomes, close_seconds))
    return 0


# ---------------------------------------------------------------------------- the sink


def _sink_env() -> dict[str, str]:
    """The environment for ``python -m asmtp sink``: the checkout's src/ when asmtp is not
    installed in this interpreter."""
    env = dict(os.environ)
    if importlib.util.find_spec("asmtp") is None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])
        )
    return env


class SinkProcess:
    """``asmtp sink --rtt MS [--chunking] --json`` on a free loopback port, in its own
    process; its counters read on demand (SIGUSR1 makes it print one JSON line)."""

    def __init__(
        self, rtt_ms: float, chunking: bool, handshake: bool, cpus: set[int] | None
    ) -> None:
        argv = [sys.executable, "-m", "asmtp", "sink", "--listen", f"{HOST}:0", "--json"]
        argv += ["--rtt", f"{rtt_ms:g}", "--duration", str(SINK_LIFETIME)]
        argv += ["--chunking"] if chunking else []
        argv += ["--handshake-rtt"] if handshake else []
        self.name = "asmtp sink " + " ".join(argv[4:])
        self.rtt_ms = rtt_ms
        self.chunking = chunking
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        # unbuffered: select() then sees every line the sink wrote
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr, env=_sink_env(), bufsize=0
        )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        listening = self._line(15.0)
        if "port" not in listening:
            self.stop()
            raise SystemExit(f"the sink did not start: {listening or tail(self._stderr)}")
        self.port = int(listening["port"])

    def _line(self, limit: float) -> dict[str, Any]:
        """The sink's next JSON line, waiting at most ``limit`` seconds ({} if none)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], limit)
        if not ready:
            return {}
        line = self.proc.stdout.readline()
        return dict(json.loads(line)) if line.strip() else {}

    def counters(self) -> dict[str, Any]:
        """The sink's counters now."""
        self.proc.send_signal(signal.SIGUSR1)
        return self._line(5.0)

    def wait_for(self, messages: int, limit: float = 3.0) -> dict[str, Any]:
        """The counters, once ``messages`` were counted or ``limit`` seconds passed."""
        deadline = time.monotonic() + limit
        while (now := self.counters()).get("messages", 0) < messages:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return now

    def cpu(self) -> float:
        return process_cpu(self.proc.pid)

    def exit_reason(self) -> str | None:
        return exit_reason(self.proc, self._stderr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        reap(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# ---------------------------------------------------------------------------- parent side


@dataclass
class Run(fanout.Run):
    """One client run, with what the sink counted during it."""

    messages: int = 0  # sent in this run
    round_trips: int = 0  # batches of replies the sink wrote
    via_bdat: int = 0
    connections: int = 0
    close: float | None = None  # reuse rows: seconds closing the sessions took, not in wall
    window: float = 0.0  # the whole run's wall time, closing included (for the busy shares)


@dataclass
class Row:
    runs: list[Run] = field(default_factory=list)
    unavailable: str = ""


def _counted(run: Run, before: dict[str, Any], after: dict[str, Any]) -> None:
    run.sink_count = int(after.get("messages", 0)) - int(before.get("messages", 0))
    run.round_trips = int(after.get("round_trips", 0)) - int(before.get("round_trips", 0))
    run.via_bdat = int(after.get("via_bdat", 0)) - int(before.get("via_bdat", 0))
    run.connections = int(after.get("connections", 0)) - int(before.get("connections", 0))


def run_python_client(
    client: str, sink: SinkProcess, count: int, concurrency: int, args: argparse.Namespace,
    cpus: set[int] | None,
) -> Run | str:  # fmt: skip
    """One run in a fresh interpreter; a str means the client is unavailable."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", client]
    argv += ["--port", str(sink.port), "--messages", str(count), "--concurrency", str(concurrency)]
    argv += ["--skip-close"] if args.skip_close else []
    worker = run_worker_process(
        argv, cpus, args.hard_timeout, lambda: (sink.counters(), sink.cpu())
    )
    if isinstance(worker, str):
        return worker
    run = Run(wall=worker.elapsed, error=worker.error, version=worker.version, messages=count)
    run.window = worker.elapsed
    if worker.error or worker.usage is None:
        return run
    before, sink_cpu_before = worker.before
    result, usage = worker.result, worker.usage
    if result.get("close_seconds") is not None:
        run.close = float(result["close_seconds"])
        run.wall -= run.close  # the go signal to the last send's result
    run.cpu = usage.ru_utime + usage.ru_stime - float(worker.ready["cpu"])
    run.delivered = int(result["delivered"])
    run.latencies = [float(x) for x in result["latencies"]]
    after = sink.wait_for(int(before.get("messages", 0)) + run.delivered)
    _counted(run, before, after)
    run.sink_cpu = sink.cpu() - sink_cpu_before
    run.others_cpu = max(0.0, worker.busy - run.cpu - run.sink_cpu)
    if result["failed"]:
        run.error = f"{result['failed']} failed: {result['errors']}"
    return run


def run_smtp_source(
    sink: SinkProcess, count: int, concurrency: int, reuse: bool, hard_timeout: float,
    cpus: set[int] | None,
) -> Run | str:  # fmt: skip
    """smtp-source, timed from its start (a C program: its start-up is a millisecond)."""
    smtp_source = fanout.find_smtp_source()
    if smtp_source is None:
        return "smtp-source is not installed"
    message = fanout.build_message()
    body_size = len(message) - len(message.split(b"\r\n\r\n", 1)[0]) - 4
    # -N: a sequence number in front of the recipient, so each message has its own
    argv = [smtp_source, *(["-d"] if reuse else []), "-l", str(body_size), "-m", str(count)]
    argv += ["-s", str(concurrency), "-N", "-M", HELO, "-f", SENDER, "-t", "rcpt@example.test"]
    argv.append(f"{HOST}:{sink.port}")
    run = Run(messages=count)
    with tempfile.TemporaryFile() as output:
        before, sink_cpu_before = sink.counters(), sink.cpu()
        busy_before = machine_busy()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
        killer = threading.Timer(hard_timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        run.wall = run.window = time.perf_counter() - start
        busy = machine_busy() - busy_before
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.cpu = usage.ru_utime + usage.ru_stime
        after = sink.wait_for(int(before.get("messages", 0)) + count)
        _counted(run, before, after)
        run.sink_cpu = sink.cpu() - sink_cpu_before
        run.others_cpu = max(0.0, busy - run.cpu - run.sink_cpu)
        run.delivered = run.sink_count  # no per-message results: the sink counts
        if proc.returncode != 0:
            run.error = f"smtp-source exited with {proc.returncode}: {tail(output)}"
    return run


def rate(run: Run) -> float:
    return run.messages / run.wall if run.wall > 0 else 0.0


# ---------------------------------------------------------------------------- the report


def cell_table(rtt_ms: float, concurrency: int, by_client: dict[str, Row]) -> list[str]:
    """One (RTT, C) cell: a row per client, then the targets as ratios."""
    lines = [
        "",
        f"## RTT {rtt_ms:g} ms, C = {concurrency}",
        "",
        "| client | N | msgs/s median (min-max) | vs smtp-source | round trips a msg"
        " | latency bound msgs/s | BDAT | p50 ms | p99 ms | CPU s per 1000 msgs | closing s"
        " | delivered | sink busy | others busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, float] = {}
    trips_of: dict[str, float] = {}  # the sink's round trips a message, all rounds
    for client, row in by_client.items():
        good = [run for run in row.runs if not run.error or run.delivered]
        if good:
            medians[client] = statistics.median(rate(run) for run in good)
        counted = sum(run.sink_count for run in good)
        if counted:
            trips_of[client] = sum(run.round_trips for run in good) / counted
    baseline = medians.get(BASELINE)
    for client, row in by_client.items():
        if row.unavailable:
            lines.append(f"| {client} | | unavailable: {row.unavailable} |" + " |" * 11)
            continue
        good = [run for run in row.runs if not run.error or run.delivered]
        if not good:
            reason = row.runs[0].error if row.runs else "not run"
            lines.append(f"| {client} | | failed: {reason} |" + " |" * 11)
            continue
        rates = [rate(run) for run in good]
        counted = sum(run.sink_count for run in good)
        trips = trips_of.get(client)
        bound = concurrency * 1000 / (rtt_ms * trips) if trips else None
        bdat = f"{sum(run.via_bdat for run in good) / counted:.0%}" if counted else "n/a"
        latencies = [x for run in good for x in run.latencies]
        p50 = percentile(latencies, 0.50) * 1000 if latencies else None
        p99 = percentile(latencies, 0.99) * 1000 if latencies else None
        cpu = statistics.median(run.cpu / run.messages * 1000 for run in good)
        vs = f"{medians[client] / baseline:.2f}x" if baseline else "n/a"
        busy = statistics.median(run.sink_cpu / run.window * 100 for run in good)
        others = statistics.median(run.others_cpu / run.window * 100 for run in good)
        flag = "" if all(not run.error for run in row.runs) else " (!)"
        delivered = (
            f"{sum(run.delivered for run in good)}/{sum(r.messages for r in row.runs)}{flag}"
        )
        closes = [run.close for run in good if run.close is not None]
        close = f"{statistics.median(closes):.2f}" if closes else "-"
        lines.append(
            f"| {client} | {good[0].messages} | {fmt(medians[client], 0)}"
            f" ({fmt(min(rates), 0)}-{fmt(max(rates), 0)}) | {vs} | {fmt(trips, 2)}"
            f" | {fmt(bound, 0)} | {bdat} | {fmt(p50)} | {fmt(p99)} | {fmt(cpu, 3)} | {close}"
            f" | {delivered} | {busy:.0f}% | {others:.0f}% |"
        )
    where = (
        "the cell the targets are set for"
        if (rtt_ms, concurrency) == TARGET_CELL
        else (f"set for RTT {TARGET_CELL[0]:g} ms, C = {TARGET_CELL[1]}; here for reference")
    )
    lines += [
        "",
        f"Targets (msgs/s ratios to smtp-source's; {where}; round trips allow: smtp-source's"
        " round trips a message over asmtp's on uvloop, the ratio latency alone would give):",
        "",
    ]
    if not baseline:
        lines.append("- no smtp-source row in this cell: no ratios")
    else:
        lines += [
            "| target | asmtp on uvloop | asmtp on asyncio | round trips allow | met |",
            "|---|---:|---:|---:|---|",
        ]
        for what, uv, std, goal in TARGETS:
            mine = medians.get(uv)
            other = medians.get(std) if std else None
            if mine is None and other is None:
                continue
            best = max(x for x in (mine, other) if x is not None) / baseline
            shown = [f"{x / baseline:.2f}x" if x else "-" for x in (mine, other)]
            met = "yes" if best >= goal else "no"
            mine_trips, base_trips = trips_of.get(uv), trips_of.get(BASELINE)
            allow = f"{base_trips / mine_trips:.2f}x" if mine_trips and base_trips else "-"
            lines.append(f"| {what} | {shown[0]} | {shown[1]} | {allow} | {met} |")
    problems = [
        f"- {client} round {i + 1}: {run.error}"
        + (f" (sink counted {run.sink_count})" if run.sink_count != run.delivered else "")
        for client, row in by_client.items()
        for i, run in enumerate(row.runs)
        if run.error or run.sink_count != run.delivered
    ]
    if problems:
        lines += ["", "Problems:", *problems]
    return lines


def render(
    cells: dict[tuple[float, int], dict[str, Row]],
    *,
    args: argparse.Namespace,
    placement: str,
    info: dict[str, str],
    versions: dict[str, str],
    size: int,
) -> str:
    loaded = os.getloadavg()[0]
    lines = [
        *header("asmtp latency benchmark", info, placement, versions),
        f"- sink: `asmtp sink --rtt MS [--chunking]` (asmtp's own, uvloop, one process) on {HOST}:"
        " each batch of replies (all that one read asked for) written one RTT after that read,"
        + (
            " the greeting two RTTs after the connection (--handshake-rtt: the TCP handshake's"
            " round trip, then the greeting's)"
            if args.handshake_rtt
            else " the greeting one RTT after the connection (the TCP handshake's round trip,"
            " which a real network adds to every fresh session, is not emulated:"
            " --handshake-rtt)"
        )
        + "; loopback otherwise",
        f"- work: N messages of {size} bytes, one recipient each, at most C connections at once;"
        f" N = {args.waves} x C, reuse rows {args.reuse_waves} x C (C sessions, each serving"
        f" about {args.reuse_waves} messages)"
        + (f", every run N = {args.messages}" if args.messages else "")
        + f"; {args.rounds} round(s), clients interleaved, order rotated each round"
        + ("; --quick" if args.quick else ""),
        "- sink offers PIPELINING; the -chunking rows' sink CHUNKING too",
        "- msgs/s: N / wall time from the go signal to the client's last result (imports"
        " excluded; smtp-source timed from its start); median (min-max) over rounds;"
        " vs smtp-source: ratio of medians in the same cell",
        "- closing s: reuse rows, the time from the last send's result to the sessions closed"
        " (QUIT to each), left out of msgs/s"
        + (
            " (not measured in this run: --skip-close, the worker exits without QUIT)"
            if args.skip_close
            else "; smtp-source -d pays its closing inside its wall time"
        ),
        "- round trips a msg: the sink's batches of replies over its messages (greeting"
        " included; smtp-source: 7, greeting, HELO, MAIL, RCPT, DATA, dot, QUIT); latency bound:"
        " C / (RTT x that), the most this many connections could do at this RTT",
        "- BDAT: the share of the sink's messages sent with BDAT; p50/p99: per message,"
        " connect (reuse rows: the send call) to its result; CPU: the client's user+system"
        " seconds per 1000 messages",
        "- sink busy / others busy: the sink's CPU and all other CPU time on the machine over"
        " the wall time, in % of one CPU (a high 'others' marks a disturbed run)",
        f"- load average at the end: {loaded:.2f} (other jobs share this machine:"
        " compare rows within a cell, not across runs of the benchmark)",
    ]
    for (rtt_ms, concurrency), by_client in cells.items():
        lines += cell_table(rtt_ms, concurrency, by_client)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="clients: " + "; ".join(f"{name}: {what}" for name, (_, _, what) in CLIENTS.items()),
    )
    parser.add_argument(
        "--rtt", type=float, action="append", help="emulated round trip in ms; repeatable"
    )
    parser.add_argument(
        "--concurrency", type=int, action="append", help="most connections at once; repeatable"
    )
    parser.add_argument("--waves", type=int, help="messages per run = WAVES x C (default 5)")
    parser.add_argument(
        "--reuse-waves", type=int, help="the reuse rows' messages = WAVES x C (default 10)"
    )
    parser.add_argument(
        "--handshake-rtt",
        action="store_true",
        help="the sink greets one more RTT late: the TCP handshake's round trip, which every"
        " fresh session pays on a real network (default: not emulated, as the targets count)",
    )
    parser.add_argument("--messages", type=int, help="messages per run, whatever C")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 2)")
    parser.add_argument(
        "--only", action="append", help="clients to run, comma-separated; repeatable"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latency-latest.md")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="RTT 50 ms, C = 200, 3 waves (reuse 10), 1 round, no settling, --skip-close:"
        " under a minute",
    )
    add_run_options(parser, "sink")
    parser.set_defaults(settle=None, hard_timeout=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-close",
        action="store_true",
        help="reuse rows: exit once every send has its result, without closing the sessions"
        " (default with --quick)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        args.concurrency = args.concurrency or [1]
        return args
    args.rtt = args.rtt or ([50.0] if args.quick else [20.0, 50.0])
    args.concurrency = args.concurrency or ([200] if args.quick else [200, 1000])
    args.waves = args.waves or (3 if args.quick else 5)
    args.reuse_waves = args.reuse_waves or 10
    args.skip_close = args.skip_close or args.quick
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.settle is None:
        args.settle = 0.0 if args.quick else 5.0
    if args.hard_timeout is None:
        args.hard_timeout = 60.0 if args.quick else 180.0
    if not all(0 < r <= MAX_RTT_MS for r in args.rtt):
        parser.error(f"--rtt must be above 0 and at most {MAX_RTT_MS:g} ms")
    if not all(1 <= c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be between 1 and 10")
    if args.messages is not None and not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages must be between 1 and {MAX_MESSAGES}")
    if not 1 <= max(args.waves, args.reuse_waves) * max(args.concurrency) <= MAX_MESSAGES:
        parser.error(f"--waves (--reuse-waves) x --concurrency must be at most {MAX_MESSAGES}")
    select_clients(parser, args, list(CLIENTS))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(
            args.worker, args.port, args.messages, args.concurrency[0], args.skip_close
        )
    info = machine(("uvloop", "aiosmtplib"))
    sink_cpus, cpus, placement = place(args.pin, args.settle, "sink")

    def count_for(client: str, concurrency: int) -> int:
        waves = args.reuse_waves if "-reuse" in client else args.waves
        return int(args.messages or waves * concurrency)

    cells = {
        (rtt, c): {client: Row() for client in args.clients}
        for rtt in args.rtt
        for c in args.concurrency
    }
    sinks: dict[tuple[float, bool], SinkProcess] = {}

    def sink_for(rtt: float, client: str) -> SinkProcess:
        key = (rtt, CLIENTS[client][1] == "chunking")
        sink = sinks.get(key)
        if sink is not None and sink.exit_reason() is not None:
            print(f"the sink {sink.exit_reason()}; starting another", file=sys.stderr)
            sink.stop()
            sink = None
        if sink is None:
            sink = sinks[key] = SinkProcess(rtt, key[1], args.handshake_rtt, sink_cpus)
            print(f"sink: {sink.name}, port {sink.port}", file=sys.stderr)
        return sink

    started = time.monotonic()
    try:
        for round_index in range(args.rounds):
            shift = round_index % len(args.clients)
            order = args.clients[shift:] + args.clients[:shift]
            for (rtt, concurrency), by_client in cells.items():
                for client in order:
                    count = count_for(client, concurrency)
                    row = by_client[client]
                    if row.unavailable:
                        continue
                    if args.settle > 0:
                        wait_for_quiet(args.settle)
                    sink = sink_for(rtt, client)
                    if client.startswith("smtp-source"):
                        reuse = client.endswith("-reuse")
                        outcome = run_smtp_source(
                            sink, count, concurrency, reuse, args.hard_timeout, cpus
                        )
                    else:
                        outcome = run_python_client(client, sink, count, concurrency, args, cpus)
                    if isinstance(outcome, str):
                        for cell in cells.values():
                            cell[client].unavailable = outcome
                        print(f"{client}: unavailable ({outcome})", file=sys.stderr)
                        continue
                    row.runs.append(outcome)
                    trips = outcome.round_trips / outcome.sink_count if outcome.sink_count else 0
                    print(
                        f"round {round_index + 1}/{args.rounds} RTT {rtt:g} ms C={concurrency}"
                        f" {client}: {rate(outcome):,.0f} msgs/s,"
                        f" {outcome.delivered}/{count} delivered, {trips:.2f} round trips a msg"
                        + (f"; {outcome.error}" if outcome.error else ""),
                        file=sys.stderr,
                    )
    finally:
        for sink in sinks.values():
            sink.stop()
    versions = {
        client: run.version
        for cell in cells.values()
        for client, row in cell.items()
        for run in row.runs
        if run.version
    }
    report = render(
        cells,
        args=args,
        placement=placement,
        info=info,
        versions=versions,
        size=len(fanout.build_message()),
    )
    report += f"\nWhole benchmark: {time.monotonic() - started:.0f} s.\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    raw = {
        f"rtt={rtt:g}ms,c={c}": {
            client: {
                "unavailable": row.unavailable,
                "runs": [fanout.summary(run) for run in row.runs],
            }
            for client, row in by_client.items()
        }
        for (rtt, c), by_client in cells.items()
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"written: {args.out} (raw runs: {args.out.with_suffix('.json')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

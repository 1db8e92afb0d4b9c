"""Side-by-side fan-out benchmark: asmtp against its peers on one machine, one local sink.

This file owns the whole benchmark: the sink (Postfix's smtp-sink when installed, else an
aiosmtpd sink), the parent that runs every client in a fresh subprocess in interleaved rounds
and measures it, the worker mode that runs one client once, and the markdown report.

The work is the same for every client: N messages of about 2 KB, each to its own recipient
(rcpt-00001@example.test ...) over its own connection, at most C connections at once.

    python benchmarks/fanout.py --quick
    python benchmarks/fanout.py --messages 5000 --concurrency 200 --rounds 3
    python benchmarks/fanout.py --only aiosmtplib,ceiling --concurrency 50

Documented peers: aiosmtplib, the standard library's smtplib, Postfix's smtp-source and
smtp-sink, aiosmtpd (the fallback sink), and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
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

from _common import (
    HELO,
    HERE,
    HOST,
    REPO,
    SENDER,
    add_run_options,
    benchmark_message,
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

MESSAGE_TIMEOUT = 30.0  # seconds, per message, in every client
MAX_MESSAGES = 100_000
MAX_CONCURRENCY = 1_000

# name -> (event loop, what it is). The loop decides which peer row a client is compared with.
CLIENTS: dict[str, tuple[str, str]] = {
    "asmtp": ("asyncio", "asmtp.send on the standard asyncio loop"),
    "asmtp-uvloop": ("uvloop", "asmtp.send on uvloop"),
    "asmtp-mypyc": ("uvloop", "asmtp.send on uvloop, hot path compiled (ASMTP_COMPILE=1)"),
    "aiosmtplib": ("asyncio", "aiosmtplib.send per recipient under a semaphore"),
    "aiosmtplib-uvloop": ("uvloop", "the same on uvloop"),
    "smtplib-threads": ("threads", "smtplib.SMTP per message in a thread pool of C"),
    "bare": ("asyncio", "bare_client.py: BufferedProtocol, one command per write"),
    "bare-uvloop": ("uvloop", "the same on uvloop"),
    "bare-pipelining": ("uvloop", "bare_client.py on uvloop, MAIL+RCPT+DATA in one write"),
    "ceiling": ("asyncio", "ceiling_client.py: the session run from the read callback"),
    "ceiling-uvloop": ("uvloop", "the same on uvloop: the ceiling for Python"),
    "smtp-source": ("C", "Postfix's C load generator (no per-message latency)"),
}
PEERS = {"aiosmtplib": "aiosmtplib", "ceiling": "ceiling"}  # the "vs" columns, by base name


def peer_for(client: str, base: str) -> str:
    """The row a client is compared with: the peer on the same loop (uvloop rows against the
    uvloop peer; threads and C against the standard-loop peer)."""
    return f"{base}-uvloop" if CLIENTS[client][0] == "uvloop" else base


# ---------------------------------------------------------------------------- the work


def build_message() -> bytes:
    """The one message every client sends: about 2 KB, CRLF line ends."""
    return benchmark_message(
        to="Benchmark list <list@example.test>",
        subject="asmtp fan-out benchmark",
        message_id="<fanout.1@bench.example.test>",
    )


def build_recipients(count: int) -> list[str]:
    width = max(5, len(str(count)))
    return [f"rcpt-{i:0{width}d}@example.test" for i in range(1, count + 1)]


# ---------------------------------------------------------------------------- worker side
# Each runner sends the message to every recipient and returns, per recipient,
# (delivered?, seconds from connect to the reply to QUIT, error text).

Outcomes = list[tuple[bool, float, str]]


async def run_asmtp(port: int, message: bytes, recipients: list[str], concurrency: int) -> Outcomes:
    import asmtp

    report = await asmtp.send(
        message,
        sender=SENDER,
        recipients=recipients,
        relay=asmtp.Relay(HOST, port, tls="none", helo=HELO),
        concurrency=concurrency,
        timeout=MESSAGE_TIMEOUT,
    )
    return [
        (
            r.status == "delivered",
            r.elapsed,
            "" if r.status == "delivered" else f"{r.status} {r.code} at {r.stage}: {r.message}",
        )
        for r in report.results
    ]


async def run_aiosmtplib(
    port: int, message: bytes, recipients: list[str], concurrency: int
) -> Outcomes:
    import aiosmtplib

    semaphore = asyncio.Semaphore(concurrency)

    async def one(recipient: str) -> tuple[bool, float, str]:
        async with semaphore:
            start = time.perf_counter()
            try:
                await aiosmtplib.send(
                    message,
                    sender=SENDER,
                    recipients=[recipient],
                    hostname=HOST,
                    port=port,
                    local_hostname=HELO,
                    use_tls=False,
                    start_tls=False,
                    timeout=MESSAGE_TIMEOUT,
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                return False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
            return True, time.perf_counter() - start, ""

    return list(await asyncio.gather(*(one(r) for r in recipients)))


def run_smtplib(port: int, message: bytes, recipients: list[str], concurrency: int) -> Outcomes:
    import smtplib
    from concurrent.futures import ThreadPoolExecutor

    def one(recipient: str) -> tuple[bool, float, str]:
        start = time.perf_counter()
        try:
            client = smtplib.SMTP(HOST, port, local_hostname=HELO, timeout=MESSAGE_TIMEOUT)
            try:
                client.sendmail(SENDER, [recipient], message)
                client.quit()
            finally:
                client.close()
        except (smtplib.SMTPException, OSError) as exc:
            return False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
        return True, time.perf_counter() - start, ""

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, recipients))


def bare_runner(pipelining: bool) -> Callable[..., Any]:
    async def run(port: int, message: bytes, recipients: list[str], concurrency: int) -> Outcomes:
        import bare_client

        outcomes = await bare_client.send_all(
            HOST,
            port,
            message,
            SENDER,
            recipients,
            concurrency=concurrency,
            helo=HELO,
            pipelining=pipelining,
            message_timeout=MESSAGE_TIMEOUT,
        )
        return [(o.ok, o.elapsed, o.error) for o in outcomes]

    return run


async def run_ceiling(
    port: int, message: bytes, recipients: list[str], concurrency: int
) -> Outcomes:
    import ceiling_client

    return await ceiling_client.send_all(
        HOST,
        port,
        message,
        SENDER,
        recipients,
        concurrency=concurrency,
        helo=HELO,
        message_timeout=MESSAGE_TIMEOUT,
    )


def base_of(client: str) -> str:
    """The library a client row runs: "asmtp", "aiosmtplib", "bare", ..."""
    return "asmtp" if client.startswith("asmtp") else client.removesuffix("-uvloop")


def compile_asmtp(directory: Path) -> str | None:
    """Build asmtp with its hot path compiled by mypyc into ``directory``, as
    ``ASMTP_COMPILE=1 pip install .`` does (hatch_build.py's own function), for the
    asmtp-mypyc row; None when built, else why not."""
    sys.path.insert(0, str(REPO))
    try:
        import mypyc  # noqa: F401
        from hatch_build import compile_in_place
    except ImportError as exc:
        return f"cannot compile here ({exc}): pip install -e '.[test]' brings what it needs"
    src = directory / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("*.so", "*.pyd"))
    try:
        compile_in_place(src, directory)
    except RuntimeError as exc:
        return " | ".join(str(exc).strip().splitlines()[-3:])
    return None


def check_available(client: str) -> str | None:
    """None when the client can run in this interpreter, else why not."""
    base = base_of(client)
    try:
        if CLIENTS[client][0] == "uvloop":
            import uvloop  # noqa: F401
        if base == "asmtp":
            import asmtp

            missing = [name for name in ("send", "Relay") if not hasattr(asmtp, name)]
            if missing:
                return f"asmtp has no {', '.join(missing)} yet"
        elif base == "aiosmtplib":
            import aiosmtplib  # noqa: F401
    except ImportError as exc:
        return f"cannot import: {exc}"
    return None


def version_of(client: str) -> str:
    base = base_of(client)
    if base == "asmtp":
        import asmtp
        import asmtp._delivery.session

        compiled = Path(asmtp._delivery.session.__file__).suffix in (".so", ".pyd")
        where = Path(asmtp.__file__).parent
        return f"asmtp {asmtp.__version__} ({where}{', compiled' if compiled else ''})"
    if base == "aiosmtplib":
        import aiosmtplib

        return f"aiosmtplib {aiosmtplib.__version__}"
    return ""


def worker_main(
    client: str, port: int, count: int, concurrency: int, asmtp_path: str | None = None
) -> int:
    """Run one client once. Protocol with the parent, one JSON line each way on stdout:
    ``{"ready"...}`` after imports and setup; wait for ``go`` on stdin; ``{"result"...}``.
    ``asmtp_path``: import asmtp from there (the compiled build of the asmtp-mypyc row)."""
    sys.path.insert(0, str(HERE))  # bare_client, ceiling_client
    if asmtp_path:
        sys.path.insert(0, asmtp_path)
    if client.startswith("asmtp"):
        ensure_asmtp_importable()
    why = check_available(client)
    if why is not None:
        emit({"unavailable": why})
        return 0
    message = build_message()
    recipients = build_recipients(count)
    runners: dict[str, Callable[..., Any]] = {
        "asmtp": run_asmtp,
        "aiosmtplib": run_aiosmtplib,
        "bare": bare_runner(pipelining=False),
        "bare-pipelining": bare_runner(pipelining=True),
        "ceiling": run_ceiling,
    }
    emit({"ready": True, "cpu": cpu_self(), "version": version_of(client)})
    if sys.stdin.readline().strip() != "go":
        return 1
    if client == "smtplib-threads":
        outcomes = run_smtplib(port, message, recipients, concurrency)
    else:
        run = runners[base_of(client)]
        coro = run(port, message, recipients, concurrency)
        if CLIENTS[client][0] == "uvloop":
            import uvloop

            outcomes = uvloop.run(coro)
        else:
            outcomes = asyncio.run(coro)
    errors = Counter(error for ok, _, error in outcomes if not ok)
    emit(
        {
            "result": True,
            "cpu": cpu_self(),
            "delivered": sum(1 for ok, _, _ in outcomes if ok),
            "failed": sum(1 for ok, _, _ in outcomes if not ok),
            "errors": dict(errors.most_common(5)),
            "latencies": [round(elapsed, 6) for ok, elapsed, _ in outcomes if ok],
        }
    )
    return 0


# ---------------------------------------------------------------------------- the sink

#: a whole counter update, as both sinks end each one ("sess=1 quit=1 mesg=1\r")
COUNTER = re.compile(rb"mesg=(\d+)\r")


def find_smtp_sink() -> str | None:
    for name in ("smtp-sink", "/usr/sbin/smtp-sink"):
        path = shutil.which(name)
        if path:
            return path
    return None


def find_smtp_source() -> str | None:
    for name in ("smtp-source", "/usr/sbin/smtp-source"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Sink:
    """The local SMTP sink, in its own process; counts the messages it accepted
    (from smtp-sink's -c counters, or the same format from the aiosmtpd sink)."""

    def __init__(self, kind: str, session_limit: int, cpus: set[int] | None) -> None:
        self.port = free_port()
        smtp_sink = find_smtp_sink()
        if kind == "smtp-sink" or (kind == "auto" and smtp_sink):
            if smtp_sink is None:
                raise SystemExit("smtp-sink is not installed")
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            # -c: counters on stdout; -m: most sessions at once; last: the listen backlog.
            # PIPELINING is offered by default (-p would turn it off).
            argv = [smtp_sink, *user, "-c", "-m", str(session_limit)]
            argv += [f"{HOST}:{self.port}", str(session_limit)]
            self.name = "Postfix smtp-sink (" + " ".join(argv[1:-2]) + ")"
            self.limiting = False
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--sink-worker"]
            argv += ["--port", str(self.port), "--backlog", str(session_limit)]
            self.name = "aiosmtpd sink in a subprocess"
            self.limiting = True
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        # The counters go to a file, read only when asked: a reader woken at every
        # update would compete with the sink for its CPU (and slow the fastest clients).
        self._counters = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self._counters, stderr=self._stderr)
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        self._wait_ready(10.0)
        self.banner_has_pipelining = self._offers_pipelining()

    def _wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the sink exited with status {self.proc.returncode}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the sink did not answer on port {self.port} within {limit} s")

    def _offers_pipelining(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            sock.recv(512)
            sock.sendall(b"EHLO probe.example.test\r\n")
            reply = b""
            deadline = time.monotonic() + 5
            while not re.search(rb"(^|\n)\d{3}( [^\r\n]*)?\r?\n$", reply):
                if time.monotonic() > deadline:
                    break
                reply += sock.recv(4096)
            sock.sendall(b"QUIT\r\n")
            return b"PIPELINING" in reply.upper()

    def messages(self) -> int:
        """The sink's message count now: the last whole update at the end of its output."""
        fd = self._counters.fileno()
        size = os.fstat(fd).st_size
        found = COUNTER.findall(os.pread(fd, 256, max(0, size - 256)))
        return int(found[-1]) if found else 0

    def exit_reason(self) -> str | None:
        """None while the sink runs; else how it ended."""
        return exit_reason(self.proc, self._stderr)

    def wait_for_count(self, at_least: int, limit: float = 2.0) -> int:
        """The counter, once it reaches ``at_least`` or ``limit`` seconds pass."""
        deadline = time.monotonic() + limit
        while (count := self.messages()) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        return count

    def cpu(self) -> float:
        """The sink's CPU seconds so far (from /proc; 0 where there is none)."""
        return process_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        reap(self.proc)
        self._counters.close()
        self._stderr.close()


def sink_worker_main(port: int, backlog: int) -> int:
    """The fallback sink: aiosmtpd accepting everything, printing ``mesg=N`` per message."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        def __init__(self) -> None:
            self.count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.count += 1
            sys.stdout.write(f"mesg={self.count}\r")
            sys.stdout.flush()
            return "250 2.0.0 Ok"

    handler = Handler()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.example.test"), HOST, port, backlog=backlog
        )
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    return 0


# ---------------------------------------------------------------------------- parent side


@dataclass
class Run:
    """One client run, as measured by the parent."""

    wall: float = 0.0
    cpu: float = 0.0
    sink_cpu: float = 0.0
    others_cpu: float = 0.0  # every CPU's busy time in the window, less the client's and sink's
    delivered: int = 0
    sink_count: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str = ""
    version: str = ""


@dataclass
class Row:
    runs: list[Run] = field(default_factory=list)
    unavailable: str = ""


def run_python_client(
    client: str,
    sink: Sink,
    count: int,
    concurrency: int,
    hard_timeout: float,
    cpus: set[int] | None,
    asmtp_path: str | None = None,
) -> Run | str:
    """One run in a fresh interpreter; a str means the client is unavailable."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", client]
    argv += ["--port", str(sink.port), "--messages", str(count), "--concurrency", str(concurrency)]
    if asmtp_path:
        argv += ["--asmtp-path", asmtp_path]
    worker = run_worker_process(argv, cpus, hard_timeout, lambda: (sink.messages(), sink.cpu()))
    if isinstance(worker, str):
        return worker
    run = Run(wall=worker.elapsed, error=worker.error, version=worker.version)
    if worker.error or worker.usage is None:
        return run
    messages_before, sink_cpu_before = worker.before
    result, usage = worker.result, worker.usage
    # The client's CPU for the work alone: its total less what it had used when ready.
    run.cpu = usage.ru_utime + usage.ru_stime - float(worker.ready["cpu"])
    run.delivered = int(result["delivered"])
    run.latencies = [float(x) for x in result["latencies"]]
    run.sink_count = sink.wait_for_count(messages_before + run.delivered) - messages_before
    run.sink_cpu = sink.cpu() - sink_cpu_before
    run.others_cpu = max(0.0, worker.busy - run.cpu - run.sink_cpu)
    if result["failed"]:
        run.error = f"{result['failed']} failed: {result['errors']}"
    return run


def run_smtp_source(
    sink: Sink,
    count: int,
    concurrency: int,
    body_size: int,
    hard_timeout: float,
    cpus: set[int] | None,
) -> Run | str:
    smtp_source = find_smtp_source()
    if smtp_source is None:
        return "smtp-source is not installed"
    # -N puts a sequence number in front of the recipient, so each message has its own.
    argv = [smtp_source, "-l", str(body_size), "-m", str(count), "-s", str(concurrency)]
    argv += ["-N", "-M", HELO, "-f", SENDER, "-t", "rcpt@example.test", f"{HOST}:{sink.port}"]
    run = Run()
    with tempfile.TemporaryFile() as output:
        messages_before, sink_cpu_before = sink.messages(), sink.cpu()
        busy_before = machine_busy()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        if cpus:  # a moment after it starts: its start-up is a millisecond of C
            os.sched_setaffinity(proc.pid, cpus)
        killer = threading.Timer(hard_timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        run.wall = time.perf_counter() - start
        busy = machine_busy() - busy_before
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.cpu = usage.ru_utime + usage.ru_stime
        run.sink_count = sink.wait_for_count(messages_before + count) - messages_before
        run.sink_cpu = sink.cpu() - sink_cpu_before
        run.others_cpu = max(0.0, busy - run.cpu - run.sink_cpu)
        run.delivered = run.sink_count  # it reports no per-message result; the sink counts
        if proc.returncode != 0:
            run.error = f"smtp-source exited with {proc.returncode}: {tail(output)}"
    return run


def summary(run: Run) -> dict[str, Any]:
    """A run for the raw JSON file: everything but the latency list, which becomes p50/p99."""
    out = {k: v for k, v in run.__dict__.items() if k != "latencies"}
    if run.latencies:
        out["p50"], out["p99"] = percentile(run.latencies, 0.5), percentile(run.latencies, 0.99)
    return out


def run_client(
    client: str,
    sink: Sink,
    args: argparse.Namespace,
    concurrency: int,
    body_size: int,
    cpus: set[int] | None,
) -> Run | str:
    if client == "smtp-source":
        return run_smtp_source(sink, args.messages, concurrency, body_size, args.hard_timeout, cpus)
    path = args.compiled if client == "asmtp-mypyc" else None
    return run_python_client(
        client, sink, args.messages, concurrency, args.hard_timeout, cpus, path
    )


def rate(run: Run, count: int) -> float:
    return count / run.wall if run.wall > 0 else 0.0


def render(
    rows: dict[int, dict[str, Row]],
    *,
    placement: str,
    sink_deaths: Sequence[str],
    count: int,
    rounds: int,
    size: int,
    sink: Sink,
    info: dict[str, str],
    versions: dict[str, str],
) -> str:
    lines = [
        *header("asmtp fan-out benchmark", info, placement, versions),
        f"- sink: {sink.name} on {HOST}, PIPELINING "
        + ("offered" if sink.banner_has_pipelining else "not offered"),
        f"- work: {count} messages of {size} bytes, one recipient and one connection each;"
        f" {rounds} round(s), clients interleaved, order rotated each round",
        "- msgs/s: messages / wall time from the go signal to the client's last result"
        " (interpreter start and imports excluded); median (min-max) over rounds",
        "- CPU: the client process's user+system seconds for the work (total from wait4, less"
        " what it had used when ready), per 1000 messages, median over rounds",
        "- latency: per message, from the start of connect to the reply to QUIT"
        " (asmtp: its RecipientResult.elapsed), delivered messages of all rounds pooled",
        "- vs: msgs/s ratio to the peer on the same loop (uvloop rows to the uvloop peer;"
        " threads and C rows to the standard-loop peer); above 1 is faster",
        "- delivered: the client's own count over all rounds / messages sent (the sink's count is"
        " checked against it under Problems); sink busy: the sink's CPU time over the wall time"
        " (near 100% means the sink set the pace); others busy: all other CPU time on the machine"
        " in the same window (kernel network work not charged to a process, and any other load:"
        " a high figure marks a disturbed run), in % of one CPU, median over rounds",
    ]
    if sink.limiting:
        lines.append(
            "- NOTE: the sink is aiosmtpd (Python; smtp-sink was not installed or not chosen),"
            " several times slower than smtp-sink: it limits every client (see sink busy),"
            " so compare rows, not absolute numbers"
        )
    lines += [
        f"- the sink {death}; it was restarted and that run repeated" for death in sink_deaths
    ]
    if not sink.banner_has_pipelining:
        lines.append("- the sink offers no PIPELINING: bare-pipelining runs as bare-uvloop does")
    for concurrency, by_client in rows.items():
        lines += [
            "",
            f"## C = {concurrency}",
            "",
            "| client | msgs/s median (min-max) | CPU s per 1000 msgs | p50 ms | p99 ms"
            " | vs aiosmtplib | vs ceiling | delivered | sink busy | others busy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        medians: dict[str, float] = {}
        for client, row in by_client.items():
            good = [run for run in row.runs if not run.error or run.delivered]
            if good:
                medians[client] = statistics.median(rate(run, count) for run in good)
        for client, row in by_client.items():
            if row.unavailable:
                lines.append(f"| {client} | unavailable: {row.unavailable} |" + " |" * 8)
                continue
            good = [run for run in row.runs if not run.error or run.delivered]
            if not good:
                reason = row.runs[0].error if row.runs else "not run"
                lines.append(f"| {client} | failed: {reason} |" + " |" * 8)
                continue
            rates = [rate(run, count) for run in good]
            cpu = statistics.median(run.cpu / count * 1000 for run in good)
            latencies = [x for run in good for x in run.latencies]
            p50 = percentile(latencies, 0.50) * 1000 if latencies else None
            p99 = percentile(latencies, 0.99) * 1000 if latencies else None
            ratios = []
            for base in PEERS.values():
                peer = medians.get(peer_for(client, base))
                ratios.append(f"{medians[client] / peer:.2f}x" if peer else "n/a")
            delivered = sum(run.delivered for run in good)
            busy = statistics.median(run.sink_cpu / run.wall * 100 for run in good)
            others = statistics.median(run.others_cpu / run.wall * 100 for run in good)
            flag = "" if all(not run.error for run in row.runs) else " (!)"
            spread = f"{fmt(min(rates), 0)}-{fmt(max(rates), 0)}"
            lines.append(
                f"| {client} | {fmt(medians[client], 0)} ({spread})"
                f" | {fmt(cpu, 3)} | {fmt(p50)} | {fmt(p99)} | {ratios[0]} | {ratios[1]}"
                f" | {delivered}/{count * len(row.runs)}{flag} | {busy:.0f}% | {others:.0f}% |"
            )
        cpus = {
            client: statistics.median(run.cpu / count * 1000 for run in row.runs)
            for client, row in by_client.items()
            if client in medians and row.runs
        }
        lines += targets(medians, cpus, pipelining=sink.banner_has_pipelining)
        problems = [
            f"- {client} round {i + 1}: {run.error}"
            + (f" (sink counted {run.sink_count})" if run.sink_count != run.delivered else "")
            for client, row in by_client.items()
            for i, run in enumerate(row.runs)
            if run.error or run.sink_count != run.delivered
        ]
        if problems:
            lines += ["", "Problems:", *problems]
    return "\n".join(lines) + "\n"


# What asmtp aims for (issue #18): (what, client, its peer, the no-library client in the
# same place, how the ratio is taken, the ratio it must reach). "rate" is msgs/s over the
# peer's; "cpu" is the peer's CPU per message over the client's (above 1: less CPU than
# the peer). The no-library client is the callback-driven ceiling (ceiling_client.py).
TARGETS = (
    ("uvloop: CPU per message within 1.3x the ceiling client's", "asmtp-uvloop",
     "ceiling-uvloop", None, "cpu", 1 / 1.3),
    ("compiled (uvloop): CPU per message within 1.15x the ceiling client's", "asmtp-mypyc",
     "ceiling-uvloop", None, "cpu", 1 / 1.15),
    ("uvloop: msgs/s at least 1.2x smtp-source's", "asmtp-uvloop", "smtp-source",
     "ceiling-uvloop", "rate", 1.2),
    ("standard loop: at least 2x aiosmtplib's msgs/s", "asmtp", "aiosmtplib", "ceiling",
     "rate", 2.0),
)  # fmt: skip


def targets(medians: dict[str, float], cpus: dict[str, float], *, pipelining: bool) -> list[str]:
    """The target table for one concurrency: asmtp's ratio (pure Python, and compiled
    where measured), the same ratio for the ceiling client (what no library can beat on
    this machine), and whether asmtp met it."""

    def ratio(client: str | None, peer: str, how: str) -> float | None:
        table = medians if how == "rate" else cpus
        if client not in table or peer not in table or not table[peer] or not table[client]:
            return None
        return table[client] / table[peer] if how == "rate" else table[peer] / table[client]

    def shown(value: float | None, how: str) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}x" if how == "rate" else f"{1 / value:.2f}x the CPU"

    lines = [
        "",
        "Targets (ratios of medians; compiled: the asmtp-mypyc row; the ceiling column is the"
        " same ratio for the callback-driven client with no library, the limit for Python"
        " here):",
        "",
        "| target | asmtp | asmtp compiled | ceiling client | met |",
        "|---|---:|---:|---:|---|",
    ]
    for what, client, peer, ceiling, how, goal in TARGETS:
        if "PIPELINING" in what and not pipelining:
            continue
        mine = ratio(client, peer, how)
        if mine is None:
            continue
        compiled = ratio("asmtp-mypyc", peer, how) if client == "asmtp-uvloop" else None
        met = "yes" if mine >= goal else "compiled" if compiled and compiled >= goal else "no"
        lines.append(
            f"| {what} | {shown(mine, how)} | {shown(compiled, how)}"
            f" | {shown(ratio(ceiling, peer, how), how) if ceiling else '-'} | {met} |"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="clients: " + "; ".join(f"{name}: {what}" for name, (_, what) in CLIENTS.items()),
    )
    parser.add_argument("--messages", type=int, help="messages per run (default 5000)")
    parser.add_argument(
        "--concurrency", type=int, action="append", help="most connections at once; repeatable"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--only", action="append", help="clients to run, comma-separated; repeatable"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fanout-latest.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 messages, 1 round")
    parser.add_argument(
        "--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto", help="default auto"
    )
    add_run_options(parser, "sink")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--asmtp-path", help=argparse.SUPPRESS)
    parser.add_argument("--sink-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backlog", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = 500 if args.quick else 5000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.concurrency = args.concurrency or [200, 1000]
    if not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages must be between 1 and {MAX_MESSAGES}")
    if not all(1 <= c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    select_clients(parser, args, list(CLIENTS))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(
            args.worker, args.port, args.messages, args.concurrency[0], args.asmtp_path
        )
    if args.sink_worker:
        return sink_worker_main(args.port, args.backlog)

    size = len(build_message())
    body_size = size - len(build_message().split(b"\r\n\r\n", 1)[0]) - 4
    info = machine()  # before pinning this process changes what nproc would say
    # The sink (and this parent, idle but for reading the sink's counters) on one CPU, each
    # client on another.
    sink_cpus, cpus, placement = place(args.pin, args.settle, "sink")

    def start_sink() -> Sink:
        session_limit = max(1024, 2 * max(args.concurrency) + 64)
        sink = Sink(args.sink, session_limit, sink_cpus)
        print(f"sink: {sink.name}, port {sink.port}", file=sys.stderr)
        return sink

    sink = start_sink()
    sink_deaths: list[str] = []
    rows = {c: {client: Row() for client in args.clients} for c in args.concurrency}
    build = tempfile.TemporaryDirectory(prefix="asmtp-mypyc-")
    args.compiled = None
    if "asmtp-mypyc" in args.clients:
        print("compiling asmtp's hot path with mypyc for the asmtp-mypyc row", file=sys.stderr)
        why = compile_asmtp(Path(build.name))
        if why is None:
            args.compiled = str(Path(build.name) / "src")
        else:
            for by_client in rows.values():
                by_client["asmtp-mypyc"].unavailable = why
    versions: dict[str, str] = {}
    try:
        for round_index in range(args.rounds):
            shift = round_index % len(args.clients)
            order = args.clients[shift:] + args.clients[:shift]
            for concurrency in args.concurrency:
                for client in order:
                    row = rows[concurrency][client]
                    if row.unavailable:
                        continue
                    if args.settle > 0:
                        wait_for_quiet(args.settle)
                    outcome = run_client(client, sink, args, concurrency, body_size, cpus)
                    death = sink.exit_reason()
                    if death is not None:
                        # Not the client's doing (another process may have killed it): restart
                        # the sink and run this client again, once.
                        print(f"the sink {death}; restarting it", file=sys.stderr)
                        sink_deaths.append(f"{death}, during {client} at C={concurrency}")
                        sink.stop()
                        sink = start_sink()
                        outcome = run_client(client, sink, args, concurrency, body_size, cpus)
                        death = sink.exit_reason()
                        if death is not None and isinstance(outcome, Run):
                            outcome.error = f"the sink {death} during the run"
                    if isinstance(outcome, str):
                        for by_client in rows.values():
                            by_client[client].unavailable = outcome
                        print(f"{client}: unavailable ({outcome})", file=sys.stderr)
                        continue
                    row.runs.append(outcome)
                    print(
                        f"round {round_index + 1}/{args.rounds} C={concurrency} {client}:"
                        f" {rate(outcome, args.messages):,.0f} msgs/s,"
                        f" {outcome.delivered}/{args.messages} delivered,"
                        f" sink counted {outcome.sink_count}"
                        + (f"; {outcome.error}" if outcome.error else ""),
                        file=sys.stderr,
                    )
    finally:
        sink.stop()
        build.cleanup()
    for by_client in rows.values():
        for client, row in by_client.items():
            for run in row.runs:
                if run.version:
                    versions[client.removesuffix("-uvloop")] = run.version
    report = render(
        rows,
        placement=placement,
        sink_deaths=sink_deaths,
        count=args.messages,
        rounds=args.rounds,
        size=size,
        sink=sink,
        info=info,
        versions=versions,
    )
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    raw = {
        str(c): {
            client: {"unavailable": row.unavailable, "runs": [summary(run) for run in row.runs]}
            for client, row in by_client.items()
        }
        for c, by_client in rows.items()
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw))
    print(f"written: {args.out} (raw runs: {args.out.with_suffix('.json')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmark scripts (fanout.py, pool.py) share; not a benchmark of its own.

This module owns: the common constants (loopback host, envelope sender, HELO name, the
checkout's paths), the 2 KB test message, the worker side's small pieces (its own CPU time,
one JSON line out, making asmtp importable), the parent side's measuring (a worker run in
a fresh interpreter from "ready" through "go" to its result line, a process's CPU time from
/proc, the machine's busy time from /proc/stat, waiting for other load to pass, a
subprocess's exit reason and stderr tail, CPU pinning), the shared command-line options
and client selection, and the report's shared pieces (machine info, the header lines, the
nearest-rank percentile, number formatting).

The scripts run as ``python benchmarks/NAME.py``, so this directory is on ``sys.path`` and
they ``import _common``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email.policy
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
SENDER = "bench@example.test"
HELO = "bench.example.test"


# ---------------------------------------------------------------------------- the work


def benchmark_message(*, to: str, subject: str, message_id: str) -> bytes:
    """The test message: about 2 KB, CRLF line ends; only the named headers differ."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f"Benchmark <{SENDER}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    msg["Message-ID"] = message_id
    line = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs."
    msg.set_content("\n".join(f"{i:02d} {line}" for i in range(1, 24)) + "\n")
    return msg.as_bytes()


# ---------------------------------------------------------------------------- worker side


def cpu_self() -> float:
    """This process's user+system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (the worker/parent protocol)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ensure_asmtp_importable() -> None:
    """The installed asmtp if there is one, else the checkout's src/."""
    with contextlib.suppress(ImportError):
        import asmtp  # noqa: F401
    if "asmtp" not in sys.modules:
        sys.path.insert(0, str(REPO / "src"))


# ---------------------------------------------------------------------------- parent side


def process_cpu(pid: int) -> float:
    """A process's CPU seconds so far (from /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Seconds all CPUs together have spent busy since boot (/proc/stat: user, nice, system,
    irq, softirq, steal); 0 where there is no /proc."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit: float, threshold: float = 0.2, sample: float = 0.25) -> float:
    """Wait, up to ``limit`` seconds, until the machine is idle but for ``threshold`` of one
    CPU over a ``sample`` (other people's builds skew a run far more than rounds can average
    out). Returns the busy fraction last seen."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy()
        time.sleep(sample)
        load = (machine_busy() - before) / sample
        if load <= threshold or time.monotonic() >= deadline:
            return load


def tail(stream: IO[bytes], lines: int = 3) -> str:
    """The last ``lines`` lines of a binary file, joined with " / "."""
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip().splitlines()
    return " / ".join(text[-lines:]) or "no output"


def exit_reason(proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> str | None:
    """None while the process runs; else how it ended, with the tail of its stderr."""
    status = proc.poll()
    if status is None:
        return None
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    return f"{how} ({tail(stderr)})"


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a process that has been asked to stop; kill it after 5 s."""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class WorkerRun:
    """What the parent saw of one worker: ``error`` set means no usable result."""

    error: str = ""
    version: str = ""
    ready: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    before: Any = None  # what ``before_go`` returned
    elapsed: float = 0.0  # the go signal to the result line, timed in the parent
    busy: float = 0.0  # the machine's busy CPU seconds in the same window
    usage: resource.struct_rusage | None = None  # the worker's total, from wait4


def run_worker_process(
    argv: Sequence[str],
    cpus: set[int] | None,
    hard_timeout: float,
    before_go: Callable[[], Any],
) -> WorkerRun | str:
    """One worker run in a fresh interpreter; a str means the client is unavailable.

    The worker prints ``{"ready"...}`` (or ``{"unavailable": why}``), waits for ``go`` on
    stdin and prints ``{"result"...}``. ``before_go`` is called just before the go signal
    (to read the server's counters); the worker is killed after ``hard_timeout`` seconds."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        if cpus:  # before "go", so the measured work runs only there
            os.sched_setaffinity(proc.pid, cpus)
        assert proc.stdin is not None and proc.stdout is not None
        killer = threading.Timer(hard_timeout, proc.kill)
        killer.start()
        run = WorkerRun()
        result: dict[str, Any] = {}
        try:
            ready = json.loads(proc.stdout.readline() or b"{}")
            if "unavailable" in ready:
                return str(ready["unavailable"])
            if not ready.get("ready"):
                run.error = f"worker died before starting: {tail(errors)}"
                return run
            run.ready = ready
            run.version = str(ready.get("version", ""))
            run.before = before_go()
            busy_before = machine_busy()
            start = time.perf_counter()
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            run.elapsed = time.perf_counter() - start
            run.busy = machine_busy() - busy_before
            result = json.loads(line or b"{}")
        finally:
            killer.cancel()
            with contextlib.suppress(OSError):
                proc.stdin.close()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            proc.stdout.close()
        if not result.get("result"):
            reason = "killed at the hard timeout" if proc.returncode < 0 else tail(errors)
            run.error = f"worker failed ({reason})"
            return run
        run.result = result
        run.usage = usage
        return run


def place(pin: bool, settle: float, server: str) -> tuple[set[int] | None, set[int] | None, str]:
    """Pin this parent (and so the ``server`` it starts) to the first CPU and each client to
    the second, when asked and there are two: every client gets the same one core, whatever
    the scheduler does. Returns (the server's CPUs, each client's CPUs, the placement line);
    no pinning is None, None."""
    available = sorted(os.sched_getaffinity(0))
    cpus: set[int] | None = None
    placement = f"not pinned ({len(available)} CPUs shared by client and {server})"
    if pin and len(available) >= 2:
        os.sched_setaffinity(0, {available[0]})
        cpus = {available[1]}
        placement = f"{server} pinned to CPU {available[0]}, each client to CPU {available[1]}"
    if settle > 0:
        placement += (
            f"; before each run, waited (up to {settle:g} s) for other load below 20% of a CPU"
        )
    return ({available[0]} if cpus else None), cpus, placement


# ---------------------------------------------------------------------------- options


def add_run_options(parser: argparse.ArgumentParser, server: str) -> None:
    """--hard-timeout, --settle and --no-pin, in that order."""
    parser.add_argument(
        "--hard-timeout", type=float, default=300.0, help="seconds before a run is killed"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="before each run, wait up to this many seconds for other load to pass (0: do not)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help=f"do not pin the {server} and the client to separate CPUs",
    )


def select_clients(
    parser: argparse.ArgumentParser, args: argparse.Namespace, clients: Sequence[str]
) -> None:
    """Set ``args.clients`` from the --only lists (all of ``clients`` without one), in
    ``clients``' order; an unknown name is a usage error."""
    names = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in clients]
    if unknown:
        parser.error(f"unknown client(s) {unknown}; known: {', '.join(clients)}")
    args.clients = [c for c in clients if c in names] if names else list(clients)


# ---------------------------------------------------------------------------- the report


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def machine(modules: Sequence[str] = ("uvloop",)) -> dict[str, str]:
    """CPU count (this process's affinity), CPU model, kernel, Python, and the version of
    each of ``modules`` ("not installed" where it is not)."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in modules:
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            versions[name] = "not installed"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **versions,
    }


def header(title: str, info: dict[str, str], placement: str, versions: dict[str, str]) -> list[str]:
    """The report's first lines: title, date, machine, Python and the clients' versions."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# {title}",
        "",
        f"- date: {date}",
        f"- machine: {info['nproc']} CPUs, {info['cpu']}, {info['kernel']}; {placement}",
        f"- Python {info['python']}, uvloop {info['uvloop']}"
        + "".join(f", {v}" for v in sorted(set(versions.values())) if v),
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Wait until something listens on ``host:port`` (a server just started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")

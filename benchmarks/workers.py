"""One machine, every core: ``asmtp send`` as one process next to ``--workers 1`` and
``--workers 2``, with and without ``--journal``, against ``asmtp sink`` on loopback.

Each row runs the command as people do (``python -m asmtp send --recipients FILE``,
N recipients over 64 domains, ``--concurrency 100``), ROUNDS times, the rows taking
turns so that a busy spell of the machine falls on all of them. Client CPU is the
command's and its workers' user + system time (``getrusage`` of reaped children: the
workers are the command's children, reaped by it), the sink's left out. Shown: the
best and the median round.

On a 2-core machine the sink shares the cores with the client, so msgs/s is mostly the
sink's; the CPU per message says what the workers cost. The ``--workers`` rows spend
more per message than one process (the parent's reading of the results, and with a
journal the round trip of each dot through the parent); on a machine with cores to
spare they give up to N cores of sending.

    python benchmarks/workers.py [-n 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HOST, REPO, SENDER, ensure_asmtp_importable, free_port, wait_port

ensure_asmtp_importable()

ROWS = (
    ("one process", []),
    ("--workers 1", ["--workers", "1"]),
    ("--workers 2", ["--workers", "2"]),
)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH", ""), str(REPO / "src")) if p
    )
    return env


def one_run(listing: Path, n: int, extra: list[str], journal: Path | None) -> tuple[float, float]:
    """(msgs/s, client CPU seconds per message) of one send to a fresh sink."""
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "asmtp", "sink", "--listen", f"{HOST}:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
    )
    try:
        wait_port(port)
        if journal is not None:
            journal.unlink(missing_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.monotonic()
        command = [
            sys.executable, "-m", "asmtp", "send", "--from", SENDER,
            "--recipients", str(listing), "--body", "b", "--relay", f"{HOST}:{port}",
            "--tls", "none", "--concurrency", "100", "--no-progress",
            *(["--journal", str(journal)] if journal is not None else []), *extra,
        ]  # fmt: skip
        done = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
            timeout=600,
            check=False,
        )
        wall = time.monotonic() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        sink.terminate()
        sink.wait(10)
    if done.returncode != 0 or f"{n} delivered" not in done.stderr:
        raise RuntimeError(f"the send failed: {done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return n / wall, cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="recipients (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each row (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asmtp-workers-") as folder:
        listing = Path(folder) / "list.txt"
        listing.write_text(
            "".join(f"user{i}@d{i % 64}.example.test\n" for i in range(args.n)),
            encoding="utf-8",
        )
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for journaled in (False, True):
                journal = Path(folder) / "run.jsonl" if journaled else None
                for label, extra in ROWS:
                    row = ("journal" if journaled else "no journal", label)
                    results.setdefault(row, []).append(one_run(listing, args.n, extra, journal))
    print(f"{args.n} recipients over 64 domains, --concurrency 100, {args.rounds} rounds")
    print("| journal | run | msgs/s (best / median) | client CPU µs/msg (best / median) |")
    print("|---|---|---|---|")
    for (journal_label, label), runs in results.items():
        rates = [r for r, _ in runs]
        cpus = [c * 1e6 for _, c in runs]
        print(
            f"| {journal_label} | {label} | {max(rates):,.0f} / {statistics.median(rates):,.0f}"
            f" | {min(cpus):,.0f} / {statistics.median(cpus):,.0f} |"
        )


if __name__ == "__main__":
    main()

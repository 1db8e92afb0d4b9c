"""Scaling out on Celery with Redis: what the queued path costs per message next to a
single-process Mailer, on the same sink (``asmtp sink``), and messages per second with
one and two ``asmtp worker`` processes.

Rows:

* **Mailer**: one process, ``asmtp.Mailer(relay, pool=True)`` over N jobs; with no
  journal, and with a file journal (what a resumable local run costs: the baseline);
* **Celery, W workers**: ``asmtp.celery.enqueue_async`` of the same N jobs in chunks
  of 500 to W ``asmtp worker --concurrency 1`` processes sharing a private
  redis-server (append-only file, fsync always: journal, counts and results stream in
  Redis), followed to the end (``asmtp.celery.follow``) by the process that enqueued.

CPU per message is counted per process, user + system: for the Celery rows the
workers (main process and pool process, from /proc), redis-server (from /proc) and
the process that enqueues and follows (its own getrusage, from the first job enqueued
to the last result read); the sink's CPU is left out of every row. Every Celery row
first sends a warm-up campaign (each worker process opens its Mailer and its pooled
sessions once), not counted. Wall-clock msgs/s include everything. On a 2-core machine
the sink, Redis and the workers share the cores: read the msgs/s with that in mind.

``--baseline-src DIR`` runs the Celery rows a second time with the asmtp package found
in DIR (an older tree: a git worktree, an unpacked release), workers and client alike,
so that a change is measured before and after in one run, on the same machine state.

    python benchmarks/scaleout.py [-n 20000] [--concurrency 100] [--chunk 500]
    python benchmarks/scaleout.py --baseline-src /tmp/old/src --baseline-label before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    REPO,
    SENDER,
    benchmark_message,
    ensure_asmtp_importable,
    free_port,
    process_cpu,
    wait_for_quiet,
    wait_port,
)

ensure_asmtp_importable()

import asmtp  # noqa: E402

HOST = "127.0.0.1"
_WORKER_OPTIONS = ("--concurrency", "1", "--loglevel", "INFO")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (a Celery worker's pool)."""
    total = process_cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_cpu(int(child)) for child in children)


def jobs(n: int) -> list[asmtp.Job]:
    message = benchmark_message(to="list@example.test", subject="scale", message_id="<s@x>")
    return [
        asmtp.Job(f"user{i}@d{i % 50}.example.test", message, sender=SENDER, key=f"k{i}")
        for i in range(n)
    ]


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mailer_row(port: int, n: int, concurrency: int, journal: Path | None) -> dict[str, Any]:
    """One process: a Mailer over N jobs (run in a fresh interpreter, CPU from itself)."""
    code = f"""
import asyncio, json, sys, time
sys.path.insert(0, {str(HERE)!r})
import scaleout, asmtp
jobs = scaleout.jobs({n})
async def main():
    relay = asmtp.Relay({HOST!r}, port={port}, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_connections={concurrency}),
                            concurrency={concurrency}, retry=None,
                            journal={str(journal) if journal else None!r}) as mailer:
        c0 = scaleout.cpu_self(); t0 = time.perf_counter()
        ok = sum([r.status == "delivered" async for r in mailer.deliver(jobs)])
        c1 = scaleout.cpu_self(); t1 = time.perf_counter()
    print(json.dumps({{"ok": ok, "cpu": c1 - c0, "wall": t1 - t0}}))
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "client_cpu": got["cpu"],
        "redis_cpu": 0.0,
        "workers_cpu": 0.0,
        "wall": got["wall"],
        "ok": got["ok"],
    }


class Redis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        conf = folder / "redis.conf"
        conf.write_text(
            f"bind {HOST}\nport {self.port}\ndir {folder}\nsave ''\nappendonly yes\n"
            "appendfsync always\nlogfile ''\n"
        )
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([server, str(conf)], stdout=subprocess.DEVNULL)
        wait_port(self.port)
        self.url = f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def tree_env(src: Path | None) -> dict[str, str]:
    """The environment of a row's processes: asmtp from ``src`` when given."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def start_workers(
    url: str, count: int, folder: Path, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    procs, logs = [], []
    for i in range(count):
        log = folder / f"worker{i}.log"
        logs.append(log)
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "asmtp", "worker", "--broker", url, *_WORKER_OPTIONS],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    deadline = time.monotonic() + 60
    while not all(b" ready." in log.read_bytes() for log in logs):
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start")
        time.sleep(0.1)
    return procs


def celery_row(
    port: int,
    n: int,
    concurrency: int,
    chunk: int,
    workers: int,
    folder: Path,
    src: Path | None = None,
) -> dict[str, Any]:
    """W workers on a fresh Redis; the campaign enqueued and followed by a client
    process (``--client``) that says when its warm-up is over and waits for "go"."""
    redis = Redis(folder)
    env = tree_env(src)
    procs = start_workers(redis.url, workers, folder, env)
    settings = [str(value) for value in (port, n, concurrency, chunk, workers)]
    client = subprocess.Popen(
        [sys.executable, str(HERE / "scaleout.py"), "--client", redis.url, *settings],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        if json.loads(client.stdout.readline() or b"{}").get("ready") is not True:
            raise RuntimeError("the client did not warm up")
        before = [tree_cpu(p.pid) for p in procs], process_cpu(redis.proc.pid)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        got = json.loads(client.stdout.readline() or b"{}")
        workers_cpu = sum(tree_cpu(p.pid) for p in procs) - sum(before[0])
        redis_cpu = process_cpu(redis.proc.pid) - before[1]
        if "ok" not in got:
            raise RuntimeError("the client failed")
        return {
            "client_cpu": got["cpu"],
            "redis_cpu": redis_cpu,
            "workers_cpu": workers_cpu,
            "wall": got["wall"],
            "ok": got["ok"],
        }
    finally:
        client.kill()
        client.wait(10)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()


def client_main(argv: list[str]) -> None:
    """The enqueuing and following process of a Celery row (its asmtp: the row's)."""
    from asmtp import celery as queue

    url, port, n, concurrency, chunk, workers = argv[0], *map(int, argv[1:])
    app = queue.make_app(url)
    relay = asmtp.Relay(HOST, port=port, tls="none")

    async def campaign(name: str, work: list[asmtp.Job]) -> int:
        run = await queue.enqueue_async(
            app, name, work, relay=relay, chunk=chunk, concurrency=concurrency, retry=None
        )
        return sum([r.status == "delivered" async for r in queue.follow(run)])

    asyncio.run(campaign("warm", jobs(workers * chunk)))
    work = jobs(n)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    c0, t0 = cpu_self(), time.perf_counter()
    ok = asyncio.run(campaign("bench", work))
    c1, t1 = cpu_self(), time.perf_counter()
    print(json.dumps({"ok": ok, "cpu": c1 - c0, "wall": t1 - t0}), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="messages per row")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="runs per row (the best is kept)")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help="also run the Celery rows with the asmtp package in DIR (before/after)",
    )
    parser.add_argument("--baseline-label", default="baseline", metavar="WORD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scaleout-latest")
    args = parser.parse_args()
    if args.baseline_src is not None and not (args.baseline_src / "asmtp").is_dir():
        parser.error(f"no asmtp package in {args.baseline_src}")
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "asmtp", "sink", "--listen", f"{HOST}:{sink_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # (name, workers, asmtp tree): the baseline's Celery rows beside this tree's
    rows: list[tuple[str, int, Path | None]] = [
        ("Mailer, no journal", 0, None),
        ("Mailer, file journal", 0, None),
    ]
    for workers in (1, 2):
        label = f"Celery, {workers} worker{'s' if workers > 1 else ''}"
        if args.baseline_src is not None:
            rows.append((f"{label} ({args.baseline_label})", workers, args.baseline_src))
        rows.append((label, workers, None))
    best: dict[str, dict[str, Any]] = {}
    loads: list[float] = []
    try:
        wait_port(sink_port)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for round_ in range(args.rounds):
                for index, (name, workers, src) in enumerate(rows):
                    # other people's load skews CPU per message far more than rounds
                    # average out: wait for a quiet machine, keep each row's best round
                    loads.append(wait_for_quiet(30.0))
                    if not workers:
                        journal = folder / f"j{round_}.jsonl" if "file" in name else None
                        row = mailer_row(sink_port, args.n, args.concurrency, journal)
                    else:
                        sub = folder / f"celery{index}-{round_}"
                        sub.mkdir()
                        row = celery_row(
                            sink_port, args.n, args.concurrency, args.chunk, workers, sub, src
                        )
                    if name not in best or _total(row) < _total(best[name]):
                        best[name] = row
    finally:
        sink.terminate()
        sink.wait(10)
    args.loads = loads
    report([(name, best[name]) for name, _, _ in rows], args)


def _total(row: dict[str, Any]) -> float:
    return float(row["client_cpu"] + row["redis_cpu"] + row["workers_cpu"])


def report(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    n = args.n
    base = dict(rows)["Mailer, file journal"]
    base_cpu = base["client_cpu"] / n
    baseline = (
        f"; rows marked ({args.baseline_label}): asmtp from {args.baseline_src}"
        if args.baseline_src is not None
        else ""
    )
    lines = [
        f"# scaleout: {n} messages, concurrency {args.concurrency}, chunk {args.chunk}",
        "",
        f"{os.cpu_count()} CPUs; sink: asmtp sink on loopback (its CPU not counted); "
        f"best of {args.rounds} rounds per row; other load seen before rows: "
        f"{min(args.loads):.2f}-{max(args.loads):.2f} CPUs{baseline}",
        "",
        "| row | msgs/s | sender µs/msg | Redis µs/msg | enqueue+follow µs/msg "
        "| total µs/msg | vs Mailer+journal | delivered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out: list[dict[str, Any]] = []
    for name, row in rows:
        celery_path = row["workers_cpu"] > 0
        sender = (row["workers_cpu"] if celery_path else row["client_cpu"]) / n * 1e6
        client = row["client_cpu"] / n * 1e6 if celery_path else 0.0
        redis = row["redis_cpu"] / n * 1e6
        total = sender + redis + client
        lines.append(
            f"| {name} | {n / row['wall']:.0f} | {sender:.0f} | {redis:.0f} | {client:.0f} "
            f"| {total:.0f} | {total / (base_cpu * 1e6) - 1:+.0%} | {row['ok']} |"
        )
        out.append({"row": name, **row, "n": n})
    lines += [
        "",
        "vs Mailer+journal: the row's total CPU per message (every process of the row: "
        "sender(s), redis-server, the enqueuing and following process) over the CPU per "
        "message of the one process running a Mailer with a file journal, same jobs, "
        "same concurrency, same sink.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

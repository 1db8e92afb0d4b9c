"""Memory of a long bulk run: stream N recipients (default 200 000) from a generator
through ``asmtp.Mailer.deliver()`` to a local sink and report the peak RSS.

The point: memory is bounded by the concurrency, not by the list. A generator of jobs
is pulled as workers free up and results are consumed as they come, so 200 000 jobs
never become 200 000 tasks or queued results.

    python benchmarks/memory.py [--recipients 200000] [--concurrency 200]

The sink is Postfix's smtp-sink when installed, else an aiosmtpd sink in a
subprocess (much slower: the run takes longer, the memory figure is the same).
Loopback only; the run is bounded by its count and a wall-clock limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import asmtp  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sink(port: int) -> tuple[subprocess.Popen[bytes], str]:
    sink = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if sink:
        proc = subprocess.Popen(
            [sink, "-u", "nobody", "-c", "-m", "1024", f"127.0.0.1:{port}", "1024"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        name = "Postfix smtp-sink"
    else:
        code = (
            "import asyncio, sys\n"
            "from aiosmtpd.controller import Controller\n"
            "class Sink:\n"
            "    async def handle_DATA(self, server, session, envelope):\n"
            "        return '250 OK'\n"
            f"c = Controller(Sink(), hostname='127.0.0.1', port={port})\n"
            "c.start()\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        name = "aiosmtpd sink (slow: it sets the pace)"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, name
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the sink did not start")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(port: int, count: int, concurrency: int, limit: float) -> dict[str, object]:
    message = EmailMessage()
    message["From"] = "news@example.test"
    message["Subject"] = "memory benchmark"
    message.set_content("hello\n" * 30)
    relay = asmtp.Relay("127.0.0.1", port, tls="none", helo="memory.asmtp.test")

    def jobs() -> Iterator[asmtp.Job]:
        for i in range(count):
            yield asmtp.Job(f"rcpt-{i:07d}@example.test", message, key=i)

    statuses: Counter[str] = Counter()
    samples: list[tuple[int, float]] = []
    start_rss = rss_mb()
    started = time.monotonic()
    async with asmtp.Mailer(relay, concurrency=concurrency, retry=None, timeout=30) as mailer:
        async with asyncio.timeout(limit):
            async for result in mailer.deliver(jobs()):
                statuses[result.status] += 1
                done = sum(statuses.values())
                if done % (count // 20 or 1) == 0:
                    samples.append((done, rss_mb()))
    elapsed = time.monotonic() - started
    return {
        "statuses": dict(statuses),
        "elapsed": elapsed,
        "start_rss": start_rss,
        "end_rss": rss_mb(),
        "peak_rss": peak_mb(),
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--limit", type=float, default=900.0, help="wall-clock limit, seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory-latest.md")
    args = parser.parse_args()
    port = free_port()
    sink, sink_name = start_sink(port)
    try:
        try:
            import uvloop

            out = uvloop.run(run(port, args.recipients, args.concurrency, args.limit))
            loop_name = "uvloop"
        except ImportError:
            out = asyncio.run(run(port, args.recipients, args.concurrency, args.limit))
            loop_name = "asyncio"
    finally:
        sink.kill()
        sink.wait()
    statuses = out["statuses"]
    assert isinstance(statuses, dict)
    delivered = statuses.get("delivered", 0)
    elapsed = float(out["elapsed"])  # type: ignore[arg-type]
    lines = [
        "# asmtp bulk memory benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, {loop_name}",
        f"- sink: {sink_name} on 127.0.0.1",
        f"- work: {args.recipients} jobs from a generator through Mailer.deliver(), "
        f"concurrency {args.concurrency}, one connection per recipient",
        "",
        "| recipients | delivered | other results | seconds | msgs/s "
        "| RSS at start MB | RSS at end MB | peak RSS MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {args.recipients} | {delivered} | "
        f"{ {k: v for k, v in statuses.items() if k != 'delivered'} or '-' } | {elapsed:.1f} | "
        f"{delivered / elapsed:,.0f} | {out['start_rss']:.1f} | {out['end_rss']:.1f} "
        f"| {out['peak_rss']:.1f} |",
        "",
        "RSS while running (results so far: MB): "
        + ", ".join(f"{n}: {mb:.0f}" for n, mb in out["samples"]),  # type: ignore[attr-defined]
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

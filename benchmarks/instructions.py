"""Instructions per message, from valgrind's callgrind: the steady measure of a client's
CPU on a shared machine, where msgs/s and even CPU seconds move with other people's load.

This file owns that measurement: it starts Postfix's smtp-sink on a loopback port, runs a
client under ``valgrind --tool=callgrind`` twice (N and 5N messages, one connection each,
at most C at once, the message of ``fanout.py``) and prints (total(5N) - total(N)) / 4N:
start-up, imports and the first connections cancel out. The kernel's work is not counted
(the same for every client doing the same exchange).

    python benchmarks/instructions.py                          # asmtp and the ceiling, uvloop
    python benchmarks/instructions.py --loop asyncio --clients asmtp,ceiling
    python benchmarks/instructions.py --no-gc       # without the collector: its share
    python benchmarks/instructions.py --clients core,policy   # asmtp's sans-IO parts alone
    python benchmarks/instructions.py --clients proto-ceiling # the ceiling on asmtp's protocol
    PYTHONPATH=/path/to/other/src python benchmarks/instructions.py --clients asmtp

Needs valgrind and smtp-sink (``apt-get install valgrind postfix``) and the ``bench`` extra.
About a minute a client (callgrind runs some 50 times slower than the program).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HELO, HERE, HOST, SENDER, free_port, wait_port

CLIENTS = ("asmtp", "ceiling", "bare", "core", "policy", "proto-ceiling")
#: asmtp's sans-IO parts alone, scripted replies, no I/O (scripted_session.py)
SCRIPTED = ("core", "policy")
MAX_MESSAGES = 20_000


def run_client(client: str, port: int, count: int, concurrency: int) -> None:
    """The work itself (in the process callgrind watches)."""
    from fanout import build_message, build_recipients

    message, recipients = build_message(), build_recipients(count)
    if client in SCRIPTED:
        import scripted_session

        scripted_session.run(client, message, recipients)
        return

    async def main() -> None:
        if client == "asmtp":
            import asmtp

            relay = asmtp.Relay(HOST, port, tls="none", helo=HELO)
            report = await asmtp.send(
                message, sender=SENDER, recipients=recipients, relay=relay, concurrency=concurrency
            )
            bad = [r for r in report.results if r.status != "delivered"]
        elif client in ("ceiling", "proto-ceiling"):
            if client == "ceiling":
                import ceiling_client as ceiling
            else:
                import protocol_ceiling as ceiling
            outcomes = await ceiling.send_all(
                HOST, port, message, SENDER, recipients, concurrency=concurrency, helo=HELO
            )
            bad = [o for o in outcomes if not o[0]]
        else:
            import bare_client

            done = await bare_client.send_all(
                HOST, port, message, SENDER, recipients, concurrency=concurrency, helo=HELO
            )
            bad = [o for o in done if not o.ok]
        if bad:
            raise SystemExit(f"{len(bad)} not delivered: {bad[:2]}")

    if os.environ.get("INSTRUCTIONS_NO_GC"):
        gc.disable()
    if os.environ.get("INSTRUCTIONS_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def measure(client: str, loop: str, port: int, count: int, concurrency: int, no_gc: bool) -> int:
    """Instructions per message: the difference between 5N and N messages, over 4N."""
    totals = []
    with tempfile.TemporaryDirectory(prefix="asmtp-callgrind-") as scratch:
        for n in (count, 5 * count):
            out = Path(scratch) / f"callgrind.{n}.out"
            env = {**os.environ, "INSTRUCTIONS_LOOP": loop}
            if no_gc:
                env["INSTRUCTIONS_NO_GC"] = "1"
            command = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--worker",
                client,
                str(port),
                str(n),
                str(concurrency),
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
            found = re.search(r"Collected : (\d+)", done.stderr)
            if done.returncode != 0 or found is None:
                raise SystemExit(f"{client}: callgrind run failed:\n{done.stderr[-2000:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) // (4 * count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="asmtp,ceiling", help=f"of {', '.join(CLIENTS)}")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--messages", type=int, default=500, help="N (the runs are N and 5N)")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--no-gc", action="store_true", help="the runs with gc.disable()")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.worker:
        client, port, count, concurrency = args.worker
        run_client(client, int(port), int(count), int(concurrency))
        return 0
    clients = [c for c in args.clients.split(",") if c]
    if unknown := set(clients) - set(CLIENTS):
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if not 1 <= args.messages <= MAX_MESSAGES // 5 or not 1 <= args.concurrency <= 1000:
        parser.error(f"--messages 1..{MAX_MESSAGES // 5}, --concurrency 1..1000")
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if shutil.which("valgrind") is None or not Path(sink).exists():
        raise SystemExit("needs valgrind and smtp-sink (apt-get install valgrind postfix)")
    port = free_port()
    server = subprocess.Popen(
        [sink, "-u", "nobody", f"{HOST}:{port}", "2000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        for client in clients:
            started = time.monotonic()
            per = measure(client, args.loop, port, args.messages, args.concurrency, args.no_gc)
            took = time.monotonic() - started
            gc_note = ", gc disabled" if args.no_gc else ""
            print(
                f"{client} ({args.loop}, C={args.concurrency}{gc_note}): "
                f"{per:,} instructions per message ({took:.0f} s)",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sending to a throttling provider: asmtp adaptive vs asmtp with fixed per-domain
limits vs aiosmtplib under a semaphore, side by side, in one run.

The scenario of issue #13: 100 domains hosted on one provider host (a loopback DNS
server names mx.provider.test for all of them), the provider refusing sessions above
K = 8 at once (421 4.7.0) and messages above R = 100 per second (451 4.7.1), 2,000
recipients, concurrency C = 500. Every client retries a refused recipient until it is
delivered (up to 50 tries, backoff from 0.5 s doubling to 5 s, with jitter), so each
row says how long it took to deliver everything and what it cost the provider.

    python benchmarks/shaping.py                  # the issue's figures
    python benchmarks/shaping.py --recipients 500 --only adaptive

Columns: time to deliver all; delivered (and duplicates: must be 0); the rate once
warmed up (messages accepted per second between the 10th and the 90th percentile of
acceptances, and that as a share of R); refusals the provider sent (sessions refused,
rate refusals); sessions opened; peak sessions at once; refusals per session and per
message tried. aiosmtplib connects to the provider's address directly (no MX lookup).
Bounded: each row stops after --limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests")]

import asmtp  # noqa: E402
from asmtp._core.prepared import prepare_message  # noqa: E402
from asmtp._core.shaping_rules import Shaping  # noqa: E402
from dnsserver import DNSServer  # noqa: E402
from throttle_server import ThrottleServer  # noqa: E402

PROVIDER = "127.0.0.2"
SENDER = "bench@client.test"
HELO = "bench.client.test"
ATTEMPTS, BACKOFF, MAX_BACKOFF = 50, 0.5, 5.0

MESSAGE = (
    b"From: bench@client.test\r\nSubject: shaping\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <shaping@client.test>\r\n\r\n" + b"The quick brown fox jumps.\r\n" * 60
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((PROVIDER, 0))
        port: int = sock.getsockname()[1]
        return port


def retry() -> asmtp.Retry:
    return asmtp.Retry(attempts=ATTEMPTS, backoff=BACKOFF, max_backoff=MAX_BACKOFF)


async def run_asmtp(settings: asmtp.Direct, to: list[str], concurrency: int) -> int:
    prepared = prepare_message(MESSAGE)
    tries = 0
    async with asmtp.Mailer(settings, concurrency=concurrency, retry=retry(), timeout=10) as m:
        async for result in m.deliver(asmtp.Job(r, prepared, sender=SENDER) for r in to):
            tries += result.attempts
    return tries


async def run_aiosmtplib(port: int, to: list[str], concurrency: int) -> int:
    import aiosmtplib

    semaphore = asyncio.Semaphore(concurrency)
    tries = 0

    async def one(recipient: str) -> None:
        nonlocal tries
        for attempt in range(1, ATTEMPTS + 1):
            async with semaphore:
                tries += 1
                try:
                    await aiosmtplib.send(
                        MESSAGE,
                        sender=SENDER,
                        recipients=[recipient],
                        hostname=PROVIDER,
                        port=port,
                        local_hostname=HELO,
                        use_tls=False,
                        start_tls=False,
                        timeout=10,
                    )
                    return
                except (aiosmtplib.SMTPException, OSError):
                    pass
            wait = min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1))
            await asyncio.sleep(wait * (1 - 0.5 * random.random()))

    await asyncio.gather(*(one(r) for r in to))
    return tries


def warmed_rate(times: list[float]) -> float:
    """Messages per second between the 10th and 90th percentile of acceptances."""
    if len(times) < 20:
        return 0.0
    times = sorted(times)
    lo, hi = len(times) // 10, len(times) * 9 // 10
    span = times[hi] - times[lo]
    return (hi - lo) / span if span > 0 else 0.0


async def one_row(
    name: str, args: argparse.Namespace, dns: DNSServer, to: list[str]
) -> dict[str, Any]:
    port = free_port()
    server = ThrottleServer(
        PROVIDER, port, max_sessions=args.k, max_rate=args.rate, name="mx.provider.test"
    ).start()
    direct = {"dns_servers": [dns.spec], "port": port, "tls": "none", "helo": HELO}
    runs: dict[str, Callable[[], Awaitable[int]]] = {
        "adaptive": lambda: run_asmtp(
            asmtp.Direct(**direct, shaping=Shaping()),
            to,
            args.concurrency,  # type: ignore[arg-type]
        ),
        "fixed": lambda: run_asmtp(
            asmtp.Direct(**direct, per_domain=args.per_domain),
            to,
            args.concurrency,  # type: ignore[arg-type]
        ),
        "aiosmtplib": lambda: run_aiosmtplib(port, to, args.concurrency),
    }
    start = time.monotonic()
    tries = 0
    finished = True
    try:
        tries = await asyncio.wait_for(runs[name](), args.limit)
    except TimeoutError:
        finished = False
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.2)  # the last QUITs
    server.stop()
    tried = tries or server.messages + server.rate_refusals + server.refused_sessions
    rate = warmed_rate(server.accepted_at)
    return {
        "client": name,
        "finished": finished,
        "seconds": round(elapsed, 2),
        "delivered": len(server.received),
        "duplicates": sum(n - 1 for n in server.received.values() if n > 1),
        "warmed_rate": round(rate, 1),
        "share_of_r": round(rate / args.rate, 3),
        "refused_sessions": server.refused_sessions,
        "rate_refusals": server.rate_refusals,
        "refusals": server.refusals,
        "sessions": server.sessions_opened,
        "peak_sessions": server.peak,
        "refusals_per_session": round(
            server.refusals / max(1, server.sessions_opened + server.refused_sessions), 3
        ),
        "refusals_per_try": round(server.refusals / max(1, tried), 3),
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"Throttling provider: {args.domains} domains on one host, K={args.k} sessions, "
        f"R={args.rate:g} msgs/s, {args.recipients} recipients, C={args.concurrency} "
        f"(fixed: per_domain={args.per_domain})\n\n"
        "| client | time s | delivered | dup | warmed rate | of R | refusals (sessions+rate)"
        " | sessions | peak | refusals/session | refusals/try |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['client']}{'' if r['finished'] else ' (cut at limit)'} | {r['seconds']} "
        f"| {r['delivered']} | {r['duplicates']} | {r['warmed_rate']} | {r['share_of_r']:.0%} "
        f"| {r['refusals']} ({r['refused_sessions']}+{r['rate_refusals']}) | {r['sessions']} "
        f"| {r['peak_sessions']} | {r['refusals_per_session']:.1%} | {r['refusals_per_try']:.1%} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--recipients", type=int, default=2000)
    parser.add_argument("--k", type=int, default=8, help="sessions the provider allows")
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s it allows")
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--per-domain", type=int, default=10)
    parser.add_argument("--limit", type=float, default=180.0, help="seconds per row, at most")
    parser.add_argument("--only", default="adaptive,fixed,aiosmtplib")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "shaping-latest")
    args = parser.parse_args()
    zones = {"provider.test": f"mx A {PROVIDER}"}
    zones |= {f"d{i}.test": "@ MX 10 mx.provider.test." for i in range(args.domains)}
    dns = DNSServer(zones).start()
    to = [f"user{i}@d{i % args.domains}.test" for i in range(args.recipients)]
    rows = []
    try:
        for name in args.only.split(","):
            row = await one_row(name, args, dns, to)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        dns.stop()
    text = table(rows, args)
    print(text)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())

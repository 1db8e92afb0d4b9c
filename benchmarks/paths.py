"""The per-message paths besides the fan-out: personalised bulk runs, pooled sends and
``build_message``, each as CPU time per message.

This file owns the whole benchmark: the sink (Postfix's smtp-sink, else ``asmtp sink``),
the parent that runs every row in a fresh subprocess in interleaved rounds, the worker
mode that runs one row once and measures its own CPU time around the measured work only
(imports, warm-up and the CSV file's writing are left out), and the markdown report.

Rows:

* ``csv-plain``: ``asmtp send --recipients r.csv`` (N rows, columns email and name) with a
  subject and body without placeholders, ``--concurrency C``; CPU ms per recipient.
* ``csv-personalised``: the same run with ``{name}`` in the subject and the body.
* ``csv-jinja``: the same run with ``--template jinja`` and ``{{ name }}`` instead.
* ``template-fixed``: ``Mailer(relay, concurrency=C, retry=None).deliver(jobs)``, N jobs
  sharing one message built once (text + HTML, the letter's texts); CPU ms per recipient.
* ``template-personalised``: the same jobs, each with an ``asmtp.Template``'s
  ``bind(row, to=..., from_=...)`` (``{{ name }}`` in the subject and both bodies).
* ``pool-prebuilt``: ``Mailer(relay, pool=Pool(max_connections=10), retry=None)``, T tasks
  (default 50) each sending one prebuilt 2 KB message (bytes) to one recipient, until S
  sends are made; the sessions are opened by a warm-up round first. CPU ms per send.
* ``pool-build``: the same, with ``build_message`` per send (a web backend's usual path).
* ``build-message``: ``build_message`` of a text+HTML message with one 20 KB attachment;
  ms of CPU each. ``build-prepare`` adds ``prepare_message`` (what a send does with it).

    python benchmarks/paths.py                           # N=5000, S=2000, 3 rounds
    python benchmarks/paths.py --quick                   # N=1000, S=500, 1 round
    python benchmarks/paths.py --only build-message,build-prepare --rounds 5
    python benchmarks/paths.py --out /tmp/paths.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    HELO,
    HERE,
    HOST,
    SENDER,
    add_run_options,
    benchmark_message,
    cpu_self,
    emit,
    ensure_asmtp_importable,
    fmt,
    header,
    machine,
    place,
    run_worker_process,
    select_clients,
    wait_for_quiet,
)

ROWS = {
    "csv-plain": "asmtp send --recipients (N rows), no placeholders",
    "csv-personalised": "the same with {name} in --subject and --body",
    "csv-jinja": "the same with --template jinja and {{ name }}",
    "template-fixed": "Mailer.deliver(N jobs), C sessions, one text+HTML message for all",
    "template-personalised": "the same, each job's message Template.bind(row, to=...)",
    "pool-prebuilt": "Mailer(pool=Pool(max_connections=10)).send(prebuilt bytes), T tasks",
    "pool-build": "the same with build_message per send",
    "build-message": "build_message: text + HTML + one 20 KB attachment",
    "build-prepare": "the same, then prepare_message",
}
MAX_COUNT = 100_000
BODY = "Dear {name}, this is the monthly letter.\n" + "A line of the letter's text.\n" * 20


# ---------------------------------------------------------------------------- worker side


def _csv_argv(port: int, csv_path: str, row: str, concurrency: int) -> list[str]:
    subject, body = ("Hi", BODY.replace("{name}", "you"))
    jinja = ["--template", "jinja"] if row == "csv-jinja" else []
    if row == "csv-personalised":
        subject, body = "Hi {name}", BODY
    elif jinja:
        subject, body = "Hi {{ name }}", BODY.replace("{name}", "{{ name }}")
    return [
        "send",
        "--from",
        f"Bench <{SENDER}>",
        "--recipients",
        csv_path,
        "--subject",
        subject,
        "--body",
        body,
        "--relay",
        f"{HOST}:{port}",
        "--tls",
        "none",
        "--helo",
        HELO,
        "--concurrency",
        str(concurrency),
        "--retries",
        "0",
        "--no-progress",
        "--json",
        *jinja,
    ]


def _built(index: int) -> Any:
    from asmtp import build_message

    return build_message(
        to=f"user-{index:05d}@example.test",
        from_=f"Bench <{SENDER}>",
        subject="Your order",
        body=BODY.replace("{name}", "you"),
    )


async def _template_run(
    port: int, count: int, concurrency: int, personal: bool
) -> tuple[int, float]:
    """(delivered, CPU seconds) of ``count`` Mailer jobs: each rendered from an
    ``asmtp.Template`` (``personal``), or all sharing one message built once."""
    import asmtp

    html = "<p>" + BODY.replace("{name}", "{{ name }}").replace("\n", "<br>\n") + "</p>\n"
    template = asmtp.Template(
        subject="Hi {{ name }}", body=BODY.replace("{name}", "{{ name }}"), html=html
    )
    relay = asmtp.Relay(HOST, port, tls="none", helo=HELO)
    rows = [{"email": f"rcpt-{i:05d}@example.test", "name": f"Person {i}"} for i in range(count)]
    sender = f"Bench <{SENDER}>"

    def jobs() -> Any:
        if not personal:
            fixed = template.message({"name": "you"}, to=None, from_=sender)
            return (asmtp.Job(row["email"], fixed) for row in rows)
        return (
            asmtp.Job(row["email"], template.bind(row, to=row["email"], from_=sender))
            for row in rows
        )

    async with asmtp.Mailer(relay, concurrency=concurrency, retry=None, timeout=30) as mailer:
        before = cpu_self()
        delivered = 0
        async for result in mailer.deliver(jobs()):
            delivered += result.status == "delivered"
        return delivered, cpu_self() - before


async def _pooled(port: int, sends: int, tasks: int, build: bool) -> tuple[int, float]:
    """(delivered, CPU seconds) of ``sends`` pooled sends, measured after a warm-up."""
    import asmtp

    relay = asmtp.Relay(HOST, port, tls="none", helo=HELO)
    message = benchmark_message(
        to="Bench user <user@example.test>", subject="pooled", message_id="<p.1@example.test>"
    )
    delivered = 0

    async def one(index: int) -> None:
        nonlocal delivered
        payload = _built(index) if build else message
        report = await mailer.send(
            payload, sender=SENDER, recipients=[f"user-{index:05d}@example.test"]
        )
        delivered += report[0].status == "delivered"

    async def share(start: int, count: int) -> None:
        for index in range(start, start + count):
            await one(index)

    pool = asmtp.Pool(max_connections=10)
    async with asmtp.Mailer(relay, pool=pool, retry=None, timeout=30) as mailer:
        await asyncio.gather(*(share(i, 1) for i in range(tasks)))  # sessions open
        delivered = 0
        before = cpu_self()
        per_task, extra = divmod(sends, tasks)
        await asyncio.gather(*(share(i * per_task, per_task + (i < extra)) for i in range(tasks)))
        return delivered, cpu_self() - before


def _build_loop(count: int, prepare: bool) -> float:
    from asmtp import build_message
    from asmtp._core.prepared import prepare_message

    attachment = ("report.pdf", bytes(range(256)) * 80, "application/pdf")
    html = "<p>" + BODY.replace("{name}", "you").replace("\n", "<br>\n") + "</p>"
    text = BODY.replace("{name}", "you")

    def once(index: int) -> None:
        msg = build_message(
            to=f"user-{index:05d}@example.test",
            from_=f"Bench <{SENDER}>",
            subject="Your invoice",
            body=html,
            mailtype="html",
            alt_text=text,
            attachments=[attachment],
        )
        if prepare:
            prepare_message(msg)

    for index in range(20):  # warm-up
        once(index)
    before = cpu_self()
    for index in range(count):
        once(index)
    return cpu_self() - before


def run_worker(row: str, port: int, count: int, concurrency: int, csv_path: str) -> int:
    ensure_asmtp_importable()
    import asmtp
    import asmtp.cli

    emit({"ready": True, "version": asmtp.__version__})
    if sys.stdin.readline().strip() != "go":
        return 1
    result: dict[str, Any] = {"result": True, "count": count}
    if row.startswith("csv-"):
        argv = _csv_argv(port, csv_path, row, concurrency)
        out = io.StringIO()
        before = cpu_self()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = asmtp.cli.main(argv)
        result["cpu"] = cpu_self() - before
        statuses = [json.loads(line).get("status") for line in out.getvalue().splitlines()]
        result["delivered"] = statuses.count("delivered")
        result["exit"] = code
    elif row.startswith("template-"):
        result["delivered"], result["cpu"] = asyncio.run(
            _template_run(port, count, concurrency, row == "template-personalised")
        )
    elif row.startswith("pool-"):
        result["delivered"], result["cpu"] = asyncio.run(
            _pooled(port, count, concurrency, row == "pool-build")
        )
    else:
        result["cpu"] = _build_loop(count, row == "build-prepare")
        result["delivered"] = count
    emit(result)
    return 0


# ---------------------------------------------------------------------------- parent side


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _sink(cpus: set[int] | None) -> Any:
    """(port, name) of a running sink: Postfix's smtp-sink, else ``asmtp sink``."""
    port = _free_port()
    found = shutil.which("smtp-sink") or shutil.which("/usr/sbin/smtp-sink")
    if found:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [found, *user, "-m", "1024", f"{HOST}:{port}", "1024"]
        name = "Postfix smtp-sink"
    else:
        argv = [sys.executable, "-m", "asmtp", "sink", "--listen", f"{HOST}:{port}"]
        name = "asmtp sink"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                break
            time.sleep(0.05)
        yield port, name
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _write_csv(path: Path, rows: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name"])
        for index in range(rows):
            writer.writerow([f"rcpt-{index:05d}@example.test", f"Person {index}"])


def _count_for(row: str, args: argparse.Namespace) -> tuple[int, int]:
    if row.startswith(("csv-", "template-")):
        return args.recipients, args.concurrency
    if row.startswith("pool-"):
        return args.sends, args.tasks
    return args.builds, 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=None, help="CSV rows (default 5000)")
    parser.add_argument("--concurrency", type=int, default=200, help="CSV runs' C (200)")
    parser.add_argument("--sends", type=int, default=None, help="pooled sends (default 2000)")
    parser.add_argument("--tasks", type=int, default=50, help="pooled sends' tasks (50)")
    parser.add_argument("--builds", type=int, default=None, help="builds (default 2000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", help="rows, comma-separated")
    parser.add_argument("--out", default=str(HERE / "results" / "paths-latest.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    add_run_options(parser, "sink")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, args.port, args.count, args.concurrency, args.csv)
    quick = args.quick
    args.recipients = args.recipients or (1000 if quick else 5000)
    args.sends = args.sends or (500 if quick else 2000)
    args.builds = args.builds or (500 if quick else 2000)
    args.rounds = args.rounds or (1 if quick else 3)
    for name in ("recipients", "sends", "builds"):
        if not 1 <= getattr(args, name) <= MAX_COUNT:
            parser.error(f"--{name} must be 1..{MAX_COUNT}")
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.tasks <= 1000:
        parser.error("--concurrency and --tasks must be 1..1000")
    select_clients(parser, args, list(ROWS))

    info = machine()  # before pinning: the machine's CPUs, not this process's one
    sink_cpus, cpus, placement = place(args.pin, args.settle, "sink")
    cpu_ms: dict[str, list[float]] = {row: [] for row in args.clients}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="asmtp-paths-") as tmp, _sink(sink_cpus) as sink:
        port, sink_name = sink
        csv_path = Path(tmp) / "recipients.csv"
        _write_csv(csv_path, args.recipients)
        for round_no in range(args.rounds):
            order = args.clients[round_no % len(args.clients) :]
            order += args.clients[: round_no % len(args.clients)]
            for row in order:
                if args.settle > 0:
                    wait_for_quiet(args.settle)
                count, concurrency = _count_for(row, args)
                argv = [sys.executable, __file__, "--worker", row, "--port", str(port)]
                argv += ["--count", str(count), "--concurrency", str(concurrency)]
                argv += ["--csv", str(csv_path)]
                run = run_worker_process(argv, cpus, args.hard_timeout, lambda: None)
                if isinstance(run, str) or run.error:
                    problems.append(f"{row}: {run if isinstance(run, str) else run.error}")
                    continue
                result = run.result
                if result["delivered"] != count:
                    problems.append(f"{row}: {result['delivered']} of {count} delivered")
                cpu_ms[row].append(result["cpu"] * 1000 / count)
                print(f"round {round_no + 1} {row}: {cpu_ms[row][-1]:.3f} ms", file=sys.stderr)

    lines = header(
        "asmtp's other per-message paths: personalised, pooled, build_message",
        info,
        placement,
        {},
    )
    lines += [
        f"- sink: {sink_name} on {HOST}; CSV runs: N={args.recipients}, C={args.concurrency};"
        f" pooled: S={args.sends}, T={args.tasks}, 10 sessions; builds: {args.builds};"
        f" {args.rounds} round(s), medians",
        "",
        "| row | what | CPU ms per message (median) | min-max |",
        "|---|---|---:|---:|",
    ]
    medians = {}
    for row in args.clients:
        values = cpu_ms[row]
        if not values:
            lines.append(f"| {row} | {ROWS[row]} | failed | |")
            continue
        medians[row] = statistics.median(values)
        lines.append(
            f"| {row} | {ROWS[row]} | {fmt(medians[row], 3)} |"
            f" {fmt(min(values), 3)}-{fmt(max(values), 3)} |"
        )
    lines += ["", "Targets (issue 18):"]
    if "csv-plain" in medians and "csv-personalised" in medians:
        ratio = medians["csv-personalised"] / medians["csv-plain"]
        lines.append(f"- personalised at most 1.3x plain: {ratio:.2f}x")
    if "template-fixed" in medians and "template-personalised" in medians:
        ratio = medians["template-personalised"] / medians["template-fixed"]
        lines.append(f"- asmtp.Template personalised vs a fixed message: {ratio:.2f}x")
    if "pool-prebuilt" in medians:
        lines.append(f"- pooled send at most 0.15 ms: {medians['pool-prebuilt']:.3f} ms")
    if "build-message" in medians:
        lines.append(f"- build_message at most 0.3 ms: {medians['build-message']:.3f} ms")
    if problems:
        lines += ["", "Problems:", *(f"- {p}" for p in problems)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

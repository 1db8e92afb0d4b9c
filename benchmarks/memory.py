"""Memory benchmarks: the peak RSS of asmtp where memory must stay bounded by design.

Every row runs in a fresh child process and its peak RSS is the kernel's figure for
that child alone (``wait4``), so one row's peak never hides in another's. Linux counts
in a child's peak the parent's own peak at the time it was started, so this parent
never holds anything large: it writes the attachment in pieces and leaves building
the message to children.

Rows (``--only`` picks some; ``--quick`` makes each smaller):

* ``stream``: N recipients (default 200 000) from a generator through
  ``asmtp.Mailer.deliver()``: memory bounded by the concurrency, not by the list.
  Target: at most 150 MB.
* ``attachment``: one message with a 30 MB attachment to 10 recipients, concurrency
  10, ``asmtp.send`` on uvloop (asyncio without it): one copy of the message whatever
  the concurrency. Target: peak RSS at most 3x the encoded message + 100 MB.
* ``attachment-asyncio``: the same on the standard asyncio loop.
* ``attachment-trio``: the same on trio (the anyio driver).
* ``attachment-tls``: the same over STARTTLS (uvloop), to this benchmark's TLS sink.
* ``cli-attachment``: the same message through the CLI, ``--recipients`` a file of 10
  (each recipient gets a copy addressed to them alone), ``--concurrency 10``.
* ``cli-refused``: ``python -m asmtp send --recipients FILE`` with 1 000 000 recipients,
  all refused at connect (a closed loopback port), ``--retries 0``, no ``--json``.
  Target: at most 150 MB.
* ``cli-journal``: 1 000 000 recipients delivered to smtp-sink with ``--journal``.
  Target: at most 150 MB.

    python benchmarks/memory.py                      # every row
    python benchmarks/memory.py --quick              # smaller rows (smoke run)
    python benchmarks/memory.py --only attachment,attachment-trio
    python benchmarks/memory.py --compare before.json   # a "before" column

The plain sink is Postfix's smtp-sink when installed, else an aiosmtpd sink in a
subprocess (much slower: the run takes longer, the memory figure is the same); the TLS
sink is a small asyncio server here (certificates from trustme). Loopback only; each
row is bounded by its count and a wall-clock limit (``--limit``). Results go to
``results/memory-latest.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
HOST = "127.0.0.1"
HELO = "memory.asmtp.test"
SENDER = "news@example.test"
MB = 1024 * 1024

ROWS = (
    "stream",
    "attachment",
    "attachment-asyncio",
    "attachment-trio",
    "attachment-tls",
    "cli-attachment",
    "cli-refused",
    "cli-journal",
)


@dataclass
class Row:
    """One row's work and what came of it."""

    name: str
    work: str
    target_mb: float | None = None
    seconds: float = 0.0
    peak_mb: float = 0.0
    exit: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.target_mb is None:
            return "-"
        return "within" if self.peak_mb <= self.target_mb else "OVER"


# ---------------------------------------------------------------------------- sinks


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the sink did not start")


def start_sink(port: int) -> tuple[subprocess.Popen[bytes], str]:
    sink = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if sink:
        proc = subprocess.Popen(
            [sink, "-u", "nobody", "-c", "-m", "1024", f"{HOST}:{port}", "1024"],
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
            f"c = Controller(Sink(), hostname={HOST!r}, port={port})\n"
            "c.start()\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        name = "aiosmtpd sink (slow: it sets the pace)"
    wait_listening(proc, port)
    return proc, name


async def tls_sink(port: int, cert: str, key: str) -> None:
    """A minimal ESMTP sink with STARTTLS and PIPELINING: takes every message, keeps none."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()

        async def more() -> bool:
            block = await reader.read(1 << 18)
            buf.extend(block)
            return bool(block)

        writer.write(b"220 sink.test ESMTP\r\n")
        try:
            while True:
                end = buf.find(b"\r\n")
                if end < 0:
                    if not await more():
                        return
                    continue
                verb = bytes(buf[:4]).upper()
                del buf[: end + 2]
                if verb == b"EHLO":
                    tls = writer.get_extra_info("sslcontext") is not None
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n")
                    writer.write(b"250 HELP\r\n" if tls else b"250 STARTTLS\r\n")
                elif verb == b"STAR":
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(context)
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    # the content is read in blocks and never kept (pipelined QUIT stays)
                    while (end := buf.find(b"\r\n.\r\n")) < 0:
                        del buf[:-4]
                        if not await more():
                            return
                    del buf[: end + 5]
                    writer.write(b"250 2.0.0 taken\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


def start_tls_sink(port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path] | None:
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    ca_file, cert_file, key_file = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    argv = [sys.executable, __file__, "--tls-sink", str(port), str(cert_file), str(key_file)]
    proc = subprocess.Popen(argv)
    wait_listening(proc, port)
    return proc, "this benchmark's asyncio TLS sink", ca_file


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------- children


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_stream(port: int, count: int, concurrency: int) -> dict[str, Any]:
    import asmtp

    async def run() -> dict[str, Any]:
        message = EmailMessage()
        message["From"] = SENDER
        message["Subject"] = "memory benchmark"
        message.set_content("hello\n" * 30)
        relay = asmtp.Relay(HOST, port, tls="none", helo=HELO)

        def jobs() -> Iterator[asmtp.Job]:
            for i in range(count):
                yield asmtp.Job(f"rcpt-{i:07d}@example.test", message, key=i)

        statuses: Counter[str] = Counter()
        samples: list[tuple[int, float]] = []
        start_rss = rss_mb()
        async with asmtp.Mailer(relay, concurrency=concurrency, retry=None, timeout=30) as mailer:
            async for result in mailer.deliver(jobs()):
                statuses[result.status] += 1
                done = sum(statuses.values())
                if done % (count // 20 or 1) == 0:
                    samples.append((done, round(rss_mb())))
        return {"statuses": dict(statuses), "start_rss": start_rss, "samples": samples}

    return run_on_asyncio(run)


def attachment_message(path: Path, count: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = ", ".join(f"rcpt-{i:02d}@example.test" for i in range(count))
    message["Subject"] = "memory benchmark: a large attachment"
    message.set_content("The attachment is random bytes.\n")
    message.add_attachment(
        path.read_bytes(), maintype="application", subtype="octet-stream", filename=path.name
    )
    return message


def child_attachment(
    port: int, path: Path, count: int, concurrency: int, driver: str, ca_file: str | None
) -> dict[str, Any]:
    import asmtp

    async def run() -> dict[str, Any]:
        context = None
        if ca_file is not None:
            import ssl

            context = ssl.create_default_context(cafile=ca_file)
        relay = asmtp.Relay(
            HOST, port, tls="starttls" if context else "none", ssl_context=context, helo=HELO
        )
        message = attachment_message(path, count)
        # What building the EmailMessage cost (the email package's, before asmtp's).
        before, peak_before = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = await asmtp.send(message, relay=relay, concurrency=concurrency, timeout=60)
        statuses = Counter(r.status for r in report.results)
        sample = next((r for r in report.results if r.status != "delivered"), None)
        return {
            "statuses": dict(statuses),
            "rss_before_send": round(before),
            "peak_before_send": round(peak_before / 1024),
            "a_failure": sample.message if sample else None,
        }

    if driver == "trio":
        import trio

        return trio.run(run)  # type: ignore[no-any-return]
    return run_on_asyncio(run, plain=driver == "asyncio")


def run_on_asyncio(run: Any, *, plain: bool = False) -> dict[str, Any]:
    try:
        if plain:
            raise ImportError
        import uvloop
    except ImportError:
        return {**asyncio.run(run()), "loop": "asyncio"}
    return {**uvloop.run(run()), "loop": "uvloop"}


# ---------------------------------------------------------------------------- the parent


def run_child(argv: list[str], limit: float, stdout: Any = subprocess.PIPE) -> dict[str, Any]:
    """Run ``argv`` to its end (killed after ``limit`` seconds) and return its exit, wall
    time, peak RSS (the kernel's figure for this child alone) and what it printed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=err, env=env)
        out = b""
        killed = False
        while True:  # bounded by ``limit``
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > limit:
                proc.send_signal(signal.SIGKILL)
                killed = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if stdout is subprocess.PIPE and proc.stdout is not None:
            out = proc.stdout.read()
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
    return {
        "exit": f"killed after {limit:g} s" if killed else str(proc.returncode),
        "seconds": time.monotonic() - started,
        "peak_mb": usage.ru_maxrss / 1024,
        "stdout": out,
        "stderr_tail": tail,
    }


def child_result(row: Row, ran: dict[str, Any]) -> None:
    row.seconds, row.peak_mb, row.exit = ran["seconds"], ran["peak_mb"], ran["exit"]
    try:
        row.details.update(json.loads(ran["stdout"].decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        row.details["stderr"] = ran["stderr_tail"]


def encoded_size(path: Path, count: int, limit: float) -> int:
    """Octets of the message as sent (the same message the rows build), in a child."""
    ran = run_child([sys.executable, __file__, "--child", "size", str(path), str(count)], limit)
    return int(json.loads(ran["stdout"])["octets"])


def write_recipients(path: Path, count: int) -> None:
    with path.open("w", encoding="ascii") as f:
        for i in range(count):
            f.write(f"rcpt-{i:07d}@example.test\n")


def cli_argv(recipients: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "asmtp", "send",
        "--from", SENDER,
        "--recipients", str(recipients),
        "--subject", "memory benchmark",
        "--body", "hello",
        "--relay", f"{HOST}:{port}",
        "--tls", "none",
        "--helo", HELO,
        "--retries", "0",
        "--timeout", "30",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def run_cli(row: Row, argv: list[str], limit: float, workdir: Path) -> None:
    out_file = workdir / f"{row.name}.stdout"
    with out_file.open("wb") as out:
        ran = run_child(argv, limit, stdout=out)
    row.seconds, row.peak_mb, row.exit = ran["seconds"], ran["peak_mb"], ran["exit"]
    with out_file.open("rb") as f:
        row.details["stdout_lines"] = sum(1 for _ in f)
    tail = [line for line in ran["stderr_tail"].splitlines() if line.strip()][-1:]
    row.details["stderr_tail"] = tail
    out_file.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma list of rows: {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="smaller rows (a smoke run)")
    parser.add_argument("--recipients", type=int, help="stream row (default 200 000)")
    parser.add_argument("--concurrency", type=int, default=200, help="stream row")
    parser.add_argument("--attachment-mb", type=float, help="attachment rows (default 30)")
    parser.add_argument("--cli-recipients", type=int, help="CLI rows (default 1 000 000)")
    parser.add_argument("--limit", type=float, default=1800.0, help="wall-clock limit per row, s")
    parser.add_argument("--compare", type=Path, help="a previous run's JSON: a 'before' column")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory-latest.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tls-sink", nargs=3, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.tls_sink:
        port, cert, key = args.tls_sink
        asyncio.run(tls_sink(int(port), cert, key))
        return 0
    if args.child:
        sys.path.insert(0, str(SRC))
        if args.child == "stream":
            out = child_stream(int(rest[0]), int(rest[1]), int(rest[2]))
        elif args.child == "size":
            message = attachment_message(Path(rest[0]), int(rest[1]))
            out = {"octets": len(message.as_bytes(policy=SMTP_POLICY))}
        else:
            ca = rest[5] if len(rest) > 5 else None
            out = child_attachment(int(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]),
                                   rest[4], ca)  # fmt: skip
        print(json.dumps(out))
        return 0

    only = args.only.split(",") if args.only else list(ROWS)
    unknown = set(only) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    stream_count = args.recipients or (20_000 if args.quick else 200_000)
    attachment_mb = args.attachment_mb or (10 if args.quick else 30)
    cli_count = args.cli_recipients or (100_000 if args.quick else 1_000_000)
    attach_rcpts = 10
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="asmtp-memory-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        sink, sink_name = start_sink(port)
        try:
            me = [sys.executable, __file__, "--child"]
            if "stream" in only:
                row = Row("stream", f"{stream_count:,} jobs from a generator through "
                          f"Mailer.deliver(), concurrency {args.concurrency}", 150.0)  # fmt: skip
                child_result(row, run_child(
                    [*me, "stream", str(port), str(stream_count), str(args.concurrency)],
                    args.limit))  # fmt: skip
                rows.append(row)
            attach = [n for n in only if n.startswith("attachment")]
            if attach or "cli-attachment" in only:
                blob = workdir / "attachment.bin"
                with blob.open("wb") as f:
                    for _ in range(int(attachment_mb)):
                        f.write(os.urandom(MB))
                    f.write(os.urandom(int(attachment_mb % 1 * MB)))
                encoded = encoded_size(blob, attach_rcpts, args.limit)
                target = 3 * encoded / MB + 100
            for name in attach:
                driver = {"attachment-trio": "trio", "attachment-asyncio": "asyncio"}.get(
                    name, "best"
                )
                how = {"attachment": "uvloop", "attachment-trio": "trio (anyio driver)",
                       "attachment-asyncio": "asyncio",
                       "attachment-tls": "uvloop, STARTTLS"}[name]  # fmt: skip
                row = Row(name, f"{attachment_mb:g} MB attachment ({encoded / MB:.1f} MB "
                          f"encoded), {attach_rcpts} recipients, concurrency {attach_rcpts}, "
                          f"asmtp.send on {how}", round(target, 1))  # fmt: skip
                argv = [*me, "attachment", str(port), str(blob), str(attach_rcpts),
                        str(attach_rcpts), driver]  # fmt: skip
                if name == "attachment-tls":
                    tls_port = free_port()
                    started = start_tls_sink(tls_port, workdir)
                    if started is None:
                        row.exit = "skipped: trustme is not installed"
                        rows.append(row)
                        continue
                    tls_proc, tls_name, ca_file = started
                    row.details["sink"] = tls_name
                    argv[4] = str(tls_port)
                    argv.append(str(ca_file))
                    try:
                        child_result(row, run_child(argv, args.limit))
                    finally:
                        stop(tls_proc)
                else:
                    child_result(row, run_child(argv, args.limit))
                row.details["encoded_mb"] = round(encoded / MB, 1)
                rows.append(row)
            if "cli-attachment" in only:
                work = f"asmtp send --recipients FILE (10) --attach ({attachment_mb:g} MB)"
                row = Row("cli-attachment", f"{work}, --concurrency 10", round(target, 1))
                ten = workdir / "ten.txt"
                write_recipients(ten, attach_rcpts)
                argv = cli_argv(ten, port, "--attach", str(blob), "--concurrency", "10")
                run_cli(row, argv, args.limit, workdir)
                rows.append(row)
            if "cli-refused" in only or "cli-journal" in only:
                recipients = workdir / "recipients.txt"
                write_recipients(recipients, cli_count)
            if "cli-refused" in only:
                row = Row("cli-refused", f"asmtp send --recipients FILE ({cli_count:,}), all "
                          "refused at connect (a closed loopback port), --retries 0, no --json",
                          150.0)  # fmt: skip
                run_cli(row, cli_argv(recipients, free_port()), args.limit, workdir)
                rows.append(row)
            if "cli-journal" in only:
                row = Row("cli-journal", f"asmtp send --recipients FILE ({cli_count:,}) to "
                          f"{sink_name} with --journal, --retries 0", 150.0)  # fmt: skip
                journal = workdir / "run.journal"
                argv = cli_argv(recipients, port, "--journal", str(journal))
                run_cli(row, argv, args.limit, workdir)
                if journal.exists():
                    row.details["journal_mb"] = round(journal.stat().st_size / MB, 1)
                rows.append(row)
        finally:
            stop(sink)
    before: dict[str, float] = {}
    label = ""
    if args.compare is not None:
        previous = json.loads(args.compare.read_text(encoding="utf-8"))
        before = {r["name"]: r["peak_mb"] for r in previous["rows"]}
        label = previous.get("commit", args.compare.name)
    report(rows, args, sink_name, before, label)
    return 0 if all(r.verdict != "OVER" for r in rows) else 1


def report(
    rows: list[Row], args: argparse.Namespace, sink: str, before: dict[str, float], label: str
) -> None:
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    lines = [
        "# asmtp memory benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, {loop}",
        f"- sink: {sink} on {HOST}",
        "- each row in a fresh process; peak RSS is the kernel's figure for that process"
        f" alone (at least this parent's own peak, {parent_peak:.0f} MB: Linux counts it)",
        "",
        "| row | work | seconds | peak RSS MB | target MB | verdict"
        + (f" | peak RSS MB before ({label}) |" if before else " |"),
        "|---|---|---:|---:|---:|---" + ("|---:|" if before else "|"),
    ]
    for r in rows:
        target = f"{r.target_mb:.0f}" if r.target_mb is not None else "-"
        cells = [r.name, r.work, f"{r.seconds:.1f}", f"{r.peak_mb:.1f}", target, r.verdict]
        if before:
            cells.append(f"{before[r.name]:.1f}" if r.name in before else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        shown = {k: v for k, v in r.details.items() if k != "samples"}
        lines.append(f"- {r.name}: exit {r.exit}; {json.dumps(shown, ensure_ascii=False)}")
        if "samples" in r.details:
            lines.append(
                "  - RSS while running (results so far: MB): "
                + ", ".join(f"{n}: {mb}" for n, mb in r.details["samples"])
            )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    data = {"date": time.time(), "rows": [{**asdict(r), "verdict": r.verdict} for r in rows]}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

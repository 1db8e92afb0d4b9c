"""The ``asmtp`` command: ``asmtp send`` (fan a message out), ``asmtp demo`` (try it on a
local server). Uses the public API only.

Exit status: 0 every recipient delivered; 1 any recipient not delivered ("unknown"
included); 2 bad usage or bad input (nothing sent, no connection made); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .api import sendmail
from .config import TLS_MODES, Relay
from .errors import InputError
from .results import Report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _relay_arg(value: str) -> tuple[str, int | None]:
    host, port = value, None
    if value.startswith("["):  # [::1]:25
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p)
    if not host:
        raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
    return host, port


def _positive_float(value: str) -> float:
    f = float(value)
    if f <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return f


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asmtp",
        description="Send one message to many recipients over SMTP, concurrently, "
        "with one result per recipient.",
    )
    parser.add_argument("--version", action="version", version=f"asmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", help="send a message to recipients through a relay")
    send.add_argument("--from", dest="from_", required=True, metavar="ADDR")
    send.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="ADDRS",
        help="recipients (a comma list; may repeat)",
    )
    send.add_argument("--cc", action="append", default=[], metavar="ADDRS")
    send.add_argument("--bcc", action="append", default=[], metavar="ADDRS")
    send.add_argument("--subject", default="")
    body = send.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", metavar="TEXT")
    body.add_argument("--body-file", metavar="FILE", type=Path)
    send.add_argument("--html", action="store_true", help="the body is HTML")
    send.add_argument(
        "--alt-text-file", metavar="FILE", type=Path, help="with --html: a plain-text alternative"
    )
    send.add_argument("--attach", action="append", default=[], metavar="FILE")
    send.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    _add_connection_options(send)
    send.add_argument("--json", action="store_true", help="JSON Lines, one per recipient")
    send.add_argument("--log-file", metavar="FILE", help="append a line per recipient")

    demo = sub.add_parser("demo", help="fan a message out through a local demo server")
    demo.add_argument("--recipients", type=_positive_int, default=30, metavar="N")
    demo.add_argument("--concurrency", type=_positive_int, default=10, metavar="N")
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the server keeps what it receives (default: a temp dir)",
    )
    demo.add_argument("--debug", action="store_true", help="show the SMTP transcript")
    demo.add_argument("--json", action="store_true")
    return parser


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relay", required=True, type=_relay_arg, metavar="HOST[:PORT]")
    p.add_argument("--user", metavar="USER")
    p.add_argument(
        "--password-env",
        metavar="VAR",
        help="the name of the environment variable holding the password",
    )
    p.add_argument(
        "--tls",
        choices=TLS_MODES,
        default=None,
        help="default: implicit on port 465, else starttls",
    )
    p.add_argument("--allow-plaintext-auth", action="store_true")
    p.add_argument("--helo", metavar="NAME")
    p.add_argument("--concurrency", type=_positive_int, default=100, metavar="N")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS")
    p.add_argument("--debug", action="store_true", help="show the SMTP transcript on stderr")


def _relay_from(args: argparse.Namespace) -> Relay:
    host, port = args.relay
    password = None
    if args.user is not None:
        if not args.password_env:
            raise InputError("--user needs --password-env VAR (the password is never a flag)")
        password = os.environ.get(args.password_env)
        if password is None:
            raise InputError(f"environment variable {args.password_env} is not set")
    return Relay(
        host,
        port or (465 if args.tls == "implicit" else 587),
        username=args.user,
        password=password,
        tls=args.tls,
        allow_plaintext_auth=args.allow_plaintext_auth,
        helo=args.helo,
    )


async def _send(args: argparse.Namespace) -> Report:
    relay = _relay_from(args)
    body = args.body if args.body is not None else _read(args.body_file)
    alt = _read(args.alt_text_file) if args.alt_text_file else None
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise InputError(f"--header must be 'Name: value': {h!r}")
        headers.append((name.strip(), value.strip()))
    if not args.to and not args.cc and not args.bcc:
        raise InputError("no recipients: give --to, --cc or --bcc")
    return await sendmail(
        to=args.to,
        from_=args.from_,
        subject=args.subject,
        body=body,
        mailtype="html" if args.html else "text",
        alt_text=alt,
        cc=args.cc or None,
        bcc=args.bcc or None,
        headers=headers or None,
        attachments=args.attach,
        relay=relay,
        concurrency=args.concurrency,
        timeout=args.timeout,
        debug=args.debug,
        log_file=args.log_file,
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


async def _demo(args: argparse.Namespace) -> Report:
    from .demo import LocalServer

    async with LocalServer(args.dir) as server:
        recipients = [f"user{i:03d}@demo.example" for i in range(1, args.recipients + 1)]
        report = await sendmail(
            to=recipients,
            from_="asmtp demo <demo@asmtp.example>",
            subject="Hello from asmtp",
            body="<h1>It works</h1><p>One message, one connection per recipient.</p>",
            mailtype="html",
            alt_text="It works. One message, one connection per recipient.",
            relay=Relay(server.host, server.port, tls="none", helo="demo-client.asmtp.example"),
            concurrency=args.concurrency,
            timeout=10.0,
            debug=args.debug,
        )
        if not args.json:
            print(
                f"\nThe demo server on {server.host}:{server.port} received "
                f"{server.received} message(s), kept in {server.directory}\n"
                f"  look at one:  cat {next(iter(sorted(server.directory.glob('*.eml'))), '')}\n"
                "  (demo over plaintext on loopback; real relays use TLS: see README.md)",
                file=sys.stderr,
            )
    return report


def print_report(report: Report, *, as_json: bool) -> None:
    if as_json:
        out = sys.stdout
        for r in report.results:
            out.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
        out.flush()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("recipient", "status", "code", "stage", "tls", "ms", "message"):
        table.add_column(col, overflow="fold")
    colours = {
        "delivered": "green",
        "transient": "yellow",
        "permanent": "red",
        "unknown": "magenta",
    }
    for r in report.results:
        table.add_row(
            r.recipient,
            f"[{colours[r.status]}]{r.status}[/]",
            str(r.code or ""),
            r.stage,
            r.tls,
            f"{r.elapsed * 1000:.0f}",
            r.message,
        )
    console = Console()
    console.print(table)
    counts = report.counts()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"{len(report)} recipient(s): {summary}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runner: Any = {"send": _send, "demo": _demo}[args.command]
    try:
        report = _run(runner(args))
    except InputError as exc:
        print(f"asmtp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_report(report, as_json=args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


def _run(coro: Any) -> Report:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[no-any-return]
    return uvloop.run(coro)  # type: ignore[no-any-return]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

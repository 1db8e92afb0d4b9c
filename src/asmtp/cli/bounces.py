"""``asmtp bounces``: read the mail that came back to a run's sender from an IMAP or POP3
mailbox, classify it (:mod:`asmtp.bounces`), and bring it back into the run: each
bounce recorded in the run's journal (``--journal``), hard bounces and complaints added
to a suppression list (``--suppress``) that ``asmtp send --suppress`` honours. A line
of JSON per bounce on stdout (``--json``), or a summary table on stderr.

A message is marked seen (or moved, or deleted) only after its bounces were recorded:
when the journal or the list cannot be written, it stays for the next run.

Exit status: 0 the mailbox was read, 1 it could not be (connection, TLS, login,
mailbox, or the journal or list could not be written), 2 bad usage, 130 interrupted.
Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import anyio.to_thread

from .._core.sanitize import printable
from .._delivery.journal import record_bounce
from .._delivery.personalise import check_personalisation
from .._delivery.suppress import SuppressionList
from ..bounces import Bounce, Mailbox, Returned, read_imap, read_pop3
from ..errors import InputError, SMTPError
from .options import (
    EXIT_FAILED,
    EXIT_OK,
    add_timeout,
    positive_float,
    run_loop,
    secret_from_env,
)

__all__ = ["add_bounces_parser", "cmd_bounces"]

#: the kinds that put a recipient on the suppression list: the address is gone, or its
#: owner asked for no more
SUPPRESSED_KINDS = ("hard", "complaint")
_KINDS = ("hard", "soft", "complaint", "auto-reply", "unknown")
_COLOURS = {"hard": "red", "soft": "yellow", "complaint": "magenta", "auto-reply": "cyan"}
_SAMPLES = 3


def add_bounces_parser(sub: Any) -> None:
    """Add ``asmtp bounces`` and its options to ``asmtp``'s subcommands."""
    cmd: argparse.ArgumentParser = sub.add_parser(
        "bounces",
        help="read bounces back from a mailbox",
        description="Read the messages that came back to a run's sender from an IMAP or "
        "POP3 mailbox, classify each (hard, soft, complaint, auto-reply, unknown) with "
        "its recipient, record them in the run's journal and suppress dead addresses.",
    )
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--imap",
        metavar="URL",
        help="imaps://USER@HOST[:PORT]/MAILBOX (implicit TLS) or imap://... (STARTTLS); "
        "USER percent-encoded (bounces%%40example.com)",
    )
    where.add_argument(
        "--pop3", metavar="URL", help="pop3s://USER@HOST[:PORT] or pop3://... (STLS)"
    )
    cmd.add_argument(
        "--password-env",
        metavar="VAR",
        required=True,
        help="the environment variable holding the mailbox password",
    )
    cmd.add_argument("--move-to", metavar="FOLDER", help="IMAP: move each message read here")
    cmd.add_argument("--follow", action="store_true", help="IMAP: then wait for new mail (IDLE)")
    cmd.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="with --follow: stop after this long (default: until interrupted)",
    )
    cmd.add_argument("--delete", action="store_true", help="POP3: delete each message read")
    cmd.add_argument(
        "--verp",
        metavar="TEMPLATE",
        help="the run's VERP sender, e.g. bounces+{token}@example.com: tells a bounce's "
        "recipient from the address it came back to",
    )
    cmd.add_argument("--journal", metavar="FILE", help="record each bounce in this run's journal")
    cmd.add_argument(
        "--suppress",
        metavar="FILE",
        help="add hard bounces and complaints to this suppression list",
    )
    cmd.add_argument("--ca-file", metavar="FILE", help="trust these CA certificates (PEM)")
    add_timeout(cmd)
    cmd.add_argument("--json", action="store_true", help="JSON Lines, one per bounce")


def _settings(args: argparse.Namespace) -> tuple[Mailbox, str, ssl.SSLContext]:
    url: str = args.imap or args.pop3
    mailbox = Mailbox.parse(url)
    flag = "--imap" if args.imap else "--pop3"
    if mailbox.protocol != flag[2:]:
        raise InputError(f"{flag} takes a {flag[2:]}:// or {flag[2:]}s:// URL")
    if args.pop3 and (args.move_to or args.follow):
        raise InputError("--move-to and --follow are for --imap (POP3 has no folders or IDLE)")
    if args.imap and args.delete:
        raise InputError("--delete is for --pop3 (with --imap: --move-to FOLDER)")
    if args.duration is not None and not args.follow:
        raise InputError("--duration goes with --follow")
    if args.verp is not None:
        check_personalisation(None, args.verp)
    password = secret_from_env("--password-env", args.password_env)
    context = ssl.create_default_context()
    if args.ca_file is not None:
        try:
            context.load_verify_locations(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"--ca-file: cannot read {args.ca_file}: {exc}") from None
    return mailbox, password, context


def cmd_bounces(args: argparse.Namespace) -> int:
    """Run ``asmtp bounces`` from parsed options; return the exit status."""
    mailbox, password, context = _settings(args)
    suppress = SuppressionList(args.suppress) if args.suppress else None
    counts: Counter[str] = Counter()
    samples: dict[str, list[str]] = {}
    failed: SMTPError | None = None

    async def run() -> None:
        nonlocal failed
        messages: AsyncIterator[Returned]
        if mailbox.protocol == "imap":
            messages = read_imap(
                mailbox,
                password=password,
                move_to=args.move_to,
                follow=args.follow,
                max_wait=args.duration,
                verp=args.verp,
                ssl_context=context,
                timeout=args.timeout,
            )
        else:
            messages = read_pop3(
                mailbox,
                password=password,
                delete=args.delete,
                verp=args.verp,
                ssl_context=context,
                timeout=args.timeout,
            )
        try:
            async for returned in messages:
                for bounce in returned.bounces:
                    record = await anyio.to_thread.run_sync(_handle, bounce, args, suppress)
                    counts[bounce.kind] += 1
                    shown = samples.setdefault(bounce.kind, [])
                    if len(shown) < _SAMPLES:
                        shown.append(_sample(bounce))
                    if args.json:
                        record["uid"] = returned.uid
                        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
                        sys.stdout.flush()
        except SMTPError as exc:
            failed = exc

    run_loop(run())
    # A mailbox that could not be read at all has nothing to sum up: the error says it.
    if not args.json and (failed is None or counts):
        _print_summary(mailbox, counts, samples)
    if failed is not None:
        print(f"asmtp: error: {printable(failed.message)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _handle(
    bounce: Bounce, args: argparse.Namespace, suppress: SuppressionList | None
) -> dict[str, Any]:
    """Record ``bounce`` in the journal and the suppression list (blocking: a worker
    thread); its JSON record, saying what was done."""
    record: dict[str, Any] = asdict(bounce)
    if args.journal is not None:
        record["journal"] = bounce.recipient is not None and record_bounce(
            Path(args.journal), bounce
        )
    if suppress is not None:
        added = False
        if bounce.recipient is not None and bounce.kind in SUPPRESSED_KINDS:
            reason = " ".join(
                part for part in (bounce.kind, bounce.status, date.today().isoformat()) if part
            )
            added = suppress.add(bounce.recipient, reason)
        record["suppressed"] = added
    return record


def _sample(bounce: Bounce) -> str:
    text = bounce.recipient or "(recipient unknown)"
    said = " ".join(part for part in (bounce.status, bounce.diagnostic) if part)
    return printable(f"{text}: {said}"[:200] if said else text)


def _print_summary(mailbox: Mailbox, counts: Counter[str], samples: dict[str, list[str]]) -> None:
    """The summary table on stderr: a row per kind of bounce, with a few samples."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120
    console = Console(file=sys.stderr, width=width, highlight=False, soft_wrap=False)
    table = Table(title=f"bounces in {mailbox.label}", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("for example", overflow="fold", ratio=1)
    table.add_column("bounces", justify="right", no_wrap=True)
    for kind in _KINDS:
        if counts[kind]:
            table.add_row(
                Text(kind, style=_COLOURS.get(kind, "")),
                Text("\n".join(samples.get(kind, []))),
                str(counts[kind]),
            )
    console.print(table)
    total = sum(counts.values())
    listed = ", ".join(f"{counts[k]} {k}" for k in _KINDS if counts[k])
    console.print(f"{total} bounce{'s' if total != 1 else ''}: {listed or 'none'}", markup=False)

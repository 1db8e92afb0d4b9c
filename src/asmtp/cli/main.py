"""The ``asmtp`` command, for people: ``asmtp send`` (one message to many recipients,
through a relay or straight to each domain's mail exchangers), ``asmtp mx`` (where mail
for a domain would go) and ``asmtp demo`` (try it on a local server). Owns turning
command-line options into the public API's settings, and results into tables and JSON
Lines. Layer 5: uses the public API only.

Every send (``--to``, ``--recipients FILE``, ``asmtp demo``) goes through
:class:`asmtp.Mailer` and one output path: results come as they complete (JSON Lines on
stdout with ``--json``, a line each in ``--log-file``), a progress bar and a summary
table go to stderr. The CLI keeps counts, not results: the table has a row per status
and reply with a few sample recipients, so its size does not grow with the list. Server
text shown on the terminal goes through :func:`asmtp._core.sanitize.printable`.

Bulk sending (``--recipients FILE``): every recipient gets a message addressed to them
alone (rendered per recipient when a CSV file's ``{column}`` placeholders are used; see
:mod:`asmtp._core.recipients`); the whole file is checked before anything is sent. The first
Ctrl-C takes no new recipients and lets the sessions in flight finish (the journal stays
complete); a second stops at once.

Exit status: 0 every recipient delivered (``mx``: every domain resolved); 1 any recipient
not delivered, "unknown" included (``mx``: any domain did not resolve); 2 bad usage or
bad input (nothing sent, no connection made); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import importlib
import json
import os
import re
import signal
import sqlite3
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import anyio

from .._core.address import check_header, check_mailbox, domain_of, parse_address_list
from .._core.message import (
    MessageIdRemover,
    PreparedMessage,
    build_message,
    prepare_envelope,
    prepare_message,
    with_headers,
)
from .._core.recipients import BadRow, Recipient, RecipientRows, address_key, decode_lines
from .._core.sanitize import printable
from .._delivery.api import format_log_line
from .._delivery.direct import DirectDelivery, plan_jobs
from .._delivery.journal import JournalIdentity, template_digest
from .._delivery.mailer import Job, Mailer
from .._delivery.retry import Rate, Retry
from .._delivery.session import default_helo, enable_debug
from .._io.resolver import MXHost, MXResolver
from .._version import __version__
from ..config import DSN, TLS_MODES, Direct, Relay, Timeouts, TLSMode
from ..errors import (
    InputError,
    JournalIdentityError,
    JournalRefusedError,
    ResolveError,
    SMTPError,
)
from ..results import RecipientResult
from .bench.main import add_bench_parser, main_bench
from .options import mail_domain, positive_float, positive_int

if TYPE_CHECKING:
    from ..testing import LocalServer  # imported when used: it brings the SMTP server

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_T = TypeVar("_T")

#: the order statuses are counted in, best first
_STATUSES = ("delivered", "transient", "permanent", "unknown")
_COLOURS = {"delivered": "green", "transient": "yellow", "permanent": "red", "unknown": "magenta"}
#: the console width from which the summary shows sample recipients beside the counts
_WIDTH_MESSAGE = 60
#: the summary's width when stderr is not a terminal and COLUMNS is not set
_PIPE_WIDTH = 120

# defaults of the direct-delivery options; None in the parser tells "not given"
_MX_PORT, _PER_DOMAIN, _DNS_TIMEOUT = 25, 10, 5.0
#: retries of a transient failure after the first try, in bulk sending
_RETRIES = 2
#: bad rows of a recipients file listed on stderr, at most
_BAD_ROWS_SHOWN = 50
#: sample recipients shown in a summary row
_SAMPLES = 3
#: summary rows kept apart, at most; replies beyond go to one "other replies" row a status
_MAX_ROWS = 30
#: characters of a sample's reply message kept
_SAMPLE_CHARS = 200
#: open files the process needs besides its sessions' sockets (the interpreter, the
#: event loop, DNS queries, the journal and log files)
_FD_HEADROOM = 32

# ----------------------------------------------------------------------- option types


def _host_port(value: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
            port = _port(rest[1:])
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        port = _port(text)
    if not host:
        raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
    return host, port


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {value!r}")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value!r}")
    return number


def _rate(value: str) -> Rate:
    try:
        return Rate.parse(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


# ----------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``asmtp`` argument parser (subcommands ``send``, ``mx``, ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="asmtp",
        description="Send one message to many recipients over SMTP, concurrently, "
        "with one result per recipient.",
        epilog="Exit status: 0 all delivered, 1 some not delivered, 2 bad usage or "
        "input (nothing sent), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"asmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_send(sub)
    _add_mx(sub)
    _add_demo(sub)
    add_bench_parser(sub)
    return parser


def _add_send(sub: Any) -> None:
    send: argparse.ArgumentParser = sub.add_parser(
        "send",
        help="send a message through a relay, or straight to the recipients' MX hosts",
        description="Send one message to every recipient, one session each, concurrently. "
        "With --relay the mail goes to that server (a submission port or smarthost); "
        "without it, straight to each recipient domain's mail exchangers (MX).",
    )
    message = send.add_argument_group("message")
    message.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="ADDR",
        help="the sender, e.g. 'Ann <ann@example.com>' (its address is also the envelope sender)",
    )
    message.add_argument(
        "--recipients",
        metavar="FILE",
        help="one address per line, or CSV with a header row naming an 'email' column "
        "whose other columns fill {column} in the subject and body; each recipient "
        "gets a message addressed to them alone ('-': standard input)",
    )
    for flag in ("--to", "--cc", "--bcc"):
        message.add_argument(
            flag,
            action="append",
            default=[],
            metavar="ADDRS",
            help="recipients, a comma list; may repeat"
            + (" (kept out of the headers)" if flag == "--bcc" else ""),
        )
    message.add_argument("--subject", default="", metavar="TEXT", help="the subject line")
    body = message.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", metavar="TEXT", help="the body (or --body-file)")
    body.add_argument("--body-file", metavar="FILE", type=Path, help="the body, from a UTF-8 file")
    message.add_argument("--html", action="store_true", help="the body is HTML")
    message.add_argument(
        "--no-html-escape",
        dest="html_escape",
        action="store_false",
        help="with --html: insert {column} values as they are (default: HTML-escaped, "
        "so that a value '<b>' shows as text)",
    )
    message.add_argument(
        "--alt-text-file", metavar="FILE", type=Path, help="with --html: a plain-text alternative"
    )
    message.add_argument(
        "--attach", action="append", default=[], metavar="FILE", help="attach a file; may repeat"
    )
    message.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a header line; may repeat",
    )

    relay = send.add_argument_group("relay")
    relay.add_argument(
        "--relay",
        type=_host_port,
        metavar="HOST[:PORT]",
        help="the server to hand the mail to (port default 587, or 465 with --tls implicit)",
    )
    relay.add_argument("--user", metavar="USER", help="authenticate as USER")
    relay.add_argument(
        "--password-env",
        metavar="VAR",
        help="with --user: the environment variable holding the password (never a flag of its own)",
    )
    relay.add_argument(
        "--allow-plaintext-auth",
        action="store_true",
        help="let AUTH go over an unencrypted connection",
    )

    direct = send.add_argument_group("direct delivery (without --relay)")
    direct.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="ask this DNS server (may repeat; default: the system's)",
    )
    direct.add_argument(
        "--mx-port", type=_port, metavar="N", help=f"the MX hosts' port (default {_MX_PORT})"
    )
    direct.add_argument(
        "--per-domain",
        type=positive_int,
        metavar="N",
        help=f"sessions open to one domain at once (default {_PER_DOMAIN})",
    )
    direct.add_argument(
        "--batch-per-domain",
        action="store_true",
        default=None,
        help="recipients of one domain share transactions",
    )
    direct.add_argument(
        "--dns-timeout",
        type=positive_float,
        metavar="SECONDS",
        help=f"per DNS query (default {_DNS_TIMEOUT:g})",
    )

    common = send.add_argument_group("delivery and output")
    common.add_argument(
        "--tls",
        choices=TLS_MODES,
        default=None,
        help="relay default: implicit on port 465, else starttls; "
        "direct default: opportunistic (implicit is not allowed)",
    )
    common.add_argument("--helo", metavar="NAME", help="the name to greet with (EHLO)")
    common.add_argument(
        "--concurrency",
        type=positive_int,
        default=100,
        metavar="N",
        help="sessions open at once (default 100)",
    )
    common.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="per network step (default 30)",
    )
    common.add_argument("--debug", action="store_true", help="the SMTP transcript on stderr")
    common.add_argument(
        "--json",
        action="store_true",
        help="JSON Lines on stdout, one per recipient, as results come",
    )
    common.add_argument(
        "--log-file",
        metavar="FILE",
        help="append a line per recipient to FILE (opened before anything is sent)",
    )

    bulk = send.add_argument_group(
        "bulk sending",
        "Used with --recipients; they work with --to as well.",
    )
    bulk.add_argument(
        "--journal",
        metavar="FILE",
        help="record each recipient's progress durably (a run killed at any moment "
        "can be resumed without losing or repeating a recipient)",
    )
    bulk.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --journal: skip recipients done, report as unknown "
        "those whose message may have arrived",
    )
    bulk.add_argument(
        "--campaign",
        metavar="NAME",
        help="name the run in --journal: a --resume run must give the same NAME, and may "
        "then change the message (default: the run is --from and the message's template)",
    )
    bulk.add_argument(
        "--ignore-identity",
        action="store_true",
        default=None,
        help="with --resume: continue the journal even though its run differs from this "
        "one (another --from, message or --campaign), or it predates journal headers",
    )
    bulk.add_argument("--rate", type=_rate, metavar="RATE", help="at most RATE, e.g. 50/s, 1000/h")
    bulk.add_argument(
        "--rate-per-domain", type=_rate, metavar="RATE", help="at most RATE to one domain"
    )
    bulk.add_argument(
        "--retries",
        type=_count,
        metavar="N",
        help=f"retry transient failures N times after the first try (default {_RETRIES} "
        "with --recipients or another bulk option, else 0)",
    )
    bulk.add_argument(
        "--unsubscribe-url",
        metavar="TEMPLATE",
        help="add one-click unsubscribe headers (RFC 8058): an https URL where "
        "{recipient} stands for the address",
    )
    bulk.add_argument(
        "--dsn",
        action="store_true",
        default=None,
        help="ask for delivery status notifications on failure and delay (RFC 3461)",
    )
    bulk.add_argument(
        "--verp",
        metavar="TEMPLATE",
        help="a sender per recipient, e.g. bounces+{token}@example.com "
        "({token}: the recipient as local=domain)",
    )
    bulk.add_argument(
        "--skip-invalid",
        action="store_true",
        default=None,
        help="report bad rows of --recipients as failed (stage input) and send to the rest "
        "(default: list them and send nothing)",
    )
    bulk.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )


def _add_mx(sub: Any) -> None:
    mx: argparse.ArgumentParser = sub.add_parser(
        "mx",
        help="show where mail for domains would go",
        description="Resolve each domain's mail exchangers as direct delivery would, "
        "and say what would happen to mail sent there.",
    )
    mx.add_argument(
        "domains", nargs="+", type=mail_domain, metavar="DOMAIN", help="a domain (or an address)"
    )
    mx.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="ask this DNS server (may repeat; default: the system's)",
    )
    mx.add_argument(
        "--dns-timeout",
        type=positive_float,
        default=_DNS_TIMEOUT,
        metavar="SECONDS",
        help=f"per DNS query (default {_DNS_TIMEOUT:g})",
    )
    mx.add_argument("--json", action="store_true", help="JSON Lines, one per domain")


def _add_demo(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="fan a message out through a local demo server",
        description="Start an SMTP server on 127.0.0.1 that keeps what it receives as "
        ".eml files, and send a message to many recipients through it.",
    )
    demo.add_argument(
        "--recipients", type=positive_int, default=30, metavar="N", help="how many (default 30)"
    )
    demo.add_argument(
        "--concurrency",
        type=positive_int,
        default=10,
        metavar="N",
        help="sessions open at once (default 10)",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the server keeps what it receives (default: a new temporary folder)",
    )
    demo.add_argument("--debug", action="store_true", help="the SMTP transcript on stderr")
    demo.add_argument("--json", action="store_true", help="JSON Lines, one per recipient")


# ----------------------------------------------------------------------- asmtp send


@dataclass(frozen=True)
class _MessageParts:
    """What every message of a send shares, read from the options and files."""

    subject: str
    body: str
    mailtype: str
    alt_text: str | None
    headers: list[tuple[str, str]] | None
    attachments: list[Any]
    #: {column} values go into an HTML body HTML-escaped (--no-html-escape: as they are)
    html_escape: bool = True

    def build(self, *, to: Any, from_: str, cc: Any = None, **changes: Any) -> EmailMessage:
        fields: dict[str, Any] = {
            "subject": self.subject,
            "body": self.body,
            "mailtype": self.mailtype,
            "alt_text": self.alt_text,
            "headers": self.headers,
            "attachments": self.attachments,
        }
        fields.update(changes)
        return build_message(to=to, from_=from_, cc=cc, **fields)


def _message_parts(args: argparse.Namespace) -> _MessageParts:
    """Check the message options and read their files (no I/O on the net)."""
    if args.alt_text_file is not None and not args.html:
        raise InputError("--alt-text-file goes with --html")
    if not args.html_escape and not args.html:
        raise InputError("--no-html-escape goes with --html")
    body = args.body if args.body is not None else _read_text(args.body_file, "--body-file")
    alt = _read_text(args.alt_text_file, "--alt-text-file") if args.alt_text_file else None
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise InputError(f"--header must be 'Name: value': {item!r}")
        headers.append((name.strip(), value.strip()))
    return _MessageParts(
        subject=args.subject,
        body=body,
        mailtype="html" if args.html else "text",
        alt_text=alt,
        headers=headers or None,
        attachments=list(args.attach),
        html_escape=args.html_escape,
    )


def _destination(args: argparse.Namespace) -> Relay | Direct:
    """A :class:`Relay` for ``--relay``, else a :class:`Direct`."""
    direct_flags = {
        "--dns-server": args.dns_server,
        "--mx-port": args.mx_port,
        "--per-domain": args.per_domain,
        "--batch-per-domain": args.batch_per_domain,
        "--dns-timeout": args.dns_timeout,
    }
    if args.relay is not None:
        given = [flag for flag, value in direct_flags.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)}: only for direct delivery (without --relay)")
        return _relay(args)
    auth = [
        flag
        for flag, value in (
            ("--user", args.user),
            ("--password-env", args.password_env),
            ("--allow-plaintext-auth", args.allow_plaintext_auth or None),
        )
        if value is not None
    ]
    if auth:
        raise InputError(
            f"{', '.join(auth)}: only with --relay (direct delivery to MX hosts "
            "does not authenticate)"
        )
    if args.tls == "implicit":
        raise InputError(
            "--tls implicit is for a relay's port 465; direct delivery takes "
            "opportunistic (the default), starttls or none"
        )
    dns_timeout = args.dns_timeout if args.dns_timeout is not None else _DNS_TIMEOUT
    # Check the DNS servers now (and that the system has some), not mid-send.
    MXResolver(args.dns_server, timeout=dns_timeout)
    return Direct(
        dns_servers=args.dns_server,
        dns_timeout=dns_timeout,
        port=args.mx_port if args.mx_port is not None else _MX_PORT,
        tls=cast(TLSMode, args.tls or "opportunistic"),
        helo=args.helo,
        per_domain=args.per_domain if args.per_domain is not None else _PER_DOMAIN,
        batch_per_domain=bool(args.batch_per_domain),
    )


def _relay(args: argparse.Namespace) -> Relay:
    host, port = args.relay
    password = None
    if args.password_env is not None and args.user is None:
        raise InputError("--password-env goes with --user")
    if args.user is not None:
        if not args.password_env:
            raise InputError("--user needs --password-env VAR (the password is never a flag)")
        password = os.environ.get(args.password_env)
        if password is None:
            raise InputError(f"--password-env: environment variable {args.password_env} is not set")
    return Relay(
        host,
        port or (465 if args.tls == "implicit" else 587),
        username=args.user,
        password=password,
        tls=cast(TLSMode | None, args.tls),
        allow_plaintext_auth=args.allow_plaintext_auth,
        helo=args.helo,
    )


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{flag}: cannot read {str(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag}: {str(path)!r} is not UTF-8 text: {exc.reason}") from exc


def _cmd_send(args: argparse.Namespace) -> int:
    # a plain --to send and a bulk run share one path: the Mailer, counts, one Ctrl-C
    return _cmd_bulk(args)


# ----------------------------------------------------------------------- asmtp send: bulk

#: options that make a bulk run (None in the parser: not given): retries by default,
#: a "key" in each JSON line. Without them a send tries each recipient once, as
#: :func:`asmtp.sendmail` does.
_BULK_OPTIONS = (
    "recipients",
    "journal",
    "resume",
    "rate",
    "rate_per_domain",
    "retries",
    "unsubscribe_url",
    "dsn",
    "verp",
    "skip_invalid",
)


def _is_bulk(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in _BULK_OPTIONS)


@dataclass(frozen=True)
class _BulkPlan:
    """A checked send (plain or bulk): the jobs (made lazily, in file order), how many,
    the file line of each job's key (for the JSON "line"), and the Mailer's settings."""

    jobs: Callable[[], Iterator[Job]]
    total: int
    #: the file line of a job's key, if it has one
    lines: Callable[[Any], int | None]
    duplicates: int
    mailer: dict[str, Any]
    #: why a bad row (by its key) is refused, with --skip-invalid
    refusals: Callable[[Any], str | None] = lambda key: None
    #: --batch-per-domain: a domain's recipients share sessions (see _DomainBatches)
    batched: bool = False
    #: the summary table's title (None: none, as in ``asmtp demo`` under its prompt)
    title: str | None = "asmtp send"


def _plan_bulk(args: argparse.Namespace) -> _BulkPlan:
    """Check every option and the whole recipients file; InputError before any I/O on
    the net (and before anything is sent)."""
    if args.resume and args.journal is None:
        raise InputError("--resume needs --journal FILE (the run to continue)")
    if args.skip_invalid and args.recipients is None:
        raise InputError("--skip-invalid goes with --recipients")
    if args.recipients is not None and (args.cc or args.bcc):
        raise InputError(
            "--cc and --bcc do not go with --recipients: each message is addressed to "
            "its recipient alone"
        )
    bulk = _is_bulk(args)
    if args.batch_per_domain and bulk:
        raise InputError(
            "--batch-per-domain is for a plain --to send: with --recipients or another "
            "bulk option each recipient has a session of its own"
        )
    parts = _message_parts(args)
    senders = parse_address_list(args.from_, field="--from")
    if len(senders) != 1:
        raise InputError(f"--from must be exactly one address: {args.from_!r}")
    sender = senders[0][1]
    mailer = _mailer_options(args)
    if args.recipients is None:
        if not (args.to or args.cc or args.bcc):
            raise InputError("no recipients: give --recipients FILE, --to, --cc or --bcc")
        for flag, values in (("--to", args.to), ("--cc", args.cc), ("--bcc", args.bcc)):
            parse_address_list(values, field=flag)  # a refusal names the flag
        # one message for all: To and Cc in its headers, Bcc not
        message = parts.build(to=args.to, from_=args.from_, cc=args.cc or None)
        env_sender, rcpts, prepared = prepare_envelope(
            message, sender, [*args.to, *args.cc, *args.bcc]
        )
        return _listed_plan(rcpts, prepared, env_sender, mailer, keyed=bulk)
    return _plan_recipients_file(args, parts, sender, mailer)


def _listed_plan(
    rcpts: Sequence[str],
    prepared: PreparedMessage,
    sender: str,
    mailer: dict[str, Any],
    *,
    keyed: bool,
    title: str | None = "asmtp send",
) -> _BulkPlan:
    """One prepared message to every recipient in ``rcpts``; ``keyed``: each result
    carries its key (the address as compared for duplicates) as in a bulk run."""
    relay = mailer["relay"]
    if isinstance(relay, Direct):
        # the domains take turns (as asmtp.send orders them), so that one busy domain
        # at the head of the list does not hold every session at its per-domain cap
        turns = plan_jobs(rcpts, replace(relay, batch_per_domain=False))
        rcpts = [rcpts[i] for [i] in turns]

    def listed() -> Iterator[Job]:
        for rcpt in rcpts:
            yield Job(rcpt, prepared, sender=sender, key=address_key(rcpt) if keyed else None)

    batched = isinstance(relay, Direct) and relay.batch_per_domain
    return _BulkPlan(listed, len(rcpts), lambda key: None, 0, mailer, batched=batched, title=title)


def _plan_recipients_file(
    args: argparse.Namespace, parts: _MessageParts, sender: str, mailer: dict[str, Any]
) -> _BulkPlan:
    source = "standard input" if args.recipients == "-" else args.recipients
    extras = parse_address_list(args.to, field="--to")
    store = _RecipientStore()
    with _recipients_file(args.recipients) as lines:
        rows = RecipientRows(lines)
        placeholders = rows.placeholders()
        texts = [parts.subject, parts.body, *([parts.alt_text] if parts.alt_text else [])]
        personal = any(placeholders.used(text) for text in texts)
        if extras and personal:
            raise InputError(
                "--to does not go with {column} placeholders: its recipients have no row "
                "to fill them from; add them to the recipients file"
            )
        # A value with a line break cannot go into a header: find such rows now.
        subject = parts.subject if placeholders.used(parts.subject) else None
        for row in rows:
            if isinstance(row, Recipient) and subject is not None:
                try:
                    check_header("Subject", placeholders.fill(subject, row.fields))
                except InputError:
                    reason = "a value for the subject holds a line break or control character"
                    store.add(row, reason)
                    continue
            store.add(row)
        for name, address in extras:
            store.add(Recipient(0, address, name))  # after the file's rows
        store.loaded()
    if store.refused and not args.skip_invalid:
        raise InputError(_bad_rows_text(source, store.refused, store.first_refused()))
    if not store.total:
        raise InputError(f"--recipients: no recipients in {source}")

    # Built once with every option checked (and attachments read) before anything is sent.
    base = parts.build(to=None, from_=args.from_)
    columns = rows.columns
    if personal:
        loaded = [
            (part.get_filename(), part.get_payload(decode=True), part.get_content_type())
            for part in base.iter_attachments()
        ]

        # Values go into an HTML body as text, not markup: a value "<script>" must not
        # become a script. The subject and plain text take them as they are.
        escape = html.escape if parts.mailtype == "html" and parts.html_escape else None

        def render(r: Recipient) -> EmailMessage:
            return parts.build(
                to=str(Address(display_name=r.name, addr_spec=r.address)),
                from_=args.from_,
                subject=placeholders.fill(parts.subject, r.fields),
                body=placeholders.fill(parts.body, r.fields, escape=escape),
                alt_text=placeholders.fill(parts.alt_text, r.fields) if parts.alt_text else None,
                attachments=loaded,
            )

        for first in store.recipients(columns, good_only=True):
            if isinstance(first, Recipient):
                render(first)  # whatever else could fail does so now
            break
    else:
        # One message for all: serialized once, with a To header and a Message-ID of
        # its own per recipient (so replies and bounces name their recipient).
        shared, found = MessageIdRemover()(prepare_message(base))
        id_domain = found or domain_of(sender)

    def in_order() -> Iterator[Job]:
        # file order, --to recipients after the file's; read back one row at a time
        for row in store.recipients(columns):
            if isinstance(row, BadRow):
                yield _refused_job(row, sender)
            elif personal:
                yield _personal_job(row, render, sender)
            else:
                yield _shared_job(row, shared, sender, id_domain)

    _warn_unknown_placeholders(rows, source, texts)
    return _BulkPlan(
        in_order, store.total, store.line_of, store.duplicates, mailer, store.refusal_of
    )


def _warn_unknown_placeholders(rows: RecipientRows, source: str, texts: list[str]) -> None:
    """One warning naming every ``{word}`` that no column fills (a typo, or a file
    without that column): such words are sent as written."""
    placeholders = rows.placeholders()
    unknown = sorted(set().union(*(placeholders.unknown(text) for text in texts)))
    if not unknown:
        return
    names = ", ".join("{" + name + "}" for name in unknown)
    verb = "matches" if len(unknown) == 1 else "match"
    columns = f"its columns: {', '.join(rows.columns)}" if rows.is_csv else "a plain list"
    print(
        printable(
            f"asmtp: warning: {names} {verb} no column of {source} ({columns}); sent as written"
        ),
        file=sys.stderr,
        flush=True,
    )


class _RecipientStore:
    """A checked recipients file kept in a private temporary SQLite database rather
    than in memory, so that a file of a million rows costs the process a few MB: the
    rows go in as they are read, and come back one at a time as their turn comes.
    Duplicates are kept out by a unique key (the first row stays); a refused row (a
    bad one, kept for --skip-invalid) keeps its reason. SQLite deletes the database
    when the process ends, however it ends."""

    def __init__(self) -> None:
        # "": a private on-disk database, unlinked as soon as it is made
        self._db = sqlite3.connect("", isolation_level=None)  # BEGIN and COMMIT are ours
        self._db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -8192;
            CREATE TABLE rows (
                seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, address TEXT NOT NULL,
                name TEXT NOT NULL, fields TEXT, key TEXT UNIQUE, reason TEXT
            );
            """
        )
        self._db.execute("BEGIN")  # one transaction for the whole file: fast
        self.total = self.refused = self.duplicates = 0

    def add(self, row: Recipient | BadRow, reason: str | None = None) -> None:
        values: tuple[int, str, str, str | None, str | None, str | None]
        if isinstance(row, BadRow):
            values = (row.line, row.text, "", None, None, row.reason)
        else:
            fields = json.dumps(list(row.fields.values())) if row.fields else None
            values = (row.line, row.address, row.name, fields, row.key, reason)
        added = self._db.execute(
            "INSERT OR IGNORE INTO rows (line, address, name, fields, key, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            values,
        ).rowcount
        if not added:
            self.duplicates += 1
            return
        self.total += 1
        if values[-1] is not None:
            self.refused += 1

    def loaded(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("CREATE INDEX refused ON rows (line) WHERE reason IS NOT NULL")

    def first_refused(self) -> list[BadRow]:
        found = self._db.execute(
            "SELECT line, address, reason FROM rows WHERE reason IS NOT NULL ORDER BY line LIMIT ?",
            (_BAD_ROWS_SHOWN,),
        )
        return [BadRow(line, text, reason) for line, text, reason in found]

    def recipients(
        self, columns: Sequence[str], *, good_only: bool = False
    ) -> Iterator[Recipient | BadRow]:
        """Every row in file order (``good_only``: those not refused)."""
        query = "SELECT line, address, name, fields, reason FROM rows"
        query += " WHERE reason IS NULL ORDER BY seq" if good_only else " ORDER BY seq"
        for line, address, name, fields, reason in self._db.execute(query):
            if reason is not None:
                yield BadRow(line, address, reason)
            elif fields is None:
                yield Recipient(line, address, name)
            else:
                cells = json.loads(fields)
                yield Recipient(line, address, name, dict(zip(columns, cells, strict=True)))

    def line_of(self, key: Any) -> int | None:
        """The file line of a job's key (for the JSON "line"); None for --to's."""
        if isinstance(key, int):  # a refused row's key is its line
            return key
        found = self._db.execute("SELECT line FROM rows WHERE key = ?", (key,)).fetchone()
        return found[0] if found and found[0] else None

    def refusal_of(self, key: Any) -> str | None:
        """Why the row keyed ``key`` (its line) was refused, as the result says it."""
        if not isinstance(key, int):
            return None
        found = self._db.execute(
            "SELECT reason FROM rows WHERE line = ? AND reason IS NOT NULL", (key,)
        ).fetchone()
        return f"line {key}: {found[0]}" if found else None


@contextlib.contextmanager
def _recipients_file(name: str) -> Iterator[Iterator[str]]:
    """The text lines of ``--recipients NAME`` ('-': standard input), read as they are
    used; a file that cannot be read, or is not UTF-8 or a valid list, is bad input."""
    try:
        with contextlib.ExitStack() as stack:
            binary = sys.stdin.buffer if name == "-" else stack.enter_context(open(name, "rb"))
            yield decode_lines(binary)
    except OSError as exc:
        raise InputError(f"--recipients: cannot read {name!r}: {exc.strerror}") from exc
    except sqlite3.Error as exc:  # e.g. the temporary folder is full
        raise InputError(f"--recipients: cannot keep the checked rows: {exc}") from exc
    except InputError as exc:
        if exc.message.startswith("--"):
            raise
        raise InputError(f"--recipients {name}: {exc.message}") from exc


def _personal_job(r: Recipient, render: Callable[[Recipient], EmailMessage], sender: str) -> Job:
    # rendered when the job's turn comes: a long list never holds every message at once
    return Job(r.address, partial(render, r), sender=sender, key=r.key)


def _shared_job(r: Recipient, shared: PreparedMessage, sender: str, id_domain: str) -> Job:
    to = formataddr((r.name, r.address))
    headers = [("To", to), ("Message-ID", make_msgid(domain=id_domain))]
    return Job(r.address, with_headers(shared, headers), sender=sender, key=r.key)


def _refused_job(row: BadRow, sender: str) -> Job:
    """A bad row kept with --skip-invalid: the Mailer records it as a permanent
    failure at stage "input" (in the results and the journal) and sends nothing."""
    try:
        [(_, recipient)] = parse_address_list(row.text, field="recipient")
    except (InputError, ValueError):
        recipient = row.text

    def refuse() -> EmailMessage:
        raise InputError(f"line {row.line}: {row.reason}")  # unless the address fails first

    return Job(recipient, refuse, sender=sender, key=row.line)


def _bad_rows_text(source: str, n: int, first: Sequence[BadRow]) -> str:
    """The refusal of a file with ``n`` bad rows, listing the ``first`` of them."""
    lines = [
        f"{source}: {n} bad row{'s' if n != 1 else ''}; nothing was sent "
        "(fix them, or pass --skip-invalid to report them as failed and send to the rest):"
    ]
    lines += [f"  {row}" for row in first[:_BAD_ROWS_SHOWN]]
    if n > _BAD_ROWS_SHOWN:
        lines.append(f"  ... and {n - _BAD_ROWS_SHOWN} more")
    return "\n".join(lines)


def _mailer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`asmtp.Mailer` settings for the options, checked."""
    if args.journal is not None:
        _check_journal(Path(args.journal), resume=bool(args.resume))
    elif args.campaign is not None:
        raise InputError("--campaign names the run in --journal: give --journal FILE")
    if args.ignore_identity and not args.resume:
        raise InputError("--ignore-identity goes with --resume")
    # a plain --to send tries once, as asmtp.sendmail does; a bulk run retries
    default_retries = _RETRIES if _is_bulk(args) else 0
    retries = args.retries if args.retries is not None else default_retries
    unsubscribe = args.unsubscribe_url
    if unsubscribe is not None:
        url = _try_template("--unsubscribe-url", unsubscribe)
        if not url.lower().startswith("https://"):
            raise InputError(f"--unsubscribe-url must be an https:// URL (RFC 8058): {url!r}")
        check_header("List-Unsubscribe", url)
    if args.verp is not None:
        if "{token}" not in args.verp:
            raise InputError("--verp must hold {token}, e.g. bounces+{token}@example.com")
        check_mailbox(_try_template("--verp", args.verp), field="--verp")
    return {
        "relay": _destination(args),
        "concurrency": args.concurrency,
        "timeout": args.timeout,
        "retry": Retry(attempts=retries + 1) if retries else None,
        "rate": args.rate,
        "rate_per_domain": args.rate_per_domain,
        "journal": args.journal,
        "resume": bool(args.resume),
        "identity": _journal_identity(args) if args.journal is not None else None,
        "campaign": args.campaign,
        "ignore_identity": bool(args.ignore_identity),
        "dsn": DSN() if args.dsn else None,
        "unsubscribe": unsubscribe,
        "verp": args.verp,
        "debug": args.debug,
    }


def _try_template(flag: str, template: str) -> str:
    """The template filled for a sample recipient (as the Mailer will fill it)."""
    try:
        return template.format(recipient="someone@example.org", token="someone=example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{flag}: {template!r} may hold only {{recipient}} and {{token}} in braces ({exc})"
        ) from None


def _check_journal(path: Path, *, resume: bool) -> None:
    """A journal of an earlier run is continued with --resume, never sent over again.
    Checked without creating the file: a run refused for bad input leaves none behind.
    The Mailer checks the rest when it opens (and locks) the journal: that it is an
    asmtp journal, not in use, and of this run."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"--journal: cannot use {str(path)!r}: {exc.strerror}") from exc
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"--journal: {str(path)!r} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            # a device or a pipe: never opened (reading /dev/zero would not end)
            raise InputError(f"--journal: {str(path)!r} is not a regular file")
        if st.st_size > 0 and not resume:
            raise InputError(
                f"--journal: {str(path)!r} holds an earlier run; pass --resume to continue "
                "it (recipients done are skipped), or give a new file"
            )
        writable = os.access(path, os.W_OK)
    else:
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"--journal: no folder {str(folder)!r}")
        writable = os.access(folder, os.W_OK)
    if not writable:
        raise InputError(f"--journal: cannot write {str(path)!r} (permission denied)")


def _journal_identity(args: argparse.Namespace) -> JournalIdentity:
    """The run --journal belongs to: the sender and a digest of the message's template
    (subject, body and alternative text with {placeholders} unfilled, type, headers,
    attachments' names and content), read from the options. --campaign is added by
    the Mailer (and then is what a resume compares)."""
    [(_, sender)] = parse_address_list(args.from_, field="--from")
    body = args.body if args.body is not None else _read_text(args.body_file, "--body-file")
    alt = _read_text(args.alt_text_file, "--alt-text-file") if args.alt_text_file else ""
    attachments = [Path(a) for a in args.attach]
    digest = template_digest(
        args.subject,
        body,
        alt,
        "html" if args.html else "text",
        f"escape={getattr(args, 'html_escape', True)}",
        f"{len(args.header)} headers",
        *args.header,
        f"{len(attachments)} attachments",
        *[piece for a in attachments for piece in (a.name, a)],
    )
    return JournalIdentity(sender=sender, message=digest)


def _cmd_bulk(args: argparse.Namespace) -> int:
    plan = _plan_bulk(args)
    plan.mailer["concurrency"] = _fit_open_files(plan.mailer["concurrency"])
    if args.debug:
        enable_debug()
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    run = _BulkRun(plan, as_json=args.json)
    log = None
    if args.log_file is not None:
        try:
            log = Path(args.log_file).open("a", encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise InputError(f"--log-file: cannot open {args.log_file!r}: {exc.strerror}") from exc
    run.log = log
    if show:
        run.progress = _ProgressBar(plan.total, forced=bool(args.progress))
    error: SMTPError | None = None
    try:
        _run(_deliver_bulk(plan, run))
    except JournalIdentityError as exc:  # nothing was sent: bad input, exit 2
        raise InputError(
            f"--journal: {exc.message}. Give a new --journal, or pass --ignore-identity to "
            "continue it anyway"
        ) from exc
    except JournalRefusedError:  # in use, not a journal: nothing was sent, exit 2
        raise
    except SMTPError as exc:  # e.g. the relay's name does not resolve, the journal broke
        error = exc
    finally:
        if run.progress is not None:
            run.progress.stop(run)
        if log is not None:
            log.close()
    run.print_summary()
    if error is not None:
        print(f"asmtp: error: {printable(error.message)}", file=sys.stderr)
        return EXIT_FAILED
    return run.exit_status()


async def _deliver_bulk(plan: _BulkPlan, run: _BulkRun) -> None:
    """Deliver every job; the first Ctrl-C stops taking new ones (those in flight finish
    and are journaled), a second one stops at once."""
    loop = asyncio.get_running_loop()
    scope = anyio.CancelScope()
    mailer: Mailer | _DomainBatches | None = None

    def interrupted() -> None:
        run.interrupts += 1
        if run.interrupts == 1 and mailer is not None:
            mailer.stop()
            run.notice(
                "asmtp: interrupted: sending to no new recipients; waiting for the "
                "sessions in flight (Ctrl-C again to stop at once)"
            )
        else:
            scope.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here: ^C raises
        installed = False
    try:
        with scope:
            if plan.batched:
                mailer = batches = _DomainBatches(**plan.mailer)
                run.started()
                await batches.run(list(plan.jobs()), run)
            else:
                async with Mailer(**plan.mailer) as mailer:
                    run.started()
                    async for result in mailer.deliver(run.counted(plan.jobs())):
                        run.add(result, mailer.skipped)
    finally:
        if mailer is not None:
            run.skipped = mailer.skipped
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
        if scope.cancel_called:
            run.notice("asmtp: stopped at once")


def _fit_open_files(concurrency: int, *, per_session: int = 2) -> int:
    """``concurrency``, or less when the open-file limit cannot hold that many
    sessions: the soft limit is raised toward the hard one first; else the sessions
    are capped, with one warning (not one "Too many open files" result each).

    A session holds one socket, but a finished session's socket is released a loop
    turn after its slot has opened the next one: two files a session, at the peak."""
    try:
        import resource
    except ImportError:  # no such limit to raise here (Windows)
        return concurrency
    need = concurrency * per_session + _FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return concurrency
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft >= need:
        return concurrency
    fitted = max(1, (soft - _FD_HEADROOM) // per_session)
    print(
        f"asmtp: warning: --concurrency {concurrency} needs about {need} open files and "
        f"the limit is {soft} (ulimit -n); sending with --concurrency {fitted}",
        file=sys.stderr,
        flush=True,
    )
    return fitted


class _DomainBatches:
    """``--batch-per-domain`` on a plain send: the recipients of one domain share
    sessions (up to the transaction's recipient limit each), as :func:`asmtp.send`
    does; the Mailer gives each recipient a session of its own. Stops as the Mailer
    does: :meth:`stop` takes no new batch, those under way finish."""

    def __init__(
        self, relay: Direct, *, concurrency: int, timeout: float, debug: bool, **_: Any
    ) -> None:
        # the other Mailer settings are those of a plain send: no retries, no journal
        self.relay = relay
        self.concurrency = concurrency
        self.timeouts = Timeouts.of(timeout)
        self.debug = debug
        self.skipped = 0
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def run(self, jobs: Sequence[Job], run: _BulkRun) -> None:
        if not jobs:
            return
        # a plain send's jobs share one prepared message and sender
        prepared, sender = jobs[0].message, jobs[0].sender or ""
        assert isinstance(prepared, PreparedMessage)
        helo = self.relay.helo or await default_helo()
        direct = DirectDelivery(self.relay, self.timeouts, helo=helo, debug=self.debug)
        batches = iter(plan_jobs([job.recipient for job in jobs], self.relay))

        async def worker() -> None:
            for batch in batches:
                if self._stopping:
                    return
                run.taken += len(batch)
                rcpts = [jobs[i].recipient for i in batch]
                for result in await direct.deliver(sender, rcpts, prepared):
                    run.add(result, 0)

        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(worker)


@dataclass
class _Row:
    """A summary row: how many results share a status and reply, and the first few
    recipients with their reply messages."""

    count: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)


class _BulkRun:
    """What a send has done so far, as it happens: the output (JSON Lines, the log file,
    the progress bar) and the counts for the summary. Keeps counts, not results: its
    size does not grow with the number of recipients."""

    def __init__(self, plan: _BulkPlan, *, as_json: bool) -> None:
        self.plan = plan
        self.as_json = as_json
        self.log: IO[str] | None = None
        self.progress: _ProgressBar | None = None
        self.interrupts = 0
        self.taken = 0
        self.done = 0
        self.skipped = 0
        self.statuses: Counter[str] = Counter()
        self.rows: dict[tuple[str, str], _Row] = {}
        self._began = time.monotonic()
        self._stdout_gone = False

    def started(self) -> None:
        self._began = time.monotonic()

    def counted(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """``jobs``, counting those the Mailer took (all but the not attempted)."""
        for job in jobs:
            self.taken += 1
            yield job

    @property
    def failed(self) -> int:
        """Results other than delivered."""
        return self.done - self.statuses["delivered"]

    def exit_status(self) -> int:
        if self.interrupts:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK

    def add(self, result: RecipientResult, skipped: int) -> None:
        self.done += 1
        self.skipped = skipped
        reason = self.plan.refusals(result.key)
        if reason is not None and result.stage == "input":
            result = replace(result, message=reason)
        self.statuses[result.status] += 1
        self._count(result)
        if self.as_json:
            record = result.as_dict()
            line = self.plan.lines(result.key)
            if line:
                record["line"] = line
            self._write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.log is not None:
            self.log.write(format_log_line(result))
            self.log.flush()
        if self.progress is not None:
            self.progress.update(self)

    def _count(self, result: RecipientResult) -> None:
        key = (result.status, _reply_label(result))
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= _MAX_ROWS:
                # a server answering with ever new codes must not grow the table
                key = (result.status, "other replies")
            row = self.rows.setdefault(key, _Row())
        row.count += 1
        if len(row.samples) < _SAMPLES:
            row.samples.append((result.recipient, result.message[:_SAMPLE_CHARS]))

    def _write(self, text: str) -> None:
        if self._stdout_gone:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            # the reader went away (``| head``): keep sending, the journal keeps count
            self._stdout_gone = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def notice(self, text: str) -> None:
        text = printable(text)
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    @property
    def hard_stopped(self) -> bool:
        return self.interrupts >= 2

    @property
    def not_attempted(self) -> int:
        # After a graceful stop the Mailer gives no result for jobs it had taken but
        # not yet started: those were not attempted either.
        if self.hard_stopped:
            return self.plan.total - self.taken
        return max(0, self.plan.total - self.done - self.skipped)

    @property
    def cut_off(self) -> int:
        """Taken but without a result: under way when a second Ctrl-C stopped the run."""
        if not self.hard_stopped:
            return 0
        return max(0, self.taken - self.done - self.skipped)

    def print_summary(self) -> None:
        """The summary table on stderr: a row per status and reply, with a few sample
        recipients (their replies' text made printable), then a line of counts."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self._began
        width = None
        if not sys.stderr.isatty() and "COLUMNS" not in os.environ:
            width = _PIPE_WIDTH
        console = Console(file=sys.stderr, width=width, highlight=False, soft_wrap=False)
        # too narrow for the samples beside the counts: they go below the table
        beside = console.width >= _WIDTH_MESSAGE
        table = Table(title=self.plan.title, title_justify="left")
        table.add_column("outcome", no_wrap=True)
        table.add_column("reply (or stage)", overflow="fold")
        if beside:
            table.add_column("for example", overflow="fold", ratio=1)
        table.add_column("recipients", justify="right", no_wrap=True)
        below: list[str] = []
        order = {status: n for n, status in enumerate(_STATUSES)}
        for (status, reply), row in sorted(
            self.rows.items(), key=lambda item: (order.get(item[0][0], 9), -item[1].count)
        ):
            more = row.count - len(row.samples)
            if status == "delivered":
                samples = [", ".join(printable(rcpt) for rcpt, _ in row.samples)]
                samples[0] += f" and {more} more" if more else ""
            else:
                # a reply message each: what the server said, shown safely
                samples = [
                    printable(f"{rcpt}: {message}" if message else rcpt)
                    for rcpt, message in row.samples
                ]
                samples += [f"and {more} more"] if more else []
            cells: list[Text | str] = [
                Text(status, style=_COLOURS.get(status, "")),
                Text(printable(reply)),
            ]
            if beside:
                cells.append(Text("\n".join(samples)))
            elif status != "delivered":
                below += [f"{reply}: {sample}" for sample in samples]
            table.add_row(*cells, str(row.count))
        for label, why, count in self._other_rows():
            table.add_row(label, why, *([""] if beside else []), str(count))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counts = ", ".join(f"{self.statuses[s]} {s}" for s in _STATUSES if self.statuses[s])
        n = self.plan.total
        line = f"{n} recipient{'s' if n != 1 else ''}: {counts or 'none sent'} ({elapsed:.2f} s"
        line += f", {rate:.1f}/s)" if self.done else ")"
        console.print(table)
        for text in below:
            console.print(text, markup=False)
        console.print(line, markup=False)

    def _other_rows(self) -> list[tuple[str, str, int]]:
        """Rows for recipients without a result of this run, and those sent once."""
        how = "interrupted" if self.interrupts else "the run broke off"
        journal = self.plan.mailer.get("journal") is not None
        rows = []
        if self.cut_off:
            why = (
                f"{how}; a --resume run sends them (unknown if the dot went out)"
                if journal
                else f"{how} mid-session; may have arrived if the dot went out"
            )
            rows.append(("unfinished", why, self.cut_off))
        if self.not_attempted:
            then = "a --resume run does them" if journal else "not sent"
            rows.append(("not attempted", f"{how}: {then}", self.not_attempted))
        if self.skipped:
            rows.append(("skipped", "already done per journal", self.skipped))
        if self.plan.duplicates:
            rows.append(("duplicates", "sent once", self.plan.duplicates))
        return rows


def _reply_label(result: RecipientResult) -> str:
    """``250``, ``550 5.1.1``, ``invalid input``, ``(connect)``: a summary row's reply."""
    if result.stage == "input":
        return "invalid input"
    if result.code is None:
        # refused or lost connection, timeout, TLS, a reply its command does not allow:
        # the stage says where (the sample rows say what)
        return f"({result.stage})"
    if result.status == "delivered" or not result.enhanced_status:
        return str(result.code)
    return f"{result.code} {result.enhanced_status}"


class _ProgressBar:
    """A rich progress bar on stderr: done of total, rate, ETA and counts by status."""

    def __init__(self, total: int, *, forced: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            Task,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")

        self.console = Console(file=sys.stderr, force_terminal=True if forced else None)
        self._progress = Progress(
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            RateColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task("sending", total=total, counts="")
        self._progress.start()

    def update(self, run: _BulkRun) -> None:
        counts = " ".join(
            f"[{_COLOURS[s]}]{run.statuses[s]} {s}[/]"
            for s in _STATUSES
            if run.statuses[s] or s == "delivered"
        )
        self._progress.update(self._task, completed=run.done + run.skipped, counts=counts)

    def stop(self, run: _BulkRun) -> None:
        self.update(run)
        self._progress.stop()


# ----------------------------------------------------------------------- asmtp demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..testing import LocalServer

    try:
        server = LocalServer(args.dir)
    except InputError as exc:
        raise InputError(f"--dir: {exc.message}") from None
    # the server's end of each session is a file of this process too
    concurrency = _fit_open_files(args.concurrency, per_session=4)
    if args.debug:
        enable_debug()
    run, where = _run(_demo(args, server, concurrency))
    run.print_summary()
    # with --json, stdout is for the JSON Lines alone
    if args.json:
        print(where, file=sys.stderr, flush=True)
    else:
        with _output() as out:
            out.write(where + "\n")
    return run.exit_status()


async def _demo(
    args: argparse.Namespace, server: LocalServer, concurrency: int
) -> tuple[_BulkRun, str]:
    async with server:
        recipients = [f"user{i:03d}@demo.example" for i in range(1, args.recipients + 1)]
        message = build_message(
            to=recipients,
            from_="asmtp demo <demo@asmtp.example>",
            subject="Hello from asmtp",
            body="<h1>It works</h1><p>One message, one connection per recipient.</p>",
            mailtype="html",
            alt_text="It works. One message, one connection per recipient.",
        )
        sender, rcpts, prepared = prepare_envelope(message, None, None)
        mailer = {
            "relay": Relay(server.host, server.port, tls="none", helo="demo-client.asmtp.example"),
            "concurrency": concurrency,
            "timeout": 10.0,
            "retry": None,
            "debug": args.debug,
        }
        plan = _listed_plan(rcpts, prepared, sender, mailer, keyed=False, title=None)
        run = _BulkRun(plan, as_json=args.json)
        await _deliver_bulk(plan, run)
        # the first file, without listing a folder that may hold many
        first = next(server.directory.glob("00001-*.eml"), None)
        where = (
            f"\nThe demo server on {server.host}:{server.port} received "
            f"{server.received} message(s), kept in {server.directory}\n"
        )
        if first is not None:
            where += f"  look at one:  cat {first}\n"
        where += "  (plaintext on loopback for the demo; real relays use TLS: see README.md)"
    return run, where


# ----------------------------------------------------------------------- asmtp mx


@dataclass(frozen=True)
class _MXOutcome:
    domain: str
    hosts: list[MXHost]
    error: ResolveError | None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else self.error.kind

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "domain": self.domain,
            "status": self.status,
            "hosts": [
                {"host": h.name, "preference": h.preference, "addresses": list(h.addresses)}
                for h in self.hosts
            ],
        }
        if self.error is not None:
            out["message"] = self.error.message
        return out


#: what sending to a domain would do, by ``ResolveError.kind``
_MX_VERDICTS = {
    "null_mx": "accepts no mail (null MX): sending fails at once, permanently",
    "nxdomain": "no such domain: sending fails at once, permanently",
    "no_address": "no mail exchanger has an address: sending fails permanently",
    "temporary": "DNS failed for now: sending fails transiently (try again later)",
}


def _cmd_mx(args: argparse.Namespace) -> int:
    # one resolver for every domain: one cache, shared queries in flight
    resolver = MXResolver(args.dns_server, timeout=args.dns_timeout)
    # each DOMAIN was checked by the parser (mail_domain): an address gives its domain
    outcomes = _run(_resolve_all(resolver, args.domains))
    with _output() as out:
        for outcome in outcomes:
            if args.json:
                out.write(json.dumps(outcome.as_dict(), ensure_ascii=False) + "\n")
            else:
                out.write(_mx_text(outcome))
    return EXIT_OK if all(o.error is None for o in outcomes) else EXIT_FAILED


async def _resolve_all(resolver: MXResolver, domains: Sequence[str]) -> list[_MXOutcome]:
    async def one(domain: str) -> _MXOutcome:
        try:
            return _MXOutcome(domain, await resolver.resolve(domain), None)
        except ResolveError as exc:
            return _MXOutcome(domain, [], exc)

    return list(await asyncio.gather(*(one(d) for d in domains)))


def _mx_text(outcome: _MXOutcome) -> str:
    # names and messages from DNS are shown through printable(): a terminal's, not JSON
    domain = printable(outcome.domain)
    if outcome.error is not None:
        verdict = _MX_VERDICTS.get(outcome.error.kind, "cannot be resolved")
        return f"{domain}: {verdict}\n  {printable(outcome.error.message)}\n"
    lines = [f"{domain}: mail goes to, in this order:"]
    names = [printable(h.name) for h in outcome.hosts]
    width = max(len(name) for name in names)
    for n, (name, host) in enumerate(zip(names, outcome.hosts, strict=True), 1):
        lines.append(
            f"  {n}. {name:<{width}}  preference {host.preference:<5} {', '.join(host.addresses)}"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- output


@contextlib.contextmanager
def _output() -> Iterator[IO[str]]:
    """Write to stdout; a reader that went away (``asmtp ... | head``) is not an error."""
    try:
        yield sys.stdout
        sys.stdout.flush()
    except BrokenPipeError:
        # keep the interpreter's final flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# ----------------------------------------------------------------------- main


#: what each command imports beyond asmtp's own dependencies: the ``cli`` extra
#: (``asmtp mx`` prints plain text and needs neither)
_EXTRA_MODULES = {
    "send": ("rich.console",),
    "bench": ("rich.console",),
    "demo": ("rich.console", "aiosmtpd.smtp"),
}


def _missing_extra(command: str) -> str | None:
    """The first package ``command`` needs that cannot be imported, checked before
    anything is sent (a summary that fails after the sends would hide the results)."""
    for module in _EXTRA_MODULES.get(command, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return module.partition(".")[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asmtp`` with ``argv`` (default: the process's); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"send": _cmd_send, "mx": _cmd_mx, "demo": _cmd_demo, "bench": main_bench}
    missing = _missing_extra(args.command)
    if missing is not None:
        print(
            f"asmtp: error: asmtp {args.command} needs {missing}, which the cli extra"
            " installs: pip install 'asmtp[cli]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return commands[args.command](args)
    except InputError as exc:
        message = _as_flags(exc.message) if args.command == "send" else exc.message
        print(f"asmtp: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


#: the names asmtp's API errors give their fields, and the send flags they came from
_FLAG_OF = {
    "from_": "--from",
    "sender": "--from",
    "to": "--to",
    "cc": "--cc",
    "bcc": "--bcc",
    "recipients": "--to/--cc/--bcc",
    "body": "--body",
    "alt_text": "--alt-text-file",
    "attachments": "--attach",
    "headers": "--header",
    "header name": "--header name",
    "header 'Subject'": "--subject",
    "header 'List-Unsubscribe'": "--unsubscribe-url",
    "header 'Content-Disposition'": "--attach (the file's name)",
    "header": "--header",
    "helo": "--helo",
    "username": "--user",
    "Relay host": "--relay",
    "timeout": "--timeout",
    "concurrency": "--concurrency",
}
_API_NAMES = "|".join(re.escape(name) for name in sorted(_FLAG_OF, key=len, reverse=True))
_API_FIELD = re.compile(f"^({_API_NAMES})(?=[: ])")


def _as_flags(message: str) -> str:
    """An API error's message naming the command-line flag, not the parameter:
    ``from_: 'x' must contain exactly one '@'`` -> ``--from: 'x' must ...``."""
    match = _API_FIELD.match(message)
    return message if match is None else _FLAG_OF[match.group(1)] + message[match.end() :]


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on a new event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: _T = uvloop.run(coro)  # typed whether or not uvloop ships its stubs
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

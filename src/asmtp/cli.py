"""The ``asmtp`` command, for people: ``asmtp send`` (one message to many recipients,
through a relay or straight to each domain's mail exchangers), ``asmtp mx`` (where mail
for a domain would go) and ``asmtp demo`` (try it on a local server). Owns turning
command-line options into the public API's settings, and results into tables and JSON
Lines. Layer 5: uses the public API only.

Bulk sending (``asmtp send --recipients FILE``, or any of --journal, --resume, --rate,
--retries, ...) goes through :class:`asmtp.Mailer`: every recipient gets a message
addressed to them alone (rendered per recipient when a CSV file's ``{column}``
placeholders are used; see :mod:`asmtp.recipients`), results come as they complete
(JSON Lines with ``--json``), a progress bar and a summary table go to stderr. The whole
file is checked before anything is sent. The first Ctrl-C takes no new recipients and
lets the sessions in flight finish (the journal stays complete); a second stops at once.

Exit status: 0 every recipient delivered (``mx``: every domain resolved); 1 any recipient
not delivered, "unknown" included (``mx``: any domain did not resolve); 2 bad usage or
bad input (nothing sent, no connection made); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import anyio

from . import __version__
from .address import check_header, check_mailbox, parse_address_list
from .api import format_log_line, sendmail
from .argtypes import positive_float, positive_int
from .bench import add_bench_parser, main_bench
from .config import DSN, TLS_MODES, Direct, Relay, TLSMode
from .errors import InputError, ResolveError, SMTPError
from .mailer import Job, Mailer
from .message import (
    PreparedMessage,
    build_message,
    prepare_envelope,
    prepare_message,
    with_headers,
)
from .recipients import BadRow, Recipient, RecipientList, address_key, parse_recipients
from .resolver import MXHost, MXResolver
from .results import RecipientResult, Report
from .retry import Rate, Retry
from .session import enable_debug

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "print_report",
    "print_results",
    "summary_line",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_T = TypeVar("_T")

#: the order statuses are counted in, best first
_STATUSES = ("delivered", "transient", "permanent", "unknown")
_COLOURS = {"delivered": "green", "transient": "yellow", "permanent": "red", "unknown": "magenta"}
#: console widths at which the table gains the message column, then the detail columns
_WIDTH_MESSAGE, _WIDTH_DETAIL = 60, 100
#: the table's width when stdout is not a terminal and COLUMNS is not set
_PIPE_WIDTH = 120

# defaults of the direct-delivery options; None in the parser tells "not given"
_MX_PORT, _PER_DOMAIN, _DNS_TIMEOUT = 25, 10, 5.0
#: retries of a transient failure after the first try, in bulk sending
_RETRIES = 2
#: bad rows of a recipients file listed on stderr, at most
_BAD_ROWS_SHOWN = 50

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
    message.add_argument("--from", dest="from_", required=True, metavar="ADDR")
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
    message.add_argument("--subject", default="", metavar="TEXT")
    body = message.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", metavar="TEXT")
    body.add_argument("--body-file", metavar="FILE", type=Path, help="UTF-8 text")
    message.add_argument("--html", action="store_true", help="the body is HTML")
    message.add_argument(
        "--alt-text-file", metavar="FILE", type=Path, help="with --html: a plain-text alternative"
    )
    message.add_argument("--attach", action="append", default=[], metavar="FILE")
    message.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")

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
        help="the environment variable holding the password (never a flag of its own)",
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
    common.add_argument("--json", action="store_true", help="JSON Lines, one per recipient")
    common.add_argument("--log-file", metavar="FILE", help="append a line per recipient")

    bulk = send.add_argument_group(
        "bulk sending",
        "Used with --recipients; with --to, any of these sends through the same engine "
        "(results as they complete, a summary on stderr).",
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
    bulk.add_argument("--rate", type=_rate, metavar="RATE", help="at most RATE, e.g. 50/s, 1000/h")
    bulk.add_argument(
        "--rate-per-domain", type=_rate, metavar="RATE", help="at most RATE to one domain"
    )
    bulk.add_argument(
        "--retries",
        type=_count,
        metavar="N",
        help=f"retry transient failures N times after the first try (default {_RETRIES})",
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
    mx.add_argument("domains", nargs="+", metavar="DOMAIN", help="a domain (or an address)")
    mx.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="ask this DNS server (may repeat; default: the system's)",
    )
    mx.add_argument("--dns-timeout", type=positive_float, default=_DNS_TIMEOUT, metavar="SECONDS")
    mx.add_argument("--json", action="store_true", help="JSON Lines, one per domain")


def _add_demo(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="fan a message out through a local demo server",
        description="Start an SMTP server on 127.0.0.1 that keeps what it receives as "
        ".eml files, and send a message to many recipients through it.",
    )
    demo.add_argument("--recipients", type=positive_int, default=30, metavar="N")
    demo.add_argument("--concurrency", type=positive_int, default=10, metavar="N")
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
    )


@dataclass(frozen=True)
class _SendPlan:
    """Everything ``asmtp send`` hands to :func:`asmtp.sendmail`, checked up front."""

    kwargs: dict[str, Any]


def _plan_send(args: argparse.Namespace) -> _SendPlan:
    """Check the options and read the files; raises InputError before any I/O on the net."""
    if not (args.to or args.cc or args.bcc):
        raise InputError("no recipients: give --to, --cc, --bcc or --recipients FILE")
    parts = _message_parts(args)
    return _SendPlan(
        {
            "to": args.to,
            "from_": args.from_,
            "subject": parts.subject,
            "body": parts.body,
            "mailtype": parts.mailtype,
            "alt_text": parts.alt_text,
            "cc": args.cc or None,
            "bcc": args.bcc or None,
            "headers": parts.headers,
            "attachments": parts.attachments,
            "relay": _destination(args),
            "concurrency": args.concurrency,
            "timeout": args.timeout,
            "debug": args.debug,
            "log_file": args.log_file,
        }
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
    if _is_bulk(args):
        return _cmd_bulk(args)
    plan = _plan_send(args)
    started = time.monotonic()
    report = _run(sendmail(**plan.kwargs))
    print_report(report, as_json=args.json, elapsed=time.monotonic() - started)
    return EXIT_OK if report.ok else EXIT_FAILED


# ----------------------------------------------------------------------- asmtp send: bulk

#: options that send through :class:`asmtp.Mailer` (None in the parser: not given)
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
    return bool(args.progress) or any(getattr(args, name) is not None for name in _BULK_OPTIONS)


@dataclass(frozen=True)
class _BulkPlan:
    """A checked bulk run: the jobs (made lazily, in file order), how many, the file
    line of each job's key (for the JSON "line"), and the Mailer's settings."""

    jobs: Callable[[], Iterator[Job]]
    total: int
    lines: Mapping[Any, int]
    duplicates: int
    mailer: dict[str, Any]
    #: why each bad row (by key) is refused, with --skip-invalid
    refusals: Mapping[Any, str] = field(default_factory=dict)


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
    parts = _message_parts(args)
    senders = parse_address_list(args.from_, field="--from")
    if len(senders) != 1:
        raise InputError(f"--from must be exactly one address: {args.from_!r}")
    sender = senders[0][1]
    mailer = _mailer_options(args)
    if args.recipients is None:
        if not (args.to or args.cc or args.bcc):
            raise InputError("no recipients: give --recipients FILE, --to, --cc or --bcc")
        # one message, as without the bulk options: To and Cc in its headers
        message = parts.build(to=args.to, from_=args.from_, cc=args.cc or None)
        env_sender, rcpts, prepared = prepare_envelope(
            message, sender, [*args.to, *args.cc, *args.bcc]
        )

        def listed() -> Iterator[Job]:
            for rcpt in rcpts:
                yield Job(rcpt, prepared, sender=env_sender, key=address_key(rcpt))

        return _BulkPlan(listed, len(rcpts), {}, 0, mailer)
    return _plan_recipients_file(args, parts, sender, mailer)


def _plan_recipients_file(
    args: argparse.Namespace, parts: _MessageParts, sender: str, mailer: dict[str, Any]
) -> _BulkPlan:
    source = "standard input" if args.recipients == "-" else args.recipients
    listing = _read_recipients(args.recipients)
    placeholders = listing.placeholders()
    texts = [parts.subject, parts.body, *([parts.alt_text] if parts.alt_text else [])]
    personal = any(placeholders.used(text) for text in texts)
    recipients = list(listing.recipients)
    bad = list(listing.bad_rows)
    duplicates = len(listing.duplicates)
    extras = parse_address_list(args.to, field="--to")
    if extras and personal:
        raise InputError(
            "--to does not go with {column} placeholders: its recipients have no row "
            "to fill them from; add them to the recipients file"
        )
    seen = {r.key for r in recipients}
    for name, address in extras:
        key = address_key(address)
        if key in seen:
            duplicates += 1
        else:
            seen.add(key)
            recipients.append(Recipient(0, address, name))
    if placeholders.used(parts.subject):
        # A value with a line break cannot go into a header: find such rows now.
        fit = []
        for r in recipients:
            try:
                check_header("Subject", placeholders.fill(parts.subject, r.fields))
            except InputError:
                bad.append(BadRow(r.line, r.address, "a value for the subject holds a line break"))
            else:
                fit.append(r)
        recipients = fit
        bad.sort(key=lambda row: row.line)
    if bad and not args.skip_invalid:
        raise InputError(_bad_rows_text(source, bad))
    if not recipients and not bad:
        raise InputError(f"--recipients: no recipients in {source}")

    # Built once with every option checked (and attachments read) before anything is sent.
    base = parts.build(to=None, from_=args.from_)
    jobs: list[tuple[int, Callable[[], Job]]] = []
    if personal:
        loaded = [
            (part.get_filename(), part.get_payload(decode=True), part.get_content_type())
            for part in base.iter_attachments()
        ]

        def render(r: Recipient) -> EmailMessage:
            return parts.build(
                to=str(Address(display_name=r.name, addr_spec=r.address)),
                from_=args.from_,
                subject=placeholders.fill(parts.subject, r.fields),
                body=placeholders.fill(parts.body, r.fields),
                alt_text=placeholders.fill(parts.alt_text, r.fields) if parts.alt_text else None,
                attachments=loaded,
            )

        if recipients:
            render(recipients[0])  # whatever else could fail does so now
        for r in recipients:
            jobs.append((r.line, partial(_personal_job, r, render, sender)))
    else:
        # One message for all: serialized once, with a To header per recipient.
        shared = prepare_message(base)
        for r in recipients:
            jobs.append((r.line, partial(_shared_job, r, shared, sender)))
    for row in bad:
        jobs.append((row.line, partial(_refused_job, row, sender)))
    # file order; --to recipients (line 0) after the file's
    jobs.sort(key=lambda item: (item[0] == 0, item[0]))
    lines: dict[Any, int] = {r.key: r.line for r in recipients if r.line}
    lines.update((row.line, row.line) for row in bad)

    def in_order() -> Iterator[Job]:
        for _, make in jobs:
            yield make()

    refusals = {row.line: f"line {row.line}: {row.reason}" for row in bad}
    return _BulkPlan(in_order, len(jobs), lines, duplicates, mailer, refusals)


def _personal_job(r: Recipient, render: Callable[[Recipient], EmailMessage], sender: str) -> Job:
    # rendered when the job's turn comes: a long list never holds every message at once
    return Job(r.address, partial(render, r), sender=sender, key=r.key)


def _shared_job(r: Recipient, shared: PreparedMessage, sender: str) -> Job:
    to = formataddr((r.name, r.address))
    return Job(r.address, with_headers(shared, [("To", to)]), sender=sender, key=r.key)


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


def _read_recipients(name: str) -> RecipientList:
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"--recipients: cannot read {name!r}: {exc.strerror}") from exc
    try:
        return parse_recipients(data)
    except InputError as exc:
        raise InputError(f"--recipients {name}: {exc.message}") from exc


def _bad_rows_text(source: str, bad: Sequence[BadRow]) -> str:
    n = len(bad)
    lines = [
        f"{source}: {n} bad row{'s' if n != 1 else ''}; nothing was sent "
        "(fix them, or pass --skip-invalid to report them as failed and send to the rest):"
    ]
    lines += [f"  {row}" for row in bad[:_BAD_ROWS_SHOWN]]
    if n > _BAD_ROWS_SHOWN:
        lines.append(f"  ... and {n - _BAD_ROWS_SHOWN} more")
    return "\n".join(lines)


def _mailer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`asmtp.Mailer` settings for the options, checked."""
    if args.journal is not None:
        _check_journal(Path(args.journal), resume=bool(args.resume))
    retries = args.retries if args.retries is not None else _RETRIES
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
    Checked without creating the file: a run refused for bad input leaves none behind."""
    if path.is_dir():
        raise InputError(f"--journal: {str(path)!r} is a folder, not a file")
    if path.exists():
        if path.stat().st_size > 0 and not resume:
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


def _cmd_bulk(args: argparse.Namespace) -> int:
    plan = _plan_bulk(args)
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
    except SMTPError as exc:  # e.g. the relay's name does not resolve, the journal broke
        error = exc
    finally:
        if run.progress is not None:
            run.progress.stop(run)
        if log is not None:
            log.close()
    if not args.json and run.failures:
        print_results(run.failures)
    run.print_summary()
    if error is not None:
        print(f"asmtp: error: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    if run.interrupts:
        return EXIT_INTERRUPTED
    return EXIT_OK if not run.failures else EXIT_FAILED


async def _deliver_bulk(plan: _BulkPlan, run: _BulkRun) -> None:
    """Deliver every job; the first Ctrl-C stops taking new ones (those in flight finish
    and are journaled), a second one stops at once."""
    loop = asyncio.get_running_loop()
    scope = anyio.CancelScope()
    mailer: Mailer | None = None

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


class _BulkRun:
    """What a bulk run has done so far, as it happens: the output (JSON Lines, the log
    file, the progress bar) and the counts for the summary."""

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
        self.rows: Counter[tuple[str, str]] = Counter()
        self.failures: list[RecipientResult] = []
        self._began = time.monotonic()
        self._stdout_gone = False

    def started(self) -> None:
        self._began = time.monotonic()

    def counted(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """``jobs``, counting those the Mailer took (all but the not attempted)."""
        for job in jobs:
            self.taken += 1
            yield job

    def add(self, result: RecipientResult, skipped: int) -> None:
        self.done += 1
        self.skipped = skipped
        reason = self.plan.refusals.get(result.key)
        if reason is not None and result.stage == "input":
            result = replace(result, message=reason)
        self.statuses[result.status] += 1
        self.rows[(result.status, _reply_label(result))] += 1
        if result.status != "delivered":
            self.failures.append(result)
        if self.as_json:
            record = result.as_dict()
            line = self.plan.lines.get(result.key)
            if line:
                record["line"] = line
            self._write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.log is not None:
            self.log.write(format_log_line(result))
            self.log.flush()
        if self.progress is not None:
            self.progress.update(self)

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
        """The summary table on stderr: outcomes by status and reply."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self._began
        table = Table(title="asmtp send", title_justify="left")
        table.add_column("outcome", no_wrap=True)
        table.add_column("reply (or stage)", overflow="fold")
        table.add_column("recipients", justify="right", no_wrap=True)
        order = {status: n for n, status in enumerate(_STATUSES)}
        for (status, reply), count in sorted(
            self.rows.items(), key=lambda item: (order.get(item[0][0], 9), -item[1])
        ):
            table.add_row(Text(status, style=_COLOURS.get(status, "")), Text(reply), str(count))
        how = "interrupted" if self.interrupts else "the run broke off"
        if self.cut_off:
            table.add_row(
                "unfinished",
                f"{how}; a --resume run sends them (unknown if the dot went out)",
                str(self.cut_off),
            )
        if self.not_attempted:
            table.add_row(
                "not attempted", f"{how}: a --resume run does them", str(self.not_attempted)
            )
        if self.skipped:
            table.add_row("skipped", "already done per journal", str(self.skipped))
        if self.plan.duplicates:
            table.add_row("duplicates", "sent once", str(self.plan.duplicates))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counts = ", ".join(f"{self.statuses[s]} {s}" for s in _STATUSES if self.statuses[s])
        n = self.plan.total
        line = f"{n} recipient{'s' if n != 1 else ''}: {counts or 'none sent'} ({elapsed:.2f} s"
        line += f", {rate:.1f}/s)" if self.done else ")"
        console = Console(file=sys.stderr, highlight=False, soft_wrap=False)
        console.print(table)
        console.print(line, markup=False, soft_wrap=True)


def _reply_label(result: RecipientResult) -> str:
    """``250``, ``550 5.1.1``, ``invalid input``, ``(connect)``: a summary row's reply."""
    if result.stage == "input":
        return "invalid input"
    if result.code is None:
        return f"no reply ({result.stage})"
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
    started = time.monotonic()
    report, where = _run(_demo(args))
    print_report(report, as_json=args.json, elapsed=time.monotonic() - started)
    # with --json, stdout is for the JSON Lines alone
    print(where, file=sys.stderr if args.json else sys.stdout, flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


async def _demo(args: argparse.Namespace) -> tuple[Report, str]:
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
        first = next(iter(sorted(server.directory.glob("*.eml"))), None)
        where = (
            f"\nThe demo server on {server.host}:{server.port} received "
            f"{server.received} message(s), kept in {server.directory}\n"
        )
        if first is not None:
            where += f"  look at one:  cat {first}\n"
        where += "  (plaintext on loopback for the demo; real relays use TLS: see README.md)"
    return report, where


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
    domains = [d.rpartition("@")[2] for d in args.domains]
    outcomes = _run(_resolve_all(resolver, domains))
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
    if outcome.error is not None:
        verdict = _MX_VERDICTS.get(outcome.error.kind, "cannot be resolved")
        return f"{outcome.domain}: {verdict}\n  {outcome.error.message}\n"
    lines = [f"{outcome.domain}: mail goes to, in this order:"]
    width = max(len(h.name) for h in outcome.hosts)
    for n, host in enumerate(outcome.hosts, 1):
        lines.append(
            f"  {n}. {host.name:<{width}}  preference {host.preference:<5} "
            f"{', '.join(host.addresses)}"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- output


def print_report(report: Report, *, as_json: bool, elapsed: float | None = None) -> None:
    """Print one JSON line per recipient, or a table and a summary line."""
    if as_json:
        with _output() as out:
            for r in report.results:
                out.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
        return
    print_results(report.results, summary=summary_line(report, elapsed))


def print_results(results: Sequence[RecipientResult], *, summary: str | None = None) -> None:
    """A table of ``results`` on stdout, fitted to its width, then ``summary``."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 here; the exit status belongs to the delivery
            raise BrokenPipeError

    width = None
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        width = _PIPE_WIDTH
    console = _Console(width=width, highlight=False, soft_wrap=False)
    with _output():
        console.print(_table(results, console.width))
        if console.width < _WIDTH_MESSAGE:
            # too narrow for a message column: the failures' messages below the table
            for r in results:
                if not r.ok and r.message:
                    console.print(f"{r.recipient}: {r.message}", markup=False)
        if summary is not None:
            console.print(summary, markup=False)


def _table(results: Sequence[RecipientResult], width: int) -> Any:
    from rich.table import Table
    from rich.text import Text

    detail = width >= _WIDTH_DETAIL
    # direct delivery: which MX host took (or refused) each recipient
    show_host = detail and any(r.tried for r in results)
    table = Table(show_lines=False)
    table.add_column("recipient", overflow="fold", min_width=12)
    table.add_column("status", no_wrap=True)
    table.add_column("code", overflow="fold")
    if detail:
        table.add_column("stage", no_wrap=True)
        if show_host:
            table.add_column("host", overflow="fold")
        table.add_column("tls", no_wrap=True)
        table.add_column("ms", justify="right", no_wrap=True)
    if width >= _WIDTH_MESSAGE:
        table.add_column("message", overflow="fold", ratio=1)
    for r in results:
        code = " ".join(str(part) for part in (r.code, r.enhanced_status) if part)
        # Text, not markup: addresses ("x@[192.0.2.1]") and replies may hold brackets
        row = [Text(r.recipient), Text(r.status, style=_COLOURS.get(r.status, "")), Text(code)]
        if detail:
            row.append(Text(r.stage))
            if show_host:
                row.append(Text(r.host or ""))
            row += [Text(r.tls), Text(f"{r.elapsed * 1000:.0f}")]
        if width >= _WIDTH_MESSAGE:
            row.append(Text(r.message))
        table.add_row(*row)
    return table


def summary_line(report: Report, elapsed: float | None = None) -> str:
    """``30 recipients: 28 delivered, 1 transient, 1 permanent (0.42 s)``."""
    counts = report.counts()
    parts = [f"{counts[s]} {s}" for s in _STATUSES if counts.get(s)]
    parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in _STATUSES]
    n = len(report)
    line = f"{n} recipient{'s' if n != 1 else ''}: {', '.join(parts) or 'none'}"
    if elapsed is not None:
        line += f" ({elapsed:.2f} s)"
    return line


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asmtp`` with ``argv`` (default: the process's); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"send": _cmd_send, "mx": _cmd_mx, "demo": _cmd_demo, "bench": main_bench}
    try:
        return commands[args.command](args)
    except InputError as exc:
        print(f"asmtp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


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

"""``asmtp send``: one message to many recipients, through a relay (``--relay``) or
straight to each domain's mail exchangers. Owns the command's options, the plan of a
send from them (checked before anything goes on the net: recipients from ``--to``,
``--cc``, ``--bcc`` or a file, see :mod:`asmtp.cli.bulk`), the run and its summary, and
the naming of the API's errors by the flags they came from.

A plain ``--to`` send and a bulk run take one path: :mod:`asmtp.cli.plan` makes the
plan, :mod:`asmtp.cli.run` delivers it through :class:`asmtp.Mailer` (Ctrl-C included)
and :mod:`asmtp.cli.output` shows it (JSON Lines, log file, progress bar, summary).
Exit status: 0 every recipient delivered; 1 any not ("unknown" included), or the run
broke off; 2 bad usage or input (nothing sent); 130 interrupted. Layer 6: may import
any layer below.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._core.address import parse_address_list
from .._core.prepared import prepare_envelope
from .._core.sanitize import printable
from .._core.tlsmap import TLS_LEVELS
from .._delivery.session import enable_debug
from ..config import TLS_MODES
from ..errors import InputError, JournalIdentityError, JournalRefusedError, SMTPError
from .bulk import plan_recipients_file
from .campaign import add_broker_options, check_broker, deliver_campaign
from .options import (
    EXIT_FAILED,
    add_dns_server,
    add_dns_timeout,
    add_proxy,
    add_timeout,
    fit_open_files,
    non_negative_int,
    port,
    positive_int,
    rate,
    relay_address,
    run_loop,
)
from .output import ProgressBar, RunOutput
from .plan import (
    MX_PORT,
    PER_DOMAIN,
    RETRIES,
    SendPlan,
    is_bulk,
    listed_plan,
    mailer_settings,
    message_parts,
)
from .run import deliver
from .tlsrpt import add_tls_policy_options, save_tls_report
from .workers import add_workers_option, start_workers

__all__ = ["add_send_parser", "as_flags", "cmd_send", "plan_send"]

# ----------------------------------------------------------------------- the options


def add_send_parser(sub: Any) -> None:
    """Add ``asmtp send`` and its options to ``asmtp``'s subcommands."""
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
        "so that a value '<b>' shows as text; with --template jinja: autoescape off)",
    )
    message.add_argument(
        "--template",
        choices=("placeholders", "jinja"),
        default="placeholders",
        help="with --recipients: how the subject, body and --alt-text-file take a row's "
        "columns: {column} placeholders (the default), or jinja: Jinja2 templates "
        "({{ column }}, {%% if %%}, filters) in a sandbox, every name checked against the "
        "CSV header before anything is sent, values HTML-escaped in an --html body; "
        "needs pip install 'asmtp[jinja]'",
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
        type=relay_address,
        metavar="HOST[:PORT]",
        help="the server to hand the mail to (port default 587, or 465 with --tls implicit), "
        "or unix:/PATH, a Unix-domain socket (TLS default none there)",
    )
    relay.add_argument(
        "--lmtp",
        action="store_true",
        help="the relay speaks LMTP (RFC 2033: LHLO, a reply per recipient); over TCP "
        "give the port (24 is common)",
    )
    relay.add_argument(
        "--client-cert",
        metavar="FILE",
        help="present this client certificate (PEM; its key too unless --client-key)",
    )
    relay.add_argument(
        "--client-key", metavar="FILE", help="with --client-cert: the key's PEM file"
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
    add_dns_server(direct)
    direct.add_argument(
        "--mx-port", type=port, metavar="N", help=f"the MX hosts' port (default {MX_PORT})"
    )
    direct.add_argument(
        "--per-domain",
        type=positive_int,
        metavar="N",
        help=f"sessions open to one domain at once (default {PER_DOMAIN})",
    )
    direct.add_argument(
        "--batch-per-domain",
        action="store_true",
        default=None,
        help="recipients of one domain share transactions",
    )
    direct.add_argument(
        "--shaping",
        metavar="FILE",
        help="how delivery adapts to each site (the MX hosts domains share): sessions, "
        "rates, reuse, rules by reply, from a TOML file; 'default' (the built-in settings, "
        "used without this flag) or 'off' (fixed --per-domain limits, a session per job)",
    )
    add_dns_timeout(direct, default=None)
    add_tls_policy_options(direct)

    common = send.add_argument_group("delivery and output")
    common.add_argument(
        "--tls",
        choices=sorted({*TLS_MODES, *TLS_LEVELS}),
        default=None,
        help="relay default: implicit on port 465, else starttls; direct default: "
        "policy (DANE with --trust-ad, else MTA-STS, else opportunistic; also dane, "
        "sts, opportunistic, starttls, none)",
    )
    common.add_argument("--helo", metavar="NAME", help="the name to greet with (EHLO)")
    common.add_argument(
        "--no-chunking",
        action="store_true",
        help="send with DATA even where the server offers CHUNKING (BDAT)",
    )
    common.add_argument(
        "--requiretls",
        action="store_true",
        help="REQUIRETLS (RFC 8689): send only over authenticated TLS to servers that "
        "offer REQUIRETLS, and ask every later hop to do the same",
    )
    add_proxy(common)
    common.add_argument(
        "--concurrency",
        type=positive_int,
        default=100,
        metavar="N",
        help="sessions open at once (default 100)",
    )
    add_workers_option(common)
    add_timeout(common)
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
    add_broker_options(bulk)
    bulk.add_argument(
        "--ignore-identity",
        action="store_true",
        default=None,
        help="with --resume: continue the journal even though its run differs from this "
        "one (another --from, message or --campaign), or it predates journal headers",
    )
    bulk.add_argument(
        "--suppress",
        metavar="FILE",
        help="never send to the addresses FILE lists (one per line, '# reason' after "
        "it; asmtp bounces --suppress adds to it): each is reported permanent, suppressed",
    )
    bulk.add_argument("--rate", type=rate, metavar="RATE", help="at most RATE, e.g. 50/s, 1000/h")
    bulk.add_argument(
        "--rate-per-domain", type=rate, metavar="RATE", help="at most RATE to one domain"
    )
    bulk.add_argument(
        "--retries",
        type=non_negative_int,
        metavar="N",
        help=f"retry transient failures N times after the first try (default {RETRIES} "
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


# ----------------------------------------------------------------------- the plan


def plan_send(args: argparse.Namespace) -> SendPlan:
    """Check every option and the whole recipients file; InputError before any I/O on
    the net (and before anything is sent)."""
    check_broker(args)
    if args.resume and args.journal is None:
        raise InputError("--resume needs --journal FILE (the run to continue)")
    if args.skip_invalid and args.recipients is None:
        raise InputError("--skip-invalid goes with --recipients")
    if args.template == "jinja" and args.recipients is None:
        raise InputError("--template jinja goes with --recipients (its rows are the values)")
    if args.recipients is not None and (args.cc or args.bcc):
        raise InputError(
            "--cc and --bcc do not go with --recipients: each message is addressed to "
            "its recipient alone"
        )
    bulk = is_bulk(args)
    if args.batch_per_domain and bulk:
        raise InputError(
            "--batch-per-domain is for a plain --to send: with --recipients or another "
            "bulk option each recipient has a session of its own"
        )
    parts = message_parts(args)
    senders = parse_address_list(args.from_, field="--from")
    if len(senders) != 1:
        raise InputError(f"--from must be exactly one address: {args.from_!r}")
    sender = senders[0][1]
    settings = mailer_settings(args)
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
        return listed_plan(rcpts, prepared, env_sender, settings, keyed=bulk)
    return plan_recipients_file(args, parts, sender, settings)


# ----------------------------------------------------------------------- the command


def cmd_send(args: argparse.Namespace) -> int:
    """Run ``asmtp send`` from parsed options; return the exit status."""
    # a plain --to send and a bulk run share one path: the Mailer, counts, one Ctrl-C
    plan = plan_send(args)
    fitted = fit_open_files(plan.settings.concurrency)
    plan = replace(plan, settings=replace(plan.settings, concurrency=fitted))
    if args.debug:
        enable_debug()
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    out = RunOutput(plan, as_json=args.json)
    log = None
    if args.log_file is not None:
        try:
            log = Path(args.log_file).open("a", encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise InputError(f"--log-file: cannot open {args.log_file!r}: {exc.strerror}") from exc
    out.log = log
    # forked now, with the plan checked and before the event loop (and any thread) starts
    workers = start_workers(args, plan)
    if show:
        out.progress = ProgressBar(plan.total, forced=bool(args.progress))
    error: SMTPError | None = None
    try:
        if args.broker is not None:  # queued for asmtp worker processes, and followed
            run_loop(deliver_campaign(plan, out, args))
        else:
            run_loop(deliver(plan, out, workers))
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
        if out.progress is not None:
            out.progress.stop(out)
        if log is not None:
            log.close()
        save_tls_report(args, plan.settings.relay)
    out.print_summary()
    if error is not None:
        print(f"asmtp: error: {printable(error.message)}", file=sys.stderr)
        return EXIT_FAILED
    return out.exit_status()


# ----------------------------------------------------------------------- errors by flag

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
    "Relay path": "--relay unix:",
    "client_cert": "--client-cert",
    "client_key": "--client-key",
    "timeout": "--timeout",
    "concurrency": "--concurrency",
    "tls": "--tls",
}
_API_NAMES = "|".join(re.escape(name) for name in sorted(_FLAG_OF, key=len, reverse=True))
_API_FIELD = re.compile(f"^({_API_NAMES})(?=[: ])")


def as_flags(message: str) -> str:
    """An API error's message naming the command-line flag, not the parameter:
    ``from_: 'x' must contain exactly one '@'`` -> ``--from: 'x' must ...``."""
    match = _API_FIELD.match(message)
    return message if match is None else _FLAG_OF[match.group(1)] + message[match.end() :]

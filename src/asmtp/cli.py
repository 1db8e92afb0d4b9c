"""The ``asmtp`` command, for people: ``asmtp send`` (one message to many recipients,
through a relay or straight to each domain's mail exchangers), ``asmtp mx`` (where mail
for a domain would go) and ``asmtp demo`` (try it on a local server). Owns turning
command-line options into the public API's settings, and results into tables and JSON
Lines. Layer 5: uses the public API only.

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
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from . import __version__
from .api import sendmail
from .config import TLS_MODES, Direct, Relay, TLSMode
from .errors import InputError, ResolveError
from .resolver import MXHost, MXResolver
from .results import RecipientResult, Report

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "print_report",
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


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {value!r}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


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
        type=_positive_int,
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
        type=_positive_float,
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
        type=_positive_int,
        default=100,
        metavar="N",
        help="sessions open at once (default 100)",
    )
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="per network step (default 30)",
    )
    common.add_argument("--debug", action="store_true", help="the SMTP transcript on stderr")
    common.add_argument("--json", action="store_true", help="JSON Lines, one per recipient")
    common.add_argument("--log-file", metavar="FILE", help="append a line per recipient")


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
    mx.add_argument("--dns-timeout", type=_positive_float, default=_DNS_TIMEOUT, metavar="SECONDS")
    mx.add_argument("--json", action="store_true", help="JSON Lines, one per domain")


def _add_demo(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="fan a message out through a local demo server",
        description="Start an SMTP server on 127.0.0.1 that keeps what it receives as "
        ".eml files, and send a message to many recipients through it.",
    )
    demo.add_argument("--recipients", type=_positive_int, default=30, metavar="N")
    demo.add_argument("--concurrency", type=_positive_int, default=10, metavar="N")
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
class _SendPlan:
    """Everything ``asmtp send`` hands to :func:`asmtp.sendmail`, checked up front."""

    kwargs: dict[str, Any]


def _plan_send(args: argparse.Namespace) -> _SendPlan:
    """Check the options and read the files; raises InputError before any I/O on the net."""
    if not (args.to or args.cc or args.bcc):
        raise InputError("no recipients: give --to, --cc or --bcc")
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
    return _SendPlan(
        {
            "to": args.to,
            "from_": args.from_,
            "subject": args.subject,
            "body": body,
            "mailtype": "html" if args.html else "text",
            "alt_text": alt,
            "cc": args.cc or None,
            "bcc": args.bcc or None,
            "headers": headers or None,
            "attachments": list(args.attach),
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
    plan = _plan_send(args)
    started = time.monotonic()
    report = _run(sendmail(**plan.kwargs))
    print_report(report, as_json=args.json, elapsed=time.monotonic() - started)
    return EXIT_OK if report.ok else EXIT_FAILED


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
        console.print(_table(report.results, console.width))
        if console.width < _WIDTH_MESSAGE:
            # too narrow for a message column: the failures' messages below the table
            for r in report.results:
                if not r.ok and r.message:
                    console.print(f"{r.recipient}: {r.message}", markup=False)
        console.print(summary_line(report, elapsed), markup=False)


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
    commands = {"send": _cmd_send, "mx": _cmd_mx, "demo": _cmd_demo}
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
    return uvloop.run(coro)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

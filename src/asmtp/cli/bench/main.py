"""``asmtp bench``: a load generator for load-testing your own SMTP server.

Owns the command: its options and their types, the :class:`~.config.BenchConfig` they
make, and the exit status. The rest of the package: :mod:`.config` (the run's settings
and its message), :mod:`.run` (the workers, the closed or open loop, the stages timed),
:mod:`.watch` (the ``on_stage`` observer), :mod:`.stats` (latency statistics),
:mod:`.tables` (the results as tables) and :mod:`.report` (a self-contained HTML file);
``--json`` prints the run's summary as one object.

Exit status: 0 every message accepted; 1 any message failed; 2 bad usage (no
``--messages`` and no ``--duration``, a bad option, a host that does not resolve; nothing
sent); 130 interrupted (the results so far are still printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ...config import TLS_MODES
from ...errors import InputError
from ..options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_proxy,
    host_port_or,
    output,
    password_from_env,
    positive_float,
    positive_int,
    proxy_from_args,
    rate_per_second,
    run_loop,
    size,
)
from .config import BenchConfig, build_bench_message
from .run import run_bench
from .tables import print_table

__all__ = [
    "add_bench_parser",
    "main_bench",
    "standalone_main",
]


# ----------------------------------------------------------------------- the command

_DESCRIPTION = (
    "Load-test an SMTP server you run: send many messages, concurrently, and report "
    "throughput, latency percentiles for each stage of the exchange and errors by reply "
    "code. Give --messages, --duration or both. Messages go to rcpt-N@DOMAIN, N counting "
    "up from 1; the same message (--size octets) is sent every time."
)
_EPILOG = (
    "Latency stages: connect (TCP, plus TLS with --tls implicit), greeting, ehlo, starttls, "
    "auth, envelope (MAIL to DATA's 354), message (content to the reply after the dot), "
    "session (a message's start to the reply after the dot: QUIT not included), quit, and "
    "queue (--rate: scheduled start to a free worker). Exit status: 0 all accepted, 1 some "
    "failed, 2 bad usage (nothing sent), 130 interrupted."
)


#: each option's help, as ``--help`` shows it (``%(default)s``: BenchConfig's default)
_HELP = {
    "HOST[:PORT]": "the server (port default 25)",
    "--messages": "send N messages",
    "--duration": "start messages for this long, then wait for those in flight (at most --timeout)",
    "--concurrency": "messages (and sessions) in flight at once (default %(default)s)",
    "--rate": (
        "open loop: start messages on a fixed schedule (R/s, R/m or R/h) and measure "
        "latency from each scheduled start; default: closed loop, each worker sends its "
        "next message as soon as the last is answered"
    ),
    "--reuse": (
        "keep each worker's session for message after message (default: a new session per message)"
    ),
    "--size": "message size, headers included (N, Nk, NM; default %(default)s)",
    "--recipients-per-message": "RCPTs per message (default %(default)s)",
    "--from": "MAIL FROM (default %(default)s)",
    "--to-domain": "recipients are rcpt-N@DOMAIN (default %(default)s)",
    "--tls": (
        "default %(default)s: plain SMTP, as a local server is usually load-tested; "
        "starttls (required), opportunistic (when offered) or implicit (TLS from the "
        "first byte, port-465 style)"
    ),
    "--no-verify": "do not check the server's certificate (your own self-signed one)",
    "--user": "AUTH as USER on every session",
    "--password-env": "the environment variable holding the password",
    "--allow-plaintext-auth": "allow AUTH with --tls none",
    "--helo": "the EHLO name (default %(default)s)",
    "--timeout": "per network step (default %(default)g)",
    "--json": "print the results as one JSON object",
    "--report": (
        "also write a self-contained HTML report (latency histograms, throughput over time)"
    ),
}

#: BenchConfig's defaults, by field: those of the options named after a field
_DEFAULTS = {f.name: f.default for f in fields(BenchConfig) if f.default is not MISSING}


def _option(group: Any, flag: str, **kwargs: Any) -> None:
    """Add ``flag`` to ``group`` with its help from :data:`_HELP` and, when it sets a
    BenchConfig field, that field's default."""
    dest = kwargs.get("dest", flag.removeprefix("--").replace("-", "_"))
    if dest in _DEFAULTS:
        kwargs.setdefault("default", _DEFAULTS[dest])
    group.add_argument(flag, help=_HELP[flag], **kwargs)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", type=host_port_or(25), metavar="HOST[:PORT]", help=_HELP["HOST[:PORT]"]
    )
    bound = parser.add_argument_group("how much (at least one)")
    _option(bound, "--messages", type=positive_int, metavar="N")
    _option(bound, "--duration", type=positive_float, metavar="SECONDS")
    load = parser.add_argument_group("load")
    _option(load, "--concurrency", type=positive_int, metavar="C")
    _option(load, "--rate", type=rate_per_second, metavar="R/s")
    _option(load, "--reuse", action="store_true")
    message = parser.add_argument_group("message")
    _option(message, "--size", type=size, metavar="OCTETS")
    _option(message, "--recipients-per-message", type=positive_int, metavar="R")
    _option(message, "--from", dest="sender", metavar="ADDR")
    _option(message, "--to-domain", metavar="DOMAIN")
    session = parser.add_argument_group("session")
    _option(session, "--tls", choices=TLS_MODES)
    _option(session, "--no-verify", action="store_true")
    _option(session, "--user", metavar="USER")
    _option(session, "--password-env", metavar="VAR")
    _option(session, "--allow-plaintext-auth", action="store_true")
    _option(session, "--helo", metavar="NAME")
    _option(session, "--timeout", type=positive_float, metavar="SECONDS")
    add_proxy(session)
    shown = parser.add_argument_group("output")
    _option(shown, "--json", action="store_true")
    _option(shown, "--report", type=Path, metavar="FILE.html")


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand to ``asmtp``'s subparsers; the parsed namespace
    carries ``handler=main_bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test an SMTP server: throughput, latency per stage, errors",
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    _add_options(parser)
    parser.set_defaults(handler=main_bench)


def _config(args: argparse.Namespace) -> BenchConfig:
    password = password_from_env(args.user, args.password_env)
    host, port = args.target
    # every other option named after a BenchConfig field sets that field
    settings = {name: value for name, value in vars(args).items() if name in _DEFAULTS}
    settings["proxy"] = proxy_from_args(args)  # the URL and its password, made a Proxy
    return BenchConfig(
        host=host,
        port=port,
        verify=not args.no_verify,
        username=args.user,
        password=password,
        **settings,
    )


def main_bench(args: argparse.Namespace) -> int:
    """Run ``asmtp bench`` from parsed options; print the results; return the exit
    status (0 all accepted, 1 some failed, 2 bad usage, 130 interrupted)."""
    try:
        config = _config(args)
        if args.report is not None and not args.report.parent.is_dir():
            raise InputError(f"--report: no such folder: {args.report.parent}")
        # Built here too, so a bad --size fails before anything is sent.
        build_bench_message(config.size, config.sender, config.to_domain)
        result = run_loop(run_bench(config))
    except InputError as exc:
        print(f"asmtp bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.report is not None:
        from .report import render_report

        args.report.write_text(render_report(result.summary, result.histograms), "utf-8")
    with output() as out:
        if args.json:
            out.write(json.dumps(result.summary) + "\n")
        else:
            print_table(result.summary)
    if result.interrupted:
        print("asmtp bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if result.failed else EXIT_OK


def standalone_main(argv: Sequence[str] | None = None) -> int:
    """``asmtp bench`` on its own (``argv`` without the word ``bench``)."""
    parser = argparse.ArgumentParser(prog="asmtp bench", description=_DESCRIPTION, epilog=_EPILOG)
    _add_options(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return main_bench(args)

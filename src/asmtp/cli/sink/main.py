"""``asmtp sink``: a load-test SMTP server, the counterpart of ``asmtp bench``, for
people load-testing their own clients (and asmtp's latency benchmark).

Owns the command: its options, the :class:`~.session.SinkSettings` they make, the
loopback check, the run (until ``--max-messages``, ``--duration`` or a signal), the
counters it prints (every ``--report-every`` seconds, on SIGUSR1 and on exit; one JSON
object a line with ``--json``) and the exit status. The exchange is
:mod:`.session`'s; the sockets and the round-trip emulation :mod:`.server`'s.

Exit status: 0 stopped by its bound or SIGTERM; 2 bad usage or the address cannot be
listened on; 130 interrupted (SIGINT; the counters are printed all the same).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import ssl
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ...errors import InputError
from ..options import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    host_port,
    output,
    positive_float,
    positive_int,
    run_loop,
    size,
)
from .server import SinkServer
from .session import DEFAULT_HOSTNAME, DEFAULT_MAX_SIZE, SinkSettings

__all__ = ["add_sink_parser", "is_loopback", "main_sink"]

DEFAULT_PORT = 2525
#: seconds given to replies still waiting for their time when the sink stops
_DRAIN = 1.0

_DESCRIPTION = (
    "Run an SMTP server that accepts every message and keeps none: a target for "
    "load-testing SMTP clients, with network latency emulated (--rtt) and faults injected "
    "(--refuse-rcpt, --421-after, --slow-greeting). It offers PIPELINING, 8BITMIME, SIZE, "
    "SMTPUTF8 and ENHANCEDSTATUSCODES; CHUNKING and STARTTLS when asked. It listens on "
    "127.0.0.1 unless --listen says otherwise, and prints its counters on exit, on SIGUSR1 "
    "and every --report-every seconds."
)
_EPILOG = (
    "Round trips: with --rtt MS each batch of replies (everything one read from the client "
    "asked for) is written MS after that read, and the greeting MS after the connection, so "
    "every write a client waits on costs one round trip. Exit status: 0 stopped by "
    "--max-messages, --duration or SIGTERM; 2 bad usage or cannot listen; 130 interrupted."
)


# ----------------------------------------------------------------------- argument types


def _listen(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (port default 2525; 0: a free one, printed at the start)."""
    text, free = value, False
    if value.endswith(":0") and (value.count(":") == 1 or value[:-2].endswith("]")):
        text, free = value[:-2], True
    host, number = host_port(text)
    if free:
        return host, 0
    return host, DEFAULT_PORT if number is None else number


def _milliseconds(value: str) -> float:
    """Milliseconds, 0 or more, as seconds."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {value!r}") from None
    if not 0 <= number <= 3_600_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 3600000 milliseconds: {value!r}")
    return number / 1000


def _share(value: str) -> float:
    """A share from 0 to 1, or a percentage: ``0.1``, ``10%``."""
    text = value.strip()
    scale = 100.0 if text.endswith("%") else 1.0
    try:
        number = float(text.removesuffix("%")) / scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a share (0.1 or 10%): {value!r}") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"a share is from 0 to 1 (0% to 100%): {value!r}")
    return number


# ----------------------------------------------------------------------- the parser


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", DEFAULT_PORT),
        metavar="HOST[:PORT]",
        help=f"where to listen (default 127.0.0.1:{DEFAULT_PORT}; port 0: a free one); "
        "an address other than loopback is warned about: the sink accepts anyone's mail",
    )
    latency = parser.add_argument_group("latency and faults")
    latency.add_argument(
        "--rtt",
        type=_milliseconds,
        default=0.0,
        metavar="MS",
        help="answer each batch of commands, and greet, this many milliseconds late: "
        "one emulated network round trip (default 0)",
    )
    latency.add_argument(
        "--handshake-rtt",
        action="store_true",
        help="greet one more --rtt late: the TCP handshake's round trip, which a real "
        "connection pays before the greeting's own (loopback connects at once)",
    )
    latency.add_argument(
        "--slow-greeting", type=_milliseconds, default=0.0, metavar="MS",
        help="greet this many milliseconds later still",
    )  # fmt: skip
    latency.add_argument(
        "--refuse-rcpt",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="answer this share of RCPTs 550, spread evenly (0.1 or 10%%: every tenth)",
    )
    latency.add_argument(
        "--421-after",
        dest="close_after",
        type=positive_int,
        metavar="N",
        help="after N messages on a connection, answer the next MAIL 421 and close it",
    )
    offers = parser.add_argument_group("what EHLO offers")
    offers.add_argument("--chunking", action="store_true", help="offer CHUNKING (BDAT)")
    offers.add_argument(
        "--no-pipelining", dest="pipelining", action="store_false", help="do not offer PIPELINING"
    )
    offers.add_argument(
        "--max-size", type=size, default=DEFAULT_MAX_SIZE, metavar="OCTETS",
        help="SIZE offered; larger messages are refused 552 (N, Nk, NM; 0: no limit; "
        "default 100M)",
    )  # fmt: skip
    offers.add_argument(
        "--hostname", default=DEFAULT_HOSTNAME, metavar="NAME",
        help="the name in the greeting and EHLO (default %(default)s)",
    )  # fmt: skip
    offers.add_argument("--starttls", action="store_true", help="offer STARTTLS (needs --cert)")
    offers.add_argument("--cert", type=Path, metavar="FILE.pem", help="certificate chain")
    offers.add_argument(
        "--key", type=Path, metavar="FILE.pem", help="private key (default: in --cert)"
    )
    bounds = parser.add_argument_group("how long")
    bounds.add_argument(
        "--max-messages", type=positive_int, metavar="N", help="stop after accepting N messages"
    )
    bounds.add_argument(
        "--duration", type=positive_float, metavar="SECONDS", help="stop after this long"
    )
    shown = parser.add_argument_group("output")
    shown.add_argument(
        "--report-every",
        type=positive_float,
        metavar="SECONDS",
        help="print the counters this often (they are always printed on exit and SIGUSR1)",
    )
    shown.add_argument("--json", action="store_true", help="one JSON object a line")


def add_sink_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sink`` subcommand to ``asmtp``'s subparsers."""
    parser = subparsers.add_parser(
        "sink",
        help="a load-test SMTP server: latency, faults, counters",
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    _add_options(parser)
    parser.set_defaults(handler=main_sink)


# ----------------------------------------------------------------------- the run


def _settings(args: argparse.Namespace) -> SinkSettings:
    return SinkSettings(
        hostname=args.hostname,
        rtt=args.rtt,
        handshake_rtt=args.handshake_rtt,
        slow_greeting=args.slow_greeting,
        refuse_rcpt=args.refuse_rcpt,
        close_after=args.close_after,
        pipelining=args.pipelining,
        chunking=args.chunking,
        max_size=args.max_size,
    )


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.cert is None and args.key is None and not args.starttls:
        return None
    if not args.starttls:
        raise InputError("--cert and --key go with --starttls")
    if args.cert is None:
        raise InputError("--starttls needs --cert FILE.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"--cert/--key: cannot load the certificate: {exc}") from None
    return context


def is_loopback(addresses: Iterable[str]) -> bool:
    """Whether every address is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def main_sink(args: argparse.Namespace) -> int:
    """Run ``asmtp sink`` from parsed options; return the exit status."""
    try:
        settings = _settings(args)
        context = _ssl_context(args)
    except (InputError, ValueError) as exc:
        print(f"asmtp sink: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _raise_open_files()
    return run_loop(_serve(args, settings, context))


def _raise_open_files() -> None:
    """The open-file limit as high as allowed: each connection is a file."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(args: argparse.Namespace, settings: SinkSettings, context: Any) -> int:
    host, port = args.listen
    sink = SinkServer(
        settings, host=host, port=port, ssl_context=context, max_messages=args.max_messages
    )
    try:
        await sink.start()
    except OSError as exc:
        print(f"asmtp sink: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    where = [address for address, _ in sink.addresses]
    if not is_loopback(where):
        print(
            f"asmtp sink: warning: listening on {', '.join(where)}, not loopback only: "
            "anyone who can reach it can send to this sink",
            file=sys.stderr,
        )
    started = time.monotonic()
    reporter = _Reporter(sys.stdout, args.json, sink, started)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why: list[str] = []

    def stop_for(reason: str) -> None:
        why.append(reason)
        stop.set()

    handled = []
    for signum, action in (
        (signal.SIGTERM, lambda: stop_for("SIGTERM")),
        (signal.SIGINT, lambda: stop_for("SIGINT")),
        (signal.SIGUSR1, lambda: reporter.report(final=False)),
    ):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, action)
            handled.append(signum)
    reporter.listening(settings, context is not None)  # once a signal would be handled
    waits = [loop.create_task(stop.wait()), loop.create_task(sink.done.wait())]
    try:
        deadline = None if args.duration is None else started + args.duration
        every = args.report_every
        while not any(w.done() for w in waits):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            report = every is not None and (left is None or every < left)
            timeout = every if report else left
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done and report:
                reporter.report(final=False)
    finally:
        for wait in waits:
            wait.cancel()
        await sink.stop(drain=max(settings.rtt, settings.greeting_delay) + _DRAIN)
        for signum in handled:
            loop.remove_signal_handler(signum)
    reporter.report(final=True)
    return EXIT_INTERRUPTED if "SIGINT" in why else EXIT_OK


class _Reporter:
    """The counters as text or JSON lines on ``out`` (a reader that went away is no error)."""

    def __init__(self, out: IO[str], as_json: bool, sink: SinkServer, started: float) -> None:
        self._out = out
        self._json = as_json
        self._sink = sink
        self._started = started

    def _print(self, line: str) -> None:
        with output():
            self._out.write(line + "\n")
            self._out.flush()

    def listening(self, settings: SinkSettings, starttls: bool) -> None:
        host, port = self._sink.addresses[0]
        if self._json:
            fields: dict[str, Any] = {"listening": f"{host}:{port}", "host": host, "port": port}
            fields["settings"] = {
                "rtt_ms": settings.rtt * 1000,
                "handshake_rtt": settings.handshake_rtt,
                "slow_greeting_ms": settings.slow_greeting * 1000,
                "refuse_rcpt": settings.refuse_rcpt,
                "close_after": settings.close_after,
                "pipelining": settings.pipelining,
                "chunking": settings.chunking,
                "starttls": starttls,
                "max_size": settings.max_size,
            }
            self._print(json.dumps(fields))
            return
        shown = f"[{host}]" if ":" in host else host
        extras = [f"rtt {settings.rtt * 1000:g} ms"] if settings.rtt else []
        if settings.handshake_rtt and settings.rtt:
            extras.append("greeting one more rtt late")
        if settings.slow_greeting:
            extras.append(f"greeting {settings.slow_greeting * 1000:g} ms late")
        if settings.refuse_rcpt:
            extras.append(f"{settings.refuse_rcpt:.0%} of RCPTs refused")
        if settings.close_after:
            extras.append(f"421 after {settings.close_after} messages")
        if settings.chunking:
            extras.append("CHUNKING")
        if starttls:
            extras.append("STARTTLS")
        if not settings.pipelining:
            extras.append("no PIPELINING")
        self._print(
            f"asmtp sink: listening on {shown}:{port}"
            + (f" ({', '.join(extras)})" if extras else "")
        )

    def report(self, *, final: bool) -> None:
        elapsed = time.monotonic() - self._started
        counts = self._sink.counters.snapshot()
        rate = counts["messages"] / elapsed if elapsed > 0 else 0.0
        if self._json:
            record = {"elapsed": round(elapsed, 3), "final": final, **counts}
            record["messages_per_second"] = round(rate, 1)
            self._print(json.dumps(record))
            return
        trips = counts["round_trips"] / counts["messages"] if counts["messages"] else 0.0
        line = (
            f"{'final' if final else 'so far'}: {elapsed:.1f} s, {counts['messages']:,} messages"
            f" ({rate:,.1f}/s; {counts['via_bdat']:,} by BDAT), {counts['recipients']:,}"
            f" recipients, {counts['refused']:,} RCPTs refused, {counts['connections']:,}"
            f" connections ({counts['open']:,} open, peak {counts['peak_open']:,}),"
            f" {counts['closed_421']:,} closed by 421, {trips:.1f} round trips a message"
        )
        self._print(line)

"""The ``asmtp`` command's entry point: the parser wiring (each subcommand adds its own
options from its module) and :func:`main`, which runs a command and turns its errors
into exit statuses.

The commands: ``asmtp send`` (:mod:`asmtp.cli.send`: one message to many recipients,
through a relay or straight to each domain's mail exchangers), ``asmtp mx``
(:mod:`asmtp.cli.mx`: where mail for a domain would go), ``asmtp demo``
(:mod:`asmtp.cli.demo`: try it on a local server), ``asmtp bench``
(:mod:`asmtp.cli.bench`: load-test your own server) and ``asmtp sink``
(:mod:`asmtp.cli.sink`: a server to load-test your own client) and ``asmtp bounces``
(:mod:`asmtp.cli.bounces`: read bounces back from a mailbox). What they share
(argument types, exit statuses, the event-loop runner, stdout plumbing) is in
:mod:`asmtp.cli.options`.

Exit status: 0 every recipient delivered (``mx``: every domain resolved); 1 any recipient
not delivered, "unknown" included (``mx``: any domain did not resolve); 2 bad usage or
bad input (nothing sent, no connection made), or the ``cli`` extra missing; 130
interrupted. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from .._version import __version__
from ..errors import InputError
from .bench.main import add_bench_parser, main_bench
from .bounces import add_bounces_parser, cmd_bounces
from .campaign import add_campaign_parser, cmd_campaign
from .demo import add_demo_parser, cmd_demo
from .mx import add_mx_parser, cmd_mx
from .options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .send import add_send_parser, as_flags, cmd_send
from .sink.main import add_sink_parser, main_sink
from .tlsrpt import add_tlsrpt_parser, cmd_tlsrpt
from .worker import add_worker_parser, cmd_worker

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: each command's runner: parsed options in, exit status out
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "send": cmd_send,
    "mx": cmd_mx,
    "demo": cmd_demo,
    "bench": main_bench,
    "sink": main_sink,
    "bounces": cmd_bounces,
    "tlsrpt": cmd_tlsrpt,
    "worker": cmd_worker,
    "campaign": cmd_campaign,
}

#: what each command imports beyond asmtp's own dependencies: the ``cli`` extra
#: (``asmtp mx`` prints plain text and needs neither)
_EXTRA_MODULES = {
    "send": ("rich.console",),
    "bench": ("rich.console",),
    "demo": ("rich.console", "aiosmtpd.smtp"),
    "bounces": ("rich.console",),
    "worker": ("celery", "redis"),
    "campaign": ("redis",),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``asmtp`` argument parser (subcommands ``send``, ``mx``, ``demo``, ``bench``,
    ``sink``)."""
    parser = argparse.ArgumentParser(
        prog="asmtp",
        description="Send one message to many recipients over SMTP, concurrently, "
        "with one result per recipient.",
        epilog="Exit status: 0 all delivered, 1 some not delivered, 2 bad usage or "
        "input (nothing sent), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"asmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_send_parser(sub)
    add_mx_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_sink_parser(sub)
    add_bounces_parser(sub)
    add_tlsrpt_parser(sub)
    add_worker_parser(sub)
    add_campaign_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asmtp`` with ``argv`` (default: the process's); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_extra(args.command)
    if missing is not None:
        extra = "celery" if args.command in ("worker", "campaign") else "cli"
        print(
            f"asmtp: error: asmtp {args.command} needs {missing}, which the {extra} extra"
            f" installs: pip install 'asmtp[cli,{extra}]'".replace("cli,cli", "cli"),
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except InputError as exc:
        message = as_flags(exc.message) if args.command == "send" else exc.message
        print(f"asmtp: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asmtp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _missing_extra(command: str) -> str | None:
    """The first package ``command`` needs that cannot be imported, checked before
    anything is sent (a summary that fails after the sends would hide the results)."""
    for module in _EXTRA_MODULES.get(command, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return module.partition(".")[0]
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

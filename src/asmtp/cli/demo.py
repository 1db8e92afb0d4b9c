"""``asmtp demo``: try asmtp on this machine. Owns the command's options and the demo
itself: an SMTP server on 127.0.0.1 (:class:`asmtp.testing.LocalServer`, which keeps what
it receives as .eml files) and one message sent through it to many recipients, run and
shown as ``asmtp send`` runs and shows a send; or, with ``--serve``, that server kept
running for your own sends (``asmtp send``, the examples) until Ctrl-C or ``--minutes``.

Needs aiosmtpd and rich (the ``cli`` extra), imported when the demo runs. Exit status as
``asmtp send``'s. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core.message import build_message
from .._core.prepared import prepare_envelope
from .._delivery.session import enable_debug
from ..config import Relay
from ..errors import InputError
from .options import (
    EXIT_OK,
    fit_open_files,
    output,
    port_or_any,
    positive_float,
    positive_int,
    run_loop,
)
from .output import RunOutput
from .plan import MailerSettings, listed_plan
from .run import deliver

if TYPE_CHECKING:
    from ..testing import LocalServer  # imported when used: it brings the SMTP server

__all__ = ["add_demo_parser", "cmd_demo"]


def add_demo_parser(sub: Any) -> None:
    """Add ``asmtp demo`` and its options to ``asmtp``'s subcommands."""
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="fan a message out through a local demo server",
        description="Start an SMTP server on 127.0.0.1 that keeps what it receives as "
        ".eml files, and send a message to many recipients through it (or, with --serve, "
        "keep it running for your own sends).",
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
    serve = demo.add_argument_group("serve")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="send nothing: keep the server running for other programs until Ctrl-C",
    )
    serve.add_argument(
        "--port",
        type=port_or_any,
        default=0,
        metavar="PORT",
        help="with --serve: the port on 127.0.0.1 (default: a free one, printed)",
    )
    serve.add_argument(
        "--minutes",
        type=positive_float,
        default=60.0,
        metavar="M",
        help="with --serve: stop by itself after this long (default 60)",
    )
    demo.add_argument("--debug", action="store_true", help="the SMTP transcript on stderr")
    demo.add_argument("--json", action="store_true", help="JSON Lines, one per recipient")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``asmtp demo`` from parsed options; return the exit status."""
    from ..testing import LocalServer

    if (args.port or args.minutes != 60.0) and not args.serve:
        raise InputError("--port and --minutes go with --serve")
    try:
        server = LocalServer(args.dir, port=args.port)
    except InputError as exc:
        raise InputError(f"--dir: {exc.message}") from None
    if args.serve:
        return _serve(server, args.minutes)
    # the server's end of each session is a file of this process too
    concurrency = fit_open_files(args.concurrency, per_session=4)
    if args.debug:
        enable_debug()
    out, where = run_loop(_demo(args, server, concurrency))
    out.print_summary()
    # with --json, stdout is for the JSON Lines alone
    if args.json:
        print(where, file=sys.stderr, flush=True)
    else:
        with output() as stdout:
            stdout.write(where + "\n")
    return out.exit_status()


def _serve(server: LocalServer, minutes: float) -> int:
    """Keep ``server`` running until Ctrl-C or ``minutes`` have passed."""
    with server, output() as stdout:
        stdout.write(
            f"asmtp demo server on {server.host}:{server.port}; messages go to "
            f"{server.directory}\n"
            f"  asmtp send --relay {server.host}:{server.port} --tls none --from me@example.com"
            " --to you@example.org --subject hi --body hello\n"
            f"  export SMTP_HOST={server.host} SMTP_PORT={server.port} SMTP_TLS=none"
            "   # for examples/\n"
            f"Ctrl-C stops it (or it stops by itself in {minutes:g} minutes).\n"
        )
        stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait(minutes * 60)
        stdout.write(f"received {server.received} message(s), kept in {server.directory}\n")
    return EXIT_OK


async def _demo(
    args: argparse.Namespace, server: LocalServer, concurrency: int
) -> tuple[RunOutput, str]:
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
        settings = MailerSettings(
            relay=Relay(server.host, server.port, tls="none", helo="demo-client.asmtp.example"),
            concurrency=concurrency,
            timeout=10.0,
            retry=None,
            debug=args.debug,
        )
        plan = listed_plan(rcpts, prepared, sender, settings, keyed=False, title=None)
        out = RunOutput(plan, as_json=args.json)
        await deliver(plan, out)
        # the first file, without listing a folder that may hold many
        first = next(server.directory.glob("00001-*.eml"), None)
        where = (
            f"\nThe demo server on {server.host}:{server.port} received "
            f"{server.received} message(s), kept in {server.directory}\n"
        )
        if first is not None:
            where += f"  look at one:  cat {first}\n"
        where += "  (plaintext on loopback for the demo; real relays use TLS: see README.md)"
    return out, where

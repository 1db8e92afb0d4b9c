"""``asmtp worker``: a Celery worker that runs asmtp's delivery task (the ``celery``
extra), on any machine that reaches the campaign's Redis.

Owns the command's options: ``--broker redis://HOST:PORT/DB`` (the queue and the
shared state), ``--concurrency C`` (worker processes, each with its own event loop and
Mailers), ``--source-address IP`` (this machine's sending address for every
campaign), ``--visibility-timeout SECONDS`` (when a chunk of a worker whose machine
died is handed out again). The same worker runs as ``ASMTP_BROKER=redis://... celery
-A asmtp.celery worker``. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import InputError
from .options import positive_float, positive_int

__all__ = ["add_worker_parser", "cmd_worker"]


def add_worker_parser(sub: Any) -> None:
    """Add ``asmtp worker`` to ``asmtp``'s subcommands."""
    worker: argparse.ArgumentParser = sub.add_parser(
        "worker",
        help="run a Celery worker that sends the campaigns queued with asmtp send --broker",
        description="Run a Celery worker for asmtp's campaigns: it takes chunks of "
        "recipients from the queue in Redis and sends them, with the campaign's journal, "
        "rates and per-domain caps shared through that Redis by every worker.",
    )
    worker.add_argument(
        "--broker",
        default=os.environ.get("ASMTP_BROKER"),
        required="ASMTP_BROKER" not in os.environ,
        metavar="URL",
        help="the Redis: redis://HOST:PORT/DB (default: $ASMTP_BROKER)",
    )
    worker.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="C",
        help="worker processes (default: one per CPU)",
    )
    worker.add_argument(
        "--source-address",
        metavar="IP",
        help="send from this local address (this machine's sending IP) for every campaign",
    )
    worker.add_argument(
        "--visibility-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="hand out again, after this long, a chunk whose worker vanished without a "
        "word (its machine lost); longer than a chunk takes (default 600)",
    )
    worker.add_argument(
        "--loglevel", default="INFO", metavar="LEVEL", help="Celery's log level (default INFO)"
    )


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the worker until it is stopped (SIGTERM: a warm shutdown)."""
    if not args.broker.startswith(("redis://", "rediss://", "unix://")):
        raise InputError(f"--broker must be a redis:// URL: {args.broker!r}")
    from ..celery import VISIBILITY_TIMEOUT, make_app

    app = make_app(
        args.broker,
        source_address=args.source_address,
        visibility_timeout=args.visibility_timeout or VISIBILITY_TIMEOUT,
    )
    # a node name of its own, so that several workers on one machine are told apart
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        "--pool=prefork",
        f"--hostname=asmtp-{os.getpid()}@%h",
    ]
    if args.concurrency is not None:
        argv.append(f"--concurrency={args.concurrency}")
    app.worker_main(argv)
    return 0

"""``asmtp send --workers N``: a send on N processes of this machine, through
:class:`asmtp.Workers`. Owns the option, its checks against the others, forking the
workers once the plan is checked (before the event loop starts), and delivering
through them with the same output as a single process. Layer 6: may import any layer
below.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._delivery.workers import Workers
from ..errors import InputError
from .options import positive_int, run_loop
from .output import RunOutput
from .plan import SendPlan

__all__ = ["MAX_WORKERS", "add_workers_option", "deliver_on_workers", "start_workers"]

#: the most worker processes a send starts
MAX_WORKERS = 256


def add_workers_option(group: Any) -> None:
    """Add ``--workers N`` to an argument group of ``asmtp send``."""
    group.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="send from N processes on this machine (one per core is a good start): "
        "recipients shared out by domain, one journal, --rate and --concurrency for "
        "all of them together",
    )


def start_workers(args: argparse.Namespace, plan: SendPlan) -> Workers | None:
    """The workers ``--workers`` asks for, forked now (None without it); an
    :class:`~asmtp.errors.InputError` when the option does not go with the others."""
    n = getattr(args, "workers", None)
    if n is None:
        return None
    if n > MAX_WORKERS:
        raise InputError(f"--workers: at most {MAX_WORKERS}: {n}")
    if getattr(args, "broker", None) is not None:
        raise InputError(
            "--workers sends from this machine's processes; --broker queues the campaign "
            "for asmtp worker processes: give one or the other"
        )
    if plan.domain_batches is not None:
        raise InputError(
            "--workers does not go with --batch-per-domain (a plain send's batches "
            "run in one process)"
        )
    if plan.settings.concurrency < n:
        raise InputError(
            f"--workers {n} needs --concurrency {n} or more (a session per worker at "
            f"least): {plan.settings.concurrency}"
        )
    return Workers(plan.settings.mailer(), plan.jobs, workers=n, runner=run_loop)


async def deliver_on_workers(workers: Workers, out: RunOutput) -> None:
    """Every job through ``workers``, each result shown as it comes (as
    :func:`asmtp.cli.run.deliver` shows a single process's)."""
    async with workers:
        out.started()
        async for result in workers.deliver():
            out.taken = workers.taken
            out.add(result, workers.skipped)
        out.taken = workers.taken

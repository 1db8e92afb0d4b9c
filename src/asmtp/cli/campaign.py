"""``asmtp campaign status NAME`` and ``asmtp campaign cancel NAME``: a look at a
campaign queued with ``asmtp send --broker``, and stopping it; and the send side of
``--broker`` (:func:`deliver_campaign`: enqueue, then follow the run with the same
output as a local run).

Owns those commands' options and output. The state is read through
:mod:`asmtp.celery`. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import anyio

from ..errors import InputError, SMTPError
from .options import EXIT_OK, on_ctrl_c, positive_int, run_loop
from .output import RunOutput
from .plan import SendPlan

__all__ = [
    "add_broker_options",
    "add_campaign_parser",
    "check_broker",
    "cmd_campaign",
    "deliver_campaign",
]

#: the environment variable --broker defaults to (as for celery -A asmtp.celery)
BROKER_ENV = "ASMTP_BROKER"
#: the order states are shown in ("dot": the dot went out, no reply recorded yet)
_STATES = ("delivered", "permanent", "transient", "unknown", "dot")


def add_campaign_parser(sub: Any) -> None:
    """Add ``asmtp campaign status|cancel`` to ``asmtp``'s subcommands."""
    campaign: argparse.ArgumentParser = sub.add_parser(
        "campaign",
        help="look at or cancel a campaign queued with asmtp send --broker",
        description="Look at a campaign queued with asmtp send --broker (its recipients "
        "by state, where its last run stands), or cancel it (no new chunks are taken; "
        "those under way finish).",
    )
    campaign.add_argument("action", choices=("status", "cancel"))
    campaign.add_argument("name", metavar="NAME", help="the campaign (--campaign of asmtp send)")
    campaign.add_argument(
        "--broker",
        default=os.environ.get(BROKER_ENV),
        required=BROKER_ENV not in os.environ,
        metavar="URL",
        help=f"the Redis: redis://HOST:PORT/DB (default: ${BROKER_ENV})",
    )
    campaign.add_argument("--json", action="store_true", help="print the status as JSON")


def add_broker_options(group: Any) -> None:
    """``asmtp send``'s --broker and --chunk (--campaign names the campaign)."""
    group.add_argument(
        "--broker",
        metavar="URL",
        help="queue the send as campaign --campaign in this Redis (redis://HOST:PORT/DB) "
        "for asmtp worker processes, and follow it; running it again resumes",
    )
    group.add_argument(
        "--chunk",
        type=positive_int,
        metavar="N",
        help="with --broker: recipients per queued task (default 500)",
    )


def cmd_campaign(args: argparse.Namespace) -> int:
    from .. import celery as queue

    if not args.broker.startswith(("redis://", "rediss://", "unix://")):
        raise InputError(f"--broker must be a redis:// URL: {args.broker!r}")
    if args.action == "cancel":
        run = run_loop(queue.cancel(args.broker, args.name))
        if run is None:
            raise InputError(f"no campaign {args.name!r} in {args.broker}")
        print(f"campaign {args.name}: run {run} cancelled (chunks under way finish)")
        return EXIT_OK
    counts, progress = run_loop(queue.status(args.broker, args.name))
    if progress is None and not counts:
        raise InputError(f"no campaign {args.name!r} in {args.broker}")
    if args.json:
        record: dict[str, Any] = {"campaign": args.name, "counts": counts}
        if progress is not None:
            record.update(
                run=progress.run,
                chunks=progress.chunks,
                chunks_done=progress.done,
                recipients=progress.recipients,
                skipped=progress.skipped,
                cancelled=progress.cancelled,
                finished=progress.finished,
            )
        print(json.dumps(record))
        return EXIT_OK
    print(f"campaign {args.name}")
    for state in _STATES:
        label = "in flight (dot sent, no reply yet)" if state == "dot" else state
        print(f"  {label}: {counts.get(state, 0)}")
    if progress is not None:
        where = (
            "finished"
            if progress.finished
            else "cancelled"
            if progress.cancelled
            else "under way"
            if progress.chunks is not None
            else "being queued"
        )
        chunks = "?" if progress.chunks is None else progress.chunks
        print(f"  run {progress.run}: {where}, {progress.done} of {chunks} chunks done")
    return EXIT_OK


async def deliver_campaign(plan: SendPlan, out: RunOutput, args: argparse.Namespace) -> None:
    """``asmtp send --broker``: enqueue the plan's jobs as campaign ``--campaign`` (or
    find its last run under way) and show each result as the workers record it."""
    from .. import celery as queue

    settings = plan.settings
    app = queue.make_app(args.broker)
    campaign = await queue.enqueue_async(
        app,
        args.campaign,
        out.counted(plan.jobs()),
        relay=settings.relay,
        chunk=args.chunk or queue.CHUNK,
        concurrency=settings.concurrency,
        timeout=settings.timeout,
        retry=settings.retry,
        rate=settings.rate,
        rate_per_domain=settings.rate_per_domain,
        connections_per_domain=args.per_domain,
        dsn=settings.dsn,
        unsubscribe=settings.unsubscribe,
        verp=settings.verp,
        ignore_identity=settings.ignore_identity,
    )
    if campaign.resumed:
        out.notice(
            f"asmtp: campaign {campaign.name}: run {campaign.run} is still under way; "
            "following it (nothing queued again)"
        )
    out.started()
    with anyio.CancelScope() as scope:
        # Ctrl-C stops following, not the campaign: the workers go on
        with _interrupt(scope, out, campaign.name, args.broker):
            async for result in queue.follow(campaign):
                out.add(result, out.skipped)
    if scope.cancel_called:
        return
    _, progress = await queue.status(campaign.redis_url, campaign.name)
    if progress is not None and progress.run == campaign.run:
        out.skipped = progress.skipped
        if progress.cancelled and out.not_attempted:
            # the summary says how many were not sent; the exit status is 1
            raise SMTPError(
                f"the campaign {campaign.name} was cancelled: {out.not_attempted} "
                "recipients were not sent (running the same command again sends them)"
            )


@contextlib.contextmanager
def _interrupt(scope: anyio.CancelScope, out: RunOutput, name: str, broker: str) -> Iterator[None]:
    """The first Ctrl-C stops following the campaign (exit 130), and says how to look
    at it or stop it; the workers go on."""

    def interrupted() -> None:
        out.interrupts += 1
        out.notice(
            f"asmtp: interrupted: no longer following; the campaign {name} goes on in the "
            f"workers (asmtp campaign status {name} --broker {broker}; "
            f"asmtp campaign cancel {name} --broker {broker})"
        )
        scope.cancel()

    with on_ctrl_c(interrupted):
        yield


def check_broker(args: argparse.Namespace) -> None:
    """``--broker``'s companions, checked before anything is queued."""
    if args.broker is None:
        if args.chunk is not None:
            raise InputError("--chunk goes with --broker")
        return
    if not args.broker.startswith(("redis://", "rediss://", "unix://")):
        raise InputError(f"--broker must be a redis:// URL: {args.broker!r}")
    if args.campaign is None:
        raise InputError("--broker needs --campaign NAME (the campaign's name in Redis)")
    if getattr(args, "requiretls", False):
        raise InputError(
            "--requiretls does not go with --broker yet: the workers' settings come from "
            "Redis, which does not carry it (set requiretls=True in your workers' Mailer)"
        )
    for flag, value in (
        ("--journal", args.journal),
        ("--resume", args.resume),
        ("--suppress", args.suppress),
        ("--batch-per-domain", args.batch_per_domain),
        ("--workers", getattr(args, "workers", None)),
    ):
        if value:
            raise InputError(
                f"{flag} does not go with --broker: the campaign's journal is in Redis, "
                "and running the same command again resumes it"
            )

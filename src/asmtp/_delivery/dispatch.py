"""The fan-out: sessions run concurrently under a limit, exactly one result per
recipient.

Owns concurrency and the one-result guarantee. A fixed pool of ``concurrency`` workers
pulls jobs from a shared iterator, so a long list never becomes one task per
recipient; one recipient's failure never cancels another's; cancelling the call closes
every session in flight and re-raises, with no result made up.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio

from .._core.prepared import PreparedMessage
from .._io.anyio_driver import loop_clock, running_loop
from ..config import Timeouts
from ..errors import SMTPError, deadline_passed
from ..results import RecipientResult, internal_error, result_from_error
from . import telemetry
from .endpoint import Endpoint
from .session import Session
from .transaction import NO_EXTRAS, Extras

__all__ = ["deliver_one", "run_pool", "run_session"]

logger: Final = logging.getLogger("asmtp")

Job = Sequence[int]  # indexes of the recipients one session carries


async def run_pool(
    count: int,
    jobs: Sequence[Job],
    concurrency: int,
    run: Callable[[Job], Awaitable[tuple[Sequence[RecipientResult], SMTPError | None]]],
) -> list[RecipientResult]:
    """Run every job with at most ``concurrency`` in flight. Each job covers some of
    the ``count`` recipients and returns their results in its own order, with the
    error that cut it short (as :func:`run_session` does: ``run`` may return its
    coroutine, no coroutine around it); the whole is returned in recipient order."""
    results: list[RecipientResult | None] = [None] * count
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:
            got, _ = await run(job)
            for i, result in zip(job, got, strict=True):
                results[i] = result

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, len(jobs))):
            tg.start_soon(worker)
    done = [r for r in results if r is not None]
    assert len(done) == count, "every recipient gets exactly one result"
    if telemetry.hooks is not None:
        telemetry.hooks.outcomes(done)
    return done


async def run_session(
    endpoint: Endpoint,
    timeouts: Timeouts,
    sender: str,
    recipients: Sequence[str],
    message: PreparedMessage,
    *,
    debug: bool = False,
    started: float | None = None,
    extras: Extras = NO_EXTRAS,
    deadline: float | None = None,
) -> tuple[list[RecipientResult], SMTPError | None]:
    """One session to ``endpoint``: connect, then transactions until every recipient
    has a result (recipients refused with 452 "too many recipients" go on in a new
    transaction), then QUIT. Returns the results, in ``recipients`` order, and the
    error that ended the session early, if one did. ``deadline`` (event loop time)
    cuts the whole session short."""
    loop = running_loop()  # asked once: on Python 3.11 each asking is a system call
    clock = loop_clock(loop)
    t0 = clock() if started is None else started
    refused = endpoint.auth_cache.refusal()
    if refused is not None:
        # The relay refused these credentials earlier in the run: no connection, no AUTH.
        host = endpoint.host
        results = []  # a loop: a comprehension would make cells of its names every call
        for rcpt in recipients:
            results.append(result_from_error(rcpt, refused, host=host))
        if telemetry.hooks is not None:
            telemetry.hooks.unsent(results, refused)
        return results, refused
    hooks = telemetry.hooks  # None: no telemetry (the default)
    watch = None if hooks is None else hooks.session(endpoint, recipients, clock)
    session = Session(
        endpoint, timeouts, debug=debug, on_stage=None if watch is None else watch.observer
    )
    final: dict[str, RecipientResult] = {}

    steps = session.one_shot(
        sender, recipients, message, final, started=t0, extras=extras, clock=clock
    )
    try:
        if deadline is None:  # the fan-out's case: no cancel scope
            conn = await session.open(loop=loop)
            await conn.run(steps)
        else:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                conn = await session.open(loop=loop)
                await conn.run(steps)
    except Exception as exc:
        session.abort()
        error: SMTPError | None = None
        if isinstance(exc, SMTPError):
            error = exc
        elif isinstance(exc, TimeoutError):
            error = deadline_passed(session.stage)
        elapsed = clock() - t0
        missing = list(itertools.filterfalse(final.__contains__, recipients))
        if error is not None:
            # What the server answered before the end (a refused RCPT, an LMTP
            # recipient's reply after the dot) stays that recipient's result.
            for result in session.cut_short(missing, error, elapsed):
                final[result.recipient] = result
        else:  # a bug in asmtp must not cost other recipients theirs
            logger.exception("asmtp internal error while delivering to %s", ", ".join(recipients))
            for rcpt in missing:
                final[rcpt] = internal_error(
                    rcpt,
                    exc,
                    stage=session.stage,
                    host=endpoint.host,
                    tls=session.tls,
                    elapsed=elapsed,
                    dot_sent=session.dot_sent,
                )
        results = list(map(final.__getitem__, recipients))
        if watch is not None:
            watch.end(session, results, exc if error is None else error)
        return results, error
    except BaseException as cut:
        session.abort()
        if watch is not None:
            watch.end(session, (), cut)
        raise
    await conn.aclose()  # as session.close() does, without its coroutine
    # map, not a comprehension: one capturing ``final`` would make it a cell, and the
    # comprehension a function object, for every session
    results = list(map(final.__getitem__, recipients))
    if watch is not None:
        watch.end(session, results, None)
    return results, None


async def deliver_one(
    endpoint: Endpoint,
    timeouts: Timeouts,
    sender: str,
    recipients: Sequence[str],
    message: PreparedMessage,
    *,
    debug: bool = False,
) -> list[RecipientResult]:
    """One session, one result per recipient, whatever the server does."""
    results, _ = await run_session(endpoint, timeouts, sender, recipients, message, debug=debug)
    return results

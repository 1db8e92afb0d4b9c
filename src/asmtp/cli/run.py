"""Running a send plan (``asmtp send``, ``asmtp demo``): every job through one
:class:`asmtp.Mailer` (or, for ``--batch-per-domain``, :class:`DomainBatches`), each result
handed to the :class:`~asmtp.cli.output.RunOutput` as it completes, and Ctrl-C.

The first Ctrl-C takes no new recipients and lets the sessions in flight finish (the
journal stays complete); a second stops at once. Layer 6: may import any layer below.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from .._core.prepared import PreparedMessage
from .._delivery.direct import DirectDelivery, plan_jobs
from .._delivery.endpoint import default_helo
from .._delivery.mailer import Job, Mailer
from .._delivery.workers import Workers
from ..config import Direct, Timeouts
from .options import on_ctrl_c
from .output import RunOutput
from .plan import SendPlan
from .workers import deliver_on_workers

__all__ = ["DomainBatches", "deliver"]


async def deliver(plan: SendPlan, out: RunOutput, workers: Workers | None = None) -> None:
    """Deliver every job (on ``workers`` when given: ``--workers``); the first Ctrl-C
    stops taking new ones (those in flight finish and are journaled), a second one stops
    at once."""
    scope = anyio.CancelScope()
    mailer: Mailer | DomainBatches | Workers | None = None

    def interrupted() -> None:
        out.interrupts += 1
        if out.interrupts == 1 and mailer is not None:
            mailer.stop()
            out.notice(
                "asmtp: interrupted: sending to no new recipients; waiting for the "
                "sessions in flight (Ctrl-C again to stop at once)"
            )
        else:
            scope.cancel()

    settings = plan.settings
    try:
        with on_ctrl_c(interrupted), scope:
            direct = plan.domain_batches
            if workers is not None:
                mailer = workers
                await deliver_on_workers(workers, out)
            elif direct is not None:
                mailer = batches = DomainBatches(
                    direct,
                    concurrency=settings.concurrency,
                    timeout=settings.timeout,
                    debug=settings.debug,
                )
                out.started()
                await batches.run(list(plan.jobs()), out)
            else:
                async with settings.mailer() as mailer:
                    out.sites = mailer.sites
                    out.started()
                    async for result in mailer.deliver(out.counted(plan.jobs())):
                        out.add(result, mailer.skipped)
    finally:
        if mailer is not None:
            out.skipped = mailer.skipped
        if scope.cancel_called:
            out.notice("asmtp: stopped at once")


class DomainBatches:
    """``--batch-per-domain`` on a plain send: the recipients of one domain share
    sessions (up to the transaction's recipient limit each), as :func:`asmtp.send`
    does; the Mailer gives each recipient a session of its own. Stops as the Mailer
    does: :meth:`stop` takes no new batch, those under way finish."""

    def __init__(self, relay: Direct, *, concurrency: int, timeout: float, debug: bool) -> None:
        # the other Mailer settings are those of a plain send: no retries, no journal
        self.relay = relay
        self.concurrency = concurrency
        self.timeouts = Timeouts.of(timeout)
        self.debug = debug
        self.skipped = 0
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def run(self, jobs: Sequence[Job], out: RunOutput) -> None:
        if not jobs:
            return
        # a plain send's jobs share one prepared message and sender
        prepared, sender = jobs[0].message, jobs[0].sender or ""
        assert isinstance(prepared, PreparedMessage)
        helo = self.relay.helo or await default_helo()
        direct = DirectDelivery(self.relay, self.timeouts, helo=helo, debug=self.debug)
        batches = iter(plan_jobs([job.recipient for job in jobs], self.relay))

        async def worker() -> None:
            for batch in batches:
                if self._stopping:
                    return
                out.taken += len(batch)
                rcpts = [jobs[i].recipient for i in batch]
                for result in await direct.deliver(sender, rcpts, prepared):
                    out.add(result, 0)

        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(worker)

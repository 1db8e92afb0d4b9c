"""What a send shows, as it happens: a line of JSON per recipient on stdout
(``--json``), a line each in ``--log-file``, a progress bar on stderr, and at the end a
summary table on stderr and the exit status.

It keeps counts, not results: the table has a row per status and reply with a few
sample recipients, so its size does not grow with the list. Server text shown on the
terminal goes through :func:`asmtp._core.sanitize.printable`. Layer 6: may import any
layer below.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO

from .._core.sanitize import printable
from .._delivery.api import format_log_line
from .._delivery.mailer import Job
from .._delivery.sites import SiteLimiter
from ..results import RecipientResult
from .options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, discard_stdout
from .plan import SendPlan
from .shaping import progress_text, site_lines

__all__ = ["ProgressBar", "RunOutput"]

#: the order statuses are counted in, best first
_STATUSES = ("delivered", "transient", "permanent", "unknown")
_COLOURS = {"delivered": "green", "transient": "yellow", "permanent": "red", "unknown": "magenta"}
#: the console width from which the summary shows sample recipients beside the counts
_WIDTH_MESSAGE = 60
#: the summary's width when stderr is not a terminal and COLUMNS is not set
_PIPE_WIDTH = 120
#: sample recipients shown in a summary row
_SAMPLES = 3
#: summary rows kept apart, at most; replies beyond go to one "other replies" row a status
_MAX_ROWS = 30
#: characters of a sample's reply message kept
_SAMPLE_CHARS = 200


@dataclass
class _Row:
    """A summary row: how many results share a status and reply, and the first few
    recipients with their reply messages."""

    count: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)


class RunOutput:
    """What a send has done so far, as it happens: the output (JSON Lines, the log file,
    the progress bar) and the counts for the summary. Keeps counts, not results: its
    size does not grow with the number of recipients."""

    def __init__(self, plan: SendPlan, *, as_json: bool) -> None:
        self.plan = plan
        self.as_json = as_json
        self.log: IO[str] | None = None
        self.progress: ProgressBar | None = None
        self.interrupts = 0
        self.taken = 0
        self.done = 0
        self.skipped = 0
        self.statuses: Counter[str] = Counter()
        self.rows: dict[tuple[str, str], _Row] = {}
        #: direct delivery with --shaping: the run's sites (progress line, summary)
        self.sites: SiteLimiter | None = None
        self._began = time.monotonic()
        self._stdout_gone = False

    def started(self) -> None:
        self._began = time.monotonic()

    def counted(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """``jobs``, counting those the Mailer took (all but the not attempted)."""
        for job in jobs:
            self.taken += 1
            yield job

    @property
    def failed(self) -> int:
        """Results other than delivered."""
        return self.done - self.statuses["delivered"]

    def exit_status(self) -> int:
        if self.interrupts:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK

    def add(self, result: RecipientResult, skipped: int) -> None:
        self.done += 1
        self.skipped = skipped
        reason = self.plan.refusals(result.key)
        if reason is not None and result.stage == "input":
            result = replace(result, message=reason)
        self.statuses[result.status] += 1
        self._count(result)
        if self.as_json:
            record = result.as_dict()
            line = self.plan.lines(result.key)
            if line:
                record["line"] = line
            self._write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.log is not None:
            self.log.write(format_log_line(result))
            self.log.flush()
        if self.progress is not None:
            self.progress.update(self)

    def _count(self, result: RecipientResult) -> None:
        key = (result.status, _reply_label(result))
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= _MAX_ROWS:
                # a server answering with ever new codes must not grow the table
                key = (result.status, "other replies")
            row = self.rows.setdefault(key, _Row())
        row.count += 1
        if len(row.samples) < _SAMPLES:
            row.samples.append((result.recipient, result.message[:_SAMPLE_CHARS]))

    def _write(self, text: str) -> None:
        if self._stdout_gone:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            # the reader went away (``| head``): keep sending, the journal keeps count
            self._stdout_gone = True
            discard_stdout()

    def notice(self, text: str) -> None:
        text = printable(text)
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    @property
    def hard_stopped(self) -> bool:
        return self.interrupts >= 2

    @property
    def not_attempted(self) -> int:
        # After a graceful stop the Mailer gives no result for jobs it had taken but
        # not yet started: those were not attempted either.
        if self.hard_stopped:
            return self.plan.total - self.taken
        return max(0, self.plan.total - self.done - self.skipped)

    @property
    def cut_off(self) -> int:
        """Taken but without a result: under way when a second Ctrl-C stopped the run."""
        if not self.hard_stopped:
            return 0
        return max(0, self.taken - self.done - self.skipped)

    def print_summary(self) -> None:
        """The summary table on stderr: a row per status and reply, with a few sample
        recipients (their replies' text made printable), then a line of counts."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self._began
        width = None
        if not sys.stderr.isatty() and "COLUMNS" not in os.environ:
            width = _PIPE_WIDTH
        console = Console(file=sys.stderr, width=width, highlight=False, soft_wrap=False)
        # too narrow for the samples beside the counts: they go below the table
        beside = console.width >= _WIDTH_MESSAGE
        table = Table(title=self.plan.title, title_justify="left")
        table.add_column("outcome", no_wrap=True)
        table.add_column("reply (or stage)", overflow="fold")
        if beside:
            table.add_column("for example", overflow="fold", ratio=1)
        table.add_column("recipients", justify="right", no_wrap=True)
        below: list[str] = []
        order = {status: n for n, status in enumerate(_STATUSES)}
        for (status, reply), row in sorted(
            self.rows.items(), key=lambda item: (order.get(item[0][0], 9), -item[1].count)
        ):
            more = row.count - len(row.samples)
            if status == "delivered":
                samples = [", ".join(printable(rcpt) for rcpt, _ in row.samples)]
                samples[0] += f" and {more} more" if more else ""
            else:
                # a reply message each: what the server said, shown safely
                samples = [
                    printable(f"{rcpt}: {message}" if message else rcpt)
                    for rcpt, message in row.samples
                ]
                samples += [f"and {more} more"] if more else []
            cells: list[Text | str] = [
                Text(status, style=_COLOURS.get(status, "")),
                Text(printable(reply)),
            ]
            if beside:
                cells.append(Text("\n".join(samples)))
            elif status != "delivered":
                below += [f"{reply}: {sample}" for sample in samples]
            table.add_row(*cells, str(row.count))
        for label, why, count in self._other_rows():
            table.add_row(label, why, *([""] if beside else []), str(count))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counts = ", ".join(f"{self.statuses[s]} {s}" for s in _STATUSES if self.statuses[s])
        n = self.plan.total
        line = f"{n} recipient{'s' if n != 1 else ''}: {counts or 'none sent'} ({elapsed:.2f} s"
        line += f", {rate:.1f}/s)" if self.done else ")"
        console.print(table)
        for text in below:
            console.print(text, markup=False)
        for text in site_lines(self.sites):  # --shaping: what each site went through
            console.print(printable(text), markup=False)
        console.print(line, markup=False)

    def _other_rows(self) -> list[tuple[str, str, int]]:
        """Rows for recipients without a result of this run, and those sent once."""
        how = "interrupted" if self.interrupts else "the run broke off"
        journal = self.plan.settings.journal is not None
        rows = []
        if self.cut_off:
            why = (
                f"{how}; a --resume run sends them (unknown if the dot went out)"
                if journal
                else f"{how} mid-session; may have arrived if the dot went out"
            )
            rows.append(("unfinished", why, self.cut_off))
        if self.not_attempted:
            then = "a --resume run does them" if journal else "not sent"
            rows.append(("not attempted", f"{how}: {then}", self.not_attempted))
        if self.skipped:
            rows.append(("skipped", "already done per journal", self.skipped))
        if self.plan.duplicates:
            rows.append(("duplicates", "sent once", self.plan.duplicates))
        return rows


def _reply_label(result: RecipientResult) -> str:
    """``250``, ``550 5.1.1``, ``invalid input``, ``(connect)``: a summary row's reply."""
    if result.message.startswith(("suppressed: ", "bounced: ")):
        return result.message.partition(":")[0]  # not sent: listed, or bounced earlier
    if result.stage == "input":
        return "invalid input"
    if result.code is None:
        # refused or lost connection, timeout, TLS, a reply its command does not allow:
        # the stage says where (the sample rows say what)
        return f"({result.stage})"
    if result.status == "delivered" or not result.enhanced_status:
        return str(result.code)
    return f"{result.code} {result.enhanced_status}"


class ProgressBar:
    """A rich progress bar on stderr: done of total, rate, ETA and counts by status."""

    def __init__(self, total: int, *, forced: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            Task,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")

        self.console = Console(file=sys.stderr, force_terminal=True if forced else None)
        self._progress = Progress(
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            RateColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task("sending", total=total, counts="")
        self._progress.start()

    def update(self, run: RunOutput) -> None:
        counts = " ".join(
            f"[{_COLOURS[s]}]{run.statuses[s]} {s}[/]"
            for s in _STATUSES
            if run.statuses[s] or s == "delivered"
        )
        if run.sites is not None and (held := progress_text(run.sites.summary())):
            counts += f" [yellow]{held}[/]"
        self._progress.update(self._task, completed=run.done + run.skipped, counts=counts)

    def stop(self, run: RunOutput) -> None:
        self.update(run)
        self._progress.stop()

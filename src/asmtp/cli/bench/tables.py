"""The human form of an ``asmtp bench`` run: a headline and rich tables.

Owns :func:`print_table`: the run's summary (the object ``--json`` prints) as a
headline, the latency of each stage with its error count, and the errors with an
example of each, the server's own words escaped.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..._core.sanitize import printable
from .stats import PERCENTILES, format_ms, percentile_key

__all__ = ["print_table"]


def print_table(summary: dict[str, Any]) -> None:
    """The human form of a run's summary: a headline and rich tables."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = None
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        width = 120
    console = Console(file=sys.stdout, width=width, highlight=False)
    target, settings = summary["target"], summary["settings"]
    messages, throughput = summary["messages"], summary["throughput"]
    rate = settings["rate_per_s"]
    loop = f"open loop at {rate:g}/s" if rate else "closed loop"
    bounds = []
    if settings["messages"] is not None:
        bounds.append(f"{settings['messages']:,} messages")
    if settings["duration_s"] is not None:
        bounds.append(f"{settings['duration_s']:g} s")
    console.print(
        f"[bold]asmtp bench[/] {target['host']}:{target['port']} ({target['address']}), "
        f"tls {target['tls']}, {' or '.join(bounds)}, concurrency {settings['concurrency']}, "
        f"{loop}, {settings['size']:,}-octet messages to {settings['recipients_per_message']} "
        f"recipient(s), {'sessions reused' if settings['reuse'] else 'a session per message'}"
        f", {settings['event_loop']}"
    )
    sessions = summary["sessions"]
    style = "green" if not messages["failed"] else "red"
    console.print(
        f"[{style}]{messages['sent']:,} sent: {messages['ok']:,} ok, "
        f"{messages['failed']:,} failed[/] in {summary['elapsed_s']:.2f} s: "
        f"[bold]{throughput['messages_per_s']:,.1f} messages/s[/] "
        f"({throughput['bytes_per_s'] / 1e6:,.2f} MB/s); sessions: "
        f"{sessions['attempted']:,} opened, {sessions['ready']:,} ready"
        + (
            "; QUIT problems: " + ", ".join(f"{k} x{v}" for k, v in sessions["quit_errors"].items())
            if sessions["quit_errors"]
            else ""
        )
        + (" [magenta](interrupted)[/]" if summary["interrupted"] else "")
    )
    refused = summary["recipients"]["refused"]
    if refused:
        console.print(
            "recipients refused: " + ", ".join(f"{code} x{n:,}" for code, n in refused.items())
        )

    table = Table(title="latency (ms)", title_justify="left")
    table.add_column("stage")
    table.add_column("count", justify="right")
    columns = ("min", "mean", *(percentile_key(p) for p in PERCENTILES), "max")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("errors", justify="right")
    errors_of = _errors_by_latency_stage(summary["errors"])
    approximate = False
    for stage, stats in summary["latency_ms"].items():
        approximate = approximate or not stats["exact"]
        errors = errors_of.get(stage, 0)
        table.add_row(
            stage,
            f"{stats['count']:,}",
            *(format_ms(stats[k]) for k in columns),
            f"[red]{errors:,}[/]" if errors else "0",
        )
    if approximate:
        table.caption = "percentiles from a 1% log histogram (too many samples to keep)"
    console.print(table)

    if summary["errors"]:
        errs = Table(title="errors", title_justify="left")
        errs.add_column("stage")
        errs.add_column("error")
        errs.add_column("count", justify="right")
        errs.add_column("example", overflow="fold")
        for stage, entries in summary["errors"].items():
            for key, entry in entries.items():
                # the server's own words: shown as text (no markup), control characters
                # escaped, so a reply cannot restyle or repaint the terminal
                errs.add_row(
                    stage,
                    Text(printable(key)),
                    f"{entry['count']:,}",
                    Text(printable(entry["example"])),
                )
        console.print(errs)


#: the latency stage whose row shows the errors of each error stage
_ERROR_ROW = {"mail": "envelope", "rcpt": "envelope", "data": "envelope"}


def _errors_by_latency_stage(errors: dict[str, dict[str, dict[str, Any]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stage, entries in errors.items():
        row = _ERROR_ROW.get(stage, stage)
        out[row] = out.get(row, 0) + sum(e["count"] for e in entries.values())
    return out

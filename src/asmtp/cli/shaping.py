"""``asmtp send --shaping FILE``: reading a shaping file (TOML) into an
:class:`asmtp.Shaping`, and saying what each site went through, for the progress line
and the summary. Layer 6: may import any layer below.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from .._core.shaping_rules import Shaping, load_shaping
from .._delivery.sites import SiteLimiter
from ..errors import InputError

__all__ = ["load_shaping_file", "progress_text", "site_lines"]

#: ``--shaping default``: the built-in settings, no file
DEFAULT = "default"


#: ``--shaping off``: fixed limits, one session per job (no reuse)
OFF = "off"


def load_shaping_file(path: str) -> Shaping | None:
    """The settings of a shaping file (or the built-in ones for ``default``, None for
    ``off``); every problem is an :class:`~asmtp.errors.InputError` naming the flag
    and the file."""
    if path == DEFAULT:
        return Shaping()
    if path == OFF:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--shaping: cannot read {path!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"--shaping: {path!r} is not UTF-8 text: {exc.reason}") from exc
    try:
        return load_shaping(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--shaping: {path!r} is not TOML: {exc}") from exc
    except InputError as exc:
        raise InputError(f"--shaping: {path!r}: {exc.message}") from exc


def progress_text(summary: Mapping[str, int] | None) -> str:
    """The progress line's word on the sites: "" while none is held back.

    >>> progress_text({"sites": 3, "paused": 1, "throttled": 1, "stopped": 0})
    'sites: 1 paused, 1 throttled'
    """
    if not summary:
        return ""
    parts = [f"{summary[k]} {k}" for k in ("paused", "throttled", "stopped") if summary.get(k)]
    return "sites: " + ", ".join(parts) if parts else ""


def site_lines(limiter: SiteLimiter | None, *, limit: int = 10) -> list[str]:
    """A line per site (the busiest first) for the summary: messages, sessions, the
    peak at once, refusals, and how the sessions allowed changed over the run."""
    if limiter is None:
        return []
    sites = sorted(limiter.sites.values(), key=lambda s: -s.stats.messages)
    lines = []
    for site in sites[:limit]:
        stats = site.stats
        steps = [n for _, n in stats.history]
        shown = " > ".join(str(n) for n in steps[:12]) + (" > ..." if len(steps) > 12 else "")
        state = site.state
        note = ""
        if state.stopped is not None:
            note = f"; stopped ({state.stopped})"
        elif state.rate is not None:
            note = f"; rate {state.rate:.1f}/s"
        lines.append(
            f"site {site.name}: {stats.messages} delivered, {stats.sessions_opened} sessions "
            f"(peak {stats.peak_sessions}, {stats.reused} reused), {stats.refusals} "
            f"refusals; sessions allowed {shown or '-'}{note}"
        )
    if len(sites) > limit:
        lines.append(f"... and {len(sites) - limit} more sites")
    return lines

"""The HTML report of ``asmtp bench --report FILE.html``: one self-contained file.

Owns turning a run's summary (the object ``--json`` prints) and its latency histograms
into HTML with the charts drawn as inline SVG by the small functions below: a latency
histogram per stage (log time axis), messages per second over the run, and the session
latency per second. No script, no stylesheet or font from the network, no plotting
library: the file opens the same offline, years later.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .stats import PERCENTILES, format_ms, percentile_key

__all__ = ["render_report"]

_OK, _FAILED, _BAR, _MEAN, _MAX = "#2e7d32", "#c62828", "#1565c0", "#1565c0", "#ef6c00"
_PERCENTILE_KEYS = tuple(percentile_key(p) for p in PERCENTILES)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ms(value: float | None) -> str:
    return format_ms(value, fine=True)


def _nice_step(span: float, ticks: int) -> float:
    """A 1-2-5 step giving about ``ticks`` ticks over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / max(1, ticks)
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * power:
            return m * power
    return 10.0 * power  # pragma: no cover


def _linear_ticks(high: float, ticks: int = 5, *, whole: bool = False) -> list[float]:
    """Ticks from 0 to the first one at or above ``high``, 1-2-5 apart (``whole``:
    at least 1 apart)."""
    step = _nice_step(high, ticks)
    if whole:
        step = max(step, 1.0)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 values per decade between low and high (both > 0)."""
    out = []
    decade = math.floor(math.log10(low))
    while 10.0**decade <= high * 1.0001:
        for m in (1, 2, 5):
            v = m * 10.0**decade
            if low * 0.9999 <= v <= high * 1.0001:
                out.append(v)
        decade += 1
    if len(out) > 9:  # keep the decades only when there are many
        out = [v for v in out if math.isclose(10.0 ** round(math.log10(v)), v)]
    return out


def _count_label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:g}M"
    if value >= 1000:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


class _Plot:
    """A chart's frame: the SVG element, margins, axes and their labels."""

    def __init__(self, width: int, height: int, css: str, label: str) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 62, 16, 14, 42
        self.parts: list[str] = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {css}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>'
        ]

    @property
    def plot_w(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> float:
        return self.height - self.top - self.bottom

    def y_of(self, value: float, high: float) -> float:
        return self.top + self.plot_h * (1.0 - (value / high if high else 0.0))

    def y_axis(self, high: float, name: str) -> float:
        """Draw the y axis for values up to ``high``; return the top of the scale."""
        ticks = _linear_ticks(high)
        high = ticks[-1] or 1.0
        for tick in ticks:
            y = self.y_of(tick, high)
            self.parts.append(
                f'<line class="grid" x1="{self.left}" x2="{self.width - self.right}" '
                f'y1="{y:.1f}" y2="{y:.1f}"/>'
                f'<text class="tick" x="{self.left - 6}" y="{y + 4:.1f}" '
                f'text-anchor="end">{_e(_count_label(tick))}</text>'
            )
        self.parts.append(
            f'<text class="axis" transform="translate(14 {self.top + self.plot_h / 2:.1f}) '
            f'rotate(-90)" text-anchor="middle">{_e(name)}</text>'
        )
        return high

    def x_label(self, name: str) -> None:
        self.parts.append(
            f'<text class="axis" x="{self.left + self.plot_w / 2:.1f}" '
            f'y="{self.height - 6}" text-anchor="middle">{_e(name)}</text>'
        )

    def x_tick(self, x: float, text: str) -> None:
        base = self.top + self.plot_h
        self.parts.append(
            f'<line class="axisline" x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}"/>'
            f'<text class="tick" x="{x:.1f}" y="{base + 16}" text-anchor="middle">'
            f"{_e(text)}</text>"
        )

    def frame(self) -> None:
        base = self.top + self.plot_h
        self.parts.append(
            f'<line class="axisline" x1="{self.left}" x2="{self.width - self.right}" '
            f'y1="{base}" y2="{base}"/>'
            f'<line class="axisline" x1="{self.left}" x2="{self.left}" '
            f'y1="{self.top}" y2="{base}"/>'
        )

    def svg(self) -> str:
        self.frame()
        return "".join(self.parts) + "</svg>"

    def seconds_axis(self, seconds: int, legend: str) -> str:
        """Finish a chart over the run: its x axis in seconds since the start, ``legend``
        saying what the colours are; the SVG."""
        slot = self.plot_w / max(seconds, 1)
        for tick in _linear_ticks(seconds, 8, whole=True):
            self.x_tick(self.left + tick * slot, f"{tick:g}")
        self.x_label(f"seconds since the start ({legend})")
        return self.svg()


def histogram_svg(
    stage: str,
    bins: Sequence[tuple[float, float, int]],
    stats: Mapping[str, Any],
    *,
    width: int = 720,
    height: int = 260,
) -> str:
    """Latency histogram of one stage: ``bins`` are ``(low_ms, high_ms, samples)`` on a
    log time axis, with the p50 and p99 marked."""
    plot = _Plot(width, height, "histogram", f"{stage} latency histogram")
    if not bins:
        plot.parts.append(
            f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
            "no samples</text>"
        )
        return plot.svg()
    low = max(min(b[0] for b in bins), 1e-4)
    high = max(max(b[1] for b in bins), low * 1.5)
    log_low, log_high = math.log10(low), math.log10(high)

    def x_of(ms: float) -> float:
        return plot.left + plot.plot_w * (math.log10(max(ms, low)) - log_low) / (log_high - log_low)

    top = float(max(n for _, _, n in bins))
    top = plot.y_axis(top, "messages")
    for lo, hi, n in bins:
        if not n:
            continue
        x0, x1 = x_of(lo), x_of(hi)
        y = plot.y_of(n, top)
        plot.parts.append(
            f'<rect class="bar" x="{x0:.2f}" y="{y:.2f}" width="{max(x1 - x0, 1.0):.2f}" '
            f'height="{plot.top + plot.plot_h - y:.2f}" fill="{_BAR}">'
            f"<title>{_e(_ms(lo))}-{_e(_ms(hi))} ms: {n:,}</title></rect>"
        )
    for tick in _log_ticks(low, high):
        plot.x_tick(x_of(tick), f"{tick:g}")
    for key, colour in (("p50", _OK), ("p99", _FAILED)):
        value = stats.get(key)
        if isinstance(value, (int, float)) and value > 0:
            x = x_of(value)
            # a label near the right edge goes on the left of its line
            left = x > plot.left + plot.plot_w * 0.8
            plot.parts.append(
                f'<line class="marker" x1="{x:.2f}" x2="{x:.2f}" y1="{plot.top}" '
                f'y2="{plot.top + plot.plot_h}" stroke="{colour}" stroke-width="1.5" '
                f'stroke-dasharray="4 3"/>'
                f'<text class="marker-label" x="{x - 4 if left else x + 4:.2f}" '
                f'y="{plot.top + (10 if key == "p50" else 24)}" fill="{colour}" '
                f'text-anchor="{"end" if left else "start"}">{key} {_e(_ms(value))} ms</text>'
            )
    plot.x_label(f"{stage} latency, ms (log scale)")
    return plot.svg()


def throughput_svg(
    timeline: Sequence[Mapping[str, Any]], *, width: int = 720, height: int = 260
) -> str:
    """Messages completed per second over the run: accepted and failed, stacked."""
    plot = _Plot(width, height, "timeseries throughput", "messages per second over the run")
    seconds = len(timeline)
    top = float(max([int(s["ok"]) + int(s["failed"]) for s in timeline] + [1]))
    top = plot.y_axis(top, "messages/s")
    slot = plot.plot_w / max(seconds, 1)
    base = plot.top + plot.plot_h
    for i, s in enumerate(timeline):
        x = plot.left + i * slot
        w = max(slot * 0.85, 0.5)
        ok, failed = int(s["ok"]), int(s["failed"])
        y_ok = plot.y_of(ok, top)
        if ok:
            plot.parts.append(
                f'<rect class="ok" x="{x:.2f}" y="{y_ok:.2f}" width="{w:.2f}" '
                f'height="{base - y_ok:.2f}" fill="{_OK}"><title>second {i}: {ok:,} ok'
                "</title></rect>"
            )
        if failed:
            y_f = plot.y_of(ok + failed, top)
            plot.parts.append(
                f'<rect class="failed" x="{x:.2f}" y="{y_f:.2f}" width="{w:.2f}" '
                f'height="{y_ok - y_f:.2f}" fill="{_FAILED}"><title>second {i}: {failed:,} '
                "failed</title></rect>"
            )
    return plot.seconds_axis(seconds, "accepted green, failed red")


def latency_over_time_svg(
    timeline: Sequence[Mapping[str, Any]], *, width: int = 720, height: int = 260
) -> str:
    """Session latency of the messages accepted in each second: mean and max."""
    plot = _Plot(width, height, "timeseries latency", "session latency per second")
    seconds = len(timeline)
    values = [s["session_max_ms"] for s in timeline if s.get("session_max_ms") is not None]
    top = max([float(v) for v in values] + [1e-3])
    top = plot.y_axis(top, "ms")
    slot = plot.plot_w / max(seconds, 1)
    for key, colour in (("session_mean_ms", _MEAN), ("session_max_ms", _MAX)):
        points = [
            f"{plot.left + (i + 0.5) * slot:.2f},{plot.y_of(float(s[key]), top):.2f}"
            for i, s in enumerate(timeline)
            if s.get(key) is not None
        ]
        if len(points) == 1:
            x, y = points[0].split(",")
            plot.parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
        elif points:
            plot.parts.append(
                f'<polyline class="{key}" fill="none" stroke="{colour}" stroke-width="1.5" '
                f'points="{" ".join(points)}"/>'
            )
    return plot.seconds_axis(seconds, "mean blue, max orange")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:980px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse;margin:8px 0} th,td{padding:3px 10px;text-align:right;
border-bottom:1px solid #ddd} th:first-child,td:first-child{text-align:left}
td.text{text-align:left} .muted{color:#666} .bad{color:#c62828;font-weight:600}
.kpi{display:flex;gap:28px;flex-wrap:wrap;margin:14px 0}.kpi div{min-width:120px}
.kpi b{display:block;font-size:22px}
svg.chart{display:block;margin:6px 0 18px;background:#fafafa;border:1px solid #eee}
svg .grid{stroke:#e4e4e4} svg .axisline{stroke:#888} svg text{font:11px sans-serif;fill:#444}
svg text.axis{font-size:12px;fill:#222} svg .marker-label{font-size:11px}
"""


def render_report(
    summary: Mapping[str, Any],
    histograms: Mapping[str, Sequence[tuple[float, float, int]]],
) -> str:
    """The whole HTML document for a run: ``summary`` as ``asmtp bench --json`` prints
    it, ``histograms`` the ``(low_ms, high_ms, samples)`` bins of each stage."""
    target, settings = summary["target"], summary["settings"]
    messages, throughput = summary["messages"], summary["throughput"]
    latency: Mapping[str, Mapping[str, Any]] = summary["latency_ms"]
    title = f"asmtp bench: {target['host']}:{target['port']}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{_e(summary["started"])}, asmtp {_e(summary["version"])}, '
        f"{_e(settings['event_loop'])}"
        + (' <span class="bad">(interrupted)</span>' if summary["interrupted"] else "")
        + "</p>",
        '<div class="kpi">',
        f"<div><b>{throughput['messages_per_s']:,.1f}</b>messages/s</div>",
        f"<div><b>{messages['sent']:,}</b>sent</div>",
        f"<div><b>{messages['ok']:,}</b>accepted</div>",
        f'<div><b class="{"bad" if messages["failed"] else ""}">{messages["failed"]:,}</b>'
        "failed</div>",
        f"<div><b>{summary['elapsed_s']:.2f} s</b>elapsed</div>",
        f"<div><b>{_ms(latency.get('session', {}).get('p99'))} ms</b>session p99</div>",
        "</div>",
        "<h2>Settings</h2><table>",
    ]
    shown = {"address": target["address"], "tls": target["tls"], **settings}
    for key, value in shown.items():
        out.append(
            f'<tr><th>{_e(key)}</th><td class="text">'
            f"{_e('-' if value is None else value)}</td></tr>"
        )
    out.append("</table>")

    out.append("<h2>Latency (ms)</h2><table><tr><th>stage</th><th>count</th>")
    columns = ("min", "mean", *_PERCENTILE_KEYS, "max")
    out.extend(f"<th>{c}</th>" for c in columns)
    out.append("</tr>")
    for stage, stats in latency.items():
        out.append(f"<tr><td>{_e(stage)}</td><td>{stats['count']:,}</td>")
        out.extend(f"<td>{_ms(stats.get(c))}</td>" for c in columns)
        out.append("</tr>")
    out.append("</table>")
    if any(not s.get("exact", True) for s in latency.values()):
        out.append(
            '<p class="muted">Percentiles from a log histogram with 1% wide buckets '
            "(more samples than were kept).</p>"
        )

    errors: Mapping[str, Mapping[str, Mapping[str, Any]]] = summary["errors"]
    out.append("<h2>Errors</h2>")
    if errors:
        out.append(
            '<table><tr><th>stage</th><th class="text">error</th><th>count</th>'
            '<th class="text">example</th></tr>'
        )
        for stage, entries in errors.items():
            for key, entry in entries.items():
                out.append(
                    f'<tr><td>{_e(stage)}</td><td class="text">{_e(key)}</td>'
                    f'<td>{entry["count"]:,}</td><td class="text">{_e(entry["example"])}'
                    "</td></tr>"
                )
        out.append("</table>")
    else:
        out.append("<p>None.</p>")
    refused = summary["recipients"]["refused"]
    if refused:
        out.append(
            "<p>Recipients refused: "
            + ", ".join(f"{_e(code)} &times; {n:,}" for code, n in refused.items())
            + "</p>"
        )

    timeline = summary["timeline"]
    out.append("<h2>Throughput over time</h2>")
    out.append(throughput_svg(timeline))
    out.append("<h2>Session latency over time</h2>")
    out.append(latency_over_time_svg(timeline))
    out.append("<h2>Latency histograms</h2>")
    order = ["session", *(s for s in latency if s != "session")]
    for stage in order:
        if stage in latency:
            out.append(f"<h3>{_e(stage)}</h3>")
            out.append(histogram_svg(stage, histograms.get(stage, ()), latency[stage]))
    out.append("</body></html>\n")
    return "\n".join(out)

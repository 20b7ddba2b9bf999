"""A self-contained HTML performance report with inline SVG charts.

One file, no scripts, no network: a per-operation table against the targets, a
latency CDF per operation (log-scale x axis, target percentiles marked) and the
waterfall of the slowest player action with its critical path in red.

The charts are SVG written here rather than by a plotting library: three chart
kinds are ~150 lines, the output is small, diffable and renders anywhere, and the
engine gains no heavy dependency. ``bar_chart_svg`` is public so the benchmark
can add its own sections (``extra_sections``).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..config import LatencyTarget
from .profiler import PerformanceProfiler, Span, critical_path

__all__ = ["bar_chart_svg", "cdf_chart_svg", "render_report", "waterfall_svg", "write_report"]

_BLUE, _RED, _GREY, _INK = "#4c78a8", "#d62728", "#9e9e9e", "#222222"
_FONT = 'font-family="sans-serif" font-size="11"'


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt_seconds(s: float) -> str:
    if math.isnan(s):
        return "–"
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def bar_chart_svg(
    title: str, values: Mapping[str, float], *, unit: str = "s", width: int = 640
) -> str:
    """A horizontal bar chart of ``{label: value}`` (values >= 0), one bar per label."""
    row, left, right, top = 22, 180, 90, 28
    height = top + row * max(len(values), 1) + 10
    peak = max([v for v in values.values() if v > 0] or [1.0])
    span = width - left - right
    parts = [
        f'<svg class="bar-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_esc(title)}">',
        f'<text x="4" y="16" {_FONT} font-weight="bold" fill="{_INK}">{_esc(title)}</text>',
    ]
    for i, (label, value) in enumerate(values.items()):
        y = top + i * row
        w = max(value, 0.0) / peak * span
        parts.append(
            f'<text x="{left - 6}" y="{y + 14}" {_FONT} text-anchor="end" '
            f'fill="{_INK}">{_esc(label)}</text>'
            f'<rect class="bar" x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
            f'fill="{_BLUE}"><title>{_esc(label)}: {value:g} {_esc(unit)}</title></rect>'
            f'<text x="{left + w + 4:.1f}" y="{y + 14}" {_FONT} fill="{_INK}">'
            f"{value:.3g} {_esc(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def cdf_chart_svg(
    operation: str,
    points: Sequence[tuple[float, float]],
    target: LatencyTarget | None = None,
    *,
    width: int = 560,
    height: int = 240,
) -> str:
    """A step CDF of ``(seconds, fraction <= seconds)`` points on a log-seconds axis,
    with the target percentiles as dashed lines."""
    left, right, top, bottom = 44, 30, 24, 34
    pw, ph = width - left - right, height - top - bottom
    positive = [v for v, _ in points if v > 0]
    marks = [target.p50, target.p95, target.p99] if target else []
    lo = min(positive + marks, default=1e-3)
    hi = max(positive + marks, default=1.0)
    lo_dec, hi_dec = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if hi_dec <= lo_dec:
        hi_dec = lo_dec + 1

    def x(v: float) -> float:
        v = max(v, 10.0**lo_dec)
        return left + (math.log10(v) - lo_dec) / (hi_dec - lo_dec) * pw

    def y(f: float) -> float:
        return top + (1 - f) * ph

    parts = [
        f'<svg class="cdf" data-operation="{_esc(operation)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="CDF of {_esc(operation)}">',
        f'<text x="{left}" y="14" {_FONT} font-weight="bold" fill="{_INK}">'
        f"{_esc(operation)} — latency CDF</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
    ]
    for dec in range(lo_dec, hi_dec + 1):
        gx = x(10.0**dec)
        parts.append(
            f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{gx:.1f}" y="{top + ph + 14}" {_FONT} text-anchor="middle" '
            f'fill="{_INK}">{_esc(_fmt_seconds(10.0**dec))}</text>'
        )
    for f in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        parts.append(
            f'<text x="{left - 4}" y="{y(f) + 4:.1f}" {_FONT} text-anchor="end" '
            f'fill="{_INK}">{f:g}</text>'
        )
    for label, mark in zip(("p50", "p95", "p99"), marks, strict=False):
        mx = x(mark)
        parts.append(
            f'<line class="target" x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + ph}" '
            f'stroke="{_RED}" stroke-dasharray="4 3"/>'
            f'<text x="{mx + 2:.1f}" y="{top + 10}" {_FONT} fill="{_RED}">{label}</text>'
        )
    if points:
        coords = [f"{x(points[0][0]):.1f},{y(0):.1f}"]
        prev = 0.0
        for v, f in points:
            coords.append(f"{x(v):.1f},{y(prev):.1f}")
            coords.append(f"{x(v):.1f},{y(f):.1f}")
            prev = f
        coords.append(f"{left + pw:.1f},{y(prev):.1f}")
        parts.append(
            f'<polyline class="cdf-line" fill="none" stroke="{_BLUE}" stroke-width="2" '
            f'points="{" ".join(coords)}"/>'
        )
    parts.append(
        f'<text x="{left + pw / 2:.0f}" y="{height - 4}" {_FONT} text-anchor="middle" '
        f'fill="{_INK}">latency (log scale)</text></svg>'
    )
    return "".join(parts)


def waterfall_svg(
    root: Span, *, width: int = 900, depends_on: Mapping[str, Iterable[str]] | None = None
) -> str:
    """The span tree of ``root`` as a timeline, one row per span, critical path red.

    A child still running when the root ended is drawn grey up to the root's end. The
    critical path is :func:`~engine.observability.profiler.critical_path`'s: a hedged
    agent's winning attempt, never the losing one; ``depends_on`` (agent name → the
    agents it waits for, from the config) makes it follow the configured DAG instead
    of inferring it from the timing.
    """
    row, label_w, top = 20, 260, 26
    spans: list[tuple[int, Span]] = []

    def visit(span: Span, depth: int) -> None:
        spans.append((depth, span))
        for child in sorted(span.children, key=lambda c: c.start):
            visit(child, depth + 1)

    visit(root, 0)
    critical = {id(s) for s in critical_path(root, depends_on)}
    total = root.duration or 0.0
    scale = (width - label_w - 70) / total if total > 0 else 0.0
    height = top + row * len(spans) + 24
    parts = [
        f'<svg class="waterfall" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="span waterfall">',
        f'<text x="4" y="16" {_FONT} font-weight="bold" fill="{_INK}">'
        f"{_esc(root.name)} — {_esc(_fmt_seconds(total))}, critical path in red</text>",
    ]
    for i, (depth, span) in enumerate(spans):
        y0 = top + i * row
        detail = str(span.attributes.get("agent", ""))
        if span.attributes.get("attempt", 1) != 1:
            detail += " (hedge)"
        label = f"{span.name} {detail}".strip()
        offset = span.start - root.start
        end = span.end if span.end is not None else root.end
        duration = max((end or span.start) - span.start, 0.0)
        on_path = id(span) in critical
        color = _GREY if span.end is None else (_RED if on_path else _BLUE)
        cls = "span critical" if on_path else "span"
        bx = label_w + offset * scale
        bw = max(duration * scale, 1.0)
        parts.append(
            f'<text x="{4 + depth * 12}" y="{y0 + 14}" {_FONT} fill="{_INK}">{_esc(label)}</text>'
            f'<rect class="{cls}" data-name="{_esc(span.name)}" x="{bx:.1f}" y="{y0 + 3}" '
            f'width="{bw:.1f}" height="{row - 6}" fill="{color}">'
            f"<title>{_esc(label)}: {_esc(span.status)}, {_esc(_fmt_seconds(duration))} "
            f"at +{_esc(_fmt_seconds(offset))}</title></rect>"
            f'<text x="{bx + bw + 4:.1f}" y="{y0 + 14}" {_FONT} fill="{_INK}">'
            f"{_esc(_fmt_seconds(duration))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 8px 0 24px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.met { background: #e3f4e3; } td.missed { background: #fbe0e0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
"""


def _table(profiler: PerformanceProfiler) -> str:
    report = profiler.get_report()
    head = (
        "<tr><th>operation</th><th>count</th><th>mean</th><th>min</th><th>max</th>"
        "<th>p50</th><th>p95</th><th>p99</th><th>target p50/p95/p99</th>"
        "<th>errors</th><th>cancelled</th><th>met</th></tr>"
    )
    rows = []
    for op in report.operations.values():
        t = op.target
        target = "–" if t is None else " / ".join(_fmt_seconds(v) for v in (t.p50, t.p95, t.p99))
        verdict = {None: ("", "–"), True: ("met", "yes"), False: ("missed", "no")}[op.met]
        rows.append(
            f"<tr><td>{_esc(op.operation)}</td><td>{op.count}</td>"
            + "".join(
                f"<td>{_esc(_fmt_seconds(v))}</td>"
                for v in (op.mean, op.min, op.max, op.p50, op.p95, op.p99)
            )
            + f"<td>{_esc(target)}</td><td>{op.errors}</td><td>{op.cancelled}</td>"
            f'<td class="{verdict[0]}">{verdict[1]}</td></tr>'
        )
    bottlenecks = "".join(f"<li>{_esc(b)}</li>" for b in report.bottlenecks)
    return f'<table class="operations">{head}{"".join(rows)}</table>' + (
        f"<h3>Bottlenecks</h3><ul>{bottlenecks}</ul>" if bottlenecks else ""
    )


def render_report(
    profiler: PerformanceProfiler,
    *,
    title: str = "dm-engine performance report",
    slowest: Span | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    depends_on: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """The report as one HTML document.

    Args:
        profiler: its operations, sketches and targets are reported.
        slowest: the span tree drawn as a waterfall; default: the profiler's
            slowest ``player_action``. None and no such trace: no waterfall.
        extra_sections: ``(heading, html)`` pairs appended as they are (the html is
            trusted, e.g. ``bar_chart_svg(...)``).
        depends_on: agent name → the agents it waits for
            (``{n: a.depends_on for n, a in config.agents.items()}``), for the
            waterfall's critical path; None: inferred from the spans' timing.
    """
    root = slowest if slowest is not None else profiler.slowest_trace("player_action")
    charts = []
    for op in profiler.operations:
        sketch = profiler.sketch(op)
        if sketch is not None and sketch.count:
            charts.append(cdf_chart_svg(op, sketch.cdf(), profiler.targets.get(op)))
    sections = [
        f"<h2>Operations against targets</h2>{_table(profiler)}",
        f'<h2>Latency distributions</h2><div class="charts">{"".join(charts)}</div>',
    ]
    if root is not None:
        waterfall = waterfall_svg(root, depends_on=depends_on)
        sections.append(f"<h2>Slowest {_esc(root.name)}: span waterfall</h2>{waterfall}")
    sections.extend(f"<h2>{_esc(heading)}</h2>{body}" for heading, body in extra_sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_esc(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def write_report(
    path: str | os.PathLike[str],
    profiler: PerformanceProfiler,
    *,
    title: str = "dm-engine performance report",
    slowest: Span | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    depends_on: Mapping[str, Iterable[str]] | None = None,
) -> Path:
    """Render the report (see :func:`render_report`) and write it to ``path``.

    Blocking file I/O: call it from a worker thread (``anyio.to_thread``) inside the
    event loop.
    """
    out = Path(path)
    text = render_report(
        profiler,
        title=title,
        slowest=slowest,
        extra_sections=extra_sections,
        depends_on=depends_on,
    )
    out.write_text(text, encoding="utf-8")
    return out

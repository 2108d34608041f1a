"""Server-rendered SVG line charts of a device's telemetry (no scripts, no style attributes).

``series_for`` turns telemetry rows into one series per line (a device metric, or one per
stream for per-stream metrics); ``line_chart`` draws them as ``<polyline>``s with SVG
presentation attributes only, so the strict CSP (no inline styles) holds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from controller.fleet.history import TelemetryRow

WIDTH, HEIGHT = 600, 160
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 44, 8, 8, 20
COLORS = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2")
DAY_BUCKET_S = 300
"""The day chart shows 5-minute means (raw samples and the retention's averaged buckets)."""


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    title: str
    unit: str
    per_stream: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("fps", "Frames per second", "fps", per_stream=True),
    Metric("latency_p50", "Latency p50 (capture to publish)", "ms", per_stream=True),
    Metric("latency_p95", "Latency p95 (capture to publish)", "ms", per_stream=True),
    Metric("cpu", "CPU", "%"),
    Metric("mem", "Memory", "%"),
    Metric("temp", "Temperature", "°C"),
    Metric("spool", "Spool depth (messages waiting for the broker)", "msgs"),
    Metric("psi", "Drift PSI of detection scores", "PSI", per_stream=True),
)

_DEVICE_FIELDS = {
    "cpu": "cpu_percent",
    "mem": "mem_percent",
    "temp": "temp_c",
    "spool": "spool_depth",
}
_STREAM_FIELDS = {
    "fps": "fps",
    "latency_p50": "latency_ms_p50",
    "latency_p95": "latency_ms_p95",
    "psi": "score_psi",
}

Series = dict[str, list[tuple[float, float]]]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series_for(metric: Metric, rows: Iterable[TelemetryRow]) -> Series:
    """Points (ts, value) per line: the metric's own name, or each stream's name."""
    out: Series = defaultdict(list)
    for r in rows:
        if metric.per_stream:
            for s in r.streams:
                value = _number(s.get(_STREAM_FIELDS[metric.key]))
                if value is not None and isinstance(s.get("name"), str):
                    out[s["name"]].append((r.ts, value))
        else:
            value = _number(getattr(r, _DEVICE_FIELDS[metric.key]))
            if value is not None:
                out[metric.key].append((r.ts, value))
    return dict(out)


def bucketed(series: Series, bucket_s: int = DAY_BUCKET_S) -> Series:
    """Each line folded into ``bucket_s`` means (at most 288 points a day)."""
    out: Series = {}
    for name, points in series.items():
        buckets: dict[float, list[float]] = defaultdict(list)
        for ts, value in points:
            buckets[math.floor(ts / bucket_s) * bucket_s].append(value)
        out[name] = [(b, sum(vs) / len(vs)) for b, vs in sorted(buckets.items())]
    return out


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def line_chart(series: Series, *, start: float, end: float, label: str) -> Markup:
    """An ``<svg>`` with one polyline per series over [start, end]; 'no data' when empty."""
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    parts = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        f'preserveAspectRatio="none" class="plot">',
        f'<rect x="{PAD_LEFT}" y="{PAD_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#cbd5e1" stroke-width="1"/>',
    ]
    values = [v for points in series.values() for _, v in points]
    if not values:
        parts.append(
            f'<text x="{PAD_LEFT + plot_w / 2:.0f}" y="{PAD_TOP + plot_h / 2:.0f}" '
            'text-anchor="middle" fill="#64748b" font-size="13">no data</text></svg>'
        )
        return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text
    low, high = min(0.0, *values), max(values)
    if high <= low:
        high = low + 1.0
    span = max(end - start, 1.0)

    def x(ts: float) -> float:
        return PAD_LEFT + (min(max(ts, start), end) - start) / span * plot_w

    def y(value: float) -> float:
        return PAD_TOP + plot_h - (value - low) / (high - low) * plot_h

    for text, ypos in ((_fmt(high), PAD_TOP + 10), (_fmt(low), PAD_TOP + plot_h)):
        parts.append(
            f'<text x="{PAD_LEFT - 4}" y="{ypos:.0f}" text-anchor="end" fill="#475569" '
            f'font-size="11">{escape(text)}</text>'
        )
    hours = span / 3600
    since = f"{hours:.0f} h ago" if hours >= 2 else f"{span / 60:.0f} min ago"
    bottom = HEIGHT - 5
    parts.append(
        f'<text x="{PAD_LEFT}" y="{bottom}" fill="#475569" font-size="11">{since}</text>'
        f'<text x="{WIDTH - PAD_RIGHT}" y="{bottom}" text-anchor="end" fill="#475569" '
        'font-size="11">now</text>'
    )
    for i, (name, points) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{x(ts):.1f},{y(v):.1f}" for ts, v in points)
        if len(points) == 1:
            px, py = x(points[0][0]), y(points[0][1])
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"/>')
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5" '
            f'data-series="{escape(name)}"><title>{escape(name)}</title></polyline>'
        )
    return Markup("".join(parts) + "</svg>")  # noqa: S704 - numbers and escaped text only


def legend(series: Series) -> list[tuple[str, str, float | None]]:
    """(name, color, latest value) per line, in the colors ``line_chart`` uses."""
    out = []
    for i, (name, points) in enumerate(sorted(series.items())):
        out.append((name, COLORS[i % len(COLORS)], points[-1][1] if points else None))
    return out


def all_series(rows: Sequence[TelemetryRow], *, day: bool) -> dict[str, Series]:
    """Metric key to its series (bucketed into 5-minute means for the day range)."""
    out = {}
    for m in METRICS:
        s = series_for(m, rows)
        out[m.key] = bucketed(s) if day else s
    return out

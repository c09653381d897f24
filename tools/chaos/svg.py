"""A small SVG line chart (throughput over time with fault windows shaded),
written by hand so the report needs no plotting dependency."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

COLORS = {"driver": "#d62728", "memory": "#9467bd", "scheduler": "#ff7f0e", "security": "#2ca02c",
          "gateway": "#1f77b4"}
LINE_COLORS = ("#222222", "#17becf", "#8c564b")


def chart(title: str, t: Sequence[float], series: dict[str, Sequence[float]],
          windows: Sequence[tuple[float, float, str, str]], *, width: int = 1000, height: int = 360) -> str:
    """`windows`: (start, end, service, label) spans shaded by service."""
    left, right, top, bottom = 60, 170, 30, 40
    w, h = width - left - right, height - top - bottom
    t_max = max([*t, *(e for _, e, _, _ in windows), 1.0])
    y_max = max([max(s, default=0.0) for s in series.values()] + [1.0]) * 1.1

    def x(v: float) -> float:
        return left + w * v / t_max

    def y(v: float) -> float:
        return top + h - h * v / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">{escape(title)}</text>']
    for a, b, service, label in windows:
        color = COLORS.get(service, "#7f7f7f")
        out.append(f'<rect x="{x(a):.1f}" y="{top}" width="{max(x(b) - x(a), 1.5):.1f}" height="{h}" '
                   f'fill="{color}" fill-opacity="0.25"><title>{escape(label)}</title></rect>')
    for i in range(6):
        v = y_max * i / 5
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    step = _nice_step(t_max)
    s = 0.0
    while s <= t_max:
        out.append(f'<text x="{x(s):.1f}" y="{top + h + 16}" text-anchor="middle">{s:.0f}</text>')
        s += step
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">seconds</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
    for (name, values), color in zip(series.items(), LINE_COLORS):
        pts = " ".join(f"{x(tv):.1f},{y(v):.1f}" for tv, v in zip(t, values))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    ly = top + 10
    for (name, _), color in zip(series.items(), LINE_COLORS):
        out.append(f'<line x1="{left + w + 10}" x2="{left + w + 30}" y1="{ly}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{left + w + 35}" y="{ly + 4}">{escape(name)}</text>')
        ly += 16
    for service, color in COLORS.items():
        out.append(f'<rect x="{left + w + 10}" y="{ly - 6}" width="20" height="10" fill="{color}" '
                   f'fill-opacity="0.35"/><text x="{left + w + 35}" y="{ly + 4}">{service} fault</text>')
        ly += 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice_step(span: float) -> float:
    for step in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span / step <= 12:
            return float(step)
    return 1200.0

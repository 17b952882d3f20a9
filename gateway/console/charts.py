"""Console charts: small server-side SVG drawn here, so nothing loads from the internet.

Hand-made rather than from a charting library: the console needs three shapes
(a line over months, bars, stacked bars over time), each a few dozen SVG
elements, and writing them here keeps every byte of the page inside the package
(no script, no external stylesheet, no font). Every mark carries its value in a
``<title>`` so a screen reader and a mouse-over show it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["line", "bars", "stacked"]

_W, _H, _PAD = 640, 220, 36
COLOURS = {"stored": "#2f7d32", "filtered": "#8d8d8d", "refused": "#c77700", "failed": "#b3261e",
           "queued": "#3b6fb6", "received": "#3b6fb6"}


def _svg(body: str, label: str, height: int = _H) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
            f'viewBox="0 0 {_W} {height}" class="chart">{body}</svg>')


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def line(points: Sequence[tuple[str, float | None]], label: str) -> str:
    """互认率 (0..1) over months as a line with dots; months without eligible results are left out."""
    known = [(k, v) for k, v in points if v is not None]
    if not known:
        return _svg(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">无数据 (no data)</text>', label)
    step = (_W - 2 * _PAD) / max(len(known) - 1, 1)
    xy = [(_PAD + i * step, _H - _PAD - v * (_H - 2 * _PAD)) for i, (_, v) in enumerate(known)]
    parts = [f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" class="axis"/>',
             f'<text x="4" y="{_PAD}" class="tick">100%</text><text x="4" y="{_H - _PAD}" class="tick">0%</text>']
    if len(xy) > 1:
        parts.append('<polyline class="series" fill="none" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
    for (key, value), (x, y) in zip(known, xy):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" class="dot"><title>{escape(key)}: {_pct(value)}'
                     f'</title></circle><text x="{x:.1f}" y="{_H - _PAD + 16}" text-anchor="middle" '
                     f'class="tick">{escape(key)}</text>')
    return _svg("".join(parts), label)


def bars(items: Sequence[tuple[str, float | None]], label: str) -> str:
    """Horizontal bars of rates (0..1), one per labelled group."""
    height = max(60, 24 * len(items) + 20)
    label_w, parts = 230, []
    for i, (name, value) in enumerate(items):
        y = 10 + i * 24
        width = (value or 0) * (_W - label_w - 70)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="tick">{escape(name[:18])}'
                     f'</text><rect x="{label_w}" y="{y}" width="{width:.1f}" height="16" class="bar">'
                     f'<title>{escape(name)}: {_pct(value)}</title></rect><text x="{label_w + width + 4:.1f}" '
                     f'y="{y + 13}" class="tick">{_pct(value)}</text>')
    return _svg("".join(parts), label, height)


def stacked(buckets: Sequence[str], series: Mapping[str, Sequence[int]], label: str) -> str:
    """Stacked columns of counts per time bucket, one colour per outcome, with a legend."""
    totals = [sum(s[i] for s in series.values()) for i in range(len(buckets))]
    top = max(totals or [0]) or 1
    step = (_W - 2 * _PAD) / max(len(buckets), 1)
    parts = [f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" class="axis"/>',
             f'<text x="4" y="{_PAD}" class="tick">{top}</text>']
    for i, bucket in enumerate(buckets):
        y = _H - _PAD
        for name, counts in series.items():
            h = counts[i] / top * (_H - 2 * _PAD)
            if counts[i]:
                y -= h
                parts.append(f'<rect x="{_PAD + i * step + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
                             f'height="{h:.1f}" fill="{COLOURS.get(name, "#555")}"><title>{escape(bucket)} '
                             f'{escape(name)}: {counts[i]}</title></rect>')
        if i % max(len(buckets) // 8, 1) == 0:
            parts.append(f'<text x="{_PAD + i * step:.1f}" y="{_H - _PAD + 14}" class="tick">{escape(bucket)}</text>')
    for j, name in enumerate(series):
        parts.append(f'<rect x="{_PAD + j * 90}" y="{_H - 12}" width="10" height="10" '
                     f'fill="{COLOURS.get(name, "#555")}"/><text x="{_PAD + j * 90 + 14}" y="{_H - 3}" '
                     f'class="tick">{escape(name)}</text>')
    return _svg("".join(parts), label)

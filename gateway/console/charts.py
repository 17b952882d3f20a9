"""Console charts: small server-side SVG drawn here, so nothing loads from the internet.

Hand-made rather than from a charting library: the console needs three shapes
(互认率 over months, bars of rates by issuer or item, stacked columns of message
counts over time), each a few dozen SVG elements, and writing them here keeps
every byte of the page inside the package (no script, no external stylesheet,
no font). They are drawn for the size they are shown at: 640 units wide, shown
about 640 px wide at 1366×768 (two charts to a row) and on an A4 page (one to a
row), so the 13-unit labels read as 13 px. Every mark carries its value in a
``<title>`` (a mouse-over and a screen reader show it), a long Chinese name is
wrapped or shortened with the whole name in its ``<title>``, and a mark may link
to the records behind it.
"""
from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["line", "bars", "amounts", "stacked", "COLOURS", "OUTCOME_NAMES"]

_W = 640
_FONT = 13  # labels, in SVG units (= px at the size the console shows a chart)
_SMALL = 12  # axis values
COLOURS = {"stored": "#2f7d32", "filtered": "#8d8d8d", "refused": "#c77700", "failed": "#b3261e",
           "queued": "#3b6fb6", "received": "#3b6fb6"}
#: Outcome names as the legend shows them (Chinese first, the stored value after).
OUTCOME_NAMES = {"stored": "入库 stored", "filtered": "过滤 filtered", "refused": "拒收 refused",
                 "failed": "失败 failed", "queued": "排队 queued"}
_BAR, _TEXT, _GRID, _AXIS = "#3b6fb6", "#333", "#e3e6ea", "#888"


def _svg(body: str, label: str, height: float) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
            f'viewBox="0 0 {_W} {height:.0f}" width="{_W}" height="{height:.0f}" class="chart" '
            f'font-size="{_FONT}">{body}</svg>')


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = _FONT, weight: str = "",
          fill: str = _TEXT, cls: str = "tick") -> str:
    bold = f' font-weight="{weight}"' if weight else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{fill}"{bold} '
            f'class="{cls}">{escape(text)}</text>')


def _linked(mark: str, href: str | None) -> str:
    return f'<a href="{escape(href)}">{mark}</a>' if href else mark


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _width(text: str, size: float = _FONT) -> float:
    """About how wide ``text`` is drawn: a Chinese character one em, a Latin letter or digit a little over half."""
    return sum(size if unicodedata.east_asian_width(ch) in "WF" else size * 0.58 for ch in text)


def _wrap(text: str, width: float, lines: int = 2, size: float = _FONT) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width``; what does not fit ends in "…"."""
    out, current = [], ""
    for ch in text:
        if _width(current + ch, size) > width:
            out.append(current)
            current = ch.lstrip()
            if len(out) == lines:
                break
        else:
            current += ch
    else:
        out.append(current)
        return out
    last = out[-1]
    while last and _width(last + "…", size) > width:
        last = last[:-1]
    out[-1] = last + "…"
    return out


def _no_data(label: str, height: float = 80) -> str:
    return _svg(_text(_W / 2, height / 2 + 5, "无数据 (no data)", anchor="middle", fill="#666"), label, height)


def line(points: Sequence[tuple[str, float | None]], label: str, *, links: Sequence[str | None] = (),
         notes: Sequence[str] = ()) -> str:
    """互认率 (0..1) over months, with a 0–100% axis and the value written at every month.

    Up to three months are columns (a single month is one labelled column, not a lone dot); more are a line
    with dots. A month without eligible results shows "—" and no mark. ``links`` (the decisions behind each
    month) and ``notes`` (say "4/6") go with ``points`` one for one.
    """
    if not any(v is not None for _, v in points):
        return _no_data(label)
    height, left, right, top, bottom = 260.0, 52.0, 20.0, 26.0, 44.0
    plot_w, plot_h = _W - left - right, height - top - bottom
    base = top + plot_h
    parts = []
    for tick in (0, 0.25, 0.5, 0.75, 1):
        y = base - tick * plot_h
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{_W - right}" y2="{y:.1f}" '
                     f'stroke="{_AXIS if tick == 0 else _GRID}" class="{"axis" if tick == 0 else "grid"}"/>')
        parts.append(_text(left - 6, y + 4, f"{tick:.0%}", anchor="end", size=_SMALL))
    n = len(points)
    slot = plot_w / n
    every = max(1, math.ceil(n / 12))
    columns = n <= 3
    xy: list[tuple[float, float]] = []
    for i, (key, value) in enumerate(points):
        x = left + slot * (i + 0.5)
        note = notes[i] if i < len(notes) and notes[i] else ""
        title = f"{key} 互认率 {_pct(value)}" + (f"（{note}）" if note else "")
        if i % every == 0 or columns:
            parts.append(_text(x, base + 18, key, anchor="middle"))
        if value is None:
            parts.append(_text(x, base - 6, "—", anchor="middle", fill="#666"))
            continue
        y = base - value * plot_h
        shown = _pct(value) + (f" ({note})" if note and columns else "")
        if columns:
            w = min(96.0, slot * 0.5)
            mark = (f'<rect x="{x - w / 2:.1f}" y="{y:.1f}" width="{w:.1f}" height="{base - y:.1f}" '
                    f'fill="{_BAR}" class="bar"><title>{escape(title)}</title></rect>')
        else:
            xy.append((x, y))
            mark = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#16324f" class="dot">'
                    f'<title>{escape(title)}</title></circle>')
        parts.append(_linked(mark, links[i] if i < len(links) else None))
        if columns or n <= 12:
            parts.append(_text(x, max(y - 8, top - 10), shown, anchor="middle", weight="bold"))
    if len(xy) > 1:  # under the dots and labels, over the grid (5 lines and 5 values)
        parts.insert(10, '<polyline fill="none" stroke="#16324f" stroke-width="2" class="series" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
    return _svg("".join(parts), label, height)


def bars(items: Sequence[tuple[str, float | None]], label: str, *, links: Sequence[str | None] = (),
         notes: Sequence[str] = ()) -> str:
    """Horizontal bars of rates (0..1), one per named group, the percentage written at the end of each bar.

    Names wrap to two lines and are shortened beyond that (the whole name is in the bar's ``<title>``); a group
    without eligible results shows "—". ``links`` and ``notes`` go with ``items`` one for one.
    """
    if not items:
        return _no_data(label)
    label_w, value_w, top, row = 196.0, 104.0, 30.0, 38.0
    x0, x1 = label_w + 10, _W - value_w
    height = top + row * len(items) + 8
    parts = []
    for tick in (0, 0.5, 1):
        x = x0 + tick * (x1 - x0)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 6:.1f}" '
                     f'stroke="{_AXIS if tick == 0 else _GRID}" class="{"axis" if tick == 0 else "grid"}"/>')
        parts.append(_text(x, top - 12, f"{tick:.0%}", anchor="middle", size=_SMALL))
    for i, (name, value) in enumerate(items):
        y = top + i * row
        note = notes[i] if i < len(notes) and notes[i] else ""
        title = f"{name}: 互认率 {_pct(value)}" + (f"（{note}）" if note else "")
        lines = _wrap(name, label_w)
        first = y + row / 2 + 4 - (len(lines) - 1) * 8
        names = "".join(_text(label_w, first + j * 16, text, anchor="end") for j, text in enumerate(lines))
        width = (value or 0) * (x1 - x0)
        mark = (f'<g class="group"><title>{escape(title)}</title>{names}'
                f'<rect x="{x0}" y="{y + 8:.1f}" width="{max(width, 0.0):.1f}" height="22" fill="{_BAR}" '
                f'class="bar"/></g>')
        parts.append(_linked(mark, links[i] if i < len(links) else None))
        shown = _pct(value) + (f" ({note})" if note else "") if value is not None else "— 无可判定 (none eligible)"
        parts.append(_text(x0 + width + 6, y + row / 2 + 5, shown, weight="bold" if value is not None else "",
                           fill=_TEXT if value is not None else "#666"))
    return _svg("".join(parts), label, height)


def amounts(items: Sequence[tuple[str, float]], label: str, *, unit: str, links: Sequence[str | None] = (),
            decimals: int = 0) -> str:
    """Horizontal bars of amounts (元 saved, results counted), scaled to the largest, the amount and ``unit``
    written at the end of each bar; names wrap like :func:`bars`."""
    if not items:
        return _no_data(label)
    label_w, value_w, top, row = 196.0, 120.0, 14.0, 38.0
    x0, x1 = label_w + 10, _W - value_w
    height = top + row * len(items) + 8
    largest = max((v for _, v in items), default=0.0) or 1.0
    parts = [f'<line x1="{x0}" y1="{top - 6}" x2="{x0}" y2="{height - 6:.1f}" stroke="{_AXIS}" class="axis"/>']
    for i, (name, value) in enumerate(items):
        y = top + i * row
        shown = f"{value:,.{decimals}f} {unit}"
        lines = _wrap(name, label_w)
        first = y + row / 2 + 4 - (len(lines) - 1) * 8
        names = "".join(_text(label_w, first + j * 16, text, anchor="end") for j, text in enumerate(lines))
        width = max(value, 0.0) / largest * (x1 - x0)
        mark = (f'<g class="group"><title>{escape(f"{name}: {shown}")}</title>{names}'
                f'<rect x="{x0}" y="{y + 8:.1f}" width="{width:.1f}" height="22" fill="{_BAR}" class="bar"/></g>')
        parts.append(_linked(mark, links[i] if i < len(links) else None))
        parts.append(_text(x0 + width + 6, y + row / 2 + 5, shown, weight="bold"))
    return _svg("".join(parts), label, height)


def _nice(top: int) -> int:
    """The axis maximum for counts up to ``top``: 1, 2, 5, 10, 20, 50, …"""
    if top <= 1:
        return 1
    power: int = 10 ** int(math.floor(math.log10(top)))  # int ** int is typed Any (a negative power is a float)
    for step in (1, 2, 5, 10):
        if step * power >= top:
            return step * power
    return 10 * power  # pragma: no cover


def stacked(buckets: Sequence[str], series: Mapping[str, Sequence[int]], label: str) -> str:
    """Stacked columns of counts per time bucket, one colour per outcome, with a count axis, each column's
    total written over it, and a legend."""
    height, left, right, top, bottom = 260.0, 44.0, 16.0, 40.0, 32.0
    plot_w, plot_h = _W - left - right, height - top - bottom
    base = top + plot_h
    totals = [sum(s[i] for s in series.values()) for i in range(len(buckets))]
    top_value = _nice(max(totals or [0]))
    parts = []
    ticks = sorted({0, top_value // 2, top_value} if top_value >= 2 else {0, top_value})
    for tick in ticks:
        y = base - tick / top_value * plot_h
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{_W - right}" y2="{y:.1f}" '
                     f'stroke="{_AXIS if tick == 0 else _GRID}" class="{"axis" if tick == 0 else "grid"}"/>')
        parts.append(_text(left - 6, y + 4, str(tick), anchor="end", size=_SMALL))
    step = plot_w / max(len(buckets), 1)
    every = max(1, math.ceil(len(buckets) / 8))
    for i, bucket in enumerate(buckets):
        y = base
        x = left + i * step
        for name, counts in series.items():
            if counts[i]:
                h = counts[i] / top_value * plot_h
                y -= h
                parts.append(f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{max(step - 4, 1):.1f}" height="{h:.1f}" '
                             f'fill="{COLOURS.get(name, "#555")}"><title>{escape(bucket)} '
                             f'{escape(OUTCOME_NAMES.get(name, name))}: {counts[i]}</title></rect>')
        if totals[i]:
            parts.append(_text(x + step / 2, y - 4, str(totals[i]), anchor="middle", size=_SMALL, weight="bold"))
        if i % every == 0:
            parts.append(_text(x + step / 2, base + 18, bucket, anchor="middle", size=_SMALL))
    x = left
    for name in series:
        shown = OUTCOME_NAMES.get(name, name)
        parts.append(f'<rect x="{x:.1f}" y="10" width="12" height="12" fill="{COLOURS.get(name, "#555")}"/>'
                     + _text(x + 16, 21, shown))
        x += 16 + _width(shown) + 18
    if not any(totals):
        parts.append(_text(left + plot_w / 2, top + plot_h / 2, "此期间无消息 (no messages in this period)",
                           anchor="middle", fill="#666"))
    return _svg("".join(parts), label, height)

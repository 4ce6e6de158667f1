"""The charts of ``compress report``, drawn as inline SVG (no plotting library, no network).

SVG rather than PNG: the page stays one self-contained file, the charts scale and their text can be
selected, nothing needs matplotlib, and every plotted point carries its numbers (``data-x``,
``data-y``) so a test can read back exactly what was drawn. Each function returns an SVG string.
"""

from __future__ import annotations

import dataclasses
import math
from html import escape

# Colour-blind-safe categorical palette (Okabe-Ito), then greys.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#666666")
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


@dataclasses.dataclass
class Series:
    label: str
    points: list[tuple[float, float]]            # (x, y) in data units
    names: list[str] | None = None               # one label per point, drawn beside it
    line: bool = True
    color: str = PALETTE[0]
    marker_size: float = 4.0


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _padded(values) -> tuple[float, float]:
    """The range of ``values`` widened by 5% each side, so no point sits on the frame."""
    values = list(values)
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _fmt_tick(v: float, step: float | None = None) -> str:
    """A tick label with as many decimals as the tick step needs (0.5 apart: one decimal)."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step else (0 if v == int(v) else 3)
    return f"{v:,.{decimals}f}"


def xy_chart(series: list[Series], *, title: str, x_label: str, y_label: str, width: int = 720,
             height: int = 380, chart_id: str = "chart") -> str:
    """A scatter / line chart of ``series`` with labelled axes, round ticks and a legend."""
    pts = [p for s in series for p in s.points]
    if not pts:
        raise ValueError("xy_chart needs at least one point")
    left, right, top, bottom = 70, 20, 36, 52
    xt = nice_ticks(*_padded(p[0] for p in pts))
    yt = nice_ticks(*_padded(p[1] for p in pts))
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def sy(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" class="chart" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" {FONT} font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>']
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt_tick(t, xt[1] - xt[0])}</text>')
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_tick(t, yt[1] - yt[0])}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    placed: list[tuple[float, float]] = []          # label anchors so far: a label too close moves down
    for k, s in enumerate(series):
        xy = [(sx(x), sy(y)) for x, y in s.points]
        if s.line and len(xy) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="2"/>')
        for i, ((x, y), (dx, dy)) in enumerate(zip(xy, s.points)):
            name = s.names[i] if s.names else ""
            tip = f"{name}: " if name else ""
            out.append(f'<circle class="point" data-series="{escape(s.label)}" data-name="{escape(name)}" '
                       f'data-x="{dx!r}" data-y="{dy!r}" cx="{x:.1f}" cy="{y:.1f}" r="{s.marker_size}" '
                       f'fill="{s.color}"><title>{escape(tip)}{dx:.4g}, {dy:.4g}</title></circle>')
            if name:
                anchor = "end" if x > left + pw * 0.75 else "start"
                off = -8 if anchor == "end" else 8
                ty = y - 6
                while any(abs(px - x) < 60 and abs(py - ty) < 12 for px, py in placed):
                    ty += 13
                placed.append((x, ty))
                out.append(f'<text x="{x + off:.1f}" y="{ty:.1f}" text-anchor="{anchor}" font-size="11" '
                           f'fill="#333">{escape(name)}</text>')
        ly = top + 14 + 16 * k
        out.append(f'<circle cx="{left + pw - 150}" cy="{ly - 4}" r="4" fill="{s.color}"/>'
                   f'<text x="{left + pw - 140}" y="{ly}" font-size="11">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _heat_color(t: float) -> str:
    """t in [0, 1] -> white-yellow-orange-dark red (a sequential scale)."""
    stops = [(255, 255, 229), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    rgb = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1])]
    return "#%02x%02x%02x" % tuple(rgb)


def heatmap(values: dict[str, dict[str, float]], columns: list[str], *, title: str, chosen: dict[str, str] | None = None,
            column_groups: list[tuple[str, int]] | None = None, cell: int | None = None,
            chart_id: str = "heatmap") -> str:
    """Rows (``values`` keys) by ``columns``, coloured by log10 of the value; ``chosen[column]`` is
    the row outlined in that column (the plan's pick). ``column_groups``: (label, span) runs drawn
    under the columns (e.g. one per layer)."""
    rows = list(values)
    finite = [v for r in rows for v in values[r].values() if v is not None and math.isfinite(v) and v > 0]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    span = (hi - lo) or 1.0
    left, top = 130, 34
    cell = cell or max(6, min(28, 900 // max(len(columns), 1)))      # px per column: ~900 px across
    ch = max(min(cell * 2, 22), 14)
    width = max(left + cell * len(columns) + 20, left + 560)           # room for the colour bar's text
    height = top + ch * len(rows) + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" class="chart" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" {FONT} font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for r, row in enumerate(rows):
        y = top + r * ch
        out.append(f'<text x="{left - 6}" y="{y + ch / 2 + 4:.1f}" text-anchor="end">{escape(row)}</text>')
        for c, col in enumerate(columns):
            v = values[row].get(col)
            ok = v is not None and math.isfinite(v) and v > 0
            fill = _heat_color((math.log10(v) - lo) / span) if ok else "#dddddd"
            out.append(f'<rect class="cell" data-row="{escape(row)}" data-col="{escape(col)}" '
                       f'data-value="{v!r}" x="{left + c * cell}" y="{y}" width="{cell}" height="{ch}" '
                       f'fill="{fill}"><title>{escape(col)} as {escape(row)}: {v if v is None else f"{v:.3g}"} '
                       f'nats</title></rect>')
    for c, col in enumerate(columns):
        pick = (chosen or {}).get(col)
        if pick in rows:
            out.append(f'<rect class="chosen" x="{left + c * cell + 0.5}" y="{top + rows.index(pick) * ch + 0.5}" '
                       f'width="{cell - 1}" height="{ch - 1}" fill="none" stroke="#000" stroke-width="1.2"/>')
    y0 = top + ch * len(rows)
    if column_groups:
        x = left
        for label, n in column_groups:
            out.append(f'<line x1="{x}" y1="{y0}" x2="{x}" y2="{y0 + 6}" stroke="#333"/>')
            if label:
                out.append(f'<text x="{x + n * cell / 2:.1f}" y="{y0 + 16}" text-anchor="middle" font-size="9">'
                           f'{escape(label)}</text>')
            x += n * cell
    # colour bar: log10 of the loss increase
    bar_y, bar_w = y0 + 30, 200
    for i in range(40):
        out.append(f'<rect x="{left + i * bar_w / 40:.1f}" y="{bar_y}" width="{bar_w / 40 + 0.5:.1f}" height="10" '
                   f'fill="{_heat_color(i / 39)}"/>')
    out.append(f'<text x="{left - 6}" y="{bar_y + 9}" text-anchor="end">{10 ** lo:.2g}</text>')
    out.append(f'<text x="{left + bar_w + 6}" y="{bar_y + 9}">{10 ** hi:.2g} nats (log scale; outlined: the plan\'s '
               f'format)</text>')
    out.append("</svg>")
    return "\n".join(out)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x and smaller y are better), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front

"""A small SVG chart toolkit: axes, ticks, log2 axes, lines, points, bands, reference lines, a legend.

Plots are inline `<svg>` so the report page needs no JavaScript library and works offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from markupsafe import Markup

from service.recipe_text import format_bytes

# Colours (Okabe-Ito, readable for colour-blind people).
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#666666"


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def format_byte_tick(value: float) -> str:
    return "0" if value == 0 else format_bytes(value)


@dataclass
class Series:
    """Points (x, y) drawn as a line, as markers, or both. `marker`: circle | cross."""

    label: str
    points: list[tuple[float, float]]
    color: str = BLUE
    line: bool = True
    marker: str | None = None
    dashed: bool = False


@dataclass
class RefLine:
    """A vertical (x) or horizontal (y) reference line with a label."""

    label: str
    x: float | None = None
    y: float | None = None
    color: str = GREY
    dashed: bool = True


@dataclass
class Band:
    """A shaded vertical span from x0 to x1 (e.g. an estimate's spread)."""

    label: str
    x0: float
    x1: float
    color: str = PURPLE


@dataclass
class Axis:
    lo: float
    hi: float
    start: float  # pixel of lo
    end: float  # pixel of hi
    log2: bool = False
    formatter: Callable[[float], str] = format_tick
    unit: float = 1.0  # linear ticks are nice numbers of this unit (e.g. 2**20 for MiB)

    def __post_init__(self) -> None:
        if self.log2:
            self.lo, self.hi = max(self.lo, 1e-12), max(self.hi, 1e-12)
        if self.hi <= self.lo:  # a single value: widen around it
            if self.log2:
                self.lo, self.hi = self.lo / 2, self.hi * 2
            else:
                pad = abs(self.lo) * 0.1 or 1.0
                self.lo, self.hi = self.lo - pad, self.hi + pad

    def _t(self, v: float) -> float:
        return math.log2(max(v, 1e-12)) if self.log2 else v

    def __call__(self, value: float) -> float:
        lo, hi = self._t(self.lo), self._t(self.hi)
        return self.start + (self._t(value) - lo) / (hi - lo) * (self.end - self.start)

    def contains(self, value: float) -> bool:
        return self.lo * (1 - 1e-9) <= value <= self.hi * (1 + 1e-9) + 1e-12

    def ticks(self, most: int = 9) -> list[float]:
        if self.log2:
            first, last = math.ceil(math.log2(self.lo) - 1e-9), math.floor(math.log2(self.hi) + 1e-9)
            exponents = list(range(first, last + 1))
            step = max(1, math.ceil(len(exponents) / most))
            return [2.0**e for e in exponents[::step]]
        lo, hi = self.lo / self.unit, self.hi / self.unit
        raw = (hi - lo) / max(1, most - 2)
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
        first = math.ceil(lo / step - 1e-9) * step
        count = int((hi - first) / step + 1e-9) + 1
        return [round(first + i * step, 12) * self.unit for i in range(count)]


def nice_upper(value: float, unit: float = 1.0) -> float:
    """Round up to a round number of `unit`s (1, 1.2, 1.5, 2, 2.5, ... times a power of ten): an axis' top."""
    if value <= 0:
        return unit
    scaled = value / unit
    magnitude = 10 ** math.floor(math.log10(scaled))
    return unit * next(
        m * magnitude for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * magnitude >= scaled
    )


def byte_unit(value: float) -> float:
    """The binary unit (GiB, MiB, KiB or B) a byte axis up to `value` is best ticked in."""
    return next((size for size in (2**30, 2**20, 2**10) if value >= 2 * size), 1.0)


def log2_range(values: Iterable[float]) -> tuple[float, float]:
    """Powers of two just around the positive values (the x range of a batch-size axis)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return 1.0, 2.0
    lo, hi = 2.0 ** math.floor(math.log2(min(positive))), 2.0 ** math.ceil(math.log2(max(positive)))
    return (lo, hi * 2) if lo == hi else (lo, hi)


def _tag(name: str, content: str | None = None, **attrs: Any) -> str:
    """One SVG element; attribute names use _ for - (text_anchor=...), floats get one decimal."""
    rendered = " ".join(
        f'{key.rstrip("_").replace("_", "-")}="{escape(_f(v) if isinstance(v, float) else str(v))}"'
        for key, v in attrs.items()
        if v is not None
    )
    return f"<{name} {rendered}/>" if content is None else f"<{name} {rendered}>{content}</{name}>"


def _f(v: float) -> str:
    return f"{v:.1f}"


def _cross(x: float, y: float, size: float) -> str:
    """An × centred on (x, y), as path data."""
    a, b = (_f(x - size), _f(y - size)), (_f(x + size), _f(y + size))
    return f"M{a[0]},{a[1]} L{b[0]},{b[1]} M{a[0]},{b[1]} L{b[0]},{a[1]}"


WIDTH, HEIGHT = 640, 340
MARGIN = {"left": 78, "right": 20, "top": 36, "bottom": 86}


def svg_plot(
    *,
    name: str,
    title: str,
    x_label: str,
    y_label: str,
    x: tuple[float, float],
    y: tuple[float, float],
    series: Sequence[Series] = (),
    refs: Sequence[RefLine] = (),
    bands: Sequence[Band] = (),
    x_log2: bool = True,
    y_log2: bool = False,
    x_format: Callable[[float], str] = format_tick,
    y_format: Callable[[float], str] = format_tick,
    y_unit: float = 1.0,
    caption: str | None = None,
) -> Markup:
    """One plot as an inline <svg>. Points outside the axes' ranges are dropped, not clipped."""
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    xa = Axis(x[0], x[1], left, right, log2=x_log2, formatter=x_format)
    ya = Axis(y[0], y[1], bottom, top, log2=y_log2, formatter=y_format, unit=y_unit)
    grid = "#e4e4e4"
    out = [
        f"<title>{escape(title)}</title>",
        _tag("text", escape(title), x=left, y=20, class_="plot-title", font_size=15, font_weight=600),
        _tag("rect", x=left, y=top, width=right - left, height=bottom - top, fill="#fafafa", stroke="#ccc"),
    ]
    # Grid, ticks and axis titles.
    for value in xa.ticks():
        px = xa(value)
        out.append(_tag("line", x1=px, x2=px, y1=top, y2=bottom, stroke=grid))
        label = escape(xa.formatter(value))
        out.append(_tag("text", label, x=px, y=bottom + 16, text_anchor="middle", font_size=11))
    for value in ya.ticks(most=6):
        py = ya(value)
        out.append(_tag("line", x1=left, x2=right, y1=py, y2=py, stroke=grid))
        label = escape(ya.formatter(value))
        out.append(_tag("text", label, x=left - 6, y=py + 4, text_anchor="end", font_size=11))
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    out.append(_tag("text", escape(x_label), x=middle_x, y=bottom + 36, text_anchor="middle", font_size=12))
    rotate = f"rotate(-90 16 {middle_y})"
    out.append(
        _tag("text", escape(y_label), x=16, y=middle_y, text_anchor="middle", font_size=12, transform=rotate)
    )
    # Bands, then series, then reference lines on top.
    for band in bands:
        x0, x1 = max(band.x0, xa.lo), min(band.x1, xa.hi)
        if x1 > x0:
            out.append(
                _tag(
                    "rect",
                    x=xa(x0),
                    y=top,
                    width=xa(x1) - xa(x0),
                    height=bottom - top,
                    fill=band.color,
                    fill_opacity=0.15,
                    class_="band",
                )
            )
    for s in series:
        inside = [(px, py) for px, py in s.points if xa.contains(px) and ya.contains(py)]
        if s.line and len(inside) >= 2:
            d = " ".join(f"{'L' if i else 'M'}{_f(xa(px))},{_f(ya(py))}" for i, (px, py) in enumerate(inside))
            dash = "6 4" if s.dashed else None
            out.append(
                _tag(
                    "path",
                    d=d,
                    fill="none",
                    stroke=s.color,
                    stroke_width=2,
                    stroke_dasharray=dash,
                    class_="series",
                )
            )
        for px, py in inside if s.marker else ():
            sx, sy = xa(px), ya(py)
            tip = f"<title>{escape(s.label)}: {xa.formatter(px)}, {ya.formatter(py)}</title>"
            if s.marker == "cross":
                out.append(
                    _tag("path", tip, d=_cross(sx, sy, 5), stroke=s.color, stroke_width=2.5, class_="point")
                )
            else:
                out.append(
                    _tag("circle", tip, cx=sx, cy=sy, r=4.5, fill=s.color, stroke="#fff", class_="point")
                )
    vertical = 0
    for ref in refs:
        dash = "5 4" if ref.dashed else None
        line: dict[str, Any] = {"stroke": ref.color, "stroke_width": 1.5, "stroke_dasharray": dash}
        if ref.x is not None and xa.contains(ref.x):
            px = xa(ref.x)
            out.append(_tag("line", x1=px, x2=px, y1=top, y2=bottom, class_="ref", **line))
            anchor, dx = ("end", -4.0) if px > middle_x else ("start", 4.0)
            label_y = top + 13 + 14 * vertical  # stagger the labels of neighbouring lines
            out.append(
                _tag(
                    "text",
                    escape(ref.label),
                    x=px + dx,
                    y=label_y,
                    text_anchor=anchor,
                    font_size=11,
                    fill=ref.color,
                )
            )
            vertical += 1
        if ref.y is not None and ya.contains(ref.y):
            py = ya(ref.y)
            out.append(_tag("line", x1=left, x2=right, y1=py, y2=py, class_="ref", **line))
            out.append(_tag("text", escape(ref.label), x=left + 4, y=py - 4, font_size=11, fill=ref.color))
    legend, y_end = _legend(series, bands, y=bottom + 58)
    out.extend(legend)
    if caption:
        y_end += 18
        out.append(_tag("text", escape(caption), x=left, y=y_end, font_size=11, fill="#444"))
    height = max(HEIGHT, y_end + 10)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" class="plot" role="img" '
        f'data-plot="{escape(name)}" aria-label="{escape(title)}">'
    )
    return Markup("\n".join([head, *out, "</svg>"]))


def _legend(series: Sequence[Series], bands: Sequence[Band], *, y: float) -> tuple[list[str], float]:
    """The legend's rows under the x axis (reference lines are labelled where they are drawn)."""
    entries = [(s.label, s.color, s.marker or ("dashed" if s.dashed else "line")) for s in series]
    entries += [(b.label, b.color, "band") for b in bands]
    out, x = ['<g class="legend" font-size="11">'], float(MARGIN["left"])
    for label, color, kind in entries:
        if not label:  # an unlabelled series has no legend entry
            continue
        width = 30 + 6.2 * len(label)
        if x + width > WIDTH and x > MARGIN["left"]:  # wrap to the next row
            x, y = float(MARGIN["left"]), y + 17
        if kind == "circle":
            out.append(_tag("circle", cx=x + 7, cy=y - 4, r=4, fill=color))
        elif kind == "band":
            out.append(_tag("rect", x=x, y=y - 9, width=14, height=10, fill=color, fill_opacity=0.3))
        elif kind == "cross":
            out.append(_tag("path", d=_cross(x + 7, y - 4, 4), stroke=color, stroke_width=2))
        else:
            dash = "4 3" if kind == "dashed" else None
            out.append(
                _tag(
                    "line",
                    x1=x,
                    x2=x + 14,
                    y1=y - 4,
                    y2=y - 4,
                    stroke=color,
                    stroke_width=2,
                    stroke_dasharray=dash,
                )
            )
        out.append(_tag("text", escape(label), x=x + 18, y=y))
        x += width
    out.append("</g>")
    return out, y


def not_measured(*, name: str, title: str, reason: str) -> Markup:
    """The placeholder a plot shows when its data is missing."""
    height, left = 120, MARGIN["left"]
    body = [
        f"<title>{escape(title)}: not measured</title>",
        _tag("text", escape(title), x=left, y=20, font_size=15, font_weight=600),
        _tag(
            "rect",
            x=left,
            y=32,
            width=WIDTH - left - MARGIN["right"],
            height=height - 44,
            fill="#fafafa",
            stroke="#ccc",
            stroke_dasharray="4 4",
        ),
        _tag(
            "text",
            f"not measured — {escape(reason)}",
            x=WIDTH / 2,
            y=height / 2 + 6,
            text_anchor="middle",
            font_size=14,
            fill="#666",
        ),
    ]
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" class="plot not-measured" '
        f'role="img" data-plot="{escape(name)}" data-empty="true" aria-label="{escape(title)}: not measured">'
    )
    return Markup("\n".join([head, *body, "</svg>"]))

"""The HTML report's data and plots: a recommendation and its trials in, template context out.

Plots are drawn here as inline SVG (a small helper below: axes, ticks, log2 batch-size axes, lines,
points, bands, reference lines, a legend), so the page needs no JavaScript library and works offline.
Everything is defensive: a result may lack any field (a job still running, a failed job, an older
result), and a plot without its data says "not measured" instead of breaking the page.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from markupsafe import Markup

from service.db.models import Recommendation, Trial
from service.status import ACTIVE

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2

# Colours (Okabe-Ito, readable for colour-blind people).
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#666666"

# --- formatting ----------------------------------------------------------------------------------


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, text, NaN, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def format_bytes(value: Any) -> str:
    n = number(value)
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_number(value: Any, digits: int = 4) -> str:
    n = number(value)
    if n is None:
        return "—"
    if n == int(n) and abs(n) < 1e15:
        return str(int(n))
    return f"{n:.{digits}g}"


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def format_byte_tick(value: float) -> str:
    return "0" if value == 0 else format_bytes(value)


# --- the SVG plot helper -------------------------------------------------------------------------


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
                )  # fmt: skip
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
                )  # fmt: skip
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
        line = {"stroke": ref.color, "stroke_width": 1.5, "stroke_dasharray": "5 4" if ref.dashed else None}
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
                )  # fmt: skip
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
        ),  # fmt: skip
        _tag(
            "text",
            f"not measured — {escape(reason)}",
            x=WIDTH / 2,
            y=height / 2 + 6,
            text_anchor="middle",
            font_size=14,
            fill="#666",
        ),  # fmt: skip
    ]
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" class="plot not-measured" '
        f'role="img" data-plot="{escape(name)}" data-empty="true" aria-label="{escape(title)}: not measured">'
    )
    return Markup("\n".join([head, *body, "</svg>"]))


# --- the report's plots --------------------------------------------------------------------------


def _points(rows: Any, x_key: str, y_key: str) -> list[tuple[float, float]]:
    points = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            px, py = number(row.get(x_key)), number(row.get(y_key))
            if px is not None and py is not None and px > 0:
                points.append((px, py))
    return sorted(points)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def memory_plot(result: dict[str, Any], trials: Sequence[Trial], budget: float | None) -> Markup:
    title = "Peak memory vs batch size"
    memory = _dict(result.get("memory"))
    budget = number(memory.get("budget_bytes")) or budget
    measured = [
        (float(t.batch_size), float(t.peak_bytes))
        for t in trials
        if t.batch_size and t.peak_bytes is not None and t.outcome in ("ok", "fits", "success")
    ]
    over = [
        (float(t.batch_size), float(t.peak_bytes))
        for t in trials
        if t.batch_size and t.peak_bytes is not None and t.outcome not in ("ok", "fits", "success")
    ]
    failed = [
        float(t.batch_size) for t in trials if t.batch_size and t.peak_bytes is None and t.outcome != "ok"
    ]
    fixed, per_sample = number(memory.get("fixed_bytes")), number(memory.get("per_sample_bytes"))
    optimizer_peak = number(memory.get("optimizer_peak_bytes")) or 0.0
    maximum = number(result.get("max_feasible_batch_size"))
    if not measured and not over and (fixed is None or per_sample is None):
        return not_measured(name="memory", title=title, reason="no memory trials yet")
    xs = [p[0] for p in measured + over] + failed + ([maximum] if maximum else [])
    x_lo, x_hi = log2_range(xs or [1.0, maximum or 2.0])
    series = [Series("measured peak (fits)", measured, color=BLUE, line=False, marker="circle")]
    if over:
        series.append(Series("measured peak (over budget)", over, color=RED, line=False, marker="cross"))
    ys = [p[1] for p in measured + over]
    if fixed is not None and per_sample is not None:
        grid = [x_lo * (x_hi / x_lo) ** (i / 60) for i in range(61)]
        model = [(b, max(optimizer_peak, fixed + per_sample * b)) for b in grid]
        series.insert(0, Series("model: max(optimizer peak, fixed + per-sample × B)", model, color=GREEN))
        ys += [p[1] for p in model if p[0] <= max(xs or [x_hi]) * 1.05]
    y_max = max([*ys, budget or 0.0, 1.0]) * 1.08
    unit = byte_unit(y_max)
    y_top = nice_upper(y_max, unit)
    if failed:  # failed without a reading: mark them at the top of the plot
        series.append(
            Series("failed (OOM / error)", [(b, y_top * 0.97) for b in failed], RED, False, "cross")
        )
    refs = []
    if budget:
        refs.append(RefLine(f"budget {format_bytes(budget)}", y=budget, color=RED))
    if maximum:
        refs.append(RefLine(f"max feasible {format_number(maximum)}", x=maximum, color=ORANGE))
    return svg_plot(
        name="memory", title=title, x_label="batch size (log2)", y_label="peak memory",
        x=(x_lo, x_hi), y=(0.0, y_top), series=series, refs=refs, y_format=format_byte_tick, y_unit=unit,
    )  # fmt: skip


def throughput_plot(result: dict[str, Any], trials: Sequence[Trial]) -> Markup:
    title = "Throughput vs batch size"
    points = _points(result.get("throughput"), "batch_size", "samples_per_second")
    if not points:  # while running: the throughput trials measured so far
        points = sorted(
            (float(t.batch_size), float(t.samples_per_second))
            for t in trials
            if t.batch_size and t.samples_per_second is not None and t.phase == "throughput"
        )
    if not points:
        return not_measured(name="throughput", title=title, reason="no throughput measurements")
    recommended = number(result.get("recommended_batch_size"))
    micro = number(result.get("micro_batch_size"))
    x_lo, x_hi = log2_range([p[0] for p in points] + [v for v in (micro,) if v])
    refs = []
    if recommended:
        refs.append(
            RefLine(f"recommended {format_number(recommended)}", x=recommended, color=GREEN, dashed=False)
        )
    if micro and micro != recommended:  # throughput is measured per device, at the micro-batch
        refs.append(RefLine(f"micro-batch {format_number(micro)}", x=micro, color=GREEN))
    return svg_plot(
        name="throughput", title=title, x_label="batch size (log2)", y_label="samples / s",
        x=(x_lo, x_hi), y=(0.0, nice_upper(max(p[1] for p in points) * 1.08)),
        series=[Series("measured (median of timed steps)", points, color=BLUE, marker="circle")], refs=refs,
    )  # fmt: skip


def time_to_target_curve(result: dict[str, Any]) -> tuple[list[tuple[float, float]], bool]:
    """The result's time_to_target_curve, or one derived from throughput and the noise scale.

    Returns (points, derived). Wall time to target ∝ (B + B_noise) / throughput(B), normalised to 1 at
    its minimum (docs/design.md, "The recommendation").
    """
    given = _points(result.get("time_to_target_curve"), "batch_size", "relative_time")
    if given:
        return given, False
    noise = number(_dict(result.get("gradient_noise_scale")).get("value"))
    throughput = [
        (b, s) for b, s in _points(result.get("throughput"), "batch_size", "samples_per_second") if s > 0
    ]
    if noise is None or len(throughput) < 2:
        return [], False
    raw = [(b, (b + noise) / s) for b, s in throughput]
    best = min(t for _, t in raw)
    return [(b, t / best) for b, t in raw], True


def time_plot(result: dict[str, Any]) -> Markup:
    title = "Predicted time to target vs batch size"
    points, derived = time_to_target_curve(result)
    if not points:
        return not_measured(
            name="time_to_target", title=title, reason="needs the throughput curve and the noise scale"
        )
    recommended = number(result.get("recommended_batch_size"))
    x_lo, x_hi = log2_range([p[0] for p in points] + ([recommended] if recommended else []))
    series = [Series("relative wall time to target", points, color=BLUE, marker="circle")]
    refs = []
    if recommended:
        refs.append(
            RefLine(f"recommended {format_number(recommended)}", x=recommended, color=GREEN, dashed=False)
        )
        near = [p for p in points if p[0] == recommended]
        if near:
            series.append(Series("recommendation", near, color=GREEN, line=False, marker="circle"))
    caption = "derived here from throughput × noise scale: (B + B_noise) / throughput(B)" if derived else None
    y_top = max(p[1] for p in points)
    return svg_plot(
        name="time_to_target", title=title, x_label="batch size (log2)", y_label="time ÷ best time",
        x=(x_lo, x_hi), y=(0.0, nice_upper(y_top * 1.08)), series=series, refs=refs, caption=caption,
    )  # fmt: skip


def noise_plot(result: dict[str, Any]) -> Markup:
    title = "Gradient noise scale: steps to target vs batch size"
    noise = _dict(result.get("gradient_noise_scale"))
    value = number(noise.get("value"))
    if value is None or value <= 0:
        return not_measured(name="noise_scale", title=title, reason="no gradient noise scale estimate")
    low, high = number(noise.get("low")), number(noise.get("high"))
    recommended = number(result.get("recommended_batch_size"))
    sizes = [b for b, _ in _points(result.get("throughput"), "batch_size", "samples_per_second")]
    sizes += [v for v in (value, low, high, recommended, number(result.get("max_feasible_batch_size"))) if v]
    x_lo, x_hi = log2_range([min(sizes) / 4, max(sizes) * 2])
    grid = [x_lo * (x_hi / x_lo) ** (i / 60) for i in range(61)]

    def steps(b_noise: float) -> list[tuple[float, float]]:
        return [(b, 1 + b_noise / b) for b in grid]

    series = [Series("1 + B_noise / B", steps(value), BLUE)]
    bands = []
    if low and high and high > low:
        series.append(Series("at the spread's ends", steps(low), color=PURPLE, dashed=True))
        series.append(Series("", steps(high), color=PURPLE, dashed=True))
        bands.append(Band(f"B_noise spread {format_number(low, 3)}–{format_number(high, 3)}", low, high))
    refs = [RefLine(f"B_noise ≈ {format_number(value, 3)}", x=value, color=PURPLE, dashed=False)]
    if recommended:
        refs.append(RefLine(f"recommended {format_number(recommended)}", x=recommended, color=GREEN))
    y_hi = max(y for s in series for _, y in s.points)
    measured_on = noise.get("measured_on")
    caption = "steps to a target loss: S(B) = S_min (1 + B_noise / B)" + (
        f"; noise scale measured on {measured_on}" if measured_on else ""
    )
    return svg_plot(
        name="noise_scale", title=title, x_label="batch size (log2)", y_label="steps ÷ minimum steps (log2)",
        x=(x_lo, x_hi), y=(1.0, 2 ** math.ceil(math.log2(max(y_hi, 2.0)))), y_log2=True,
        series=series, refs=refs, bands=bands, caption=caption,
    )  # fmt: skip


def _safe(build: Callable[[], Markup], *, name: str, title: str) -> Markup:
    """A plot that fails to draw (unexpected data) must not take the page down with it."""
    try:
        return build()
    except Exception:  # noqa: BLE001 - logged; the page shows the placeholder
        log.exception("could not draw the %s plot", name)
        return not_measured(name=name, title=title, reason="could not be drawn from this result")


# --- the page's context --------------------------------------------------------------------------


@dataclass
class RecipeItem:
    key: str
    label: str
    text: str
    value: Any
    hint: str = ""


@dataclass
class Report:
    recommendation: dict[str, Any]
    recipe: list[RecipeItem]
    request_summary: list[tuple[str, str]]
    plots: list[Markup]
    trials: list[dict[str, Any]]
    warnings: list[str]
    refresh_seconds: int | None
    progress_percent: int | None


def _recipe(result: dict[str, Any]) -> list[RecipeItem]:
    def item(key: str, label: str, text: str | None = None, hint: str = "") -> RecipeItem | None:
        if key not in result or result[key] is None:
            return None
        value = result[key]
        return RecipeItem(key, label, text if text is not None else format_number(value), value, hint)

    micro, accumulation, devices = (
        result.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "devices")
    )
    layout = " × ".join(
        f"{format_number(v)} {unit if v == 1 or unit.startswith('per') else unit + 's'}"
        for v, unit in ((micro, "per device"), (devices, "device"), (accumulation, "accumulation step"))
        if number(v) is not None
    )
    noise = _dict(result.get("gradient_noise_scale"))
    items = [
        item("recommended_batch_size", "Recommended global batch size", hint=layout),
        item("micro_batch_size", "Micro-batch per device"),
        item("gradient_accumulation_steps", "Gradient accumulation steps"),
        item("devices", "Devices"),
        item("learning_rate", "Learning rate", hint=str(result.get("learning_rate_rule") or "")),
        item("warmup_steps", "Warm-up steps"),
        item("steps_per_epoch", "Steps per epoch"),
        item("max_feasible_batch_size", "Largest batch that fits (verified)"),
        item("max_feasible_batch_size_aligned", "Largest multiple of 8 that fits"),
    ]
    if number(noise.get("value")) is not None:
        spread = ""
        if number(noise.get("low")) is not None and number(noise.get("high")) is not None:
            spread = f"{format_number(noise['low'], 3)}–{format_number(noise['high'], 3)}"
        items.append(
            RecipeItem(
                "gradient_noise_scale",
                "Gradient noise scale B_noise",
                format_number(noise["value"], 3),
                noise["value"],
                (spread + (f", measured on {noise['measured_on']}" if noise.get("measured_on") else "")),
            )  # fmt: skip
        )
    if result.get("confidence") is not None:
        items.append(RecipeItem("confidence", "Confidence", str(result["confidence"]), result["confidence"]))
    if result.get("extrapolated") is not None:
        items.append(
            RecipeItem(
                "extrapolated",
                "Extrapolated to the target device",
                "yes" if result["extrapolated"] else "no",
                bool(result["extrapolated"]),
            )  # fmt: skip
        )
    return [i for i in items if i is not None]


def _request_summary(request: dict[str, Any], result: dict[str, Any]) -> list[tuple[str, str]]:
    model, training, dataset = (_dict(request.get(k)) for k in ("model", "training", "dataset"))
    target = _dict(request.get("device"))
    device = _dict(result.get("device")) or target
    optimizer = (
        f"{training.get('optimizer', '—')}, lr {format_number(training.get('learning_rate'))} "
        f"at batch {format_number(training.get('reference_batch_size'))}"
    )
    precision = str(training.get("precision", "—"))
    if training.get("gradient_checkpointing"):
        precision += ", gradient checkpointing"
    budget = request.get("memory_budget_bytes")
    described = " ".join(str(v) for v in (device.get("type"), device.get("name")) if v) or "—"
    if device.get("memory_bytes"):
        described += f" ({format_bytes(device['memory_bytes'])})"
    count = number(target.get("count"))
    if count and count > 1:
        described += f" × {format_number(count)}"
    return [
        ("Model", str(model.get("name") or f"artifact {model.get('artifact_id')}")),
        ("Dataset size", format_number(dataset.get("size"))),
        ("Optimizer", optimizer),
        ("Precision", precision),
        ("Objective", str(request.get("objective", "—"))),
        ("Memory budget", format_bytes(budget) if budget else "the device's free memory"),
        ("Device", described),
    ]


def _trial_row(trial: Trial) -> dict[str, Any]:
    detail = ""
    if trial.detail:
        detail = json.dumps(trial.detail, separators=(", ", ": "), default=str)
        detail = detail if len(detail) <= 160 else detail[:157] + "…"
    return {
        "index": trial.index,
        "phase": trial.phase,
        "batch_size": format_number(trial.batch_size),
        "outcome": trial.outcome,
        "peak": format_bytes(trial.peak_bytes),
        "step_time": f"{trial.step_time_s * 1000:.3g} ms" if number(trial.step_time_s) is not None else "—",
        "throughput": format_number(trial.samples_per_second, 4),
        "detail": detail,
    }


def _warning_text(warning: Any) -> str:
    if isinstance(warning, dict):
        return str(warning.get("message") or json.dumps(warning, default=str))
    return str(warning)


def build_report(recommendation: Recommendation, public: dict[str, Any], trials: Sequence[Trial]) -> Report:
    """Everything report.html shows. `public` is service.recommendations.to_public(recommendation)."""
    result = _dict(recommendation.result)
    request = _dict(recommendation.request)
    budget = number(request.get("memory_budget_bytes"))
    plots = [
        _safe(lambda: memory_plot(result, trials, budget), name="memory", title="Peak memory vs batch size"),
        _safe(lambda: throughput_plot(result, trials), name="throughput", title="Throughput vs batch size"),
        _safe(lambda: time_plot(result), name="time_to_target", title="Predicted time to target"),
        _safe(lambda: noise_plot(result), name="noise_scale", title="Gradient noise scale"),
    ]
    active = recommendation.status in ACTIVE
    percent = None
    if active and recommendation.trials_planned:
        percent = min(100, round(100 * recommendation.trials_done / recommendation.trials_planned))
    warnings = result.get("warnings") if isinstance(result.get("warnings"), list) else []
    return Report(
        recommendation=public,
        recipe=_recipe(result),
        request_summary=_request_summary(request, result),
        plots=plots,
        trials=[_trial_row(t) for t in trials],
        warnings=[_warning_text(w) for w in warnings],
        refresh_seconds=REFRESH_SECONDS if active else None,
        progress_percent=percent,
    )


def index_row(public: dict[str, Any]) -> dict[str, Any]:
    """One line of the index page's table of recent recommendations."""
    result = _dict(public.get("result"))
    request = _dict(public.get("request"))
    model = _dict(request.get("model"))
    progress = _dict(public.get("progress"))
    return {
        "id": public["id"],
        "status": public["status"],
        "model": model.get("name") or f"artifact {model.get('artifact_id')}",
        "dataset_size": format_number(_dict(request.get("dataset")).get("size")),
        "objective": request.get("objective", ""),
        "recommended": format_number(result.get("recommended_batch_size")),
        "max_feasible": format_number(result.get("max_feasible_batch_size")),
        "progress": "{} {}/{}".format(
            progress.get("phase") or "", progress.get("trials_done", 0), progress.get("trials_planned", 0)
        ),
        "created_at": public["created_at"].strftime("%Y-%m-%d %H:%M:%S UTC")
        if public.get("created_at")
        else "",
    }

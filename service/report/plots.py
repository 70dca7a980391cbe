"""The report's four plots (memory, throughput, time to target, noise scale) from a result and its trials.

Everything is defensive: a result may lack any field (a job still running, a failed job, an older
result), and a plot without its data says "not measured" instead of breaking the page. Trials are the
API's public dicts (GET /v1/recommendations/{id}/trials).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from markupsafe import Markup

from service.recipe_text import as_dict, format_bytes, format_number, number
from service.report.svg import (
    BLUE,
    GREEN,
    ORANGE,
    PURPLE,
    RED,
    Band,
    RefLine,
    Series,
    byte_unit,
    format_byte_tick,
    log2_range,
    nice_upper,
    not_measured,
    svg_plot,
)

log = logging.getLogger(__name__)

MEMORY_PHASES = ("warmup", "memory")  # the trials whose peak memory the memory plot draws
TINY_AGAINST_BUDGET = 32  # peaks below budget/32 would sit on a linear axis' floor: use a log2 axis


def _points(rows: Any, x_key: str, y_key: str) -> list[tuple[float, float]]:
    points = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            px, py = number(row.get(x_key)), number(row.get(y_key))
            if px is not None and py is not None and px > 0:
                points.append((px, py))
    return sorted(points)


def memory_plot(result: dict[str, Any], trials: Sequence[Mapping[str, Any]], budget: float | None) -> Markup:
    """Peak memory of the memory search's trials, the fitted memory model, the budget and the maximum.
    Only warm-up and memory-search trials are drawn: a race that diverged or a statistics step that
    failed is not a memory failure. The y axis turns log2 when the model is tiny against the budget."""
    title = "Peak memory vs batch size"
    memory = as_dict(result.get("memory"))
    budget = number(memory.get("budget_bytes")) or budget
    searched = [t for t in trials if t.get("phase") in MEMORY_PHASES and number(t.get("batch_size"))]
    measured = [
        (float(t["batch_size"]), float(t["peak_bytes"]))
        for t in searched
        if number(t.get("peak_bytes")) is not None and t.get("outcome") == "ok"
    ]
    over = [
        (float(t["batch_size"]), float(t["peak_bytes"]))
        for t in searched
        if number(t.get("peak_bytes")) is not None and t.get("outcome") != "ok"
    ]
    failed = [
        float(t["batch_size"]) for t in searched if t.get("peak_bytes") is None and t.get("outcome") != "ok"
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
    log_y = budget is not None and 0 < max(ys, default=0.0) < budget / TINY_AGAINST_BUDGET
    if log_y:  # on a linear axis every point would sit on the floor
        positive = [y for y in ys if y > 0]
        y_range = (2.0 ** math.floor(math.log2(min(positive))), 2.0 ** math.ceil(math.log2(y_max)))
        unit = 1.0
    else:
        unit = byte_unit(y_max)
        y_range = (0.0, nice_upper(y_max, unit))
    if failed:  # failed without a reading: mark them at the top of the plot
        y_top = y_range[1] * (0.9 if log_y else 0.97)
        series.append(Series("failed (OOM / error)", [(b, y_top) for b in failed], RED, False, "cross"))
    refs = []
    if budget:
        refs.append(RefLine(f"budget {format_bytes(budget)}", y=budget, color=RED))
    if maximum:
        refs.append(RefLine(f"max feasible {format_number(maximum)}", x=maximum, color=ORANGE))
    y_label = "peak memory (log2)" if log_y else "peak memory"
    return svg_plot(
        name="memory",
        title=title,
        x_label="batch size (log2)",
        y_label=y_label,
        x=(x_lo, x_hi),
        y=y_range,
        series=series,
        refs=refs,
        y_log2=log_y,
        y_format=format_byte_tick,
        y_unit=unit,
    )


def throughput_plot(result: dict[str, Any], trials: Sequence[Mapping[str, Any]]) -> Markup:
    title = "Throughput vs batch size"
    points = _points(result.get("throughput"), "batch_size", "samples_per_second")
    if not points:  # while running: the throughput trials measured so far
        running = [t for t in trials if t.get("phase") == "throughput"]
        points = _points(running, "batch_size", "samples_per_second")
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
        name="throughput",
        title=title,
        x_label="batch size (log2)",
        y_label="samples / s",
        x=(x_lo, x_hi),
        y=(0.0, nice_upper(max(p[1] for p in points) * 1.08)),
        series=[Series("measured (median of timed steps)", points, color=BLUE, marker="circle")],
        refs=refs,
    )


def time_to_target_curve(result: dict[str, Any]) -> tuple[list[tuple[float, float]], bool]:
    """The result's time_to_target_curve, or one derived from throughput and the noise scale.

    Returns (points, derived). Wall time to target ∝ (B + B_noise) / throughput(B), normalised to 1 at
    its minimum (docs/design.md, "The recommendation").
    """
    given = _points(result.get("time_to_target_curve"), "batch_size", "relative_time")
    if given:
        return given, False
    noise = number(as_dict(result.get("gradient_noise_scale")).get("value"))
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
        name="time_to_target",
        title=title,
        x_label="batch size (log2)",
        y_label="time ÷ best time",
        x=(x_lo, x_hi),
        y=(0.0, nice_upper(y_top * 1.08)),
        series=series,
        refs=refs,
        caption=caption,
    )


def noise_plot(result: dict[str, Any]) -> Markup:
    title = "Gradient noise scale: steps to target vs batch size"
    noise = as_dict(result.get("gradient_noise_scale"))
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
        name="noise_scale",
        title=title,
        x_label="batch size (log2)",
        y_label="steps ÷ minimum steps (log2)",
        x=(x_lo, x_hi),
        y=(1.0, 2 ** math.ceil(math.log2(max(y_hi, 2.0)))),
        y_log2=True,
        series=series,
        refs=refs,
        bands=bands,
        caption=caption,
    )


def safe(build: Callable[[], Markup], *, name: str, title: str) -> Markup:
    """A plot that fails to draw (unexpected data) must not take the page down with it."""
    try:
        return build()
    except Exception:  # logged; the page shows the placeholder
        log.exception("could not draw the %s plot", name)
        return not_measured(name=name, title=title, reason="could not be drawn from this result")

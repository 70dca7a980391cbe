"""Throughput curve: samples per second at the recipe's candidate batch sizes up to the maximum.

Each size gets warm-up steps (allocator, kernel selection, caches), then timed steps with the device
synchronised before each clock read, interleaved across sizes in rounds, and reports the median (a
robust statistic: CPU step times vary 1.2-2x between passes) with its spread (relative median absolute
deviation). A size whose median breaks the curve's shape (a step time off by more than OUTLIER_FACTOR
from what its neighbours predict, or below a smaller size's) is flagged, re-timed in extra rounds while
the budget allows, and stays flagged (`"outlier": true`) when it still does; `monotone_step_times` gives
the non-decreasing step times the recipe may interpolate between.
Works with any object that has `make_batch(batch_size)`, `train_on(inputs, targets)` and
`synchronize()` (a `step.TrainingStep`), so other phases and benchmarks can reuse it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

from service.probing.recipe import micro_batch_grid

MAX_POINTS = 16
WARMUP_STEPS = 2
TIMED_STEPS = 7
OUTLIER_FACTOR = 1.5  # a median this far off its neighbours' log-log interpolation is flagged
EXTRA_ROUNDS = 4  # further timed rounds for flagged sizes, budget permitting


class Trainable(Protocol):
    def make_batch(self, batch_size: int) -> Any: ...
    def train_on(self, inputs: Any, targets: Any) -> Any: ...
    def synchronize(self) -> None: ...


def throughput_ladder(max_batch_size: int, max_points: int = MAX_POINTS) -> list[int]:
    """The recipe's candidate sizes below `max_batch_size` (powers of two, half-octaves from 24) plus
    the maximum itself, thinned evenly to at most `max_points`, always keeping the smallest and the
    maximum. The recipe chooses between these sizes: timing them spares it from interpolating between
    powers of two exactly where two candidates are close."""
    if max_batch_size < 1:
        return []
    candidates = [b for b in micro_batch_grid(max_batch_size) if b < max_batch_size] + [max_batch_size]
    if len(candidates) <= max_points:
        return candidates
    last = len(candidates) - 1
    picks = sorted({round(i * last / (max_points - 1)) for i in range(max_points)})
    return [candidates[i] for i in picks]


def measure_throughput(
    step: Trainable,
    batch_sizes: list[int],
    *,
    time_budget_s: float,
    warmup_steps: int = WARMUP_STEPS,
    timed_steps: int = TIMED_STEPS,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    is_oom: Callable[[BaseException], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Time `step` at each batch size; returns [{"batch_size", "samples_per_second", "step_time_s", ...}].

    First pass, size by size: warm-up steps and one timed step, each size with the time left divided
    by the sizes left (small sizes finish early and hand their time on). Then rounds of one more timed
    step per size, interleaved, until every size has `timed_steps` or the budget is spent: a slow spell
    of the host (other jobs, clock changes) then lands on every size alike instead of bending the
    curve's shape, which is what the recommendation reads. Batches are made afresh for each step
    (outside the clock), so no more memory is held than at the size itself. When `is_oom` is given, a
    size that runs out of memory is reported with `"outcome": "oom"` and no timing, and the sizes above
    it are skipped. `on_point` is called once per size, with its final median.
    """
    deadline = clock() + time_budget_s
    times: dict[int, list[float]] = {}
    warmups: dict[int, int] = {}
    failed: dict[str, Any] | None = None
    for index, batch_size in enumerate(batch_sizes):
        share = max(0.0, deadline - clock()) / (len(batch_sizes) - index)
        try:
            warmups[batch_size] = _warm_up(step, batch_size, share / 2, warmup_steps, clock)
            times[batch_size] = [_timed_step(step, batch_size, clock)]
        except Exception as exc:
            if is_oom is None or not is_oom(exc):
                raise
            failed = {
                "batch_size": batch_size,
                "outcome": "oom",
                "samples_per_second": None,
                "step_time_s": None,
            }
            break
    sizes = list(times)
    for _ in range(max(1, timed_steps) - 1):
        if clock() >= deadline:
            break
        for batch_size in sizes:
            times[batch_size].append(_timed_step(step, batch_size, clock))
    flagged = find_outliers({b: statistics.median(times[b]) for b in sizes})
    for _ in range(EXTRA_ROUNDS if flagged else 0):  # a second look at sizes that break the shape
        if clock() >= deadline:
            break
        for batch_size in flagged:
            times[batch_size].append(_timed_step(step, batch_size, clock))
    flagged = find_outliers({b: statistics.median(times[b]) for b in sizes})
    points = [_point(batch_size, times[batch_size], warmups[batch_size]) for batch_size in sizes]
    for point in points:
        point["outlier"] = point["batch_size"] in flagged
    if failed is not None:
        points.append(failed)
    for point in points:
        if on_point is not None:
            on_point(point)
    return points


def _warm_up(
    step: Trainable, batch_size: int, max_seconds: float, warmup_steps: int, clock: Callable[[], float]
) -> int:
    """At least one and at most `warmup_steps` untimed steps, stopping after `max_seconds`."""
    started = clock()
    done = 0
    while done < max(1, warmup_steps):
        inputs, targets = step.make_batch(batch_size)
        step.train_on(inputs, targets)
        done += 1
        step.synchronize()
        if clock() - started > max_seconds:
            break
    return done


def _timed_step(step: Trainable, batch_size: int, clock: Callable[[], float]) -> float:
    inputs, targets = step.make_batch(batch_size)  # made before the clock starts: time the training only
    step.synchronize()
    t0 = clock()
    step.train_on(inputs, targets)
    step.synchronize()
    return clock() - t0


def find_outliers(step_times: dict[int, float]) -> list[int]:
    """Sizes whose median step time breaks the shape of a step time overhead + cost·B.

    That shape bounds an interior size B between neighbours B0 < B < B1 with times t0, t1: from above by
    the log-log chord between them (the curve is convex in log-log), from below by max(t0, t1·B/B1) (a
    step cannot get cheaper with a larger batch, nor cheaper per sample with a smaller one). The size
    furthest outside its bounds, when more than OUTLIER_FACTOR, is flagged and left out of its
    neighbours' bounds; repeated until none is (one bad point does not condemn the points beside it).
    An end size is judged only by the lower bound from the size before it.
    """
    kept = sorted(b for b, t in step_times.items() if t > 0)
    flagged: list[int] = []
    while len(kept) >= 2:
        worst, worst_score = None, OUTLIER_FACTOR
        for i, b in enumerate(kept):
            t = step_times[b]
            if i == 0:
                continue
            t0 = step_times[kept[i - 1]]
            if i == len(kept) - 1:
                score = t0 / t
            else:
                b0, b1, t1 = kept[i - 1], kept[i + 1], step_times[kept[i + 1]]
                frac = math.log(b / b0) / math.log(b1 / b0)
                upper = math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
                lower = max(t0, t1 * b / b1)
                score = max(t / max(upper, lower), min(upper, lower) / t)
            if score > worst_score:
                worst, worst_score = b, score
        if worst is None:
            break
        flagged.append(worst)
        kept.remove(worst)
    return sorted(flagged)


def monotone_step_times(points: list[dict[str, Any]]) -> dict[int, float]:
    """Step time per size, made non-decreasing in the batch size by pooling violators (isotonic
    regression, pool-adjacent-violators, each size weighted by its timed steps)."""
    rows = sorted(
        (p["batch_size"], p["step_time_s"], p.get("timed_steps", 1)) for p in points if p.get("step_time_s")
    )
    blocks: list[list[float]] = []  # [mean step time, weight, count]
    for _, t, w in rows:
        blocks.append([t, float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, n2), (m1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted = [m for m, _, n in blocks for _ in range(int(n))]
    return {b: t for (b, _, _), t in zip(rows, fitted, strict=True)}


def _point(batch_size: int, times: list[float], warmups: int) -> dict[str, Any]:
    median = statistics.median(times)
    spread = statistics.median(abs(t - median) for t in times) / median if median > 0 else None
    return {
        "batch_size": batch_size,
        "outcome": "ok",
        "samples_per_second": batch_size / median if median > 0 else None,
        "step_time_s": median,
        "warmup_steps": warmups,
        "timed_steps": len(times),
        "step_times_s": times,
        "spread": spread,  # median absolute deviation / median
    }

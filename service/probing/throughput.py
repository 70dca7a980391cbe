"""Throughput curve: samples per second at a geometric ladder of batch sizes up to the maximum.

Each size gets warm-up steps (allocator, kernel selection, caches), then timed steps with the device
synchronised before each clock read, and reports the median: CPU step times vary 1.2-2x between passes.
Works with any object that has `make_batch(batch_size)`, `train_on(inputs, targets)` and
`synchronize()` (a `step.TrainingStep`), so other phases and benchmarks can reuse it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

MAX_POINTS = 6
WARMUP_STEPS = 2
TIMED_STEPS = 5


class Trainable(Protocol):
    def make_batch(self, batch_size: int) -> Any: ...
    def train_on(self, inputs: Any, targets: Any) -> Any: ...
    def synchronize(self) -> None: ...


def throughput_ladder(max_batch_size: int, max_points: int = MAX_POINTS) -> list[int]:
    """Powers of two below `max_batch_size` plus the maximum itself, thinned evenly (in log space)
    to at most `max_points`, always keeping the smallest and the maximum."""
    if max_batch_size < 1:
        return []
    candidates = [2**k for k in range(max_batch_size.bit_length()) if 2**k < max_batch_size] + [
        max_batch_size
    ]
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

    The time budget is shared out as it goes: each size may use the time left divided by the sizes
    left (small sizes finish early and hand their time on). Every size gets at least one warm-up and
    one timed step. When `is_oom` is given, a size that runs out of memory is reported with
    `"outcome": "oom"` and no timing, and the sizes above it are skipped.
    """
    deadline = clock() + time_budget_s
    points: list[dict[str, Any]] = []
    for index, batch_size in enumerate(batch_sizes):
        share = max(0.0, deadline - clock()) / (len(batch_sizes) - index)
        try:
            point = _time_one_size(step, batch_size, share, warmup_steps, timed_steps, clock)
        except Exception as exc:
            if is_oom is None or not is_oom(exc):
                raise
            point = {
                "batch_size": batch_size,
                "outcome": "oom",
                "samples_per_second": None,
                "step_time_s": None,
            }
        points.append(point)
        if on_point is not None:
            on_point(point)
        if point["outcome"] != "ok":
            break
    return points


def _time_one_size(
    step: Trainable,
    batch_size: int,
    time_share_s: float,
    warmup_steps: int,
    timed_steps: int,
    clock: Callable[[], float],
) -> dict[str, Any]:
    started = clock()
    inputs, targets = step.make_batch(batch_size)  # one batch: time the training, not data generation
    warmups_done = 0
    while warmups_done < max(1, warmup_steps):
        step.train_on(inputs, targets)
        warmups_done += 1
        step.synchronize()
        if clock() - started > time_share_s / 2:  # leave at least half the share for timed steps
            break
    times: list[float] = []
    while len(times) < max(1, timed_steps):
        step.synchronize()
        t0 = clock()
        step.train_on(inputs, targets)
        step.synchronize()
        times.append(clock() - t0)
        if clock() - started > time_share_s:
            break
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "outcome": "ok",
        "samples_per_second": batch_size / median if median > 0 else None,
        "step_time_s": median,
        "warmup_steps": warmups_done,
        "timed_steps": len(times),
        "step_times_s": times,
    }

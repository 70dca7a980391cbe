"""Measured training steps shared by the probe's phases: what a step costs so far (to plan the next
ones within the time budget), the trial event each measured step emits, the guarded first step that
creates the optimizer state, and the memory search's measurer."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from service.probing.memory import measure_step
from service.probing.search import Trial
from service.probing.spec import ProbeError
from service.probing.step import TrainingStep

Emit = Callable[[dict[str, Any]], None]

# A step's time is predicted from the steps measured so far (proportionally above the largest one: an
# upper bound when step time is affine in the batch size) times this factor, for timing noise.
TIME_SAFETY = 1.25


class StepCosts:
    """Wall time of the steps measured so far, to predict what a step at another size will cost.

    Above the largest size measured: the secant through the two largest sizes, its slope at least
    MIN_SLOPE_SHARE of the largest size's time per sample (a fixed cost measured at small sizes may hide
    the per-sample cost), or proportionally from one size. Between sizes: linear; below: the smallest
    size's time. The first step (warm-up: it creates the optimizer state) is used only while nothing
    else has been measured.
    """

    MIN_SLOPE_SHARE = 0.25

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.first_step: tuple[int, float] | None = None

    def add(self, batch_size: int, seconds: float | None, *, first_step: bool = False) -> None:
        if seconds is None or seconds <= 0:
            return
        if first_step:
            self.first_step = (batch_size, seconds)
        else:
            self.seconds[batch_size] = max(seconds, self.seconds.get(batch_size, 0.0))

    def predict(self, batch_size: int) -> float:
        """Seconds for one step at `batch_size` (0 when nothing was measured)."""
        seconds = self.seconds or dict([self.first_step] if self.first_step else [])
        if not seconds:
            return 0.0
        sizes = sorted(seconds)
        hi = sizes[-1]
        if batch_size >= hi:
            per_sample = seconds[hi] / hi
            slope = per_sample
            if len(sizes) > 1:
                secant = (seconds[hi] - seconds[sizes[-2]]) / (hi - sizes[-2])
                slope = max(secant, self.MIN_SLOPE_SHARE * per_sample)
            return seconds[hi] + slope * (batch_size - hi)
        if batch_size <= sizes[0]:
            return seconds[sizes[0]]
        i = next(i for i, b in enumerate(sizes) if b >= batch_size)
        b0, b1 = sizes[i - 1], sizes[i]
        return seconds[b0] + (seconds[b1] - seconds[b0]) * (batch_size - b0) / (b1 - b0)

    def largest_within(self, batch_size: int, seconds: float) -> int:
        """The largest size <= `batch_size` whose step (with TIME_SAFETY) fits in `seconds`; 0 if none."""
        if TIME_SAFETY * self.predict(batch_size) <= seconds:
            return batch_size
        lo, hi = 0, batch_size  # step time grows with the batch size: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if TIME_SAFETY * self.predict(mid) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo


def trial_event(phase: str, trial: Trial) -> dict[str, Any]:
    """The `trial` event (see service/probing/engine.py's docstring) for one measured step."""
    sps = trial.batch_size / trial.step_time_s if trial.ok and trial.step_time_s else None
    detail = dict(trial.detail)
    for name in ("fwd_bwd_peak_bytes", "step_peak_bytes", "baseline_bytes"):
        if getattr(trial, name) is not None:
            detail[name] = getattr(trial, name)
    return {
        "event": "trial",
        "phase": phase,
        "batch_size": trial.batch_size,
        "outcome": trial.outcome,
        "peak_bytes": trial.peak_bytes,
        "step_time_s": trial.step_time_s,
        "samples_per_second": sps,
        "detail": detail,
    }


def measure_training_step(
    step: TrainingStep, batch_size: int, budget: int, run: Callable[..., Any] | None = None
) -> Trial:
    """One training step at `batch_size` (`run`, default `step.run`: the step or a variant of it, e.g.
    accumulating) measured against the memory budget, the step's gradients freed after."""
    return measure_step(
        run or step.run,
        batch_size,
        budget,
        step.device,
        roots=step.memory_roots(),
        cleanup=step.discard_gradients,
    )


def _run_keeping_loss(step: TrainingStep, losses: list[torch.Tensor], size: int, recorder: Any) -> None:
    losses.append(step.run(size, recorder))


def warm_up(
    step: TrainingStep, budget: int, cap: int, emit: Emit, costs: StepCosts, phase: str = "warmup"
) -> None:
    """The first step creates the optimizer state: run it (guarded) before measuring.

    At batch 2 when allowed, since BatchNorm cannot train on one sample whose last feature map is 1x1;
    at batch 1 when 2 does not fit.
    """
    if phase == "warmup":
        emit({"event": "phase", "phase": "warmup", "trials_planned": 1})
    for batch_size in sorted({min(2, cap), 1}, reverse=True):
        losses: list[torch.Tensor] = []
        began = time.perf_counter()
        trial = measure_training_step(
            step, batch_size, budget, functools.partial(_run_keeping_loss, step, losses)
        )
        emit(trial_event(phase, trial))
        if trial.ok:
            costs.add(batch_size, time.perf_counter() - began, first_step=True)
            step.check_finite_loss(float(losses[0]), batch_size)
            return
    raise ProbeError(
        "oom_at_min_batch",
        f"the first training step at batch size 1 does not fit the memory budget of {budget} bytes "
        f"({trial.detail.get('error', trial.outcome)})",
    )


def trial_measurer(step: TrainingStep, budget: int, emit: Emit, costs: StepCosts) -> Callable[[int], Trial]:
    """The memory search's trial: a measured step, its time added to `costs`, its event emitted."""

    def measure(batch_size: int) -> Trial:
        began = time.perf_counter()
        try:
            trial = measure_training_step(step, batch_size, budget)
        except Exception as exc:  # model code failed: record the trial, then let the engine map it
            failed = Trial(batch_size, "error", detail={"error": f"{type(exc).__name__}: {exc}"})
            emit(trial_event("memory", failed))
            raise
        if trial.ok:  # a failed step stopped early: its time says little about a full one
            costs.add(batch_size, time.perf_counter() - began)
        emit(trial_event("memory", trial))
        return trial

    return measure

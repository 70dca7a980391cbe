"""Predict-then-verify search for the largest batch size whose training step fits a memory budget.

Pure Python on purpose (no torch): the search only sees a `measure(batch_size) -> Trial` callable, so
it is tested against simulated memory curves and reused on CPU and CUDA alike.

The method (docs/design.md, "The probe engine"):

1. Calibrate at a small size, then at the largest size a worst-case bound still guarantees: with
   everything above the step's baseline (parameters + optimizer state) counted as per-sample memory,
   the line through the baseline and the first peak over-counts, so the size it allows fits. A long
   lever makes the fitted slope accurate.
2. Model each phase of the step as a line in the batch size: the forward+backward peak
   (`fixed + per_sample * B`) and the optimizer-step peak (nearly flat). The step's peak is the larger
   of the two, `max(optimizer_peak, fixed + per_sample * B)`; fitting the phases separately sees the
   activation slope even when the optimizer step dominates the total peak at small sizes.
3. Jump towards the predicted limit, short of it by a margin that grows with the distance
   extrapolated, verify with a real step, refit on a local secant and step up again with a small
   margin. A failure closes a bracket that later guesses stay well inside.
4. Real steps bend: at small sizes the forward/backward peak is set while gradients exist, at large
   ones by the activations, with a steeper slope. When the slope steepens between the largest sizes,
   the line through the baseline and the largest size predicts instead (exact once activations rule).

Every returned size was measured "ok": a size that failed or went over budget is never returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from service.probing.spec import ProbeError

Outcome = Literal["ok", "oom", "over_budget", "error"]

# Trials a search usually needs (for progress bars) and the most it may take, calibration included.
PLANNED_TRIALS = 4
MAX_TRIALS = 6
# First calibration size: small enough to fit nearly always, large enough that a per-sample bound
# taken from it is not swamped by gradients and other batch-independent memory.
FIRST_BATCH_SIZE = 4
# How far short of the predicted limit to land, as a fraction of the distance from the largest size
# that fitted: MARGIN_PER_DOUBLING for each doubling the jump extrapolates over, within
# [FINAL_MARGIN, MAX_MARGIN]. A model fitted far below the limit errs more, in proportion.
MARGIN_PER_DOUBLING = 0.03
# Share of the budget the worst-case bound for the second calibration size keeps free.
CALIBRATION_MARGIN = 0.03
FINAL_MARGIN = 0.01
MAX_MARGIN = 0.25
# Stop once the largest fitting size is within this fraction of the smallest failing (or predicted) one.
TOLERANCE = 0.01
# The second calibration size grows at least this much over the first, so the fitted slope has a lever.
MIN_CALIBRATION_GROWTH = 8
# A local secant pairs the largest fitting size with the largest one at most this fraction of it.
MIN_SECANT_SPREAD = 0.8
# Inside a bracket (largest ok, smallest failed): where to step when the model's guess falls outside it
# (fraction of the bracket's log width), and the highest fraction of its width a guess may reach.
BRACKET_STEP = 0.75
BRACKET_CAP = 0.7
# The forward/backward slope between the two largest fitting sizes must exceed the one below them by
# this fraction to count as a bend (see _Search.bent).
BEND_THRESHOLD = 0.1


@dataclass(frozen=True)
class Trial:
    """One measured training step at `batch_size`.

    `peak_bytes` is the quantity the budget is enforced on (CPU: tracked tensor bytes; CUDA: reserved
    memory); the phase peaks are what the model is fitted on. `baseline_bytes` is what was alive when
    the step began (parameters, buffers, optimizer state): a known part of the fixed memory that lets
    the search bound the per-sample cost from a single size. Failed trials may leave peaks unknown.
    """

    batch_size: int
    outcome: Outcome
    peak_bytes: int | None = None
    fwd_bwd_peak_bytes: int | None = None
    step_peak_bytes: int | None = None
    baseline_bytes: int | None = None
    step_time_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def modelled_peak_bytes(self) -> int | None:
        """The larger phase peak (what the model predicts); the total peak when phases are unknown."""
        phases = [p for p in (self.fwd_bwd_peak_bytes, self.step_peak_bytes) if p is not None]
        return max(phases) if phases else self.peak_bytes


@dataclass(frozen=True)
class Line:
    """`intercept + slope * B` for one phase of the step."""

    intercept: float
    slope: float

    def at(self, batch_size: float) -> float:
        return self.intercept + self.slope * batch_size

    def largest_batch_within(self, limit: float) -> float:
        """Largest real B with `at(B) <= limit` (inf when flat and below, -inf when flat and above)."""
        if self.slope <= 0:
            return math.inf if self.intercept <= limit else -math.inf
        return (limit - self.intercept) / self.slope


@dataclass(frozen=True)
class MemoryModel:
    """Fitted peak memory: `overhead_ratio * max(optimizer_peak(B), fixed + per_sample * B)`.

    `overhead_ratio` (>= 1) maps the modelled tensor peak to the budget-relevant peak (on CUDA the
    caching allocator reserves more than the tensors hold; on CPU it is 1).
    """

    fwd_bwd: Line
    optimizer_step: Line
    overhead_ratio: float = 1.0

    @property
    def fixed_bytes(self) -> int:
        return round(self.fwd_bwd.intercept)

    @property
    def per_sample_bytes(self) -> float:
        return self.fwd_bwd.slope

    def optimizer_peak_bytes(self, batch_size: int) -> int:
        return round(self.optimizer_step.at(batch_size))

    def peak_bytes(self, batch_size: float) -> float:
        return self.overhead_ratio * max(self.fwd_bwd.at(batch_size), self.optimizer_step.at(batch_size))

    def max_batch_size(self, budget_bytes: float) -> float:
        """Largest real batch size predicted to fit `budget_bytes` (inf when nothing grows with B)."""
        limit = budget_bytes / self.overhead_ratio
        return min(self.fwd_bwd.largest_batch_within(limit), self.optimizer_step.largest_batch_within(limit))

    def to_dict(self, batch_size: int) -> dict[str, Any]:
        """The result's `memory` fields, with the optimizer peak evaluated at `batch_size`."""
        return {
            "fixed_bytes": self.fixed_bytes,
            "per_sample_bytes": round(self.per_sample_bytes),
            "optimizer_peak_bytes": self.optimizer_peak_bytes(batch_size),
            "overhead_ratio": round(self.overhead_ratio, 4),
        }


@dataclass
class SearchResult:
    max_batch_size: int
    aligned_batch_size: int
    memory_model: MemoryModel
    trials: list[Trial]
    capped: bool  # stopped by max_batch_size, not by memory
    converged: bool  # stopped because the limit was pinned down, not because trials or time ran out
    bracket: tuple[int, int | None]  # (largest ok, smallest failed or None when nothing failed)
    # Stopped because the next trial could not finish in the time left: max_batch_size is a verified
    # lower bound of the limit, `next_batch_size` the size the search would have tried next.
    time_limited: bool = False
    next_batch_size: int | None = None


def align_batch_size(batch_size: int, multiple: int = 8) -> int:
    """Largest multiple of `multiple` <= batch_size; batch_size itself when it is below `multiple`."""
    return batch_size if batch_size < multiple else batch_size - batch_size % multiple


def search_max_batch_size(
    measure: Callable[[int], Trial],
    budget_bytes: int,
    max_batch_size: int,
    *,
    first_batch_size: int = FIRST_BATCH_SIZE,
    tolerance: float = TOLERANCE,
    max_trials: int = MAX_TRIALS,
    affordable: Callable[[int], int] | None = None,
) -> SearchResult:
    """Find the largest batch size in [1, max_batch_size] whose step measures "ok" under `budget_bytes`.

    `affordable(size)`, when given, is the largest size <= `size` whose trial can still finish in the
    time left (0 when none): a proposal beyond it is shortened to it (still a step towards the limit,
    and a verified one), and the search stops, `time_limited`, when that is no larger than the largest
    size that fitted. The calibration trials at `first_batch_size` (and 1) always run.
    Raises ProbeError("oom_at_min_batch") when batch size 1 does not fit.
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    search = _Search(measure, budget_bytes, max_batch_size, max_trials)
    search.run(min(first_batch_size, max_batch_size))
    if search.largest_ok is None and search.trials[-1].batch_size > 1:
        search.run(1)
    if search.largest_ok is None:
        trial = search.trials[-1]
        raise ProbeError(
            "oom_at_min_batch",
            f"a training step at batch size 1 does not fit the memory budget of {budget_bytes} bytes "
            f"(outcome {trial.outcome!r}, {_describe_peak(trial)})",
        )
    time_limited, proposal = False, None
    while not search.done(tolerance):
        proposal = search.propose()
        allowed = proposal if affordable is None else min(proposal, affordable(proposal))
        if allowed <= search.largest_ok.batch_size:
            time_limited = True
            break
        search.run(allowed)
    converged = not time_limited and (
        len(search.trials) < max_trials or search.done(tolerance, count_trials=False)
    )

    best = search.largest_ok
    return SearchResult(
        max_batch_size=best.batch_size,
        aligned_batch_size=align_batch_size(best.batch_size),
        memory_model=search.fit(),
        trials=search.trials,
        capped=best.batch_size >= max_batch_size,
        converged=converged,
        bracket=(best.batch_size, search.smallest_failed),
        time_limited=time_limited,
        next_batch_size=proposal if time_limited else None,
    )


def _describe_peak(trial: Trial) -> str:
    return "peak unknown" if trial.peak_bytes is None else f"peak at least {trial.peak_bytes} bytes"


class _Search:
    """The search's state: trials so far and the bracket (largest ok, smallest failed)."""

    def __init__(self, measure: Callable[[int], Trial], budget: int, cap: int, max_trials: int) -> None:
        self.measure = measure
        self.budget = budget
        self.cap = cap
        self.max_trials = max_trials
        self.trials: list[Trial] = []

    @property
    def ok_trials(self) -> list[Trial]:
        return sorted((t for t in self.trials if t.ok), key=lambda t: t.batch_size)

    @property
    def largest_ok(self) -> Trial | None:
        ok = self.ok_trials
        return ok[-1] if ok else None

    def _top(self) -> Trial:
        """The largest fitting trial: what the bracket's methods start from, once a size fitted."""
        top = self.largest_ok
        if top is None:
            raise RuntimeError("no batch size has fitted yet")
        return top

    @property
    def smallest_failed(self) -> int | None:
        failed = [t.batch_size for t in self.trials if not t.ok]
        return min(failed) if failed else None

    def run(self, batch_size: int) -> Trial:
        trial = self.measure(batch_size)
        if trial.batch_size != batch_size:
            raise ValueError(f"measure({batch_size}) returned a trial for batch size {trial.batch_size}")
        self.trials.append(trial)
        return trial

    def _upper(self) -> int:
        """Largest size still worth trying: one below the smallest failure, else the cap."""
        failed = self.smallest_failed
        return self.cap if failed is None else failed - 1

    def done(self, tolerance: float, count_trials: bool = True) -> bool:
        lo = self._top().batch_size
        hi = self._upper()
        if lo >= hi or (count_trials and len(self.trials) >= self.max_trials):
            return True
        if self.smallest_failed is not None and hi - lo <= tolerance * lo:
            return True  # the bracket is narrow: lo is within `tolerance` of the limit
        if len(self.ok_trials) < 2:
            return False
        # The model, refitted on the largest sizes that fitted, says the next size gains less than
        # `tolerance`. Below 1/tolerance one more sample is worth more than that: confirm with lo + 1.
        predicted = self.predicted_limit()
        return predicted < lo * (1 + tolerance) and lo * tolerance >= 1

    def propose(self) -> int:
        """Next size to measure, strictly inside (largest ok, smallest failed)."""
        lo = self._top().batch_size
        hi = self._upper()
        failed = self.smallest_failed
        if len(self.ok_trials) < 2:
            # One point gives no slope: calibrate far away, or bisect (geometrically) below a failure.
            guess = self._second_calibration_size() if failed is None else math.sqrt(lo * failed)
            return _clamp_int(guess, lo + 1, hi)
        predicted = self.predicted_limit()
        guess = lo + (predicted - lo) * (1 - _jump_margin(predicted, lo))
        if guess <= lo:
            return lo + 1  # the model says lo is the limit: confirm that lo + 1 fails
        if failed is not None:
            if guess >= failed:
                # The model disagrees with a failure: fall back on the bracket, stepping in log space
                # (a far failed jump says little about where the limit is).
                guess = lo * (failed / lo) ** BRACKET_STEP
            # The model was wrong above: never aim at the failure's doorstep, where it fails again.
            guess = min(guess, lo + BRACKET_CAP * (failed - lo))
        return _clamp_int(guess, lo + 1, hi)

    def _second_calibration_size(self) -> float:
        """The largest size the worst-case line through the baseline allows (see the module docstring),
        and at least MIN_CALIBRATION_GROWTH times the first when that bound is loose (large gradients)."""
        first = self._top()
        bound = _anchored_limit(first, self.budget, baseline=first.baseline_bytes or 0)
        return max(bound * (1 - CALIBRATION_MARGIN), first.batch_size * MIN_CALIBRATION_GROWTH)

    def predicted_limit(self) -> float:
        """The model's limit for the full budget (capped at twice the cap, so "no limit" stays finite)."""
        predicted = self.fit().max_batch_size(self.budget)
        anchored = self.anchored_limit()
        if anchored is not None and anchored < predicted and self.bent():
            predicted = anchored
        return min(predicted, 2.0 * self.cap)

    def bent(self) -> bool:
        """True when the forward/backward peak grows faster between the two largest fitting sizes than
        below them: the moment of the step that sets the peak changed (gradients at small sizes,
        activations at large ones), so a secant reaching below the bend under-counts the slope."""
        ok = self.ok_trials
        if len(ok) < 3:
            return False
        a, b, c = ok[-3], ok[-2], ok[-1]
        return _slope(b, c) > _slope(a, b) * (1 + BEND_THRESHOLD)

    def anchored_limit(self) -> float | None:
        """`_anchored_limit` at the largest fitting size, when its baseline is known."""
        top = self._top()
        if top.baseline_bytes is None:
            return None
        return _anchored_limit(top, self.budget, baseline=top.baseline_bytes)

    def fit(self) -> MemoryModel:
        """Fit both phase lines on a pair of fitting sizes (see `_fit_pair`)."""
        ok = self.ok_trials
        top = ok[-1]
        if len(ok) == 1:
            flat = Line(float(top.modelled_peak_bytes or 0), 0.0)
            return MemoryModel(flat, flat, _overhead_ratio(top))
        low, high = _fit_pair(ok)
        fwd = _line_through(low, high, "fwd_bwd_peak_bytes")
        opt = _line_through(low, high, "step_peak_bytes")
        return MemoryModel(fwd, opt, _overhead_ratio(top))


def _anchored_limit(trial: Trial, budget: float, *, baseline: int) -> float:
    """Limit of the forward/backward line through `baseline` at B=0 and `trial`'s peak.

    It counts everything above the baseline as per-sample memory, so it under-predicts while other
    batch-independent memory (gradients) is large, and is near exact once activations dominate.
    """
    peak = _phase_peak(trial, "fwd_bwd_peak_bytes")
    line = Line(float(baseline), max(peak - baseline, 1.0) / trial.batch_size)
    return line.largest_batch_within(budget / _overhead_ratio(trial))


def _fit_pair(ok: list[Trial]) -> tuple[Trial, Trial]:
    """The highest fitting size and, as its partner, the highest one at most MIN_SECANT_SPREAD of it:
    a local secant (right for curves that bend) with enough lever for a reliable slope. Without such
    a partner, the lowest size."""
    high = ok[-1]
    partners = [t for t in ok[:-1] if t.batch_size <= MIN_SECANT_SPREAD * high.batch_size]
    return (partners[-1] if partners else ok[0]), high


def _slope(low: Trial, high: Trial, phase: str = "fwd_bwd_peak_bytes") -> float:
    return (_phase_peak(high, phase) - _phase_peak(low, phase)) / (high.batch_size - low.batch_size)


def _phase_peak(trial: Trial, phase: str) -> float:
    value = getattr(trial, phase)
    if value is None:  # phases unknown: the whole step's peak stands in for both
        value = trial.peak_bytes
    return float(value or 0)


def _line_through(low: Trial, high: Trial, phase: str) -> Line:
    """Line through two measured sizes, anchored at the higher one (nearest the limit); never decreasing."""
    slope = max(0.0, _slope(low, high, phase))
    return Line(_phase_peak(high, phase) - slope * high.batch_size, slope)


def _overhead_ratio(trial: Trial) -> float:
    modelled = trial.modelled_peak_bytes
    if not modelled or trial.peak_bytes is None:
        return 1.0
    return max(1.0, trial.peak_bytes / modelled)


def _jump_margin(predicted: float, largest_ok: int) -> float:
    """Fraction of the way from `largest_ok` to `predicted` to fall short by (see MARGIN_PER_DOUBLING)."""
    doublings = math.log2(max(predicted / largest_ok, 1.0))
    return min(MAX_MARGIN, max(FINAL_MARGIN, MARGIN_PER_DOUBLING * doublings))


def _clamp_int(value: float, low: int, high: int) -> int:
    if math.isnan(value):
        return low
    if math.isinf(value):
        return high if value > 0 else low
    return max(low, min(high, math.floor(value)))

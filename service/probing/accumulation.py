"""A recipe's micro-batch measured the way gradient accumulation runs it.

A recipe with gradient_accumulation_steps > 1 runs its later micro-steps with the gradients alive through
forward and backward, which can peak above the step the memory search measured: after the recipe is
chosen, its micro-batch is measured that way and lowered, with at most ACCUMULATION_MAX_TRIALS trials,
until it fits the budget.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from service.probing import horizon
from service.probing.recipe import split_batch
from service.probing.result import ProbeResult
from service.probing.search import BRACKET_CAP, TOLERANCE, SearchResult, Trial
from service.probing.spec import ProbeSpec
from service.probing.step import ACCUMULATING_CONVENTION, TrainingStep
from service.probing.trials import TIME_SAFETY, Emit, StepCosts, measure_training_step, trial_event, warm_up

ACCUMULATION_MAX_TRIALS = 4
# Each step towards the limit lands short of it by this share of the distance the slope predicts.
ACCUMULATION_MARGIN = 0.1


class AccumulationCheck:
    """Measures a recipe's micro-batch in the accumulating convention (ACCUMULATING_CONVENTION) and
    lowers it, with a few bisection trials of the search's kind, until it fits the budget.

    The accumulating step differs from the searched one only in that its gradients stay alive through a
    second micro-step's forward and backward, so the limit lies between about one copy of the gradients
    below the searched one and the micro-batch. A fresh model is built (the search's was freed for the
    statistics) and warmed up first. Without time for a trial the micro-batch is lowered by the memory
    model's prediction with one more copy of the gradients, unverified, and a warning says so.
    """

    def __init__(
        self,
        spec: ProbeSpec,
        model_spec: Any,
        config: Any,
        device: torch.device,
        budget: int,
        costs: StepCosts,
        emit: Emit,
    ) -> None:
        self.spec, self.model_spec, self.config = spec, model_spec, config
        self.device, self.budget, self.costs, self.emit = device, budget, costs, emit
        self.trials: list[Trial] = []

    def run(self, result: ProbeResult, search: SearchResult, gradient_bytes: int, seconds: float) -> None:
        """Check `result`'s micro-batch within `seconds`; re-split its global batch when it is lowered."""
        deadline = time.monotonic() + seconds
        micro = result["micro_batch_size"]
        predicted = predicted_accumulating_limit(search, gradient_bytes, self.budget, micro)
        self.emit({"event": "phase", "phase": "accumulation", "trials_planned": 1})
        # The fresh model's warm-up and build cost about one step, the accumulating step two.
        measure = self._measurer() if self._affordable(micro, deadline, extra_steps=1) else None
        first = measure(micro) if measure is not None else None
        lo, hi = (micro, micro) if first is not None and first.ok else (0, micro)  # largest ok, failed
        if measure is not None and lo < hi:
            lo = self._lower(measure, micro, predicted, search.memory_model, deadline)
        verified = lo > 0
        chosen = lo if verified else max(1, min(predicted, micro if first is None else micro - 1))
        fitted = next((t for t in self.trials if t.batch_size == chosen and t.ok), None)
        result["search"]["accumulation_checked"] = {
            "micro_batch_size": chosen,
            "peak_bytes": fitted.peak_bytes if fitted else None,
            "fits": None if first is None else first.ok,
            "verified": verified,
            "trials": len(self.trials),
            "batch_sizes_tried": [[t.batch_size, t.outcome] for t in self.trials],
            "convention": ACCUMULATING_CONVENTION,
        }
        if chosen < micro:
            self._resplit(result, micro, chosen, verified)
        elif first is not None and not first.ok:  # micro-batch 1 itself does not fit accumulating
            result["warnings"].append(
                "gradient accumulation keeps the gradients alive through later micro-steps: even "
                "micro-batch 1 does not fit the budget that way; lower the global batch or raise the budget"
            )

    def _lower(
        self, measure: Callable[[int], Trial], failed: int, first_guess: int, model: Any, deadline: float
    ) -> int:
        """The largest micro-batch below `failed` measured to fit (0 when none did): first at the memory
        model's conservative guess, then stepping from the largest fit along the search's per-sample slope
        (short of the budget by ACCUMULATION_MARGIN of the distance), inside the bracket."""
        lo, lo_peak, hi, guess = 0, 0, failed, first_guess
        slope = model.overhead_ratio * model.per_sample_bytes
        while len(self.trials) < ACCUMULATION_MAX_TRIALS and hi - lo > 1:
            guess = min(max(guess, lo + 1), hi - 1)
            if not self._affordable(guess, deadline):
                break
            trial = measure(guess)
            if trial.ok:
                lo, lo_peak = guess, trial.peak_bytes or self.budget
            else:
                hi = guess
            if not lo:
                guess = hi // 2
                continue
            distance = (self.budget - lo_peak) / slope if slope > 0 else hi - lo
            if distance < max(1.0, TOLERANCE * lo):
                break  # lo is within the search's tolerance of the limit
            guess = math.floor(min(lo + (1 - ACCUMULATION_MARGIN) * distance, lo + BRACKET_CAP * (hi - lo)))
        return lo

    def _measurer(self) -> Callable[[int], Trial]:
        step = TrainingStep.from_spec(self.spec, self.model_spec, self.config)
        warm_up(step, self.budget, 2, self.emit, self.costs, phase="accumulation")
        accumulating = functools.partial(step.run, micro_steps=2)

        def measure(batch_size: int) -> Trial:
            trial = measure_training_step(step, batch_size, self.budget, accumulating)
            self.trials.append(trial)
            self.emit(trial_event("accumulation", trial))
            return trial

        return measure

    def _affordable(self, batch_size: int, deadline: float, extra_steps: int = 0) -> bool:
        steps = 2 * self.costs.predict(batch_size) + extra_steps * self.costs.predict(2)
        return TIME_SAFETY * steps <= deadline - time.monotonic()

    def _resplit(self, result: ProbeResult, micro: int, chosen: int, verified: bool) -> None:
        """The global batch split again with the lowered micro-batch (more accumulation steps)."""
        wanted = result["recommended_batch_size"]
        new_micro, accumulation, global_batch = split_batch(wanted, chosen, self.spec.device_count)
        result["micro_batch_size"] = new_micro
        result["gradient_accumulation_steps"] = accumulation
        result["recommended_batch_size"] = global_batch
        result["steps_per_epoch"] = math.ceil(self.spec.dataset_size / global_batch)
        horizon.reschedule(result, result.get("throughput") or [], self.spec.dataset_size)
        unmeasured = "no time left for a trial" if not self.trials else "no smaller size measured to fit"
        how = (
            "measured within the budget"
            if verified
            else f"predicted by the memory model with one more copy of the gradients, not measured "
            f"({unmeasured})"
        )
        changed = "" if global_batch == wanted else f"; the global batch rounds up to {global_batch}"
        result["warnings"].append(
            f"gradient accumulation keeps the gradients alive through later micro-steps: micro-batch "
            f"{micro} does not fit the budget that way, lowered to {new_micro} ({how}) with "
            f"{accumulation} accumulation steps{changed}"
        )


def predicted_accumulating_limit(search: SearchResult, gradient_bytes: int, budget: int, micro: int) -> int:
    """The memory model's largest micro-batch with one more copy of the gradients alive, in [1, micro]."""
    model = search.memory_model
    limit = model.max_batch_size(budget - model.overhead_ratio * gradient_bytes)
    return max(1, min(micro, int(limit) if math.isfinite(limit) else micro))

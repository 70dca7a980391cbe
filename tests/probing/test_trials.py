"""Step costs (the time planning every phase relies on) and the trial event each measured step emits."""

from __future__ import annotations

import pytest

from service.probing.search import Trial
from service.probing.trials import TIME_SAFETY, StepCosts, trial_event


def test_nothing_measured_predicts_nothing_and_the_first_step_counts_only_alone() -> None:
    costs = StepCosts()
    assert costs.predict(64) == 0.0
    costs.add(2, 0.5, first_step=True)  # the warm-up step also creates the optimizer state: slow
    assert costs.predict(2) == 0.5
    costs.add(8, 0.01)
    assert costs.predict(2) == 0.01  # measured steps replace the first one


def test_between_sizes_linear_below_the_smallest_flat_and_repeats_keep_the_slowest() -> None:
    costs = StepCosts()
    costs.add(8, 0.010)
    costs.add(32, 0.040)
    costs.add(32, 0.030)  # a faster repeat does not lower the estimate
    assert costs.predict(20) == pytest.approx(0.025)
    assert costs.predict(1) == pytest.approx(0.010)


def test_above_the_largest_the_secant_is_kept_at_least_a_share_of_the_per_sample_cost() -> None:
    rising = StepCosts()
    rising.add(8, 0.010)
    rising.add(16, 0.018)
    assert rising.predict(32) == pytest.approx(0.018 + 0.001 * 16)  # secant: 1 ms per sample
    flat = StepCosts()  # a fixed cost hides the per-sample one at small sizes
    flat.add(8, 0.0100)
    flat.add(16, 0.0101)
    per_sample = 0.0101 / 16
    assert flat.predict(32) == pytest.approx(0.0101 + StepCosts.MIN_SLOPE_SHARE * per_sample * 16)
    one = StepCosts()
    one.add(10, 0.02)
    assert one.predict(40) == pytest.approx(0.08)  # proportional from one size


def test_largest_within_is_the_largest_size_whose_step_fits_with_the_safety_factor() -> None:
    costs = StepCosts()
    costs.add(10, 0.010)
    costs.add(100, 0.100)
    seconds = TIME_SAFETY * 0.0505  # 50 takes 50 ms, 51 takes 51
    assert costs.largest_within(200, seconds) == 50
    assert costs.largest_within(40, seconds) == 40
    assert costs.largest_within(200, TIME_SAFETY * 0.005) == 0  # not even the smallest step fits


def test_a_trial_event_carries_throughput_only_for_a_completed_step() -> None:
    ok = trial_event("memory", Trial(64, "ok", peak_bytes=1000, step_peak_bytes=900, step_time_s=0.5))
    assert ok["samples_per_second"] == 128
    assert ok["detail"] == {"step_peak_bytes": 900}
    failed = trial_event("memory", Trial(64, "oom", step_time_s=0.5, detail={"error": "out of memory"}))
    assert failed["samples_per_second"] is None
    assert failed["outcome"] == "oom" and failed["detail"] == {"error": "out of memory"}

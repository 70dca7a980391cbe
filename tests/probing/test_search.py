"""The predict-then-verify search against simulated memory curves (no torch, no real steps)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from service.probing.search import (
    MAX_TRIALS,
    PLANNED_TRIALS,
    Trial,
    align_batch_size,
    search_max_batch_size,
)
from service.probing.spec import ProbeError

GIB = 2**30


@dataclass
class SimulatedStep:
    """Peak memory of a fake training step: forward/backward and optimizer-step phases, in bytes.

    `ratio` scales the budget-relevant peak over the phase peaks (CUDA reserves more than it
    allocates); `noise` is the relative standard deviation of each measurement.
    """

    fwd_bwd: Callable[[int], float]
    optimizer_step: Callable[[int], float]
    budget: int = GIB
    baseline: float | None = None
    ratio: float = 1.0
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.calls: list[Trial] = []

    def true_peak(self, batch_size: int) -> float:
        return self.ratio * max(self.fwd_bwd(batch_size), self.optimizer_step(batch_size))

    def measure(self, batch_size: int) -> Trial:
        fwd = self.fwd_bwd(batch_size) * (1 + self.rng.gauss(0, self.noise))
        opt = self.optimizer_step(batch_size) * (1 + self.rng.gauss(0, self.noise))
        peak = self.ratio * max(fwd, opt)
        if peak > self.budget:
            trial = Trial(batch_size, "over_budget", baseline_bytes=self._baseline())
        else:
            trial = Trial(batch_size, "ok", int(peak), int(fwd), int(opt), self._baseline())
        self.calls.append(trial)
        return trial

    def _baseline(self) -> int | None:
        return None if self.baseline is None else int(self.baseline)

    def true_limit(self, cap: int, budget: float | None = None) -> int:
        """Largest B <= cap whose noiseless peak fits (bisection: the curves are increasing)."""
        budget = self.budget if budget is None else budget
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.true_peak(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def linear() -> SimulatedStep:
    return SimulatedStep(lambda b: 3e8 + 2e5 * b, lambda b: 4e8, baseline=2e8)


def optimizer_dominated() -> SimulatedStep:
    # Optimizer step peak (0.7 GiB) far above the forward/backward peak at small sizes.
    return SimulatedStep(lambda b: 2e8 + 2.5e5 * b, lambda b: 7.5e8 + 10 * b, baseline=1.5e8)


def mildly_superlinear() -> SimulatedStep:
    # 5 % more memory than linear at the limit (allocator rounding, workspace growth).
    return SimulatedStep(lambda b: 3e8 + 1.9e5 * b * (1 + b / 40_000), lambda b: 4e8, baseline=2e8)


def two_regimes() -> SimulatedStep:
    # What real steps do (measured on the zoo MLP): at small sizes the peak is set in the backward
    # pass while gradients exist, at large sizes at the end of the forward, with a steeper slope.
    return SimulatedStep(lambda b: max(3e8 + 4e4 * b, 2.05e8 + 2e5 * b), lambda b: 4e8, baseline=2e8)


def under_predicted() -> SimulatedStep:
    # Per-sample memory shrinks as B grows (a fixed workspace amortised): small sizes over-estimate it.
    return SimulatedStep(lambda b: 3e8 + 2e6 * b**0.8, lambda b: 4e8, baseline=2e8)


def cuda_like() -> SimulatedStep:
    # Reserved memory 7 % above the allocated peaks, no baseline information.
    return SimulatedStep(lambda b: 3e8 + 2e5 * b, lambda b: 4e8, ratio=1.07)


SHAPES = {
    "linear": linear,
    "optimizer_dominated": optimizer_dominated,
    "mildly_superlinear": mildly_superlinear,
    "two_regimes": two_regimes,
    "under_predicted": under_predicted,
    "cuda_like": cuda_like,
}


def _check_never_infeasible(sim: SimulatedStep, found: int) -> None:
    measured = {t.batch_size: t.outcome for t in sim.calls}
    assert measured[found] == "ok"
    assert all(outcome == "ok" for b, outcome in measured.items() if b <= found)


@pytest.mark.parametrize("name", SHAPES)
def test_finds_98_percent_of_the_limit_in_at_most_six_trials(name: str) -> None:
    sim = SHAPES[name]()
    cap = 65_536
    limit = sim.true_limit(cap)
    result = search_max_batch_size(sim.measure, sim.budget, cap)
    assert len(result.trials) <= MAX_TRIALS
    assert result.max_batch_size >= 0.98 * limit, (result.max_batch_size, limit, result.trials)
    assert result.max_batch_size <= limit
    _check_never_infeasible(sim, result.max_batch_size)


def test_linear_memory_takes_four_trials() -> None:
    sim = linear()
    result = search_max_batch_size(sim.measure, sim.budget, 65_536)
    assert len(result.trials) == PLANNED_TRIALS == 4
    assert result.max_batch_size >= 0.995 * sim.true_limit(65_536)


@pytest.mark.parametrize("seed", range(8))
def test_noisy_measurements(seed: int) -> None:
    sim = linear()
    sim.noise, sim.seed = 0.001, seed
    sim.rng = random.Random(seed)
    cap = 65_536
    result = search_max_batch_size(sim.measure, sim.budget, cap)
    # Near the limit a 0.1 % noise can fail a size that fits on average: compare with the limit
    # three standard deviations below the budget.
    assert result.max_batch_size >= 0.97 * sim.true_limit(cap, sim.budget * (1 - 3 * sim.noise))
    assert len(result.trials) <= MAX_TRIALS
    _check_never_infeasible(sim, result.max_batch_size)


def _random_shape(rng: random.Random) -> SimulatedStep:
    base = rng.uniform(0.01, 0.6) * GIB
    extra = rng.uniform(0.0, 0.5) * base
    limit = math.exp(rng.uniform(math.log(1), math.log(50_000)))
    per_sample = max(GIB - base - extra, 0.02 * GIB) / limit
    kind = rng.choice(["linear", "superlinear", "concave", "two_regimes"])
    if kind == "superlinear":
        bend = rng.uniform(0, 0.3)
        fwd = lambda b: base + extra + per_sample * b * (1 + bend * b / limit)  # noqa: E731
    elif kind == "concave":
        power = rng.uniform(0.7, 0.95)
        fwd = lambda b: base + extra + per_sample * limit ** (1 - power) * b**power  # noqa: E731
    elif kind == "two_regimes":
        fwd = lambda b: max(base + extra + 0.2 * per_sample * b, base + per_sample * b)  # noqa: E731
    else:
        fwd = lambda b: base + extra + per_sample * b  # noqa: E731
    opt_peak = min(base + rng.uniform(0, 1.2) * (extra + base / 2), 0.99 * GIB)
    return SimulatedStep(
        fwd,
        lambda b: opt_peak,
        baseline=base if rng.random() < 0.8 else None,
        ratio=rng.choice([1.0, rng.uniform(1.0, 1.1)]),
        noise=rng.choice([0.0, 0.0, rng.uniform(0, 0.01)]),
        seed=rng.randrange(10**6),
    )


def test_never_returns_a_size_that_failed_over_many_random_shapes() -> None:
    rng = random.Random(1234)
    fractions = []
    for _ in range(600):
        sim = _random_shape(rng)
        cap = rng.choice([65_536, 5_000, 300])
        if sim.true_peak(1) > sim.budget:
            with pytest.raises(ProbeError) as info:
                search_max_batch_size(sim.measure, sim.budget, cap)
            assert info.value.code == "oom_at_min_batch"
            continue
        try:
            result = search_max_batch_size(sim.measure, sim.budget, cap)
        except ProbeError:  # noise can fail batch 1 when it barely fits
            assert sim.noise > 0 and sim.true_peak(1) > sim.budget * (1 - 5 * sim.noise)
            continue
        assert 1 <= result.max_batch_size <= cap
        assert len(result.trials) <= MAX_TRIALS
        _check_never_infeasible(sim, result.max_batch_size)
        if not sim.noise:
            fractions.append(result.max_batch_size / sim.true_limit(cap))
    fractions.sort()
    # Deliberately hard shapes (up to 30 % superlinear, strong bends, 1 % noise): most land close.
    assert fractions[len(fractions) // 2] >= 0.99
    assert fractions[len(fractions) // 10] >= 0.9


def test_batch_one_that_does_not_fit_is_an_error() -> None:
    sim = SimulatedStep(lambda b: 2 * GIB, lambda b: 0)
    with pytest.raises(ProbeError) as info:
        search_max_batch_size(sim.measure, sim.budget, 1000)
    assert info.value.code == "oom_at_min_batch"
    assert [t.batch_size for t in sim.calls] == [4, 1]


def test_tiny_limits_are_found_exactly() -> None:
    for limit in (1, 2, 3, 5, 7, 12, 20):
        per_sample = 0.5 * GIB / (limit + 0.5)
        sim = SimulatedStep(
            lambda b, s=per_sample: 0.5 * GIB + s * b, lambda b: 0.3 * GIB, baseline=0.4 * GIB
        )
        result = search_max_batch_size(sim.measure, sim.budget, 65_536)
        assert result.max_batch_size == limit, (limit, result.trials)
        assert len(result.trials) <= MAX_TRIALS


def test_respects_the_cap() -> None:
    sim = linear()
    result = search_max_batch_size(sim.measure, sim.budget, 1000)
    assert result.max_batch_size == 1000
    assert result.capped
    assert max(t.batch_size for t in sim.calls) <= 1000
    small = linear()
    assert search_max_batch_size(small.measure, small.budget, 3).max_batch_size == 3
    assert len(small.calls) == 1


def test_optimizer_dominated_memory_is_fitted_from_phase_peaks() -> None:
    sim = optimizer_dominated()
    result = search_max_batch_size(sim.measure, sim.budget, 65_536)
    model = result.memory_model
    # The total peak is flat at small sizes; the forward/backward phase still shows the slope.
    assert model.per_sample_bytes == pytest.approx(2.5e5, rel=1e-3)
    assert model.fixed_bytes == pytest.approx(2e8, rel=1e-3)
    assert model.optimizer_peak_bytes(result.max_batch_size) == pytest.approx(7.5e8, rel=1e-3)
    assert model.to_dict(result.max_batch_size)["per_sample_bytes"] == 250_000


def test_aligned_batch_size() -> None:
    assert [align_batch_size(b) for b in (1, 7, 8, 9, 15, 16, 1811)] == [1, 7, 8, 8, 8, 16, 1808]
    sim = linear()
    result = search_max_batch_size(sim.measure, sim.budget, 65_536)
    assert result.aligned_batch_size == align_batch_size(result.max_batch_size)
    assert result.aligned_batch_size % 8 == 0


def test_measure_must_return_the_size_asked_for() -> None:
    with pytest.raises(ValueError, match=r"returned a trial for batch size \d+"):
        search_max_batch_size(lambda b: Trial(b + 1, "ok", 1, 1, 1), GIB, 100)


def test_a_trial_the_time_left_cannot_cover_is_shortened_or_not_started() -> None:
    # Simulated step time: 1 ms per sample; 600 ms of "time" to spend, charged per trial measured.
    sim = linear()
    spent = [0.0]

    def measure(batch_size: int) -> Trial:
        spent[0] += batch_size * 1e-3
        return sim.measure(batch_size)

    def affordable(batch_size: int) -> int:
        return min(batch_size, int((0.6 - spent[0]) / 1e-3))

    result = search_max_batch_size(measure, sim.budget, 65_536, affordable=affordable)
    assert spent[0] <= 0.6
    assert result.time_limited and not result.converged
    assert result.next_batch_size is not None and result.next_batch_size > result.max_batch_size
    assert result.max_batch_size < sim.true_limit(65_536)
    _check_never_infeasible(sim, result.max_batch_size)  # a verified lower bound, never a guess


def test_with_time_for_it_the_search_is_unchanged() -> None:
    sim, again = linear(), linear()
    plain = search_max_batch_size(sim.measure, sim.budget, 65_536)
    timed = search_max_batch_size(again.measure, again.budget, 65_536, affordable=lambda b: b)
    assert [t.batch_size for t in timed.trials] == [t.batch_size for t in plain.trials]
    assert not timed.time_limited and timed.next_batch_size is None

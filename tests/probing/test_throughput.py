"""Throughput ladder: sizes, warm-up, synchronisation before the clock, medians, the time budget."""

from __future__ import annotations

import pytest

from service.probing.memory import is_oom
from service.probing.recipe import micro_batch_grid
from service.probing.throughput import MAX_POINTS, TIMED_STEPS, measure_throughput, throughput_ladder


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStep:
    """Advances the fake clock by `seconds_per_sample * B` per step, but only once synchronised:
    the work is "queued" like a CUDA kernel, so a clock read without synchronising measures nothing."""

    def __init__(self, clock: FakeClock, seconds_per_sample: float = 0.001, overhead_s: float = 0.01) -> None:
        self.clock = clock
        self.seconds_per_sample = seconds_per_sample
        self.overhead_s = overhead_s
        self.queued = 0.0
        self.log: list[tuple[str, int]] = []
        self.first_steps: dict[int, int] = {}

    def make_batch(self, batch_size: int):
        self.log.append(("batch", batch_size))
        return batch_size, None

    def train_on(self, inputs: int, targets: None) -> None:
        count = self.first_steps.get(inputs, 0)
        self.first_steps[inputs] = count + 1
        slow_first = 10.0 if count == 0 else 1.0  # the first step at a size is slow (warm-up matters)
        self.queued += slow_first * (self.overhead_s + self.seconds_per_sample * inputs)
        self.log.append(("step", inputs))

    def synchronize(self) -> None:
        self.clock.now += self.queued
        self.queued = 0.0


def test_ladder() -> None:
    assert throughput_ladder(1) == [1]
    assert throughput_ladder(8) == [1, 2, 4, 8]
    assert throughput_ladder(20) == [1, 2, 4, 8, 16, 20]
    assert throughput_ladder(512) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    ladder = throughput_ladder(1811, max_points=6)
    assert len(ladder) == 6 and ladder[0] == 1 and ladder[-1] == 1811
    assert set(ladder[:-1]) <= set(micro_batch_grid(1811))  # the recipe's candidates below the maximum
    assert ladder == sorted(set(ladder))
    assert throughput_ladder(1024)[-1] == 1024 and len(throughput_ladder(65_536)) == MAX_POINTS


def test_measures_medians_after_warm_up_with_synchronisation() -> None:
    clock = FakeClock()
    step = FakeStep(clock)
    points = measure_throughput(step, [1, 64, 512], time_budget_s=100.0, clock=clock)
    assert [p["batch_size"] for p in points] == [1, 64, 512]
    for point in points:
        expected = 0.01 + 0.001 * point["batch_size"]  # the slow first step was a warm-up, not timed
        assert point["step_time_s"] == pytest.approx(expected)
        assert point["samples_per_second"] == pytest.approx(point["batch_size"] / expected)
        assert point["warmup_steps"] == 2 and point["timed_steps"] == TIMED_STEPS
    # After each size's warm-up and first timed step, the timed steps go round the sizes in turn.
    steps = [b for kind, b in step.log if kind == "step"]
    first_pass = 3 * (2 + 1)
    assert steps[:first_pass] == [1, 1, 1, 64, 64, 64, 512, 512, 512]
    assert steps[first_pass:] == [1, 64, 512] * (TIMED_STEPS - 1)
    assert step.log.count(("batch", 64)) == 2 + TIMED_STEPS  # a fresh batch per step, made off the clock


def test_time_budget_limits_the_steps() -> None:
    clock = FakeClock()
    step = FakeStep(clock, seconds_per_sample=0.01)
    points = measure_throughput(step, [1, 100, 1000], time_budget_s=30.0, clock=clock)
    assert len(points) == 3
    assert all(p["timed_steps"] >= 1 and p["warmup_steps"] >= 1 for p in points)
    assert points[-1]["timed_steps"] < TIMED_STEPS  # 10 s per step at 1000 does not fit in the budget
    assert clock.now < 30.0 + 2 * 100.0  # over by at most the minimum steps of the largest size


def test_oom_stops_the_ladder() -> None:
    clock = FakeClock()
    step = FakeStep(clock)
    original = step.train_on

    def train_on(inputs, targets):
        if inputs >= 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        original(inputs, targets)

    step.train_on = train_on
    seen = []
    points = measure_throughput(
        step, [1, 64, 512], time_budget_s=10.0, clock=clock, is_oom=is_oom, on_point=seen.append
    )
    assert [p["outcome"] for p in points] == ["ok", "oom"]
    assert seen == points
    with pytest.raises(RuntimeError):
        measure_throughput(step, [64], time_budget_s=10.0, clock=clock)  # without is_oom it propagates


def test_on_a_real_step() -> None:
    from models.registry import get_model, make_config
    from service.probing.step import TrainingStep

    spec = get_model("mlp")
    step = TrainingStep(spec, make_config(spec, {"input_dim": 16, "hidden_dims": [32]}), optimizer="adam")
    points = measure_throughput(step, throughput_ladder(64), time_budget_s=2.0)
    assert [p["batch_size"] for p in points] == throughput_ladder(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert all(p["samples_per_second"] > 0 and p["step_time_s"] > 0 for p in points)


def test_outliers_are_flagged_against_their_neighbours() -> None:
    from service.probing.throughput import find_outliers

    # The ladder a user saw: 24 five times slower per sample than 8 and 48 say it should be.
    times = {8: 8 / 5387, 24: 24 / 2125, 48: 48 / 17108, 96: 96 / 20000}
    assert find_outliers(times) == [24]
    smooth = {b: 0.001 + 1e-4 * b for b in (8, 16, 32, 64, 128)}
    assert find_outliers(smooth) == []
    assert find_outliers({8: 0.01, 16: 0.002, 32: 0.012}) == [16]  # much cheaper than a smaller size


def test_a_slow_spell_on_one_size_is_re_timed() -> None:
    clock = FakeClock()
    step = FakeStep(clock)
    slow = {"left": 7}

    def train_on(inputs: int, targets: None) -> None:
        FakeStep.train_on(step, inputs, targets)
        if inputs == 32 and step.first_steps[32] > 1 and slow["left"] > 0:
            slow["left"] -= 1
            step.queued += 0.5  # a neighbour's job lands on this size's first timed steps

    step.train_on = train_on  # type: ignore[method-assign]
    points = measure_throughput(step, [8, 16, 32, 64, 128], time_budget_s=100.0, clock=clock)
    by_size = {p["batch_size"]: p for p in points}
    assert by_size[32]["timed_steps"] > TIMED_STEPS  # flagged, then timed again
    assert all("spread" in p and "outlier" in p for p in points)


def test_monotone_step_times_pool_violators() -> None:
    from service.probing.throughput import monotone_step_times

    points = [
        {"batch_size": 8, "step_time_s": 0.010, "timed_steps": 5},
        {"batch_size": 16, "step_time_s": 0.014, "timed_steps": 5},
        {"batch_size": 32, "step_time_s": 0.012, "timed_steps": 5},
        {"batch_size": 64, "step_time_s": 0.030, "timed_steps": 5},
    ]
    fitted = monotone_step_times(points)
    assert fitted[16] == fitted[32] == pytest.approx(0.013)
    assert fitted[8] == 0.010 and fitted[64] == 0.030
    assert list(fitted.values()) == sorted(fitted.values())

"""The convergence suite's diagnostics (bench/convergence_diagnostics.py): the oracle's B_noise fit."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "convergence_diagnostics.py"
_SPEC = importlib.util.spec_from_file_location("convergence_diagnostics", _PATH)
assert _SPEC and _SPEC.loader
diagnostics = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(diagnostics)


@pytest.mark.parametrize("b_noise", [8.0, 64.0, 900.0])
def test_the_oracles_noise_scale_is_recovered_from_its_steps(b_noise):
    steps = {b: 100.0 * (1 + b_noise / b) for b in (16, 32, 64, 128, 256, 512)}
    assert diagnostics.oracle_noise_scale(steps) == pytest.approx(b_noise, rel=0.03)


def test_the_fit_is_least_squares_in_log_steps():
    steps = {16: 500.0, 64: 140.0, 256: 60.0, 512: 55.0}  # noisy: no exact B_noise
    fitted = diagnostics.oracle_noise_scale(steps)
    sizes = sorted(steps)

    def error(b_noise: float) -> float:
        logs = [math.log(steps[b]) - math.log1p(b_noise / b) for b in sizes]
        mean = sum(logs) / len(logs)
        return sum((v - mean) ** 2 for v in logs)

    assert error(fitted) <= min(error(fitted * 1.2), error(fitted / 1.2))


@pytest.mark.parametrize(
    ("optimizer", "options", "expected"),
    [("sgd", {"momentum": 0.0}, "plain SGD"), ("sgd", {}, "SGD momentum"), ("adamw", {}, "Adam/AdamW")],
)
def test_family(optimizer, options, expected):
    assert diagnostics.family({"optimizer": optimizer, "options": options}) == expected


def test_an_oracle_whose_orders_agree_agrees_with_itself():
    per_order = {16: [300.0] * 4, 64: [100.0] * 4, 256: [60.0] * 4}
    step_seconds = {16: 1.0, 64: 1.2, 256: 3.0}
    assert diagnostics.split_half_ratios(per_order, step_seconds) == [1.0, 1.0, 1.0]


def test_a_half_picks_and_the_other_half_scores():
    # orders 0 and 1 make 16 the fastest, orders 2 and 3 make 64 over twice as fast as 16
    per_order = {16: [50.0, 50.0, 200.0, 200.0], 64: [150.0, 150.0, 90.0, 90.0]}
    step_seconds = {16: 1.0, 64: 1.0}
    ratios = diagnostics.split_half_ratios(per_order, step_seconds)
    assert len(ratios) == 3  # order 0 paired with each other order
    assert ratios[0] == pytest.approx(200 / 90)  # {0, 1} picks 16; {2, 3} time it at 200, 64 at 90
    assert ratios[1:] == [1.0, 1.0]  # {0, 2} and {0, 3} pick 64 (120 < 125), the best on the rest too


def test_too_few_orders_give_no_split():
    assert diagnostics.split_half_ratios({16: [1.0, 2.0, 3.0], 64: [1.0, 2.0, 3.0]}, {16: 1.0, 64: 1.0}) == []


def test_eight_orders_split_into_halves_of_four():
    per_order = {16: [100.0] * 8, 64: [90.0] * 8}
    ratios = diagnostics.split_half_ratios(per_order, {16: 1.0, 64: 1.0}, orders=8)
    assert len(ratios) == 35  # the first order with each 3 of the other 7
    assert set(ratios) == {1.0}
    assert diagnostics.split_half_ratios(per_order, {16: 1.0, 64: 1.0}, orders=6) != []
    assert diagnostics.split_half_ratios({16: [1.0] * 4, 64: [1.0] * 4}, {16: 1.0, 64: 1.0}, orders=8) == []

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

"""The recipe the probe returns trains: the zoo MLP on the built-in digits, 100 optimizer steps with exactly
the returned micro-batch, accumulation, learning rate and warm-up, for each optimizer and time budget.

Each case runs the real probe in-process (time_to_target, the default objective). Budgets of 60 s and
120 s are marked `slow` (deselected by default; `pytest -m slow` runs them).
"""

from __future__ import annotations

import math

import pytest
import torch

from models.registry import get_model, make_config
from service.probing import engine
from service.probing.data import sample_for_model
from service.probing.spec import ProbeSpec
from service.probing.step import build_optimizer

DIGITS = 1797
REFERENCE = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
STEPS = 100


def _train(result: dict, optimizer: str) -> list[float]:
    """Losses on the whole sample: before training, then after every 10 optimizer steps."""
    spec = get_model("mlp")
    sample = sample_for_model([64], "float32", 10)
    torch.manual_seed(1)
    model = spec.build(make_config(spec, {}), False)
    lr, reference = result["learning_rate"], REFERENCE[optimizer]
    opt = build_optimizer(optimizer, model.parameters(), lr)
    micro, accumulation = result["micro_batch_size"], result["gradient_accumulation_steps"]
    warmup = result["warmup_steps"]
    generator = torch.Generator().manual_seed(2)
    order = torch.randperm(len(sample.x), generator=generator)
    cursor = 0

    def evaluate() -> float:
        with torch.no_grad():
            return float(spec.loss(model(sample.x), sample.y))

    losses = [evaluate()]
    for step in range(STEPS):
        for group in opt.param_groups:  # linear warm-up from the reference learning rate
            group["lr"] = lr if step >= warmup else reference + (lr - reference) * (step + 1) / warmup
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            if cursor + micro > len(order):
                order, cursor = torch.randperm(len(sample.x), generator=generator), 0
            idx = order[cursor : cursor + micro]
            cursor += micro
            (spec.loss(model(sample.x[idx]), sample.y[idx]) / accumulation).backward()
        opt.step()
        if (step + 1) % 10 == 0:
            losses.append(evaluate())
    return losses


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core host two threads spin against each other and a 100-step
    MLP run takes 30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "budget",
    [10, 20, pytest.param(60, marks=pytest.mark.slow), pytest.param(120, marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_returned_recipe_trains(optimizer: str, budget: int) -> None:
    spec = ProbeSpec(
        model_name="mlp",
        optimizer=optimizer,
        learning_rate=REFERENCE[optimizer],
        reference_batch_size=32,
        dataset_size=DIGITS,
        time_budget_s=float(budget),
    )
    result = engine.run_probe(spec, lambda event: None)
    assert result["micro_batch_size"] <= result["max_feasible_batch_size"]
    assert result["learning_rate"] <= result["learning_rate_ceiling"]["value"] * (1 + 1e-9)
    losses = _train(result, optimizer)
    assert all(math.isfinite(loss) for loss in losses), (losses, result["learning_rate"])
    assert max(losses) <= losses[0] * 1.5, (losses, result["learning_rate"])  # never blows up on the way
    assert losses[-1] < 0.8 * losses[0], (losses, result["learning_rate"], result["recommended_batch_size"])

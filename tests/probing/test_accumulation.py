"""A recipe with gradient accumulation: its micro-batch is measured with the gradients accumulating.

The model: the wide MLP (512 -> 4 x 128 -> 10, Adam) whose gradients are a large share of its memory, so
a second micro-step, which keeps the first one's gradients alive through its forward and backward, peaks
above the step the memory search measured. Every peak is counted by the engine's CPU live-bytes tracker
(CPUMemoryBudget), around the engine's step and around a plain accumulating loop written out here alike.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from models.registry import get_model, make_config
from service.probing import accumulation, engine, trials
from service.probing.memory import CPUMemoryBudget
from service.probing.search import SearchResult, search_max_batch_size
from service.probing.spec import ProbeSpec
from service.probing.step import TrainingStep

MLP = get_model("mlp")
CONFIG = {"input_dim": 512, "hidden_dims": [128, 128, 128, 128], "num_classes": 10}
BUDGET = 3 * 2**20
DATASET = 4096
LEARNING_RATE = 1e-3


def _spec(loop: str = "pytorch", **overrides: Any) -> ProbeSpec:
    return ProbeSpec(
        **{
            "model_name": "mlp",
            "model_config": CONFIG,
            "optimizer": "adam",
            "learning_rate": LEARNING_RATE,
            "memory_budget_bytes": BUDGET,
            "objective": "max_feasible",
            "time_budget_s": 60.0,
            "dataset_size": DATASET,
            "loop": loop,
            **overrides,
        }
    )


def _accumulating_loop_peak(loop: str, micro_batch: int) -> int:
    """Peak of a real training loop accumulating over two micro-batches, in its steady state (the
    second window: optimizer state exists; in Lightning's loop the previous gradients are alive)."""
    config = make_config(MLP, CONFIG)
    torch.manual_seed(0)
    model = MLP.build(config, False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)

    def window() -> None:
        batch: Any = None  # as in `for batch in loader`: the last micro-batch is alive through the step
        for index in range(2):
            batch = None
            batch = MLP.make_batch(config, micro_batch, "cpu", generator)
            loss = MLP.loss(model(batch[0]), batch[1])
            if loop == "lightning" and index == 0:  # Lightning zeroes at the window's first backward
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            del loss
        optimizer.step()
        if loop == "pytorch":
            optimizer.zero_grad(set_to_none=True)

    window()
    with CPUMemoryBudget(None, roots=[model, optimizer]) as tracker:
        window()
    return tracker.peak_bytes


def _searched(spec: ProbeSpec) -> tuple[SearchResult, trials.StepCosts, int]:
    """The memory search's result in the request's loop convention, as run_probe runs it."""
    step = TrainingStep.from_spec(spec, MLP, make_config(MLP, CONFIG))
    step.warm_up(2)
    costs = trials.StepCosts()
    measure = trials.trial_measurer(step, BUDGET, lambda _e: None, costs)
    search = search_max_batch_size(measure, BUDGET, DATASET)
    return search, costs, step.state_bytes()["gradients"]


def _accumulating_recipe(micro_batch: int) -> dict[str, Any]:
    """The recipe fields the check reads and rewrites: `micro_batch` accumulated twice."""
    return {
        "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": 2,
        "recommended_batch_size": 2 * micro_batch,
        "steps_per_epoch": -(-DATASET // (2 * micro_batch)),
        "warnings": [],
        "search": {"accumulation_checked": None},
        "throughput": [{"batch_size": b, "samples_per_second": b / (0.001 + 1e-5 * b)} for b in (4, 64, 512)],
        "horizon": {"b_noise": 100.0, "s_min": 50.0, "recommended": {"batch_size": 2 * micro_batch}},
    }


@pytest.mark.parametrize("loop", ["pytorch", "lightning"])
def test_an_accumulating_recipe_fits_a_real_accumulating_loop(loop: str) -> None:
    spec = _spec(loop)
    search, costs, gradient_bytes = _searched(spec)
    micro = search.max_batch_size
    # Without the check: the searched limit, accumulated, does not fit a real accumulating loop.
    assert _accumulating_loop_peak(loop, micro) > BUDGET

    result = _accumulating_recipe(micro)
    events: list[dict] = []
    check = accumulation.AccumulationCheck(
        spec, MLP, make_config(MLP, CONFIG), torch.device("cpu"), BUDGET, costs, events.append
    )
    check.run(result, search, gradient_bytes, 120.0)  # type: ignore[arg-type]

    checked = result["search"]["accumulation_checked"]
    assert checked["fits"] is False and checked["verified"] is True
    assert 2 <= checked["trials"] <= accumulation.ACCUMULATION_MAX_TRIALS
    chosen = checked["micro_batch_size"]
    assert chosen < micro and checked["peak_bytes"] <= BUDGET
    # The global batch is split again: a smaller micro-batch, more accumulation steps, same global batch.
    assert result["micro_batch_size"] <= chosen
    assert result["gradient_accumulation_steps"] > 2
    assert result["recommended_batch_size"] >= 2 * micro
    split = result["micro_batch_size"] * result["gradient_accumulation_steps"]
    assert split == result["recommended_batch_size"]
    # The horizon's steps, epochs and time are for the new layout.
    recommended = result["horizon"]["recommended"]
    assert recommended["batch_size"] == result["recommended_batch_size"]
    assert recommended["steps"] == math.ceil(50.0 * (1 + 100.0 / result["recommended_batch_size"]))
    assert recommended["predicted_seconds"] > 0
    assert any("gradient accumulation" in w and "lowered" in w for w in result["warnings"])
    # With the check: the recipe's micro-batch fits the real accumulating loop.
    peak = _accumulating_loop_peak(loop, result["micro_batch_size"])
    assert peak <= BUDGET
    # The engine's accumulating step measures what the real loop peaks at (a few bytes apart).
    assert abs(checked["peak_bytes"] - _accumulating_loop_peak(loop, chosen)) <= 256
    # ... and lowers it no more than needed: 5% more does not fit the real loop.
    assert _accumulating_loop_peak(loop, int(chosen * 1.05) + 1) > BUDGET
    assert {e["phase"] for e in events if e["event"] == "trial"} == {"accumulation"}


def test_a_micro_batch_that_fits_accumulating_is_kept_after_one_trial() -> None:
    spec = _spec()
    search, costs, gradient_bytes = _searched(spec)
    micro = search.max_batch_size // 2
    result = _accumulating_recipe(micro)
    check = accumulation.AccumulationCheck(
        spec, MLP, make_config(MLP, CONFIG), torch.device("cpu"), BUDGET, costs, lambda _e: None
    )
    check.run(result, search, gradient_bytes, 120.0)  # type: ignore[arg-type]

    checked = result["search"]["accumulation_checked"]
    assert checked["fits"] is True and checked["verified"] is True and checked["trials"] == 1
    assert checked["micro_batch_size"] == micro
    assert checked["peak_bytes"] == pytest.approx(_accumulating_loop_peak("pytorch", micro), abs=256)
    assert (result["micro_batch_size"], result["gradient_accumulation_steps"]) == (micro, 2)
    assert result["warnings"] == []


def test_without_time_for_a_trial_the_micro_batch_is_lowered_by_the_gradients_and_flagged() -> None:
    spec = _spec()
    search, costs, gradient_bytes = _searched(spec)
    micro = search.max_batch_size
    result = _accumulating_recipe(micro)
    check = accumulation.AccumulationCheck(
        spec, MLP, make_config(MLP, CONFIG), torch.device("cpu"), BUDGET, costs, lambda _e: None
    )
    check.run(result, search, gradient_bytes, 0.0)  # type: ignore[arg-type]

    checked = result["search"]["accumulation_checked"]
    assert checked["trials"] == 0 and checked["fits"] is None and checked["verified"] is False
    model = search.memory_model
    lowered = int(model.max_batch_size(BUDGET - gradient_bytes))
    assert checked["micro_batch_size"] == lowered < micro
    assert result["micro_batch_size"] <= lowered
    assert any("not measured" in w for w in result["warnings"])


def test_run_probe_checks_an_accumulating_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_probe runs the check when the recipe accumulates (here made to, at the largest micro-batch)."""
    recommend = engine.recommend

    def accumulating(**kwargs: Any) -> dict[str, Any]:
        recipe = recommend(**kwargs)
        micro = kwargs["max_feasible_batch_size"]
        return {**recipe, "micro_batch_size": micro, "gradient_accumulation_steps": 2,
                "recommended_batch_size": 2 * micro}  # fmt: skip

    monkeypatch.setattr(engine, "recommend", accumulating)
    events: list[dict] = []
    result = engine.run_probe(_spec(), events.append)

    checked = result["search"]["accumulation_checked"]
    assert checked is not None and checked["trials"] >= 1
    assert result["micro_batch_size"] <= checked["micro_batch_size"]
    assert checked["verified"] is True and checked["peak_bytes"] <= BUDGET
    assert any(e["event"] == "trial" and e["phase"] == "accumulation" for e in events)
    assert [p["phase"] for p in result["phases"] if p["ran"]] == ["setup", "memory", "accumulation"]


def test_a_recipe_without_accumulation_is_not_checked() -> None:
    events: list[dict] = []
    result = engine.run_probe(_spec(), events.append)

    assert result["gradient_accumulation_steps"] == 1
    assert result["search"]["accumulation_checked"] is None
    assert result["micro_batch_size"] == result["max_feasible_batch_size"]
    assert not any(e.get("phase") == "accumulation" for e in events)
    assert "accumulation" not in [p["phase"] for p in result["phases"]]

"""The probe's input: one builder for every caller, one cap on the batch size."""

from __future__ import annotations

from service.probing.spec import MAX_BATCH_SIZE, build_probe_spec

TRAINING = {
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "reference_batch_size": 32,
    "precision": "fp32",
    "gradient_checkpointing": False,
}


def _spec(dataset_size: int, model_config: dict) -> int:
    return build_probe_spec(
        model_name="m",
        model_config=model_config,
        training=TRAINING,
        device="cpu",
        dataset_size=dataset_size,
        time_budget_s=10,
        objective="max_feasible",
    ).max_batch_size


def test_the_search_is_capped_by_the_fixed_cap_the_dataset_and_the_models_batch_bound() -> None:
    assert _spec(10 * MAX_BATCH_SIZE, {}) == MAX_BATCH_SIZE
    assert _spec(100, {}) == 100
    assert _spec(100, {"max_batch_size": 48}) == 48
    assert _spec(100, {"max_batch_size": None}) == 100


def test_training_options_and_types_are_carried() -> None:
    spec = build_probe_spec(
        model_name="m",
        model_config={},
        training={**TRAINING, "momentum": 0.5, "betas": (0.8, 0.9)},
        device="cpu",
        dataset_size=10,
        time_budget_s=3,
        objective="throughput",
    )
    assert (spec.momentum, spec.betas, spec.time_budget_s) == (0.5, [0.8, 0.9], 3.0)
    assert isinstance(spec.time_budget_s, float)

"""run_probe end to end on a tiny MLP, in-process: the limit it finds is real, events, result, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from models.registry import get_model, make_config
from service.probing import engine, recipe
from service.probing.memory import measure_step
from service.probing.spec import ProbeError, ProbeSpec
from service.probing.step import TrainingStep

BUDGET = 3 * 2**20  # 3 MiB of tensors: the default MLP (84k parameters) fits a few hundred samples

RESULT_FIELDS = {
    "max_feasible_batch_size",
    "max_feasible_batch_size_aligned",
    "recommended_batch_size",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "devices",
    "learning_rate",
    "learning_rate_rule",
    "warmup_steps",
    "steps_per_epoch",
    "gradient_noise_scale",
    "throughput",
    "memory",
    "device",
    "extrapolated",
    "confidence",
    "warnings",
    "search",
}


def _spec(**overrides) -> ProbeSpec:
    """max_feasible: the search alone, which ends as soon as the limit is pinned down."""
    return ProbeSpec(
        **{
            "model_name": "mlp",
            "memory_budget_bytes": BUDGET,
            "time_budget_s": 30.0,
            "objective": "max_feasible",
            **overrides,
        }
    )


def _run(spec: ProbeSpec) -> tuple[dict, list[dict]]:
    events: list[dict] = []
    result = engine.run_probe(spec, events.append)
    return result, events


@pytest.fixture(scope="module")
def probe() -> tuple[dict, list[dict]]:
    return _run(_spec())


def test_the_limit_found_fits_and_a_few_percent_more_does_not(probe) -> None:
    result, _ = probe
    found = result["max_feasible_batch_size"]
    spec = _spec()
    model_spec = get_model("mlp")
    step = TrainingStep.from_spec(spec, model_spec, make_config(model_spec, {}))
    step.warm_up()

    def outcome(batch_size: int) -> str:
        trial = measure_step(
            step.run,
            batch_size,
            BUDGET,
            step.device,
            roots=step.memory_roots(),
            cleanup=step.discard_gradients,
        )
        return trial.outcome

    assert outcome(found) == "ok"
    assert outcome(math.ceil(found * 1.03)) == "over_budget"
    assert result["search"]["trials"] <= 6


def test_result_contract(probe) -> None:
    result, _ = probe
    assert set(result) >= RESULT_FIELDS
    json.dumps(result, allow_nan=False)
    assert result["max_feasible_batch_size_aligned"] % 8 == 0
    assert result["max_feasible_batch_size_aligned"] <= result["max_feasible_batch_size"]
    assert set(result["memory"]) >= {
        "fixed_bytes",
        "per_sample_bytes",
        "optimizer_peak_bytes",
        "budget_bytes",
    }
    assert result["memory"]["budget_bytes"] == BUDGET
    assert result["memory"]["per_sample_bytes"] > 0
    assert set(result["device"]) == {"type", "name", "memory_bytes"} and result["device"]["type"] == "cpu"
    assert result["extrapolated"] is False
    assert result["gradient_noise_scale"] is None
    assert "zero_grad(set_to_none=True)" in result["search"]["measured_convention"]
    # max_feasible runs the search alone: its own steps are the throughput curve, no noise scale.
    assert [p["phase"] for p in result["phases"] if p["ran"]] == ["setup", "memory"]
    assert all(p["seconds"] >= 0 for p in result["phases"])
    assert result["throughput_source"] == "memory_search"
    throughput = result["throughput"]
    assert throughput and throughput[-1]["batch_size"] == result["max_feasible_batch_size"]
    assert all(p["samples_per_second"] > 0 for p in throughput)
    assert result["recommended_batch_size"] == result["micro_batch_size"] == result["max_feasible_batch_size"]
    assert result["objective_used"] == "max_feasible" and not result["partial"]
    assert not result["max_feasible_is_lower_bound"] and result["search"]["converged"]
    # No learning rate was seen training here: never above the reference, scaled down linearly (SGD).
    assert result["learning_rate_rule"].startswith("linear")
    assert result["learning_rate"] == pytest.approx(0.1 * min(1.0, result["recommended_batch_size"] / 32))
    assert result["steps_per_epoch"] == math.ceil(50_000 / result["recommended_batch_size"])
    assert result["gradient_accumulation_steps"] == 1 and result["devices"] == 1


def test_events(probe) -> None:
    result, events = probe
    json.dumps(events, allow_nan=False)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["setup", "warmup", "memory"]  # max_feasible needs no more
    trials = [e for e in events if e["event"] == "trial"]
    for event in trials:
        assert set(event) == {
            "event",
            "phase",
            "batch_size",
            "outcome",
            "peak_bytes",
            "step_time_s",
            "samples_per_second",
            "detail",
        }
        assert event["outcome"] in ("ok", "oom", "over_budget", "error")
    memory = [e for e in trials if e["phase"] == "memory"]
    assert len(memory) == result["search"]["trials"]
    assert all(e["peak_bytes"] <= BUDGET for e in memory if e["outcome"] == "ok")
    assert all(e["peak_bytes"] > BUDGET for e in memory if e["outcome"] == "over_budget")
    assert not [e for e in trials if e["phase"] == "throughput"]


def test_adam_throughput_objective_is_the_knee_and_never_scales_the_learning_rate_up() -> None:
    result, events = _run(_spec(optimizer="adam", learning_rate=1e-3, objective="throughput", device_count=2))
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "setup",
        "warmup",
        "memory",
        "throughput",
    ]
    assert result["throughput_source"] == "ladder"
    # The knee of the ladder with step times made non-decreasing: pooling a noisy pair can move it either
    # way from the raw ladder's, so it is checked against the smoothed one, and to be a measured size.
    measured = {p["batch_size"] for p in result["throughput"] if p.get("samples_per_second")}
    knee = recipe.throughput_knee(result["throughput"], result["max_feasible_batch_size"])
    assert result["micro_batch_size"] == knee and knee in measured
    assert result["recommended_batch_size"] == 2 * result["micro_batch_size"]
    assert result["learning_rate_rule"].startswith("sqrt")
    assert result["learning_rate"] <= 1e-3  # B_noise unknown: nothing above what was observed
    assert any("B_noise unknown" in w for w in result["warnings"])


def test_extrapolation_to_a_target_device() -> None:
    target = {"type": "cuda", "name": "NVIDIA H200", "memory_bytes": 4 * 2**20, "count": 1}
    # The host probes under its own default budget (the client's budget is the target's), up to the cap.
    result, _ = _run(_spec(target_device=target, memory_budget_bytes=None, max_batch_size=4096))
    assert result["extrapolated"] is True
    assert result["target_device"]["name"] == "NVIDIA H200"
    assert any(w.startswith("extrapolated") for w in result["warnings"])
    memory = result["memory"]
    usable = 4 * 2**20 * (1 - engine.EXTRAPOLATION_MARGIN)
    expected = (usable - memory["fixed_bytes"]) / memory["per_sample_bytes"]
    assert result["max_feasible_batch_size"] == pytest.approx(expected, rel=0.02)
    assert result["confidence"] == "low"


def _broken_mlp(**changes) -> object:
    return dataclasses.replace(get_model("mlp"), **changes)


class _Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("shapes do not line up")


@pytest.mark.parametrize(
    ("spec", "broken", "code", "text"),
    [
        (_spec(memory_budget_bytes=2**60), None, "budget_exceeds_device", "exceeds"),
        (_spec(memory_budget_bytes=100_000), None, "budget_below_model", "bytes the model needs"),
        (_spec(memory_budget_bytes=1_020_500), None, "oom_at_min_batch", "batch size 1"),
        (_spec(model_name="nope"), None, "unknown_model", "nope"),
        (_spec(model_config={"hidden_dims": "wide"}), None, "invalid_config", "hidden_dims"),
        (_spec(gradient_checkpointing=True), None, "unsupported_option", "checkpointing"),
        (_spec(dataset_size=0), None, "invalid_spec", "dataset_size"),
        (
            _spec(),
            {"build": lambda config, checkpointing: _Exploding()},
            "model_error",
            "shapes do not line up",
        ),
        (_spec(), {"loss": lambda out, y: out.sum() * float("nan")}, "nan_loss", "nan"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_failures_map_to_probe_errors(monkeypatch, spec, broken, code, text) -> None:
    if broken is not None:
        monkeypatch.setattr(engine, "get_model", lambda name: _broken_mlp(**broken))
    with pytest.raises(ProbeError) as info:
        engine.run_probe(spec, lambda event: None)
    assert info.value.code == code
    assert text in info.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ProbeError) as info:
        engine.run_probe(_spec(device="cuda"), lambda event: None)
    assert info.value.code == "device_unavailable"


def test_with_time_for_it_the_noise_scale_and_races_run_on_builtin_data() -> None:
    result, events = _run(_spec(time_budget_s=40.0, dataset_size=1797, objective="time_to_target"))
    assert [e["phase"] for e in events if e["event"] == "phase"][-1] == "statistics"
    gns = result["gradient_noise_scale"]
    assert gns["measured_on"] == "builtin:digits"
    assert gns["value"] is not None and gns["value"] > 0
    assert result["noise_scale_source"] in ("races", "gradient_noise_scale", "combined")
    assert result["data_sample"]["measured_on"] == "builtin:digits"
    assert [e for e in events if e["event"] == "trial" and e["phase"] == "noise"]
    assert result["time_to_target_curve"]
    assert (
        result["recommended_batch_size"] == result["micro_batch_size"] * result["gradient_accumulation_steps"]
    )
    assert result["micro_batch_size"] <= result["max_feasible_batch_size"]
    assert result["probe"]["duration_s"] < 40.0 * 1.2


def test_batchnorm_models_whose_last_feature_map_is_1x1_never_train_at_batch_1() -> None:
    # BatchNorm cannot normalise one value per channel: warm-up and throughput ladder start at 2.
    spec = _spec(
        model_name="resnet",
        model_config={"stem": "imagenet", "image_size": 32, "width": 8},
        memory_budget_bytes=64 * 2**20,
        time_budget_s=60.0,  # an upper bound: the search and the ladder end once they have their answer
        max_batch_size=16,
        objective="throughput",
    )
    result, events = _run(spec)
    assert result["max_feasible_batch_size"] == 16 and result["search"]["capped"]
    assert all(e["batch_size"] >= 2 for e in events if e["event"] == "trial" and e["phase"] != "noise")


def test_time_to_target_skips_the_statistics_when_they_cannot_change_the_answer() -> None:
    flat = [{"batch_size": b, "samples_per_second": 100.0 * b} for b in (2, 4, 8, 16)]
    why = engine._answer_without_noise_scale(_spec(objective="time_to_target"), 16, flat)
    assert why is not None and "would not change the answer" in why
    # Larger batches that still gain throughput: the choice depends on B_noise, so measure it.
    rising = [{"batch_size": b, "samples_per_second": 1000.0 * b / (b + 64)} for b in (2, 8, 32, 128, 512)]
    assert engine._answer_without_noise_scale(_spec(objective="time_to_target"), 512, rising) is None
    assert engine._answer_without_noise_scale(_spec(objective="throughput"), 16, flat) is None


def test_time_to_target_without_time_for_the_noise_scale_is_a_flagged_throughput_answer() -> None:
    result, _ = _run(_spec(objective="time_to_target", time_budget_s=3.0, dataset_size=1797))
    assert result["objective_used"] == "throughput" and result["confidence"] == "low"
    assert result["partial"] and result["gradient_noise_scale"] is None
    assert any("no time was left to measure the noise scale" in w for w in result["warnings"])
    assert any("a time_budget_s of about" in w for w in result["warnings"])
    assert result["learning_rate"] <= 0.1  # nothing observed: never above the reference


@pytest.mark.parametrize(
    ("momentum", "recommended", "warned"),
    [(0.0, 128, True), (0.0, 32, False), (0.9, 128, False)],
)
def test_plain_sgd_above_the_reference_batch_is_warned_about(momentum, recommended, warned) -> None:
    spec = _spec(optimizer="sgd", momentum=momentum, reference_batch_size=32)
    warnings = engine._plain_sgd_warning(spec, {"recommended_batch_size": recommended})
    assert bool(warnings) is warned
    assert all("plain SGD" in w for w in warnings)


def test_adam_is_never_warned_about_plain_sgd() -> None:
    spec = _spec(optimizer="adam", momentum=0.0, reference_batch_size=32)
    assert engine._plain_sgd_warning(spec, {"recommended_batch_size": 512}) == []

"""A real training step: optimizers, precisions, optimizer state, and why the second step is measured."""

from __future__ import annotations

import pytest
import torch

from models.registry import get_model, make_config
from service.probing.memory import measure_step
from service.probing.spec import ProbeError, ProbeSpec
from service.probing.step import MEASURED_CONVENTION, TrainingStep, check_precision_supported

TINY_MLP = {"input_dim": 32, "hidden_dims": [64, 64], "num_classes": 10}


def _step(optimizer: str = "sgd", precision: str = "fp32", **config) -> TrainingStep:
    spec = get_model("mlp")
    return TrainingStep(
        spec,
        make_config(spec, {**TINY_MLP, **config}),
        optimizer=optimizer,
        precision=precision,
        learning_rate=1e-2,
    )


def _parameter_bytes(step: TrainingStep) -> int:
    return sum(p.numel() * p.element_size() for p in step.model.parameters())


@pytest.mark.parametrize(("optimizer", "state_copies"), [("sgd", 1), ("adam", 2), ("adamw", 2)])
def test_optimizer_state_exists_after_the_first_step(optimizer: str, state_copies: int) -> None:
    step = _step(optimizer)
    assert not step.optimizer.state
    loss = step.warm_up(1)
    assert loss > 0
    param_bytes = _parameter_bytes(step)
    state = step.state_bytes()
    assert state["parameters"] == param_bytes
    assert state["gradients"] == param_bytes
    # Adam keeps a step counter per parameter too (a few bytes each).
    assert state_copies * param_bytes <= state["optimizer_state"] <= state_copies * param_bytes + 64
    assert all(p.grad is None for p in step.model.parameters())  # zero_grad(set_to_none=True)
    if optimizer == "sgd":
        assert step.optimizer.param_groups[0]["momentum"] == 0.9


def test_a_step_changes_the_weights() -> None:
    step = _step("adam")
    before = [p.detach().clone() for p in step.model.parameters()]
    step.run(16)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True))
    assert step.steps_done == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cpu(precision: str) -> None:
    try:
        step = _step("adam", precision)
    except ProbeError as exc:
        if exc.code == "unsupported_precision":  # a CPU build without fp16 autocast says so clearly
            return
        raise
    assert (step.scaler is not None) == (precision == "fp16")
    assert step.warm_up(4) > 0
    with step._autocast():
        assert (
            step.model(torch.randn(2, 32)).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        )
    assert all(p.dtype == torch.float32 for p in step.model.parameters())  # master weights stay fp32


def test_unknown_precision_and_unsupported_options() -> None:
    with pytest.raises(ProbeError) as info:
        check_precision_supported("fp8", torch.device("cpu"))
    assert info.value.code == "unsupported_precision"
    spec = get_model("mlp")
    with pytest.raises(ProbeError) as info:
        TrainingStep(spec, make_config(spec, TINY_MLP), gradient_checkpointing=True)
    assert info.value.code == "unsupported_option"
    with pytest.raises(ProbeError) as info:
        _step("lbfgs")
    assert info.value.code == "invalid_spec"


def test_from_spec() -> None:
    spec = ProbeSpec(model_name="mlp", model_config=TINY_MLP, optimizer="adamw", learning_rate=3e-4, seed=7)
    model_spec = get_model("mlp")
    step = TrainingStep.from_spec(spec, model_spec, make_config(model_spec, spec.model_config))
    assert isinstance(step.optimizer, torch.optim.AdamW)
    assert step.optimizer.param_groups[0]["lr"] == 3e-4
    assert step.device == torch.device("cpu")
    same_seed = TrainingStep.from_spec(spec, model_spec, make_config(model_spec, spec.model_config))
    assert all(
        torch.equal(a, b) for a, b in zip(step.model.parameters(), same_seed.model.parameters(), strict=True)
    )


def test_one_step_probe_over_reports_the_limit_with_adam() -> None:
    """The first step runs without Adam's two moments: a budget it fits can fail at the second step."""
    step = _step("adam", hidden_dims=[512, 512])
    batch_size = 8

    def measure(budget: int):
        return measure_step(
            step.run,
            batch_size,
            budget,
            step.device,
            roots=step.memory_roots(),
            cleanup=step.discard_gradients,
        )

    first = measure(10**9)
    second = measure(10**9)
    moments = 2 * _parameter_bytes(step)
    # Both moments are alive through the second forward/backward, not through the first.
    assert second.fwd_bwd_peak_bytes - first.fwd_bwd_peak_bytes == pytest.approx(moments, rel=0.01)
    assert second.peak_bytes > first.peak_bytes

    fresh = _step("adam", hidden_dims=[512, 512])
    budget = (first.peak_bytes + second.peak_bytes) // 2

    def measure_fresh(budget: int):
        return measure_step(
            fresh.run,
            batch_size,
            budget,
            fresh.device,
            roots=fresh.memory_roots(),
            cleanup=fresh.discard_gradients,
        )

    assert measure_fresh(budget).outcome == "ok"  # a one-step probe would call this size feasible
    assert measure_fresh(budget).outcome == "over_budget"  # and training fails at step two
    assert "second step" in MEASURED_CONVENTION


def test_failed_step_leaves_no_gradients_behind() -> None:
    step = _step("sgd")
    step.warm_up()
    trial = measure_step(
        step.run, 4096, 200_000, step.device, roots=step.memory_roots(), cleanup=step.discard_gradients
    )
    assert trial.outcome == "over_budget"
    assert all(p.grad is None for p in step.model.parameters())
    assert step.run(2).isfinite()  # and the next step runs normally


def test_the_probe_trains_the_clients_optimizer_settings() -> None:
    spec = get_model("mlp")
    probe = ProbeSpec(
        model_name="mlp", optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=1e-3, learning_rate=0.05
    )
    step = TrainingStep.from_spec(probe, spec, make_config(spec, TINY_MLP))
    group = step.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.0, False, 1e-3)
    step.warm_up(2)
    assert not any(
        "momentum_buffer" in s and s["momentum_buffer"] is not None for s in step.optimizer.state.values()
    )

    probe = ProbeSpec(model_name="mlp", optimizer="adamw", betas=[0.9, 0.95], eps=1e-6, weight_decay=0.1)
    group = TrainingStep.from_spec(probe, spec, make_config(spec, TINY_MLP)).optimizer.param_groups[0]
    assert isinstance(
        TrainingStep.from_spec(probe, spec, make_config(spec, TINY_MLP)).optimizer, torch.optim.AdamW
    )
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-6, 0.1)

    default = TrainingStep.from_spec(ProbeSpec(model_name="mlp"), spec, make_config(spec, TINY_MLP))
    assert default.optimizer.param_groups[0]["momentum"] == 0.9  # sgd's documented default


def test_nesterov_without_momentum_is_refused() -> None:
    spec = get_model("mlp")
    probe = ProbeSpec(model_name="mlp", optimizer="sgd", momentum=0.0, nesterov=True)
    with pytest.raises(ProbeError) as info:
        TrainingStep.from_spec(probe, spec, make_config(spec, TINY_MLP))
    assert info.value.code == "invalid_spec"


def test_the_lightning_loop_keeps_the_previous_gradients_alive_through_the_forward() -> None:
    spec = get_model("mlp")
    step = TrainingStep(spec, make_config(spec, TINY_MLP), optimizer="adam", loop="lightning")
    step.warm_up(2)
    assert all(p.grad is not None for p in step.model.parameters())  # not freed after the step
    steady = measure_step(step.run, 16, 2**40, step.device, roots=step.memory_roots())
    step.discard_gradients()  # as after a failed trial: the next step starts from the steady state again
    again = measure_step(step.run, 16, 2**40, step.device, roots=step.memory_roots())
    assert steady.peak_bytes == again.peak_bytes and steady.baseline_bytes is not None
    plain = TrainingStep(spec, make_config(spec, TINY_MLP), optimizer="adam")
    plain.warm_up(2)
    first = measure_step(plain.run, 16, 2**40, plain.device, roots=plain.memory_roots())
    gradients = plain.state_bytes()["gradients"]
    assert steady.baseline_bytes == first.baseline_bytes + gradients


def test_prefetched_batches_are_counted() -> None:
    spec = get_model("mlp")
    peaks = []
    for ahead in (0, 2):
        step = TrainingStep(spec, make_config(spec, TINY_MLP), prefetch_batches=ahead)
        step.warm_up(2)
        peaks.append(measure_step(step.run, 64, 2**40, step.device, roots=step.memory_roots()).peak_bytes)
    batch_bytes = 64 * (TINY_MLP["input_dim"] * 4 + 8)  # float32 features, int64 targets
    assert peaks[1] - peaks[0] == 2 * batch_bytes

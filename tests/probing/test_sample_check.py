"""One sample validator: targets checked against what the declared loss needs (probing/sample_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.probing import engine
from service.probing.sample_check import Task, check_arrays, dry_step, prepare, problem
from service.probing.spec import ProbeError, ProbeSpec

REGRESSION = Task("mse", (10,), target_shape=(1,), target_dtype="float32")
CLASSIFIER = Task.for_model(None, input_shape=[64], input_dtype="float32", num_classes=10)


def _described(x: torch.Tensor, y: torch.Tensor) -> dict:
    return check_arrays({"x": x, "y": y})


def test_the_task_of_a_zoo_model_and_of_an_uploaded_one() -> None:
    assert CLASSIFIER.loss == "cross_entropy" and CLASSIFIER.classes == 10 and CLASSIFIER.target_shape is None
    gpt = Task.for_model(None, input_shape=[16], input_dtype="int64", num_classes=256)
    assert gpt.input_high == 256
    uploaded = {"loss": "mse", "input_shape": [10], "target_shape": [3], "target_dtype": "float32"}
    task = Task.for_model(uploaded, input_shape=[10], input_dtype="float32", num_classes=0)
    assert task.loss == "mse" and task.target_shape == (3,) and task.classes is None


def test_float_targets_fit_a_regression_model() -> None:
    x, y = torch.randn(20, 10), torch.randn(20, 1)
    assert problem(_described(x, y), REGRESSION) is None
    assert problem(_described(x, y[:, 0]), REGRESSION) is None  # [N] for one output is read as [N, 1]
    _xs, ys = prepare(x, y[:, 0], REGRESSION)
    assert ys.shape == (20, 1) and ys.dtype == torch.float32
    counts = torch.randint(0, 50, (20, 1))  # integer targets are regression targets too
    assert prepare(x, counts, REGRESSION)[1].dtype == torch.float32


def test_regression_mismatches_name_the_array_its_shape_and_dtype_and_the_loss() -> None:
    x = torch.randn(20, 10)
    message = problem(_described(x, torch.randn(20, 2)), REGRESSION)
    assert message is not None
    assert "y has per-example shape [2] and dtype float32" in message
    assert "loss mse expects float targets shaped like the model's output: [1] per example" in message
    wrong_x = problem(_described(torch.randn(20, 9), torch.randn(20, 1)), REGRESSION)
    assert wrong_x is not None and "x has per-example shape [9]" in wrong_x and "[10]" in wrong_x


def test_class_ids_for_cross_entropy() -> None:
    x = torch.randn(20, 64)
    assert problem(_described(x, torch.randint(0, 10, (20,))), CLASSIFIER) is None
    floats = problem(_described(x, torch.randn(20)), CLASSIFIER)
    assert floats is not None and "y has per-example shape [] and dtype float32" in floats
    assert "loss cross_entropy expects integer class ids in [0, 10)" in floats
    too_high = problem(_described(x, torch.full((20,), 12)), CLASSIFIER)
    assert too_high is not None and "the model has 10 classes" in too_high


def test_ignore_index_targets_are_accepted_for_cross_entropy() -> None:
    y = torch.randint(0, 10, (20,))
    y[:5] = -100
    assert problem(_described(torch.randn(20, 64), y), CLASSIFIER) is None
    y[0] = -1
    assert problem(_described(torch.randn(20, 64), y), CLASSIFIER) is not None


def test_model_returns_loss_takes_the_target_it_was_exported_with() -> None:
    task = Task(
        "model_returns_loss", (16,), "int64", 256, target_shape=(16,), target_dtype="int64", classes=256
    )
    tokens = torch.randint(0, 256, (8, 16))
    assert problem(_described(tokens, tokens), task) is None
    wrong = problem(_described(tokens, torch.randn(8, 16)), task)
    assert wrong is not None and "forward(x, target) expects a int64 target" in wrong


def test_sample_level_problems() -> None:
    with pytest.raises(ValueError, match="missing \\['y'\\]"):
        check_arrays({"x": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        check_arrays({"x": torch.zeros(3, 2), "y": torch.zeros(2)})
    with pytest.raises(ValueError, match="'y' contains NaN"):
        check_arrays({"x": torch.zeros(3, 2), "y": torch.tensor([0.0, float("nan"), 1.0])})


def test_the_dry_step_settles_what_shapes_cannot() -> None:
    torch.manual_seed(0)
    two_outputs = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    task = Task("mse", (10,))  # a zoo-like task: the output shape is only known once the model runs
    x, y = torch.randn(20, 10), torch.randn(20, 1)
    before = two_outputs[1].running_mean.clone()
    with pytest.raises(ValueError, match="a training step on the first") as info:
        dry_step(two_outputs, nn.functional.mse_loss, x, y, task)
    message = str(info.value)
    assert "the model's output is [2] per example but y is [1]" in message
    assert "x float32 [10], y float32 [1] per example" in message
    assert torch.equal(two_outputs[1].running_mean, before)  # buffers restored
    assert all(p.grad is None for p in two_outputs.parameters())
    dry_step(two_outputs, nn.functional.mse_loss, x, torch.randn(20, 2), task)  # fits: no error

    logits = nn.Linear(64, 5)
    with pytest.raises(ValueError, match="y holds class id 9 but the model has 5 classes"):
        dry_step(logits, nn.functional.cross_entropy, torch.randn(8, 64), torch.full((8,), 9), CLASSIFIER)


def test_the_probe_fails_a_sample_whose_targets_the_model_cannot_use(tmp_path) -> None:
    """Per-position class ids for a classifier with one label per example: only the step can tell."""
    rng = np.random.default_rng(0)
    path = tmp_path / "positions.npz"
    np.savez(path, x=rng.standard_normal((256, 64)).astype(np.float32), y=rng.integers(0, 10, (256, 3)))
    spec = ProbeSpec(
        model_name="mlp", memory_budget_bytes=64 * 2**20, time_budget_s=2.0, sample_path=str(path)
    )
    with pytest.raises(ProbeError) as info:
        engine.run_probe(spec, lambda event: None)
    assert info.value.code == "invalid_sample"
    assert (
        "the model's logits are [10] per example (classes last), so y must be [], got [3]"
        in info.value.message
    )
    assert "x float32 [64], y int64 [3] per example" in info.value.message


def test_a_sample_the_model_cannot_use_fails_the_job_even_when_the_statistics_are_skipped(
    tmp_path, monkeypatch
) -> None:
    """When the throughput curve settles the answer without a noise scale, the sample is still checked."""
    rng = np.random.default_rng(0)
    path = tmp_path / "positions.npz"
    np.savez(path, x=rng.standard_normal((256, 64)).astype(np.float32), y=rng.integers(0, 10, (256, 3)))
    monkeypatch.setattr(engine, "_answer_without_noise_scale", lambda *args: "skipped: settled")
    spec = ProbeSpec(
        model_name="mlp", memory_budget_bytes=64 * 2**20, time_budget_s=2.0, sample_path=str(path)
    )
    with pytest.raises(ProbeError) as info:
        engine.run_probe(spec, lambda event: None)
    assert info.value.code == "invalid_sample"

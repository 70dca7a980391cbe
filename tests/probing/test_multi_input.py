"""Models with several named inputs (input_ids + attention_mask): their config, synthesised batches,
named-array samples, the sample check, ignore_index, and a probe that measures a noise scale on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.probing.exported import ArchiveError, check_sample, dry_run, model_spec_for
from service.probing.exported.adapt import ExportedConfig
from service.probing.inputs import NamedInputs
from service.probing.sample_check import Task, check_arrays, dry_step, prepare, prepare_arrays, problem
from service.probing.spec import ProbeSpec
from tests.multi_input_models import CLASSES, SEQ, VOCAB, classifier_archive, own_loss_archive, text_data


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _config(archive: Path, loss: str = "cross_entropy") -> dict:
    return dry_run(str(archive), {"loss": loss})["config"]


# ------------------------------------------------------------------------------------ NamedInputs


def test_named_inputs_slice_move_and_count_together() -> None:
    batch = NamedInputs({"input_ids": torch.arange(12).reshape(6, 2), "attention_mask": torch.ones(6, 2)})
    assert len(batch) == 6 and batch.device.type == "cpu"
    assert batch[1:3]["input_ids"].tolist() == [[2, 3], [4, 5]] and len(batch[1:3]) == 2
    picked = batch[torch.tensor([5, 0])]
    assert picked["input_ids"].tolist() == [[10, 11], [0, 1]] and picked["attention_mask"].shape == (2, 2)
    assert batch.to("cpu")["input_ids"].dtype == torch.int64  # moved, dtypes kept
    assert batch.unsqueeze(0)["input_ids"].shape == (1, 6, 2)
    with pytest.raises(ValueError, match="share their first"):
        NamedInputs({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    with pytest.raises(TypeError):
        batch[0]


# ------------------------------------------------------------------------------- config + synthesis


def test_the_config_lists_every_input_by_name_with_its_bound_and_fill() -> None:
    result = dry_run(str(classifier_archive()), {"loss": "cross_entropy"})
    config = result["config"]
    assert [i["name"] for i in result["inputs"]] == ["input_ids", "attention_mask"]
    assert config["inputs"] == [
        {"name": "input_ids", "shape": [SEQ], "dtype": "int64", "high": VOCAB, "fill": "random"},
        {"name": "attention_mask", "shape": [SEQ], "dtype": "int64", "high": None, "fill": "ones"},
    ]
    assert config["input_shape"] == [SEQ] and config["input_high"] == VOCAB  # the first input
    assert (config["target_shape"], config["target_high"]) == ([], CLASSES)
    assert "target_name" not in config and set(result["losses"]) == {"1", "2", "3"}

    own = dry_run(str(own_loss_archive()), {"loss": "model_returns_loss", "num_classes": CLASSES})["config"]
    assert [i["name"] for i in own["inputs"]] == ["input_ids", "attention_mask"]
    assert own["target_name"] == "labels" and own["target_high"] == CLASSES and own["target_shape"] == []


def test_one_input_configs_are_unchanged() -> None:
    config = ExportedConfig("mse", (10,), target_shape=(1,), target_dtype="float32")
    assert "inputs" not in config.to_dict() and "target_name" not in config.to_dict()
    assert "ignore_index" not in config.to_dict()


def test_synthesised_batches_feed_every_input() -> None:
    config = ExportedConfig.from_dict(_config(classifier_archive()))
    spec = model_spec_for(str(classifier_archive()), config)
    inputs, targets = spec.make_batch(config, 5, "cpu", torch.Generator().manual_seed(0))
    assert isinstance(inputs, NamedInputs) and list(inputs) == ["input_ids", "attention_mask"]
    assert inputs["input_ids"].shape == (5, SEQ) and int(inputs["input_ids"].min()) >= 0
    assert int(inputs["input_ids"].max()) < VOCAB
    assert bool((inputs["attention_mask"] == 1).all())  # masks: attend everywhere
    assert targets.shape == (5,) and int(targets.max()) < CLASSES
    model = spec.build(config, False)
    loss = spec.loss(model(inputs), targets)
    loss.backward()
    assert loss.ndim == 0 and model.program.embed.weight.grad is not None


def test_an_integer_input_without_an_embedding_needs_its_bound(tmp_path: Path) -> None:
    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(SEQ, 3)

        def forward(self, counts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.head(counts.float() * scale)

    batch = torch.export.Dim("batch")
    program = torch.export.export(
        Counts().train(),
        (),
        {"counts": torch.ones(4, SEQ, dtype=torch.long), "scale": torch.ones(4, 1)},
        dynamic_shapes={"counts": {0: batch}, "scale": {0: batch}},
    )
    path = tmp_path / "counts.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(path), {"loss": "cross_entropy"})
    assert excinfo.value.code == "invalid_model_spec" and "'counts'" in excinfo.value.message
    config = dry_run(str(path), {"loss": "cross_entropy", "input": {"high": 7}})["config"]
    assert config["inputs"][0]["high"] == 7 and config["inputs"][1]["dtype"] == "float32"


# -------------------------------------------------------------------------------- named samples


def _task(archive: Path | None = None, loss: str = "cross_entropy", **kwargs: object) -> Task:
    config = (
        _config(archive or classifier_archive(), loss) if loss == "cross_entropy" else kwargs.pop("config")
    )
    return Task.for_model(config, input_shape=[SEQ], input_dtype="int64", num_classes=0, **kwargs)  # type: ignore[arg-type]


def test_a_named_sample_fits_and_loads_as_named_inputs() -> None:
    arrays = {k: torch.from_numpy(v) for k, v in text_data(32).items()}
    description = check_arrays(arrays)
    assert set(description) == {"input_ids", "attention_mask", "y", "examples"}
    task = _task()
    assert task.input_names == ["input_ids", "attention_mask"]
    assert problem(description, task) is None
    x, y = prepare_arrays(arrays, task)
    assert isinstance(x, NamedInputs) and len(x) == 32 and y.dtype == torch.int64
    extra = {**arrays, "token_type_ids": torch.zeros(32, SEQ, dtype=torch.long)}  # not taken: not used
    assert problem(check_arrays(extra), task) is None


def test_named_sample_errors_name_the_array_its_shape_and_what_was_expected() -> None:
    arrays = {k: torch.from_numpy(v) for k, v in text_data(32).items()}
    task = _task()
    with pytest.raises(ValueError, match="array 'attention_mask' has 31 examples \\(shape \\[31, 8\\]\\)"):
        check_arrays({**arrays, "attention_mask": arrays["attention_mask"][:31]})
    with pytest.raises(ValueError, match="one array per forward argument"):
        check_arrays({"input_ids": arrays["input_ids"]})  # no target

    missing = problem(check_arrays({"input_ids": arrays["input_ids"], "y": arrays["y"]}), task)
    assert (
        missing is not None
        and "no array 'attention_mask'" in missing
        and "input_ids, attention_mask" in missing
    )
    short = problem(check_arrays({**arrays, "input_ids": arrays["input_ids"][:, :6]}), task)
    assert short is not None and "input_ids has per-example shape [6] and dtype int64" in short
    assert "per-example shape [8] (int64)" in short
    high = problem(check_arrays({**arrays, "input_ids": arrays["input_ids"] + VOCAB}), task)
    assert high is not None and f"the model takes input_ids in [0, {VOCAB})" in high
    floats = problem(check_arrays({**arrays, "input_ids": arrays["input_ids"].float()}), task)
    assert floats is not None and "input_ids has per-example shape [8] and dtype float32" in floats
    xy = problem(check_arrays({"x": arrays["input_ids"], "y": arrays["y"]}), task)
    assert xy is not None and "one array per input" in xy and "['x', 'y']" in xy
    no_target = problem(check_arrays({**arrays, "labels": arrays.pop("y")}), task)
    assert no_target is None  # labels is a target name too


def test_model_returns_loss_takes_its_target_by_the_forwards_name() -> None:
    config = dry_run(str(own_loss_archive()), {"loss": "model_returns_loss", "num_classes": CLASSES})[
        "config"
    ]
    task = Task.for_model(config, input_shape=[SEQ], input_dtype="int64", num_classes=0)
    data = text_data(16)
    arrays = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "labels": data["y"]}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    x, y = prepare_arrays(tensors, task)
    spec = model_spec_for(str(own_loss_archive()), ExportedConfig.from_dict(config))
    model = spec.build(ExportedConfig.from_dict(config), False)
    dry_step(model, spec.loss, x, y, task)  # fits
    wrong = problem(check_arrays({**tensors, "labels": tensors["labels"].float()}), task)
    assert wrong is not None and "forward(input_ids, attention_mask, labels) expects a int64 target" in wrong


# ---------------------------------------------------------------------------------- ignore_index


def test_a_custom_ignore_index_is_left_out_of_the_loss_and_the_checks() -> None:
    x = torch.randn(20, 64)
    y = torch.randint(0, 10, (20,))
    padding = torch.tensor([1, 5, 9, 13])
    y[padding] = 10  # the padding class: out of range unless ignored
    default = Task.for_model(None, input_shape=[64], input_dtype="float32", num_classes=10)
    assert problem(check_arrays({"x": x, "y": y}), default) is not None
    padded = Task.for_model(None, input_shape=[64], input_dtype="float32", num_classes=10, ignore_index=10)
    # Described at upload with -100: the range may include the ignored value, so the data decides.
    assert problem(check_arrays({"x": x, "y": y}), padded) is None
    _xs, ys = prepare(x, y, padded)
    assert (ys[padding] == -100).all() and int((ys == -100).sum()) == 4  # what cross_entropy ignores
    logits = nn.Linear(64, 10)
    dry_step(logits, nn.functional.cross_entropy, x, ys, padded)

    y[6] = -100  # -100 is no longer ignored, so no class id either
    with pytest.raises(ValueError, match="y holds class ids in \\[-100, 9\\]"):
        prepare(x, y, padded)
    stored = check_arrays({"x": x, "y": y})
    found = problem(stored, padded)
    assert found is not None and "training.ignore_index is 10" in found


# ------------------------------------------------------------------------------- the sample check


def test_check_sample_runs_a_step_and_names_what_does_not_fit(tmp_path: Path) -> None:
    config = _config(classifier_archive())
    good = _npz(tmp_path / "good.npz", **text_data(64))
    assert check_sample(str(classifier_archive()), config, str(good)) == {"examples": 64}
    data = text_data(64)
    per_position = _npz(tmp_path / "pos.npz", **{**data, "y": np.repeat(data["y"][:, None], SEQ, 1)})
    with pytest.raises(ArchiveError) as excinfo:
        check_sample(str(classifier_archive()), config, str(per_position))
    assert excinfo.value.code == "sample_mismatch"
    assert "y has per-example shape [8] and dtype int64" in excinfo.value.message
    padded = {**data, "y": np.where(np.arange(64) % 8 == 1, 7, data["y"])}
    path = _npz(tmp_path / "padded.npz", **padded)
    with pytest.raises(ArchiveError, match="class ids in \\[0, 7\\]"):
        check_sample(str(classifier_archive()), config, str(path))
    assert check_sample(str(classifier_archive()), config, str(path), ignore_index=7) == {"examples": 64}


# -------------------------------------------------------------------------------------- the probe


def test_the_probe_trains_every_input_and_measures_the_noise_scale_on_a_named_sample(tmp_path: Path) -> None:
    from service.probing.engine import run_probe

    sample = _npz(tmp_path / "text.npz", **text_data(2048))
    spec = ProbeSpec(
        model_name="artifact:text",
        model_config=_config(classifier_archive()),
        model_artifact_path=str(classifier_archive()),
        optimizer="adam",
        learning_rate=1e-3,
        memory_budget_bytes=16 * 2**20,
        time_budget_s=20,
        dataset_size=4096,
        sample_path=str(sample),
        objective="time_to_target",
    )
    events: list[dict] = []
    result = run_probe(spec, events.append)
    assert 1 <= result["max_feasible_batch_size"] <= 4096
    assert any(
        e.get("phase") == "memory" and e.get("outcome") == "ok" for e in events if e["event"] == "trial"
    )
    assert result["throughput"]
    noise = result["gradient_noise_scale"]
    # Measured on the client's sample: a value, or (too few draws on a loaded host) its lower bound.
    assert noise is not None and noise["measured_on"] == "client", result["warnings"]
    assert noise["status"] in ("ok", "unresolved") and (noise["value"] is not None or noise["low"] > 0), noise
    assert result["data_sample"]["measured_on"] == "client" and result["data_sample"]["size"] == 2048

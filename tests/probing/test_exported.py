"""service.probing.exported: archive inspection (zipfile only), the pickle-free loader, the dry run."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from service.probing import exported
from service.probing.exported import ArchiveError, dry_run, inspect_archive, load_program
from service.probing.spec import ProbeSpec
from tests import exported_models as em


def _code(excinfo: pytest.ExceptionInfo[ArchiveError]) -> str:
    return excinfo.value.code


def test_a_real_export_archive_passes_inspection() -> None:
    summary = inspect_archive(em.cnn_archive())
    assert summary["weights"] >= 6 and summary["constants"] == 0


def test_inspection_refuses_files_that_are_not_export_archives(tmp_path: Path) -> None:
    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"definitely not a zip")
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(not_zip)
    assert _code(excinfo) == "not_a_zip"

    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(em.zip_without_export_layout(tmp_path / "layout.pt2"))
    assert _code(excinfo) in {"not_an_export_archive", "unsupported_archive_content"}
    assert "torch.export" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(em.cnn_archive(), max_uncompressed_bytes=1000)
    assert _code(excinfo) == "archive_too_large"


def test_a_weight_stored_as_a_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_weight_archive(marker, tmp_path / "evil.pt2")
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(archive)
    assert _code(excinfo) == "pickled_content" and "use_pickle" in excinfo.value.message
    with pytest.raises(ArchiveError):
        load_program(str(archive))  # the probe-side loader inspects again before torch reads a byte
    assert not marker.exists()


def test_the_crafted_pickle_is_real_torch_export_load_would_run_it(tmp_path: Path) -> None:
    """Sanity check of the marker mechanism: the archive above is dangerous with torch's own loader."""
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_weight_archive(marker, tmp_path / "evil.pt2")
    with pytest.raises(Exception):  # noqa: B017 - the open file object is not a tensor: torch fails later
        torch.export.load(archive)
    assert marker.exists()


def test_sample_inputs_are_never_read_by_our_loader(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_sample_inputs_archive(marker, tmp_path / "evil-inputs.pt2")
    inspect_archive(archive)  # clean weights: accepted
    program = load_program(str(archive))
    assert program.module()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert not marker.exists()


def test_other_pickled_or_compiled_payloads_are_refused(tmp_path: Path) -> None:
    source = em.cnn_archive()
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        constants = json.loads(archive.read(f"{root}/data/constants/model_constants_config.json"))
    constants["config"]["obj"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False}
    cases = {
        "legacy.pt2": ({"data/weights/model.pt": b"pickle"}, "pickled_content"),
        "object.pt2": (
            {
                "data/constants/model_constants_config.json": json.dumps(constants).encode(),
                "data/constants/custom_obj_0": b"pickle",
            },
            "pickled_content",
        ),
        "aoti.pt2": ({"data/aotinductor/model/model.so": b"\x7fELF"}, "unsupported_archive_content"),
    }
    for name, (extra, code) in cases.items():
        target = tmp_path / name
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
            for info in src.infolist():
                relative = info.filename.split("/", 1)[1]
                dst.writestr(info, extra.pop(relative, src.read(info)))
            for relative, payload in extra.items():
                dst.writestr(f"{root}/{relative}", payload)
        with pytest.raises(ArchiveError) as excinfo:
            inspect_archive(target)
        assert _code(excinfo) == code, name


def test_dry_run_infers_a_classifier_task_from_the_program() -> None:
    result = dry_run(str(em.cnn_archive()), {"loss": "cross_entropy"})
    config = result["config"]
    assert config["input_shape"] == [1, 8, 8] and config["input_dtype"] == "float32"
    assert config["target_shape"] == [] and config["target_high"] == 10
    assert set(result["losses"]) == {"1", "2", "3"}
    assert result["batch"]["dynamic"] is True
    assert result["parameters"] == sum(p.numel() for p in em.TinyCNN().parameters())


def test_dry_run_of_a_model_that_returns_its_own_loss() -> None:
    result = dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss", "num_classes": 256})
    config = result["config"]
    assert config["input_shape"] == [16] and config["input_dtype"] == "int64" and config["input_high"] == 256
    assert config["target_shape"] == [16] and config["target_high"] == 256


def test_dry_run_refusals_name_the_problem() -> None:
    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.static_archive()), {"loss": "cross_entropy"})
    assert _code(excinfo) == "static_batch_dimension" and "static" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.nan_archive()), {"loss": "cross_entropy"})
    assert _code(excinfo) == "dry_run_failed" and "nan" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.cnn_archive()), {"loss": "cross_entropy", "input": {"shape": [3, 8, 8]}})
    assert _code(excinfo) == "input_shape_mismatch"

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.cnn_archive()), {"loss": "model_returns_loss"})
    assert _code(excinfo) == "unsupported_inputs"

    with pytest.raises(ArchiveError) as excinfo:  # integer targets need their range
        dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss"})
    assert _code(excinfo) == "invalid_model_spec"


def test_the_probe_engine_trains_an_exported_model_in_process() -> None:
    from service.probing.engine import run_probe

    config = dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss", "num_classes": 256})[
        "config"
    ]
    spec = ProbeSpec(
        model_name="artifact:transformer",
        model_config=config,
        model_artifact_path=str(em.transformer_archive()),
        optimizer="adamw",
        learning_rate=1e-3,
        memory_budget_bytes=16 * 2**20,
        time_budget_s=3,
        dataset_size=2048,
    )
    events: list[dict] = []
    result = run_probe(spec, events.append)
    assert 1 <= result["max_feasible_batch_size"] <= 2048
    assert result["throughput"] and result["recommended_batch_size"] >= 1
    fitted = [
        e for e in events if e.get("event") == "trial" and e["phase"] == "memory" and e["outcome"] == "ok"
    ]
    assert all(e["peak_bytes"] <= spec.memory_budget_bytes for e in fitted)
    # Each build is a fresh copy: training it left the archive's cached program untouched.
    program = exported.load_program(str(em.transformer_archive()))
    fresh = exported.load_program.__wrapped__(str(em.transformer_archive()))
    for (name, a), (_, b) in zip(program.state_dict.items(), fresh.state_dict.items(), strict=True):
        assert torch.equal(a, b), name

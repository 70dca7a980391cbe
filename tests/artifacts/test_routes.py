"""/v1/artifacts: bring-your-own models (torch.export) and data samples, from upload to a recommendation."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests import exported_models as em
from tests.helpers import wait_for_job


def _upload(client: TestClient, path: Path, kind: str = "model", **fields: str):
    with path.open("rb") as handle:
        return client.post(
            "/v1/artifacts",
            data={"kind": kind, **fields},
            files={"file": (path.name, handle, "application/zip")},
        )


def _error(response) -> dict:
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def test_an_exported_transformer_goes_from_upload_to_a_recommendation(settings: Settings) -> None:
    archive = em.transformer_archive()
    with TestClient(create_app(settings, run_worker=True)) as client:
        created = _upload(client, archive, loss="model_returns_loss", num_classes="256")
        assert created.status_code == 201, created.text
        artifact = created.json()
        assert artifact["kind"] == "model" and len(artifact["id"]) == 64
        assert created.headers["location"] == f"/v1/artifacts/{artifact['id']}"
        config = artifact["meta"]["config"]
        assert config["input_shape"] == [16] and config["input_dtype"] == "int64"
        assert config["target_shape"] == [16] and config["target_high"] == 256
        stored = Path(settings.data_dir) / "artifacts" / f"{artifact['id']}.pt2"
        assert stored.read_bytes() == archive.read_bytes()

        # The same file again is the same artifact; with another declaration it is a conflict.
        again = _upload(client, archive, loss="model_returns_loss", num_classes="256")
        assert again.status_code == 200 and again.json()["id"] == artifact["id"]
        assert _error(_upload(client, archive, loss="mse"))["code"] == "artifact_conflict"

        assert [a["id"] for a in client.get("/v1/artifacts", params={"kind": "model"}).json()] == [
            artifact["id"]
        ]
        assert client.get("/v1/artifacts", params={"kind": "sample"}).json() == []
        assert client.get(f"/v1/artifacts/{artifact['id']}").json()["filename"] == archive.name

        request = {
            "model": {"artifact_id": artifact["id"]},
            "dataset": {"size": 2048},
            "training": {"optimizer": "adamw", "learning_rate": 0.001, "reference_batch_size": 16},
            "memory_budget_bytes": 16 * 2**20,
            "time_budget_s": 5,
        }
        job = client.post("/v1/recommendations", json=request)
        assert job.status_code == 202, job.text
        assert "_internal" not in job.json()["request"]  # the archive's path on disk stays private
        assert job.json()["request"]["model"]["config"]["loss"] == "model_returns_loss"
        done = wait_for_job(client, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        result = done["result"]
        assert 1 <= result["max_feasible_batch_size"] <= 2048
        assert result["micro_batch_size"] >= 1 and result["learning_rate"] > 0
        assert result["throughput"] and result["memory"]["budget_bytes"] == 16 * 2**20
        trials = client.get(f"/v1/recommendations/{done['id']}/trials").json()
        assert any(t["phase"] == "memory" and t["outcome"] == "ok" for t in trials)

        # Identical request: answered from storage. The fingerprint follows the artifact's hash.
        cached = client.post("/v1/recommendations", json=request)
        assert cached.status_code == 200 and cached.json()["id"] == done["id"]

        assert client.delete(f"/v1/artifacts/{artifact['id']}").status_code == 204
        assert client.get(f"/v1/artifacts/{artifact['id']}").status_code == 404
        assert not stored.exists()
        gone = client.post("/v1/recommendations", json={**request, "force": True})
        assert _error(gone)["code"] == "unknown_artifact"


def test_bad_archives_are_refused_with_the_problem_named(client: TestClient, tmp_path: Path) -> None:
    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"this is not a zip archive at all")
    error = _error(_upload(client, not_zip, loss="cross_entropy"))
    assert error["code"] == "not_a_zip" and "zip" in error["message"]

    error = _error(
        _upload(client, em.zip_without_export_layout(tmp_path / "plain.pt2"), loss="cross_entropy")
    )
    assert error["code"] == "not_an_export_archive" and "torch.export" in error["message"]

    error = _error(_upload(client, em.cnn_archive()))  # no loss declared
    assert error["code"] == "invalid_model_spec" and "loss" in error["message"]

    error = _error(_upload(client, em.cnn_archive(), loss="cross_entropy", input="{not json"))
    assert error["code"] == "invalid_model_spec"
    assert client.get("/v1/artifacts").json() == []


def test_a_pickle_bearing_archive_is_refused_and_its_pickle_never_runs(
    client: TestClient, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled.marker"
    response = _upload(client, em.pickled_weight_archive(marker, tmp_path / "evil.pt2"), loss="cross_entropy")
    error = _error(response)
    assert response.status_code == 422
    assert error["code"] == "pickled_content" and "use_pickle" in error["message"]
    assert not marker.exists()
    assert client.get("/v1/artifacts").json() == []
    assert not list((Path(client.app.state.batchsize.settings.data_dir) / "artifacts").glob("*.pt2"))


def test_uploads_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", probe_device="cpu", max_upload_bytes=20_000, _env_file=None
    )
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/archive_format", "pt2")
        archive.writestr("model/data/weights/weight_0", b"\0" * 10_000_000)
    huge = tmp_path / "huge.pt2"
    huge.write_bytes(b"\0" * 200_000)
    with TestClient(create_app(settings, run_worker=False)) as client:
        response = _upload(client, em.cnn_archive(), loss="cross_entropy")  # ~40 kB of 20 kB allowed
        assert response.status_code == 413 and "20000 bytes" in _error(response)["message"]
        response = _upload(client, huge, loss="cross_entropy")  # refused before the body is read
        assert response.status_code == 413
        response = _upload(client, bomb, loss="cross_entropy")  # small file, unpacks to 10 MB
        assert response.status_code == 413 and _error(response)["code"] == "archive_too_large"
        assert not list((settings.data_dir / "artifacts").glob("*.pt2"))


def test_models_failing_the_dry_run_are_refused(client: TestClient) -> None:
    response = _upload(client, em.static_archive(), loss="cross_entropy")
    error = _error(response)
    assert response.status_code == 422
    assert error["code"] == "static_batch_dimension" and "batch dimension is static" in error["message"]

    error = _error(_upload(client, em.nan_archive(), loss="cross_entropy"))
    assert error["code"] == "dry_run_failed" and "nan" in error["message"]
    assert client.get("/v1/artifacts").json() == []


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _safetensors(x: np.ndarray, y: np.ndarray) -> bytes:
    import json
    import struct

    header, offset, blobs = {}, 0, []
    for name, array, dtype in (("x", x, "F32"), ("y", y, "I64")):
        data = array.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def test_data_samples_are_checked_and_stored(client: TestClient, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    good = tmp_path / "digits.npz"
    good.write_bytes(_npz(x=x, y=y))
    created = _upload(client, good, kind="sample")
    assert created.status_code == 201, created.text
    meta = created.json()["meta"]
    assert meta["examples"] == 64 and meta["x"]["shape"] == [1, 8, 8] and meta["y"]["max"] <= 9
    assert _upload(client, good, kind="sample").status_code == 200

    tensors = tmp_path / "digits.safetensors"
    tensors.write_bytes(_safetensors(x[:8], y[:8]))
    assert _upload(client, tensors, kind="sample").status_code == 201

    marker = tmp_path / "unpickled.marker"
    cases = {
        "pickled.npz": _npz(x=np.array([em._CreatesMarker(marker)], dtype=object), y=np.array([1])),
        "nan.npz": _npz(x=np.full((4, 2), np.nan, dtype=np.float32), y=np.zeros(4, dtype=np.int64)),
        "empty.npz": _npz(x=np.zeros((0, 2), dtype=np.float32), y=np.zeros(0, dtype=np.int64)),
        "no-y.npz": _npz(x=np.zeros((4, 2), dtype=np.float32)),
        "junk.safetensors": b"\xff" * 64,
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        assert _error(_upload(client, path, kind="sample"))["code"] == "invalid_sample", name
    assert not marker.exists()
    assert len(client.get("/v1/artifacts", params={"kind": "sample"}).json()) == 2

    # A recommendation checks the sample against the model: the zoo mlp takes 64 flat features.
    mismatch = client.post(
        "/v1/recommendations", json={"model": {"name": "mlp"}, "dataset": {"sample_id": created.json()["id"]}}
    )
    assert _error(mismatch)["code"] == "sample_mismatch"
    fits = client.post(
        "/v1/recommendations",
        json={
            "model": {"name": "resnet", "config": {"in_channels": 1, "image_size": 8, "width": 8}},
            "dataset": {"sample_id": created.json()["id"]},
        },
    )
    assert fits.status_code == 202, fits.text
    few_classes = client.post(
        "/v1/recommendations",
        json={
            "model": {"name": "resnet", "config": {"in_channels": 1, "image_size": 8, "num_classes": 5}},
            "dataset": {"sample_id": created.json()["id"]},
        },
    )
    assert (
        _error(few_classes)["code"] == "sample_mismatch"
        and "classes" in few_classes.json()["error"]["message"]
    )


# --------------------------------------------------------------------------------------------------
# Regression: an uploaded model with loss=mse and a sample of float targets (Friedman #1)


def _friedman1(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Friedman's first regression problem, 10 features (5 of them noise), targets standardised."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 10)).astype(np.float32)
    y = 10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
    y = y + rng.standard_normal(n)
    return x, ((y - y.mean()) / y.std()).astype(np.float32)[:, None]


def _regression_archive(tmp_path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.train(), (torch.randn(4, 10),), dynamic_shapes={"input": {0: batch}})
    path = tmp_path / "friedman.pt2"
    torch.export.save(program, path)
    return path


def test_a_regression_model_is_probed_on_its_float_targets(settings: Settings, tmp_path: Path) -> None:
    x, y = _friedman1(4000)
    sample = tmp_path / "friedman.npz"
    sample.write_bytes(_npz(x=x, y=y))
    with TestClient(create_app(settings, run_worker=True)) as client:
        model = _upload(client, _regression_archive(tmp_path), loss="mse")
        assert model.status_code == 201, model.text
        config = model.json()["meta"]["config"]
        assert (config["loss"], config["target_shape"], config["target_dtype"]) == ("mse", [1], "float32")
        uploaded = _upload(client, sample, kind="sample")
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["meta"]["y"] == {"shape": [1], "dtype": "float32"}
        request = {
            "model": {"artifact_id": model.json()["id"]},
            "dataset": {"size": 20_000, "sample_id": uploaded.json()["id"]},
            "training": {"optimizer": "adam", "learning_rate": 0.001, "reference_batch_size": 32},
            "objective": "time_to_target",
            "memory_budget_bytes": 64 * 2**20,
            "time_budget_s": 30,
        }
        job = client.post("/v1/recommendations", json=request)
        assert job.status_code == 202, job.text
        done = wait_for_job(client, job.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    noise = result["gradient_noise_scale"]
    assert noise["measured_on"] == "client" and noise["value"] is not None and noise["value"] > 0
    assert result["data_sample"]["measured_on"] == "client"
    assert result["noise_scale_source"] in ("races", "gradient_noise_scale", "combined")
    assert result["time_to_target_curve"]
    assert result["micro_batch_size"] <= result["max_feasible_batch_size"]


def test_samples_that_do_not_fit_the_loss_are_refused_naming_the_arrays(
    client: TestClient, tmp_path: Path
) -> None:
    model = _upload(client, _regression_archive(tmp_path), loss="mse")
    assert model.status_code == 201, model.text
    x, y = _friedman1(64)

    def submit(name: str, **arrays: np.ndarray) -> dict:
        path = tmp_path / name
        path.write_bytes(_npz(**arrays))
        sample = _upload(client, path, kind="sample")
        assert sample.status_code == 201, sample.text
        body = {"model": {"artifact_id": model.json()["id"]}, "dataset": {"sample_id": sample.json()["id"]}}
        return _error(client.post("/v1/recommendations", json=body))

    two_targets = submit("two.npz", x=x, y=np.concatenate([y, y], axis=1))
    assert two_targets["code"] == "sample_mismatch"
    assert "y has per-example shape [2] and dtype float32" in two_targets["message"]
    assert "loss mse expects float targets shaped like the model's output: [1]" in two_targets["message"]
    wrong_inputs = submit("narrow.npz", x=x[:, :8], y=y)
    assert "x has per-example shape [8] and dtype float32" in wrong_inputs["message"]
    assert "the model takes per-example shape [10]" in wrong_inputs["message"]

    # A classifier (the zoo mlp) and float targets: the loss needs class ids.
    labels = tmp_path / "floats64.npz"
    labels.write_bytes(_npz(x=np.zeros((64, 64), dtype=np.float32), y=y))
    sample_id = _upload(client, labels, kind="sample").json()["id"]
    body = {"model": {"name": "mlp"}, "dataset": {"sample_id": sample_id}}
    mismatch = _error(client.post("/v1/recommendations", json=body))
    assert mismatch["code"] == "sample_mismatch"
    assert "y has per-example shape [1] and dtype float32" in mismatch["message"]
    assert "loss cross_entropy expects integer class ids in [0, 10)" in mismatch["message"]


def test_l1_and_huber_are_regression_losses_too(client: TestClient, tmp_path: Path) -> None:
    archive = _regression_archive(tmp_path)
    x, y = _friedman1(64)
    sample = tmp_path / "friedman.npz"
    sample.write_bytes(_npz(x=x, y=y[:, 0]))  # [N] for a model with one output
    sample_id = _upload(client, sample, kind="sample").json()["id"]
    for loss in ("l1", "huber"):
        model = _upload(client, archive, loss=loss)
        assert model.status_code in (200, 201), model.text
        config = model.json()["meta"]["config"]
        assert (config["loss"], config["target_shape"], config["target_dtype"]) == (loss, [1], "float32")
        assert model.json()["meta"]["losses"]["2"] >= 0
        body = {"model": {"artifact_id": model.json()["id"]}, "dataset": {"sample_id": sample_id}}
        assert client.post("/v1/recommendations", json=body).status_code == 202
        client.delete(f"/v1/artifacts/{model.json()['id']}")  # the same bytes, declared with the next loss

"""The sample check at submission (service/artifacts/sample_fit.py): one training step of the uploaded
model on the named sample before a job is queued, cached per pair; and training.ignore_index end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.artifacts import sample_fit
from service.config import Settings
from tests.helpers import make_worker, wait_for_job
from tests.multi_input_models import SEQ, classifier_archive, text_data


@pytest.fixture(autouse=True)
def _fresh_verdicts() -> None:
    sample_fit.clear_cache()


def _upload(client: TestClient, path: Path, kind: str, **fields: str) -> dict:
    with path.open("rb") as handle:
        response = client.post(
            "/v1/artifacts",
            data={"kind": kind, **fields},
            files={"file": (path.name, handle, "application/zip")},
        )
    assert response.status_code in (200, 201), response.text
    return response.json()


def _sample(client: TestClient, tmp_path: Path, name: str, **arrays: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue())
    return _upload(client, path, "sample")["id"]


def _request(model_id: str, sample_id: str, **training: object) -> dict:
    return {
        "model": {"artifact_id": model_id},
        "dataset": {"size": 2048, "sample_id": sample_id},
        "training": {"optimizer": "adam", "learning_rate": 0.001, **training},
        "memory_budget_bytes": 16 * 2**20,
        "time_budget_s": 5,
    }


def test_a_sample_only_a_training_step_can_refuse_is_a_422_before_any_job(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _upload(client, classifier_archive(), "model", loss="cross_entropy")
    assert [i["name"] for i in model["meta"]["config"]["inputs"]] == ["input_ids", "attention_mask"]
    data = text_data(64)
    # Per-position targets for a model with one label per example: the stored config knows the logits
    # are [4] per example, so the description check already names it ...
    per_position = _sample(
        client, tmp_path, "pos.npz", **{**data, "y": np.repeat(data["y"][:, None], SEQ, 1)}
    )
    refused = client.post("/v1/recommendations", json=_request(model["id"], per_position))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "sample_mismatch"
    assert "y has per-example shape [8] and dtype int64" in refused.json()["error"]["message"]

    # A sample that fits: checked by one step in a subprocess, once per (model, sample, loss, ignore_index).
    runs: list[str] = []
    original = sample_fit._run
    monkeypatch.setattr(
        sample_fit, "_run", lambda check, **kw: runs.append(check.sample_id) or original(check, **kw)
    )
    good = _sample(client, tmp_path, "good.npz", **data)
    accepted = client.post("/v1/recommendations", json=_request(model["id"], good))
    assert accepted.status_code == 202, accepted.text
    assert runs == [good]
    other = client.post("/v1/recommendations", json=_request(model["id"], good, reference_batch_size=16))
    assert other.status_code == 202 and other.json()["id"] != accepted.json()["id"]
    assert runs == [good]  # the same pair, loss and ignore_index: the cached verdict, no second process

    listed = client.get("/v1/recommendations").json()
    assert len(listed["items"]) == 2  # the refused request queued nothing


def _ambiguous(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Targets padded with 9 (meant as ignore_index) and some class 5, which this 4-class model lacks:
    the stored range [0, 9] cannot tell 5 apart when 9 is ignored, the data can."""
    labels = np.where(np.arange(64) % 8 == 1, 9, np.where(np.arange(64) % 8 == 2, 5, data["y"]))
    return {**data, "y": labels}


def test_the_step_check_refuses_what_the_descriptions_cannot_see(client: TestClient, tmp_path: Path) -> None:
    model = _upload(client, classifier_archive(), "model", loss="cross_entropy")
    data = text_data(64)
    sample = _sample(client, tmp_path, "ambiguous.npz", **_ambiguous(data))
    refused = client.post("/v1/recommendations", json=_request(model["id"], sample, ignore_index=9))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "sample_mismatch", refused.text
    assert "class ids in [0, 5]" in refused.json()["error"]["message"]

    padded = _sample(
        client, tmp_path, "padded.npz", **{**data, "y": np.where(np.arange(64) % 8 == 1, 9, data["y"])}
    )
    assert client.post("/v1/recommendations", json=_request(model["id"], padded)).status_code == 422
    ignored = client.post("/v1/recommendations", json=_request(model["id"], padded, ignore_index=9))
    assert ignored.status_code == 202, ignored.text
    assert ignored.json()["request"]["training"]["ignore_index"] == 9
    good = _sample(client, tmp_path, "good.npz", **data)
    plain = client.post("/v1/recommendations", json=_request(model["id"], good))
    assert plain.status_code == 202 and plain.json()["request"]["training"]["ignore_index"] == -100
    with_index = client.post("/v1/recommendations", json=_request(model["id"], good, ignore_index=9))
    assert with_index.json()["fingerprint"] != plain.json()["fingerprint"]  # part of the fingerprint


def test_a_check_that_cannot_run_does_not_block_and_the_probe_checks_at_its_start(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sample_fit._run

    def hurried(check: sample_fit.FitCheck, *, settings: Settings) -> str | None:
        return original(check, settings=settings.model_copy(update={"artifact_dry_run_timeout_s": 0.01}))

    app = create_app(settings, run_worker=False)  # the test runs the job itself (make_worker)
    with TestClient(app) as client:
        model = _upload(client, classifier_archive(), "model", loss="cross_entropy")
        sample = _sample(client, tmp_path, "ambiguous.npz", **_ambiguous(text_data(64)))
        monkeypatch.setattr(sample_fit, "_run", hurried)
        job = client.post("/v1/recommendations", json=_request(model["id"], sample, ignore_index=9))
        assert job.status_code == 202, job.text  # no verdict within 0.01 s: queued, not refused
        assert make_worker(app).run_next()
        done = wait_for_job(client, job.json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_sample"
    assert "class ids in [0, 5]" in done["error"]["message"]


def test_ignore_index_applies_to_built_in_models_too_and_is_documented(
    client: TestClient, tmp_path: Path
) -> None:
    padded = np.arange(16, dtype=np.int64) % 10
    padded[::4] = 99  # padding targets, not a class of a 10-class MLP
    sample = _sample(client, tmp_path, "digits.npz", x=np.zeros((16, 64), np.float32), y=padded)
    zoo = {"model": {"name": "mlp"}, "dataset": {"sample_id": sample}}
    refused = client.post("/v1/recommendations", json=zoo)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "sample_mismatch"
    accepted = client.post("/v1/recommendations", json={**zoo, "training": {"ignore_index": 99}})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["request"]["training"]["ignore_index"] == 99
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainingSpec"]["properties"]
    assert (
        schema["ignore_index"]["default"] == -100
        and "left out of the loss" in schema["ignore_index"]["description"]
    )

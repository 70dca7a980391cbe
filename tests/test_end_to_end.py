"""A real probe, end to end: POST → the in-process worker runs the probe subprocess → GET the result."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.helpers import wait_for_job

TINY_MLP = {
    "model": {"name": "mlp", "config": {"hidden_dims": [32]}},
    "dataset": {"size": 4096},
    "training": {"optimizer": "adam", "learning_rate": 0.001, "reference_batch_size": 32},
    "memory_budget_bytes": 4 * 2**20,
    "objective": "max_feasible",
    "time_budget_s": 30,
}


def test_a_real_probe_finds_a_verified_maximum_and_stores_every_trial(settings: Settings) -> None:
    with TestClient(create_app(settings, run_worker=True)) as client:
        job = client.post("/v1/recommendations", json=TINY_MLP).json()
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        result = done["result"]
        maximum = result["max_feasible_batch_size"]
        assert 1 <= maximum <= TINY_MLP["dataset"]["size"]
        assert result["max_feasible_batch_size_aligned"] <= maximum
        assert result["max_feasible_batch_size_aligned"] % 8 == 0 or maximum < 8
        assert result["memory"]["budget_bytes"] == TINY_MLP["memory_budget_bytes"]
        assert result["device"]["type"] == "cpu"

        trials = client.get(f"/v1/recommendations/{job['id']}/trials").json()
        memory_trials = [t for t in trials if t["phase"] == "memory"]
        assert 2 <= len(memory_trials) <= 6
        # The answer was verified by a real step that fitted, and nothing that failed is recommended.
        fitted = {t["batch_size"] for t in memory_trials if t["outcome"] == "ok"}
        failed = {t["batch_size"] for t in memory_trials if t["outcome"] != "ok"}
        assert maximum in fitted
        assert all(size > maximum for size in failed)
        assert all(
            t["peak_bytes"] <= TINY_MLP["memory_budget_bytes"] for t in memory_trials if t["outcome"] == "ok"
        )
        assert done["progress"]["trials_done"] == len(trials)

        # The same request again is answered from storage.
        cached = client.post("/v1/recommendations", json=TINY_MLP)
        assert cached.status_code == 200 and cached.json()["id"] == job["id"]


def test_a_batch_of_one_that_does_not_fit_fails_the_job_with_a_reason(settings: Settings) -> None:
    # Above the weights+grads+state floor the API checks, but far below one sample's activations.
    request = {
        "model": {"name": "resnet", "config": {"width": 8, "image_size": 32}},
        "training": {"optimizer": "sgd"},
        "memory_budget_bytes": 2_300_000,
        "time_budget_s": 20,
    }
    with TestClient(create_app(settings, run_worker=True)) as client:
        response = client.post("/v1/recommendations", json=request)
        assert response.status_code == 202, response.text
        failed = wait_for_job(client, response.json()["id"])
        assert failed["status"] == "failed"
        assert failed["error"]["code"] in {"oom_at_min_batch", "budget_below_model"}
        assert "batch" in failed["error"]["message"] or "budget" in failed["error"]["message"]
        assert client.get("/healthz").status_code == 200

"""The /v1/recommendations contract: status codes, field names, caching, errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.schemas import RecommendationCreate
from tests.helpers import finish_job

MLP = {"model": {"name": "mlp"}}


def test_post_queues_a_job_with_the_contract_fields(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json=MLP)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert len(body["fingerprint"]) == 64
    assert response.headers["location"] == f"/v1/recommendations/{body['id']}"
    assert body["progress"] == {"phase": None, "trials_done": 0, "trials_planned": 0}
    # The stored request is canonical: every default is filled in, so it can be replayed exactly.
    request = body["request"]
    assert request["model"]["config"]["input_dim"] == 64
    assert request["training"] == {
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "reference_batch_size": 32,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "momentum": 0.9,
        "nesterov": False,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "epochs": None,
        "target_loss": None,
        "ignore_index": -100,
        "loop": "pytorch",
        "prefetch_batches": 0,
    }
    assert request["input"]["shape"] == [64]
    assert request["device"]["type"] == "cpu"

    fetched = client.get(f"/v1/recommendations/{body['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["id"] == body["id"]
    assert set(fetched.json()) >= {
        "id", "status", "fingerprint", "progress", "request", "result", "error",
        "created_at", "started_at", "finished_at",
    }  # fmt: skip


def test_identical_requests_share_one_job_and_cached_results_come_back_200(client: TestClient) -> None:
    first = client.post("/v1/recommendations", json=MLP).json()
    again = client.post("/v1/recommendations", json={**MLP, "dataset": {"size": 50000}})
    assert again.status_code == 202 and again.json()["id"] == first["id"]

    finish_job(client, first["id"], {"max_feasible_batch_size": 123})
    cached = client.post("/v1/recommendations", json=MLP)
    assert cached.status_code == 200
    assert cached.json()["id"] == first["id"]
    assert cached.json()["result"] == {"max_feasible_batch_size": 123}

    forced = client.post("/v1/recommendations", json={**MLP, "force": True})
    assert forced.status_code == 202
    assert forced.json()["id"] != first["id"]
    assert forced.json()["fingerprint"] == first["fingerprint"]


def test_a_repeated_succeeded_request_is_answered_from_memory(client: TestClient, monkeypatch) -> None:
    from service.recommendations import service as use_cases

    first = client.post("/v1/recommendations", json=MLP).json()
    finish_job(client, first["id"], {"max_feasible_batch_size": 123})
    from_database = client.post("/v1/recommendations", json=MLP)
    assert from_database.status_code == 200

    def no_lookup(**_: object) -> None:
        raise AssertionError("the memoised answer should not reach the database")

    monkeypatch.setattr(use_cases, "create_recommendation", no_lookup)
    from_memory = client.post("/v1/recommendations", json=MLP)
    assert from_memory.status_code == 200
    assert from_memory.content == from_database.content
    assert from_memory.headers["location"] == f"/v1/recommendations/{first['id']}"

    # An expired entry, and any `force`d request, go back to the use case (here: the stub that fails).
    memo = client.app.state.batchsize.answered_requests
    key = use_cases.answer_key(RecommendationCreate.model_validate(MLP))
    assert memo.get(key) is not None
    memo.put(key, (first["id"], 0.0))
    with pytest.raises(AssertionError, match="memoised"):
        client.post("/v1/recommendations", json=MLP)
    memo.put(key, (first["id"], float("inf")))
    with pytest.raises(AssertionError, match="memoised"):
        client.post("/v1/recommendations", json={**MLP, "force": True})
    assert memo.get(key) is None


def test_requests_that_reference_artifacts_are_never_memoised() -> None:
    from service.recommendations.service import answer_key

    assert answer_key(RecommendationCreate.model_validate(MLP)) is not None
    assert answer_key(RecommendationCreate.model_validate({**MLP, "force": True})) == answer_key(
        RecommendationCreate.model_validate(MLP)
    )
    with_sample = {**MLP, "dataset": {"size": 100, "sample_id": "a" * 64}}
    assert answer_key(RecommendationCreate.model_validate(with_sample)) is None
    assert answer_key(RecommendationCreate.model_validate({"model": {"artifact_id": "b" * 64}})) is None


def test_a_different_request_gets_a_different_fingerprint(client: TestClient) -> None:
    a = client.post("/v1/recommendations", json=MLP).json()
    b = client.post("/v1/recommendations", json={**MLP, "training": {"optimizer": "adam"}}).json()
    assert a["fingerprint"] != b["fingerprint"]


def test_list_filters_and_paginates(client: TestClient) -> None:
    ids = [
        client.post("/v1/recommendations", json={**MLP, "dataset": {"size": size}}).json()["id"]
        for size in (1000, 2000, 3000)
    ]
    client.post("/v1/recommendations", json={"model": {"name": "gpt", "config": {"n_layer": 1}}})
    page = client.get("/v1/recommendations", params={"model": "mlp", "limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    assert [item["id"] for item in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/recommendations", params={"model": "mlp", "limit": 2, "offset": 2}).json()
    assert [item["id"] for item in rest["items"]] == [ids[0]]
    assert client.get("/v1/recommendations", params={"status": "succeeded"}).json()["total"] == 0
    assert client.get("/v1/recommendations", params={"status": "bogus"}).status_code == 422


def test_cancel_a_queued_job_then_cancel_again_is_a_conflict(client: TestClient) -> None:
    job = client.post("/v1/recommendations", json=MLP).json()
    cancelled = client.delete(f"/v1/recommendations/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.delete(f"/v1/recommendations/{job['id']}")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]["message"]
    # A cancelled job does not block a new identical request.
    assert client.post("/v1/recommendations", json=MLP).json()["id"] != job["id"]


def test_unknown_ids_are_404_with_the_error_envelope(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/recommendations/nope"),
        ("GET", "/v1/recommendations/nope/trials"),
        ("DELETE", "/v1/recommendations/nope"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
        assert "nope" in response.json()["error"]["message"]


def test_trials_of_a_new_job_are_empty(client: TestClient) -> None:
    job = client.post("/v1/recommendations", json=MLP).json()
    assert client.get(f"/v1/recommendations/{job['id']}/trials").json() == []


def _error(client: TestClient, body: object) -> dict:
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422, response.text
    return response.json()["error"]


def test_bad_input_gets_a_clear_422(client: TestClient) -> None:
    assert _error(client, {"model": {"name": "vgg"}})["code"] == "unknown_model"
    assert "mlp" in _error(client, {"model": {"name": "vgg"}})["message"]

    bad_field = _error(client, {"model": {"name": "mlp", "config": {"hidden": 3}}})
    assert bad_field["code"] == "invalid_model_config" and "hidden" in bad_field["message"]

    bad_value = _error(client, {"model": {"name": "gpt", "config": {"n_embd": 130, "n_head": 4}}})
    assert bad_value["code"] == "invalid_model_config" and "n_embd" in bad_value["message"]

    size = _error(client, {**MLP, "dataset": {"size": 0}})
    assert size["code"] == "validation_error" and "dataset.size" in size["message"]
    assert _error(client, {**MLP, "dataset": {"size": -5}})["details"][0]["field"] == "dataset.size"

    assert _error(client, {**MLP, "colour": "red"})["details"][0]["field"] == "colour"
    assert _error(client, {})["details"][0]["field"] == "model"
    assert _error(client, {"model": {}})["code"] == "validation_error"
    assert _error(client, {**MLP, "training": {"optimizer": "lbfgs"}})["details"][0]["field"] == (
        "training.optimizer"
    )
    assert _error(client, {**MLP, "time_budget_s": 10**9})["code"] == "time_budget_too_large"

    shape = _error(client, {**MLP, "input": {"shape": [3, 32, 32]}})
    assert shape["code"] == "input_shape_mismatch" and "[64]" in shape["message"]
    assert (
        _error(client, {**MLP, "training": {"gradient_checkpointing": True}})["code"] == "unsupported_option"
    )
    assert _error(client, {**MLP, "device": {"type": "cuda"}})["code"] == "target_memory_required"
    assert _error(client, {"model": {"artifact_id": "abc"}})["code"] == "unknown_artifact"
    assert _error(client, {**MLP, "dataset": {"size": 10, "sample_id": "nope"}})["code"] == "unknown_sample"


def test_budgets_the_device_or_the_model_cannot_meet_are_refused(client: TestClient) -> None:
    device = client.get("/v1/device").json()
    too_big = _error(client, {**MLP, "memory_budget_bytes": device["memory_bytes"] + 1})
    assert too_big["code"] == "budget_exceeds_device"
    too_small = _error(client, {"model": {"name": "gpt"}, "memory_budget_bytes": 1000})
    assert too_small["code"] == "budget_below_model"
    assert "bytes" in too_small["message"]
    # A target device with its own memory is checked against that memory instead of the host's.
    target = {"type": "cuda", "name": "H100", "memory_bytes": 80 * 2**30}
    accepted = client.post(
        "/v1/recommendations", json={**MLP, "device": target, "memory_budget_bytes": 2**30}
    )
    assert accepted.status_code == 202
    assert accepted.json()["request"]["device"]["memory_bytes"] == 80 * 2**30


def test_malformed_json_and_oversized_bodies_are_4xx(client: TestClient) -> None:
    malformed = client.post(
        "/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    huge = client.post(
        "/v1/recommendations", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "payload_too_large"

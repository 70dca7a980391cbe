"""A time budget too small for any verified answer is refused before a job is queued, naming the least."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

GPT2_SMALL = {"name": "gpt", "config": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}}


def test_a_hopeless_time_budget_is_refused_naming_the_least_useful_one(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json={"model": GPT2_SMALL, "time_budget_s": 10})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "time_budget_too_small"
    least = int(re.search(r"at least (\d+) s", error["message"]).group(1))
    assert least > 10 and "time_budget_s" in error["message"]
    assert client.get("/v1/recommendations").json()["items"] == []  # nothing was queued
    accepted = client.post("/v1/recommendations", json={"model": GPT2_SMALL, "time_budget_s": least})
    assert accepted.status_code == 202, accepted.text


def test_small_models_keep_small_budgets(client: TestClient) -> None:
    assert (
        client.post("/v1/recommendations", json={"model": {"name": "mlp"}, "time_budget_s": 3}).status_code
        == 202
    )
    tiny = client.post("/v1/recommendations", json={"model": {"name": "mlp"}, "time_budget_s": 1.5})
    assert tiny.status_code == 422 and tiny.json()["error"]["code"] == "time_budget_too_small"

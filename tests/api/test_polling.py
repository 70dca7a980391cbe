"""Cached reads of finished jobs answered before routing: same bytes, same auth, same logs and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import recommendations as use_cases
from service.api import recommendations as routes
from service.app import create_app
from service.config import Settings
from tests.api.test_recommendations import MLP, _finish

KEY = "polling-key-0123456789"


def _finished_job(client: TestClient, headers: dict | None = None) -> str:
    job_id = client.post("/v1/recommendations", json=MLP, headers=headers).json()["id"]
    _finish(client, job_id, {"max_feasible_batch_size": 7})
    return job_id


def _fail_if_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    def routed(*_: object, **__: object) -> None:
        raise AssertionError("the read reached the route")

    monkeypatch.setattr(routes, "_read_job_json", routed)
    monkeypatch.setattr(use_cases, "get_recommendation", routed)


def test_a_finished_job_is_read_from_the_cache_before_routing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _finished_job(client)
    first = client.get(f"/v1/recommendations/{job_id}")  # routed: fills the cache
    assert first.status_code == 200 and first.json()["result"] == {"max_feasible_batch_size": 7}
    _fail_if_routed(monkeypatch)
    again = client.get(f"/v1/recommendations/{job_id}", headers={"X-Request-ID": "poll-1"})
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["content-type"] == "application/json"
    assert again.headers["x-request-id"] == "poll-1"
    metrics = client.get("/metrics").text
    assert f'route="{routes.JOB_PATH}"' in metrics
    assert routes.JOB_PATH in client.app.openapi()["paths"]  # the constant names the real route


def test_other_paths_and_misses_go_through_the_app(client: TestClient) -> None:
    job_id = _finished_job(client)
    client.get(f"/v1/recommendations/{job_id}")
    assert client.get(f"/v1/recommendations/{job_id}/trials").json() == []  # a sub-resource: routed
    missing = client.get("/v1/recommendations/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/recommendations/" + "x" * 65).status_code == 422  # validation still applies


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", probe_device="cpu", api_key=KEY, _env_file=None)
    with TestClient(create_app(settings, run_worker=False)) as client:
        yield client


def test_the_cache_never_skips_the_api_key(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"X-API-Key": KEY}
    job_id = _finished_job(keyed, good)
    assert keyed.get(f"/v1/recommendations/{job_id}", headers=good).status_code == 200  # cached now
    assert keyed.get(f"/v1/recommendations/{job_id}").json()["error"]["code"] == "missing_api_key"
    wrong = keyed.get(f"/v1/recommendations/{job_id}", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "wrong_api_key"
    _fail_if_routed(monkeypatch)
    assert keyed.get(f"/v1/recommendations/{job_id}", headers=good).status_code == 200

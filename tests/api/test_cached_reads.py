"""Cached reads of finished jobs and repeated request bodies answered before routing: same bytes, same
auth, same logs and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import cached_reads
from service.app import create_app
from service.config import Settings
from service.recommendations import routes
from service.recommendations import service as use_cases
from service.schemas import RecommendationCreate
from tests.helpers import finish_job

MLP = {"model": {"name": "mlp"}}
KEY = "cached-reads-key-0123456789"


def _finished_job(client: TestClient, headers: dict | None = None) -> str:
    job_id = client.post("/v1/recommendations", json=MLP, headers=headers).json()["id"]
    finish_job(client, job_id, {"max_feasible_batch_size": 7})
    return job_id


def _fail_if_routed(monkeypatch: pytest.MonkeyPatch, method: str = "GET") -> None:
    """Make what the route would call for a `method` request raise: a fast-path answer never calls it."""

    def routed(*_: object, **__: object) -> None:
        raise AssertionError(f"the {method} request reached the route")

    called = {"GET": ((routes, "_read_job_json"), (use_cases, "get_recommendation")),
              "POST": ((use_cases, "answer_key"), (use_cases, "create_recommendation"))}  # fmt: skip
    for owner, name in called[method]:
        monkeypatch.setattr(owner, name, routed)


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
    for wrong_key, code in (("nope", "wrong_api_key"), ("", "missing_api_key")):  # as tests/test_auth.py
        wrong = keyed.get(f"/v1/recommendations/{job_id}", headers={"X-API-Key": wrong_key})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == code
    _fail_if_routed(monkeypatch)
    assert keyed.get(f"/v1/recommendations/{job_id}", headers=good).status_code == 200


def test_a_repeated_request_body_is_answered_before_routing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _finished_job(client)
    body = json.dumps(MLP).encode()
    headers = {"content-type": "application/json"}
    routed = client.post("/v1/recommendations", content=body, headers=headers)  # remembers these bytes
    assert routed.status_code == 200 and routed.json()["id"] == job_id
    _fail_if_routed(monkeypatch, "POST")
    again = client.post("/v1/recommendations", content=body, headers={**headers, "X-Request-ID": "post-1"})
    assert again.status_code == 200 and again.content == routed.content
    assert again.headers["location"] == routed.headers["location"] == f"/v1/recommendations/{job_id}"
    assert again.headers["x-request-id"] == "post-1"
    assert f'route="{cached_reads.COLLECTION}",status="200"' in client.get("/metrics").text
    assert cached_reads.COLLECTION in client.app.openapi()["paths"]  # the constant names the real route


def test_other_bytes_force_and_expired_answers_go_through_the_app(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _finished_job(client)
    body = json.dumps(MLP).encode()
    headers = {"content-type": "application/json"}
    assert client.post("/v1/recommendations", content=body, headers=headers).status_code == 200
    key = use_cases.answer_key(RecommendationCreate.model_validate(MLP))
    _fail_if_routed(monkeypatch, "POST")
    with pytest.raises(AssertionError, match="reached the route"):  # same request, other bytes
        client.post("/v1/recommendations", content=json.dumps(MLP, indent=1).encode(), headers=headers)
    with pytest.raises(AssertionError, match="reached the route"):  # force is never answered from memory
        client.post("/v1/recommendations", json={**MLP, "force": True})
    state = client.app.state.batchsize
    state.answered_requests.put(key, (state.answered_requests.get(key)[0], 0.0))  # the trust ran out
    with pytest.raises(AssertionError, match="reached the route"):
        client.post("/v1/recommendations", content=body, headers=headers)


def test_a_body_read_for_the_memo_reaches_the_app_whole(client: TestClient) -> None:
    job_id = _finished_job(client)
    headers = {"content-type": "application/json"}
    padded = (json.dumps(MLP) + " " * cached_reads.MEMO_BODY_LIMIT).encode()  # too big to memoise: passed on
    for _ in range(2):
        answer = client.post("/v1/recommendations", content=padded, headers=headers)
        assert answer.status_code == 200 and answer.json()["id"] == job_id
    body = json.dumps(MLP).encode()
    for _ in range(2):  # read, digested and replayed to the app; the second time answered before it
        assert client.post("/v1/recommendations", content=body, headers=headers).json()["id"] == job_id
    bad = client.post("/v1/recommendations", content=b"{not json", headers=headers)
    assert bad.status_code == 422
    assert client.post("/v1/recommendations", json={**MLP, "dataset": {"size": 0}}).status_code == 422
    assert len(client.app.state.batchsize.request_keys) == 1  # the small body only


def test_a_repeated_body_still_needs_the_api_key(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"X-API-Key": KEY, "content-type": "application/json"}
    _finished_job(keyed, good)
    body = json.dumps(MLP).encode()
    assert keyed.post("/v1/recommendations", content=body, headers=good).status_code == 200
    _fail_if_routed(monkeypatch, "POST")
    refused = keyed.post("/v1/recommendations", content=body, headers={"content-type": "application/json"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    assert keyed.post("/v1/recommendations", content=body, headers=good).status_code == 200

"""Request ids, structured logs and Prometheus metrics."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.observability import JsonFormatter, RequestIdFilter, configure_logging
from service.probing.spec import ProbeError, ProbeSpec
from service.worker import Worker

MLP = {"model": {"name": "mlp", "config": {"hidden_dims": [16]}}, "time_budget_s": 5}


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, as JSON lines (the production formatter and filter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- request ids ---------------------------------------------------------------------------------


def test_a_request_id_is_made_when_none_is_sent(client: TestClient) -> None:
    first = client.get("/healthz").headers["x-request-id"]
    second = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_the_clients_request_id_comes_back_on_every_kind_of_response(client: TestClient) -> None:
    rid = "pipeline-42.step:7"
    for path in ("/healthz", "/v1/recommendations/nope", "/no/such/path"):
        assert client.get(path, headers={"X-Request-ID": rid}).headers["x-request-id"] == rid
    invalid = client.post("/v1/recommendations", json={"model": {}}, headers={"X-Request-ID": rid})
    assert invalid.status_code == 422 and invalid.headers["x-request-id"] == rid
    too_big = client.post(
        "/v1/recommendations",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers={"X-Request-ID": rid, "content-type": "application/json"},
    )
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == rid


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "new\\nline", "<script>", ""])
def test_an_unsafe_request_id_is_replaced(client: TestClient, bad: str) -> None:
    sent = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", sent)


def test_every_log_line_of_a_request_carries_its_id(client: TestClient, log_lines: io.StringIO) -> None:
    logger = logging.getLogger("service.test_route")

    def noisy() -> dict:  # a sync route runs in a thread pool: the id must follow it there
        logger.info("inside the handler")
        logger.warning("a second line", extra={"job_id": "abc"})
        return {"ok": True}

    client.app.add_api_route("/test-noisy", noisy)
    client.app.middleware_stack = client.app.build_middleware_stack()
    assert client.get("/test-noisy", headers={"X-Request-ID": "req-1"}).status_code == 200
    client.get("/healthz", headers={"X-Request-ID": "req-2"})

    records = _records(log_lines)
    mine = [r for r in records if r["request_id"] == "req-1"]
    assert [r["message"] for r in mine][:2] == ["inside the handler", "a second line"]
    assert mine[1]["job_id"] == "abc" and mine[1]["level"] == "warning"
    access = [r for r in records if r["logger"] == "batchsize.access"]
    assert {(r["request_id"], r["route"], r["status"]) for r in access} == {
        ("req-1", "/test-noisy", 200),
        ("req-2", "/healthz", 200),
    }
    assert all({"ts", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    assert all(r["duration_ms"] >= 0 and r["method"] == "GET" for r in access)


def test_configure_logging_formats(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "info")
        logging.getLogger("uvicorn.error").warning("from uvicorn")  # (other tests may set its level)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("x").exception("it failed")
        json_lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert json_lines[0]["logger"] == "uvicorn.error" and json_lines[0]["message"] == "from uvicorn"
        assert "ValueError: boom" in json_lines[1]["exception"]

        configure_logging("text", "warning")
        logging.getLogger("x").info("hidden")
        logging.getLogger("x").warning("shown")
        assert capsys.readouterr().err.strip().endswith("WARNING x [None]: shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    client.get("/v1/recommendations/aaa")
    client.get("/v1/recommendations/bbb")
    client.get("/v1/models")
    client.get("/definitely/not/a/route")
    samples = _samples(client)
    key = ("method", "GET"), ("route", "/v1/recommendations/{recommendation_id}"), ("status", "404")
    assert samples[("batchsize_http_requests_total", key)] == 2
    models = ("method", "GET"), ("route", "/v1/models"), ("status", "200")
    assert samples[("batchsize_http_requests_total", models)] == 1
    unmatched = ("method", "GET"), ("route", "<unmatched>"), ("status", "404")
    assert samples[("batchsize_http_requests_total", unmatched)] == 1
    assert not any("aaa" in str(labels) for _, labels in samples)  # raw paths never become labels
    latency = ("method", "GET"), ("route", "/v1/recommendations/{recommendation_id}")
    assert samples[("batchsize_http_request_duration_seconds_count", latency)] == 2


def test_metrics_report_jobs_by_status_from_the_database(client: TestClient) -> None:
    for size in (1000, 2000, 3000):
        assert client.post("/v1/recommendations", json={**MLP, "dataset": {"size": size}}).status_code == 202
    job = client.post("/v1/recommendations", json=MLP).json()
    client.delete(f"/v1/recommendations/{job['id']}")
    samples = _samples(client)
    assert samples[("batchsize_jobs", (("status", "queued"),))] == 3
    assert samples[("batchsize_jobs", (("status", "cancelled"),))] == 1
    assert samples[("batchsize_jobs", (("status", "succeeded"),))] == 0


def test_metrics_count_probe_durations_and_trials(client: TestClient) -> None:
    state = client.app.state.batchsize

    def fake_probe(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict:
        on_event({"event": "phase", "phase": "memory", "trials_planned": 3})
        for batch_size, outcome in [(8, "ok"), (64, "ok"), (512, "oom")]:
            on_event({"event": "trial", "phase": "memory", "batch_size": batch_size, "outcome": outcome})
        return {"max_feasible_batch_size": 64}

    def failing_probe(spec: ProbeSpec, **_: Any) -> dict:
        raise ProbeError("model_error", "the model raised")

    for probe, size in ((fake_probe, 1000), (failing_probe, 2000)):
        client.post("/v1/recommendations", json={**MLP, "dataset": {"size": size}})
        worker = Worker(
            settings=state.settings, sessions=state.writes, host=state.host, run_probe=probe,
            metrics=client.app.state.metrics,
        )  # fmt: skip
        assert worker.run_next()
    samples = _samples(client)
    assert samples[("batchsize_probe_trials_total", (("outcome", "ok"), ("phase", "memory")))] == 2
    assert samples[("batchsize_probe_trials_total", (("outcome", "oom"), ("phase", "memory")))] == 1
    assert samples[("batchsize_probe_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert samples[("batchsize_probe_duration_seconds_count", (("outcome", "model_error"),))] == 1
    assert samples[("batchsize_jobs", (("status", "failed"),))] == 1
    assert samples[("batchsize_jobs", (("status", "succeeded"),))] == 1


def test_each_app_has_its_own_registry(client: TestClient, settings: Any) -> None:
    from service.app import create_app

    other = create_app(settings, run_worker=False)
    assert other.state.metrics.registry is not client.app.state.metrics.registry

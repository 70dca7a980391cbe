"""The worker: claims, progress, failures, cancellation and recovery after a dead worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import repository
from service.db.session import session_scope
from service.probing.spec import ProbeError, ProbeSpec
from tests.helpers import make_worker

MLP = {"model": {"name": "mlp"}, "time_budget_s": 30}


def _fake_probe(spec: ProbeSpec, *, on_event: Any, timeout_s: float, should_cancel: Any) -> dict:
    assert spec.model_name == "mlp" and spec.device == "cpu" and timeout_s > spec.time_budget_s
    on_event({"event": "phase", "phase": "memory", "trials_planned": 2})
    for batch_size, outcome in [(64, "ok"), (512, "oom")]:
        on_event({"event": "trial", "phase": "memory", "batch_size": batch_size, "outcome": outcome,
                  "peak_bytes": batch_size * 1000, "step_time_s": 0.01, "samples_per_second": None,
                  "detail": {}})  # fmt: skip
    return {"max_feasible_batch_size": 64}


def test_worker_runs_a_job_and_records_trials_and_result(client: TestClient) -> None:
    job = client.post("/v1/recommendations", json=MLP).json()
    assert make_worker(client.app, _fake_probe).run_next() is True

    done = client.get(f"/v1/recommendations/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert done["result"] == {"max_feasible_batch_size": 64}
    assert done["progress"] == {"phase": "done", "trials_done": 2, "trials_planned": 2}
    assert done["started_at"] and done["finished_at"]
    trials = client.get(f"/v1/recommendations/{job['id']}/trials").json()
    assert [(t["index"], t["batch_size"], t["outcome"]) for t in trials] == [(0, 64, "ok"), (1, 512, "oom")]
    assert make_worker(client.app, _fake_probe).run_next() is False  # queue empty


def test_a_failing_probe_fails_the_job_with_its_reason(client: TestClient) -> None:
    def failing(spec: ProbeSpec, **_: Any) -> dict:
        raise ProbeError("oom_at_min_batch", "batch size 1 needs 3 GiB, over the 1 GiB budget")

    job = client.post("/v1/recommendations", json=MLP).json()
    make_worker(client.app, failing).run_next()
    failed = client.get(f"/v1/recommendations/{job['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "oom_at_min_batch",
        "message": "batch size 1 needs 3 GiB, over the 1 GiB budget",
    }


def test_an_unexpected_exception_fails_the_job_and_the_worker_goes_on(client: TestClient) -> None:
    def broken(spec: ProbeSpec, **_: Any) -> dict:
        raise ZeroDivisionError("boom")

    first = client.post("/v1/recommendations", json=MLP).json()
    second = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 31}).json()
    worker = make_worker(client.app, broken)
    worker.run_next()
    worker.run_next()
    for job in (first, second):
        body = client.get(f"/v1/recommendations/{job['id']}").json()
        assert body["status"] == "failed" and "boom" in body["error"]["message"]


def test_cancelling_a_running_job_stops_its_probe(client: TestClient) -> None:
    started = threading.Event()

    def slow(spec: ProbeSpec, *, on_event: Any, timeout_s: float, should_cancel: Any) -> dict:
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if should_cancel():
                raise ProbeError("cancelled", "cancelled by request")
            time.sleep(0.05)
        raise AssertionError("the probe was never told to stop")

    job = client.post("/v1/recommendations", json=MLP).json()
    thread = threading.Thread(target=make_worker(client.app, slow).run_next)
    thread.start()
    assert started.wait(5)
    assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "running"
    assert client.delete(f"/v1/recommendations/{job['id']}").status_code == 200
    thread.join(10)
    assert not thread.is_alive()
    assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "cancelled"


def test_a_job_left_running_by_a_dead_worker_is_requeued_and_finished(client: TestClient) -> None:
    state = client.app.state.batchsize
    job = client.post("/v1/recommendations", json=MLP).json()
    import socket

    with session_scope(state.writes) as session:
        claimed = repository.claim_next_queued(session, worker_id=f"{socket.gethostname()}:999999999:dead")
        assert claimed is not None
        repository.add_trial(session, job["id"], {"phase": "memory", "batch_size": 8, "outcome": "ok"})
    assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "running"

    worker = make_worker(client.app, _fake_probe)  # "restart": a new worker process on the same host
    assert worker.recover_orphans() == [job["id"]]
    assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "queued"
    worker.run_next()
    done = client.get(f"/v1/recommendations/{job['id']}").json()
    assert done["status"] == "succeeded"
    # The dead attempt's trial was dropped: no row duplicated.
    assert [t["batch_size"] for t in client.get(f"/v1/recommendations/{job['id']}/trials").json()] == [
        64,
        512,
    ]
    with session_scope(state.reads) as session:
        assert repository.get_recommendation(session, job["id"]).attempts == 2


def test_a_live_worker_elsewhere_keeps_its_job_until_its_heartbeat_goes_stale(client: TestClient) -> None:
    state = client.app.state.batchsize
    job = client.post("/v1/recommendations", json=MLP).json()
    with session_scope(state.writes) as session:
        repository.claim_next_queued(session, worker_id="other-host:1:abc")
    worker = make_worker(client.app, _fake_probe)
    assert worker.recover_orphans() == []
    worker.settings = worker.settings.model_copy(update={"stale_after_s": 0.001})
    time.sleep(0.01)
    assert worker.requeue_stale() == [job["id"]]


@pytest.mark.parametrize("code", ["timeout", "crashed"])
def test_probe_process_failures_end_as_failed(client: TestClient, code: str) -> None:
    def dies(spec: ProbeSpec, **_: Any) -> dict:
        raise ProbeError(code, f"probe {code}")

    job = client.post("/v1/recommendations", json=MLP).json()
    make_worker(client.app, dies).run_next()
    assert client.get(f"/v1/recommendations/{job['id']}").json()["error"]["code"] == code

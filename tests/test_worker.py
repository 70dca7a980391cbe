"""The worker: claims, progress, failures, cancellation and recovery after a dead worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import repository
from service.db.session import session_scope
from service.probing.spec import ProbeError, ProbeSpec
from service.recommendations.service import HostDevice
from service.worker import Worker
from tests.conftest import BOTH_DATABASES
from tests.helpers import make_worker, probe_children, wait_for_job

pytestmark = BOTH_DATABASES

MLP = {"model": {"name": "mlp"}, "time_budget_s": 30}
H100 = HostDevice(type="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, free_bytes=0, count=8)
A100 = HostDevice(type="cuda", name="NVIDIA A100-SXM4-40GB", memory_bytes=40 * 2**30, free_bytes=0, count=4)


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


# --- fleet: ownership, registration, routing by device --------------------------------------------


def test_a_worker_whose_job_went_stale_and_was_taken_cannot_write_to_it(client: TestClient) -> None:
    """A partitioned worker (alive but silent) loses its job to another; its late writes are dropped."""
    started, release = threading.Event(), threading.Event()

    def stalls(spec: ProbeSpec, *, on_event: Any, should_cancel: Any, **_: Any) -> dict:
        started.set()
        release.wait(10)
        on_event({"event": "trial", "phase": "memory", "batch_size": 999, "outcome": "ok"})
        return {"max_feasible_batch_size": 999}

    job = client.post("/v1/recommendations", json=MLP).json()
    slow = make_worker(client.app, stalls)
    thread = threading.Thread(target=slow.run_next)
    thread.start()
    assert started.wait(5)
    other = make_worker(client.app, _fake_probe)
    other.settings = other.settings.model_copy(update={"stale_after_s": 0.001})
    time.sleep(0.01)
    assert other.requeue_stale() == [job["id"]]
    assert other.run_next() is True
    release.set()
    thread.join(10)
    done = client.get(f"/v1/recommendations/{job['id']}").json()
    assert done["status"] == "succeeded" and done["result"] == {"max_feasible_batch_size": 64}
    trials = client.get(f"/v1/recommendations/{job['id']}/trials").json()
    assert [t["batch_size"] for t in trials] == [64, 512]  # not the stale worker's 999


def test_workers_register_their_device_and_leave_on_stop(client: TestClient) -> None:
    worker = make_worker(client.app, _fake_probe, host=H100)
    worker.start_in_thread()
    try:
        deadline = time.monotonic() + 10
        while not (listed := client.get("/v1/workers").json()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(listed) == 1
        assert listed[0]["id"] == worker.worker_id and listed[0]["alive"] is True
        assert listed[0]["device"] == {
            "type": "cuda",
            "name": "NVIDIA H100 80GB HBM3",
            "memory_bytes": 80 * 2**30,
            "count": 8,
        }
    finally:
        worker.stop()
    assert client.get("/v1/workers").json() == []


def _claimed_by(client: TestClient, body: dict, workers: list[Worker]) -> Worker | None:
    """Post `body`, let each worker in turn try to claim; the worker that ran it (None: nobody)."""
    job = client.post("/v1/recommendations", json=body).json()
    assert job["status"] == "queued", job
    for worker in workers:
        if worker.run_next():
            assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "succeeded"
            return worker
    return None


def _recording_probe(specs: list[ProbeSpec]) -> Any:
    def probe(spec: ProbeSpec, **_: Any) -> dict:
        specs.append(spec)
        return {"max_feasible_batch_size": 8}

    return probe


def test_a_request_naming_a_device_is_claimed_only_by_a_worker_that_has_it(client: TestClient) -> None:
    specs: list[ProbeSpec] = []
    cpu = make_worker(client.app, _recording_probe(specs))
    h100 = make_worker(client.app, _recording_probe(specs), host=H100)
    a100 = make_worker(client.app, _recording_probe(specs), host=A100)
    for worker in (cpu, h100, a100):
        worker.register()

    h100_request = {**MLP, "device": {"type": "cuda", "name": "*h100*", "memory_bytes": 80 * 2**30}}
    assert _claimed_by(client, h100_request, [cpu, a100, h100]) is h100
    assert specs[-1].device == "cuda" and specs[-1].target_device is None  # its own device: no extrapolation
    any_cuda_40g = {**MLP, "time_budget_s": 31, "device": {"type": "cuda", "memory_bytes": 40 * 2**30}}
    assert _claimed_by(client, any_cuda_40g, [cpu, a100]) is a100
    cpu_request = {**MLP, "time_budget_s": 32, "device": {"type": "cpu"}}
    assert _claimed_by(client, cpu_request, [h100, a100, cpu]) is cpu
    # Naming no device: the first free worker takes it, and probes for its own device.
    assert _claimed_by(client, {**MLP, "time_budget_s": 33}, [a100, cpu]) is a100
    assert specs[-1].device == "cuda" and specs[-1].target_device is None


def test_extrapolation_only_when_allowed_and_no_worker_has_the_device(client: TestClient) -> None:
    specs: list[ProbeSpec] = []
    a100 = make_worker(client.app, _recording_probe(specs), host=A100)
    h100 = make_worker(client.app, _recording_probe(specs), host=H100)
    a100.register()
    h100_only = {"type": "cuda", "name": "*H100*", "memory_bytes": 80 * 2**30}
    assert _claimed_by(client, {**MLP, "device": h100_only}, [a100]) is None  # not allowed: it waits

    allowed = {**MLP, "time_budget_s": 31, "device": {**h100_only, "allow_extrapolation": True}}
    h100.register()  # a live worker has the device: the A100 must leave it to it
    assert h100.run_next() is True  # the request that waited for it
    assert _claimed_by(client, allowed, [a100, h100]) is h100
    with session_scope(client.app.state.batchsize.writes) as session:
        repository.unregister_worker(session, h100.worker_id)
    allowed_again = {**allowed, "time_budget_s": 32}
    assert _claimed_by(client, allowed_again, [a100]) is a100
    assert specs[-1].target_device is not None and specs[-1].target_device["memory_bytes"] == 80 * 2**30


def test_a_request_nobody_can_serve_waits_with_a_reason_then_fails(client: TestClient) -> None:
    cpu = make_worker(client.app, _fake_probe)
    cpu.register()
    body = {**MLP, "device": {"type": "cuda", "name": "NVIDIA H100*", "memory_bytes": 80 * 2**30}}
    job = client.post("/v1/recommendations", json=body).json()
    assert cpu.run_next() is False
    assert cpu.route_waiting_jobs() == ([job["id"]], [])
    waiting = client.get(f"/v1/recommendations/{job['id']}").json()
    assert waiting["status"] == "queued" and waiting["progress"]["phase"] == "waiting_for_device"
    reason = waiting["progress"]["reason"]
    assert (
        "cuda device named like 'nvidia h100*' with at least 80.0 GiB" in reason
        and "live workers: cpu" in reason
    )

    # A worker with the device comes up: the job is no longer flagged, and that worker takes it.
    h100 = make_worker(client.app, lambda spec, **_: {"max_feasible_batch_size": 8}, host=H100)
    h100.register()
    assert cpu.route_waiting_jobs() == ([], [])
    assert "reason" not in client.get(f"/v1/recommendations/{job['id']}").json()["progress"]
    assert h100.run_next() is True

    # Nobody has it and the wait runs out: the job fails with a clear error.
    late = client.post("/v1/recommendations", json={**body, "time_budget_s": 31}).json()
    cpu.settings = cpu.settings.model_copy(update={"device_wait_timeout_s": 0.001})
    with session_scope(client.app.state.batchsize.writes) as session:
        repository.unregister_worker(session, h100.worker_id)
    time.sleep(0.01)
    assert cpu.route_waiting_jobs() == ([], [late["id"]])
    failed = client.get(f"/v1/recommendations/{late['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "no_device"
    assert "no worker could serve this request in time" in failed["error"]["message"]


@pytest.mark.parametrize(("interval_s", "beats"), [(3600.0, 0), (1e-9, 20)])
def test_the_heartbeat_interval_setting_paces_job_heartbeats(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, interval_s: float, beats: int
) -> None:
    """The probe asks "should I stop?" often; the job's heartbeat (a write) goes out once per interval,
    the first one interval after the claim (which stamped it): a probe shorter than that writes none."""
    written: list[str] = []
    heartbeat = repository.heartbeat
    monkeypatch.setattr(repository, "heartbeat", lambda *a, **k: written.append(a[1]) or heartbeat(*a, **k))

    def probe(spec: ProbeSpec, *, should_cancel: Any, **_: Any) -> dict:
        for _ in range(20):
            assert should_cancel() is False
        return {}

    job = client.post("/v1/recommendations", json=MLP).json()
    worker = make_worker(client.app, probe)
    worker.settings = worker.settings.model_copy(update={"heartbeat_interval_s": interval_s})
    assert worker.run_next()
    assert written == [job["id"]] * beats


# --- the standby probe process (real subprocesses) -------------------------------------------------

TINY_REAL = {
    "model": {"name": "mlp", "config": {"hidden_dims": [16]}},
    "dataset": {"size": 512},
    "memory_budget_bytes": 64 * 2**20,
    "time_budget_s": 5,
}



def _wait_for(predicate: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s")


def _waiting_standby(worker: Worker) -> Any:
    """The worker's standby process once it is running, else None."""
    process = worker._standby.process if worker._standby is not None else None
    return process if process is not None and process.poll() is None else None


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


@needs_proc
def test_a_running_worker_keeps_a_standby_that_takes_the_next_job(client: TestClient) -> None:
    worker = make_worker(client.app)
    worker.start_in_thread()
    try:
        first = _wait_for(lambda: _waiting_standby(worker))
        assert probe_children(os.getpid(), zombies=False) == [first.pid]  # one process waits, and only one
        job = client.post("/v1/recommendations", json=TINY_REAL).json()
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert first.returncode == 0  # the standby ran the job, then exited
        second = _wait_for(lambda: _waiting_standby(worker))  # and a new one waits for the next
        assert second.pid != first.pid
    finally:
        worker.stop(timeout=60)
    assert not worker.alive


@needs_proc
def test_stopping_the_worker_leaves_no_standby_process_behind(client: TestClient) -> None:
    worker = make_worker(client.app)
    worker.start_in_thread()
    try:
        standby = _wait_for(lambda: _waiting_standby(worker))
    finally:
        worker.stop(timeout=60)
    assert not worker.alive
    assert standby.returncode is not None
    assert probe_children(os.getpid(), zombies=False) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(standby.pid, 0)  # nothing it started survives either


@needs_proc
def test_a_standby_that_died_while_idle_is_replaced(client: TestClient) -> None:
    worker = make_worker(client.app)
    worker.start_in_thread()
    try:
        first = _wait_for(lambda: _waiting_standby(worker))
        os.kill(first.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
        second = _wait_for(lambda: (p := _waiting_standby(worker)) is not None and p.pid != first.pid and p)
        assert first.poll() == -signal.SIGKILL
        assert probe_children(os.getpid(), zombies=False) == [second.pid]
    finally:
        worker.stop(timeout=60)
    assert probe_children(os.getpid(), zombies=False) == []


@needs_proc
def test_the_standby_can_be_turned_off(client: TestClient) -> None:
    worker = make_worker(client.app, probe_standby=False)
    worker.start_in_thread()
    try:
        job = client.post("/v1/recommendations", json=TINY_REAL).json()
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
        time.sleep(3 * client.app.state.batchsize.settings.poll_interval_s)  # a few idle loops
        assert worker._standby is None and probe_children(os.getpid(), zombies=False) == []
    finally:
        worker.stop(timeout=60)

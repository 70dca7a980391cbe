"""Faults, injected for real: each ends its job with a readable reason (or finishes it after a restart),
and the service keeps answering.

- the probe subprocess SIGKILLed mid-trial, or crashing, or hanging past its time limit;
- an OOM at the smallest batch size; a model that raises;
- the service process SIGKILLed mid-job and restarted (a real `batchsize serve`);
- SIGTERM: the running probe is cancelled and its job re-queued, then finished by the next start;
- the database locked by another connection for ~1.5 s while requests and the worker write.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.probing.sandbox import run_probe_subprocess
from service.probing.spec import ProbeSpec
from service.worker import Worker
from tests.helpers import make_worker, probe_children
from tests.live_server import live_server

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "BATCHSIZE_PROBE_TEST_FAULT"
# A tiny real probe: a 16-unit MLP, a small dataset (caps the batch size search), a short budget.
TINY = {
    "model": {"name": "mlp", "config": {"hidden_dims": [16]}},
    "dataset": {"size": 512},
    "memory_budget_bytes": 64 * 2**20,
    "time_budget_s": 5,
}


def _variant(**changes: Any) -> dict[str, Any]:
    """TINY with other fields, so each job has its own fingerprint."""
    return {**TINY, **changes}



def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/recommendations/{job_id}").json()


# --- the probe subprocess ------------------------------------------------------------------------


def test_probe_sigkilled_mid_trial_fails_the_job_and_the_service_goes_on(client: TestClient) -> None:
    killed: list[int] = []

    def probe_killed_after_first_trial(spec: ProbeSpec, *, on_event: Any, **kwargs: Any) -> dict:
        def kill_on_trial(event: dict) -> None:
            on_event(event)
            if event.get("event") == "trial" and not killed:
                children = probe_children(os.getpid())
                assert len(children) == 1
                os.kill(children[0], signal.SIGKILL)  # as the kernel's OOM killer would
                killed.append(children[0])

        return run_probe_subprocess(spec, on_event=kill_on_trial, **kwargs)

    job = client.post("/v1/recommendations", json=TINY).json()
    state = client.app.state.batchsize
    worker = Worker(
        settings=state.settings,
        sessions=state.writes,
        host=state.host,
        run_probe=probe_killed_after_first_trial,
    )
    assert worker.run_next()
    failed = _job(client, job["id"])
    assert killed and failed["status"] == "failed"
    assert failed["error"]["code"] == "crashed"
    assert "signal 9 (SIGKILL)" in failed["error"]["message"]
    assert failed["progress"]["trials_done"] >= 1  # it was mid-trial: the trials it finished are kept
    assert not probe_children(os.getpid())
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [("sigkill", "crashed", "signal 9 (SIGKILL)"), ("crash", "crashed", "test fault: crashing")],
)
def test_a_probe_that_dies_fails_the_job_with_a_readable_reason(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, fault: str, code: str, message: str
) -> None:
    monkeypatch.setenv(FAULT_ENV, fault)
    job = client.post("/v1/recommendations", json=TINY).json()
    assert make_worker(client.app).run_next()
    failed = _job(client, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == code
    assert message in failed["error"]["message"]
    assert failed["finished_at"] is not None


def test_a_probe_that_hangs_is_killed_at_its_time_limit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang")
    job = client.post("/v1/recommendations", json=TINY).json()
    started = time.monotonic()
    assert make_worker(client.app, probe_timeout_s=2.0).run_next()
    elapsed = time.monotonic() - started
    failed = _job(client, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "timeout"
    assert "did not finish within 2 s and was killed" in failed["error"]["message"]
    assert 1.9 < elapsed < 30
    assert not probe_children(os.getpid())  # the hung process is gone


def test_oom_at_the_smallest_batch_size_fails_the_job(client: TestClient) -> None:
    # Just above what request validation allows (weights + gradients for SGD: 3 x 4840 bytes), so batch
    # size 1 cannot fit its activations.
    response = client.post("/v1/recommendations", json=_variant(memory_budget_bytes=14_800))
    assert response.status_code == 202, response.text
    assert make_worker(client.app).run_next()
    failed = _job(client, response.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "oom_at_min_batch"
    assert "batch size 1 does not fit the memory budget of 14800 bytes" in failed["error"]["message"]


def test_a_model_that_raises_fails_the_job_with_its_error(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The probe subprocess imports this sitecustomize at start-up: the zoo MLP's forward raises there.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import models.mlp\n"
        "def _broken(self, x):\n"
        "    raise RuntimeError('mat1 and mat2 shapes cannot be multiplied (injected)')\n"
        "models.mlp.MLP.forward = _broken\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(ROOT)]))
    job = client.post("/v1/recommendations", json=TINY).json()
    assert make_worker(client.app).run_next()
    failed = _job(client, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_error"
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied (injected)" in failed["error"]["message"]
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/recommendations", json=_variant(time_budget_s=4)).status_code == 202


# --- the service process -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`batchsize serve` as a real process on a free loopback port, with its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, fault: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSIZE_")}
        env.update(
            BATCHSIZE_DATA_DIR=str(self.data_dir),
            BATCHSIZE_PROBE_DEVICE="cpu",
            BATCHSIZE_POLL_INTERVAL_S="0.1",
            PYTHONPATH=str(ROOT),
        )
        if fault:
            env[FAULT_ENV] = fault
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for(self._healthy, 90, "the service to start")

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for pid in probe_children(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=30)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "batchsize.db", timeout=10)

    def rows(self) -> list[tuple]:
        with self.db() as connection:
            return connection.execute("SELECT id, status, attempts FROM recommendations").fetchall()

    def trials(self, job_id: str) -> list[int]:
        with self.db() as connection:
            query = 'SELECT "index" FROM trials WHERE recommendation_id = ? ORDER BY "index"'
            return [row[0] for row in connection.execute(query, (job_id,))]

    def job(self, job_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/recommendations/{job_id}", timeout=10).json()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    svc = Service(data_dir, tmp_path / "service.log")
    try:
        yield svc
    finally:
        svc.kill_everything()


def _post_and_wait_running(service: Service, body: dict) -> tuple[str, int]:
    response = httpx.post(
        f"{service.url}/v1/recommendations", json=body, headers={"X-Request-ID": "fault-test-1"}, timeout=30
    )
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == "fault-test-1"
    job_id = response.json()["id"]
    _wait_for(lambda: service.job(job_id)["status"] == "running", 60, "the job to start")
    assert service.process is not None
    children = _wait_for(lambda: probe_children(service.process.pid), 30, "the probe subprocess")
    return job_id, children[0]


def test_sigterm_requeues_sigkill_recovers_and_the_job_finishes_once(service: Service) -> None:
    """One job through three lives of the service (one test: each start of the service costs seconds).

    1. SIGTERM while its probe runs: a clean shutdown that kills the probe and puts the job back in the
       queue. 2. SIGKILL while it runs again: nothing gets a chance to clean up. 3. A normal start: the
       job left `running` by the dead process is re-queued and finished, stored once, run three times.
    The probe hangs (a test hook) in the first two lives, so the job is surely running when the signal
    comes.
    """
    service.start(fault="hang")
    job_id, probe_pid = _post_and_wait_running(service, TINY)
    started = time.monotonic()
    assert service.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it after shutdown
    assert time.monotonic() - started < 30
    assert not _alive(probe_pid)  # the probe was killed, not orphaned
    assert service.rows() == [(job_id, "queued", 1)]
    assert f"job {job_id} re-queued at shutdown" in service.log_path.read_text()
    assert "Application shutdown complete" in service.log_path.read_text()

    service.start(fault="hang")
    _wait_for(lambda: service.job(job_id)["status"] == "running", 60, "the job to start again")
    assert service.process is not None
    probe_pid = _wait_for(lambda: probe_children(service.process.pid), 30, "the probe subprocess")[0]
    assert service.stop(signal.SIGKILL) == -signal.SIGKILL
    # The orphaned probe is in its own session; in production its next write fails and it exits. Here
    # it hangs on purpose, so end it.
    os.kill(probe_pid, signal.SIGKILL)
    assert service.rows() == [(job_id, "running", 2)]

    service.start()
    done = _wait_for(lambda: (j := service.job(job_id))["status"] in ("succeeded", "failed") and j, 120, "it")
    assert done["status"] == "succeeded", done["error"]
    assert service.rows() == [(job_id, "succeeded", 3)]  # not lost, not duplicated
    indices = service.trials(job_id)
    assert indices == list(range(len(indices))) and len(indices) == done["progress"]["trials_done"] > 0

    # The logs are JSON lines, and the request's lines carry its id.
    lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    access = [line for line in lines if line["logger"] == "batchsize.access" and line["method"] == "POST"]
    assert access and access[0]["request_id"] == "fault-test-1" and access[0]["status"] == 202
    assert any("re-queued job" in line["message"] and job_id in line["message"] for line in lines)


# --- the database --------------------------------------------------------------------------------


def test_a_briefly_locked_database_makes_writers_wait_not_fail(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", probe_device="cpu", poll_interval_s=0.05, _env_file=None)
    lock_held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        connection = sqlite3.connect(settings.data_dir / "batchsize.db", isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        lock_held.set()
        release.wait(1.5)
        connection.execute("COMMIT")
        connection.close()

    def chatty_probe(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict:
        for index in range(20):  # writes spread over ~2 s: some land while the lock is held
            on_event({"event": "trial", "phase": "memory", "batch_size": index + 1, "outcome": "ok"})
            time.sleep(0.1)
        return {"max_feasible_batch_size": 20}

    app = create_app(settings, run_worker=False)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        first = http.post("/v1/recommendations", json=TINY).json()
        state = app.state.batchsize
        worker = Worker(settings=settings, sessions=state.writes, host=state.host, run_probe=chatty_probe)
        worker_thread = threading.Thread(target=worker.run_next)
        locker = threading.Thread(target=hold_lock)
        locker.start()
        assert lock_held.wait(10)
        lock_started = time.monotonic()
        worker_thread.start()

        results: list[tuple[int, float]] = []

        def post(size: int) -> None:
            t0 = time.monotonic()
            response = http.post("/v1/recommendations", json=_variant(dataset={"size": size}))
            results.append((response.status_code, time.monotonic() - t0))

        posters = [threading.Thread(target=post, args=(1000 + i,)) for i in range(4)]
        for thread in posters:
            thread.start()
        reads = [http.get(f"/v1/recommendations/{first['id']}").status_code for _ in range(5)]
        ready = http.get("/readyz").status_code
        for thread in [*posters, locker, worker_thread]:
            thread.join(30)
        waited = time.monotonic() - lock_started

        assert reads == [200] * 5 and ready == 200  # WAL: readers are not blocked by the writer's lock
        assert [status for status, _ in results] == [202] * 4
        assert max(seconds for _, seconds in results) > 1.0  # they waited for the lock...
        assert waited < 15  # ...and no longer than needed
        done = http.get(f"/v1/recommendations/{first['id']}").json()
        assert done["status"] == "succeeded" and done["progress"]["trials_done"] == 20
        assert http.get("/v1/recommendations", params={"limit": 10}).json()["total"] == 5

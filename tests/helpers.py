"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import repository
from service.db.session import session_scope
from service.recommendations.service import HostDevice
from service.status import ACTIVE, JobStatus
from service.worker import Worker


def make_worker(
    app: FastAPI, run_probe: Any = None, *, host: HostDevice | None = None, **settings_changes: Any
) -> Worker:
    """A worker on `app`'s database and host (or `host`), with `run_probe` (default: the real probe
    subprocess) and settings changed as given."""
    state = app.state.batchsize
    settings = state.settings.model_copy(update=settings_changes) if settings_changes else state.settings
    return Worker(settings=settings, sessions=state.writes, host=host or state.host, run_probe=run_probe)


def wait_for_job(client: TestClient, job_id: str, timeout_s: float = 180) -> dict[str, Any]:
    """Poll a job until it leaves queued/running; fail the test when it takes over `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/recommendations/{job_id}").json()
        if body["status"] not in ACTIVE:
            return body
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish in {timeout_s} s")


def finish_job(client: TestClient, job_id: str, result: dict[str, Any]) -> None:
    """Claim the queued job and mark it succeeded with `result`, the way a worker would."""
    state = client.app.state.batchsize
    with session_scope(state.writes) as session:
        job = repository.claim_next_queued(session, worker_id="test:1:x")
        assert job is not None and job.id == job_id
    with session_scope(state.writes) as session:
        repository.finish(session, job_id, status=JobStatus.SUCCEEDED, result=result)


def probe_children(parent_pid: int, *, zombies: bool = True) -> list[int]:
    """Pids of probe processes (`python -m service.probing.runner`) whose parent is `parent_pid`
    (exited ones not yet reaped included unless `zombies` is False)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
        if not match or int(match.group(1)) != parent_pid or b"service.probing.runner" not in cmdline:
            continue
        if zombies or "State:\tZ" not in status:
            found.append(int(entry.name))
    return found

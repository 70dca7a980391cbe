"""Never a bare 500: unexpected errors, storage refusing writes, and the job errors clients are shown."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.api.cached_reads import CachedAnswers
from service.app import create_app
from service.config import Settings
from service.errors import client_message
from service.probing.spec import ProbeError, ProbeSpec
from service.worker import Worker

MLP = {"model": {"name": "mlp", "config": {"hidden_dims": [8]}}, "time_budget_s": 30}


def _envelope(response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


# --- unexpected errors -----------------------------------------------------------------------------


def test_an_exception_in_a_route_is_a_json_500_with_the_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings, run_worker=False)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom in a route")

    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        response = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    error = _envelope(response)
    assert error["code"] == "internal_error" and "req-500" in error["message"]
    assert error["details"] == {"request_id": "req-500"}
    assert response.headers["X-Request-ID"] == "req-500"
    assert "kaboom" not in response.text  # the client gets the id, the log gets the traceback
    assert any(r.exc_info and "kaboom in a route" in str(r.exc_info[1]) for r in caplog.records)


def test_test_clients_still_see_the_exception(settings: Settings) -> None:
    app = create_app(settings, run_worker=False)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom for the test client")

    with TestClient(app) as client, pytest.raises(RuntimeError, match="kaboom for the test client"):
        client.get("/boom")


def test_an_exception_in_a_middleware_is_a_json_500_too(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_args: Any) -> None:
        raise ValueError("kaboom in a middleware")

    monkeypatch.setattr(CachedAnswers, "_repeated_request", broken)
    client = TestClient(create_app(settings, run_worker=False), raise_server_exceptions=False)
    with client, caplog.at_level(logging.ERROR):
        response = client.post("/v1/recommendations", json=MLP)
        assert client.get("/healthz").status_code == 200  # and the service goes on
    assert response.status_code == 500
    error = _envelope(response)
    assert error["code"] == "internal_error"
    assert error["details"]["request_id"] == response.headers["X-Request-ID"]
    assert any(r.exc_info and "kaboom in a middleware" in str(r.exc_info[1]) for r in caplog.records)


def test_an_exception_in_the_outermost_layer_still_gets_the_envelope(settings: Settings) -> None:
    app = create_app(settings, run_worker=False)

    class Broken:  # added last: outside RequestContext and UnexpectedErrors
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                raise RuntimeError("kaboom outside")
            await self.app(scope, receive, send)

    app.add_middleware(Broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/healthz", headers={"X-Request-ID": "outer-1"})
    assert response.status_code == 500
    assert _envelope(response)["details"] == {"request_id": "outer-1"}


# --- storage that refuses writes -------------------------------------------------------------------


@contextmanager
def _read_only(path: Path) -> Iterator[str]:
    """Make a file truly read-only for this process: `chattr +i` as root (permissions do not bind
    root), plain permissions otherwise. Yields how; skips where neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield "chmod"
        finally:
            path.chmod(mode)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file read-only as root here: chattr: {done.stderr.strip()}")
    try:
        yield "chattr +i"
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_database_answers_writes_with_a_503_and_readyz_says_not_ready(settings: Settings) -> None:
    with TestClient(create_app(settings, run_worker=False)) as client:  # migrated, then closed cleanly
        queued = client.post("/v1/recommendations", json=MLP).json()
    database = settings.data_dir / "batchsize.db"
    with _read_only(database), TestClient(create_app(settings, run_worker=False)) as client:
        assert client.get(f"/v1/recommendations/{queued['id']}").status_code == 200  # reads still work
        response = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 31})
        assert response.status_code == 503
        error = _envelope(response)
        assert error["code"] == "database_read_only" and "read-only" in error["message"]
        assert error["details"]["request_id"] == response.headers["X-Request-ID"]
        cancel = client.delete(f"/v1/recommendations/{queued['id']}")
        assert cancel.status_code == 503 and _envelope(cancel)["code"] == "database_read_only"
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready" and ready.json()["writable"] is False
        assert ready.json()["database"] is True
    with TestClient(create_app(settings, run_worker=False)) as client:  # writable again: all back
        assert client.get("/readyz").status_code == 200
        assert client.delete(f"/v1/recommendations/{queued['id']}").status_code == 200


def test_a_read_only_data_directory_answers_uploads_with_a_503(settings: Settings) -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 64), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    with TestClient(create_app(settings, run_worker=False)) as client, _read_only(settings.data_dir):
        response = client.post(
            "/v1/artifacts", files={"file": ("s.npz", buffer.getvalue())}, data={"kind": "sample"}
        )
        assert response.status_code == 503
        assert _envelope(response)["code"] == "storage_not_writable"
        assert client.get("/readyz").json()["status"] == "not_ready"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("database or disk is full", "storage_full"),
        ("attempt to write a readonly database", "database_read_only"),
        ("disk I/O error", "storage_error"),
    ],
)
def test_storage_errors_on_commit_are_503s_with_a_clear_code(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, message: str, code: str
) -> None:
    def failing_commit(self: Session) -> None:
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError(message))

    monkeypatch.setattr(Session, "commit", failing_commit)
    response = client.post("/v1/recommendations", json=MLP)
    assert response.status_code == 503 and _envelope(response)["code"] == code


def test_a_full_disk_under_an_upload_is_a_503(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from service.artifacts import service as artifacts

    def no_space(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "upload", no_space)
    response = client.post("/v1/artifacts", files={"file": ("s.npz", b"x")}, data={"kind": "sample"})
    assert response.status_code == 503 and _envelope(response)["code"] == "storage_full"


# --- job errors as clients see them ----------------------------------------------------------------

TORCH_ERROR = """training step of 'artifact:3f2a' failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)
Exception raised from meta_mm at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:123 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f1c in /srv/app/.venv/lib/python3.11/site-packages/torch/lib/libc10.so)
frame #1: at::native::mm(at::Tensor const&, at::Tensor const&) + 0x1a (0x7f1d in /srv/app/.venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so)
"""  # noqa: E501

CRASH = """probe process exited with status 1 before reporting a result; last lines of its stderr:
Traceback (most recent call last):
  File "/srv/app/.venv/lib/python3.11/site-packages/torch/export/pt2_archive/_package.py", line 880, in load_pt2
    return _load_program(archive)
  File "/srv/app/.venv/lib/python3.11/site-packages/torch/_export/serde/serialize.py", line 512, in deserialize
    raise SerializeError(f"bad payload in {path}")
torch._export.serde.serialize.SerializeError: bad payload in /var/lib/batchsize/artifacts/3f2a.pt2
"""  # noqa: E501


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            TORCH_ERROR,
            "training step of 'artifact:3f2a' failed: RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)",
        ),
        (
            CRASH,
            "probe process exited with status 1 before reporting a result; last lines of its stderr: "
            "torch._export.serde.serialize.SerializeError: bad payload in 3f2a.pt2",
        ),
        (
            "Traceback (most recent call last):\n  File \"/x/y.py\", line 1\n    f()\nKeyError: 'k'",
            "KeyError: 'k'",
        ),
        (
            "batch size 1 needs 3 GiB, over the 1 GiB budget",
            "batch size 1 needs 3 GiB, over the 1 GiB budget",
        ),
        ("", "the probe failed without a message"),
    ],
)
def test_client_message_keeps_the_first_meaningful_line_without_frames_or_paths(
    text: str, expected: str
) -> None:
    assert client_message(text) == expected


def test_client_message_is_capped() -> None:
    cleaned = client_message("x" * 10_000)
    assert len(cleaned) == 500 and cleaned.endswith("…")


def test_a_failed_job_shows_the_clean_message_and_the_log_keeps_the_full_text(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(spec: ProbeSpec, **_: Any) -> dict:
        raise ProbeError("model_error", TORCH_ERROR)

    state = client.app.state.batchsize
    job = client.post("/v1/recommendations", json=MLP).json()
    worker = Worker(settings=state.settings, sessions=state.writes, host=state.host, run_probe=failing)
    with caplog.at_level(logging.INFO):
        assert worker.run_next()
    failed = client.get(f"/v1/recommendations/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_error"
    message = failed["error"]["message"]
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert "site-packages" not in message and "frame #" not in message and "\n" not in message
    assert any("libc10.so" in record.getMessage() for record in caplog.records)

"""Shared fixtures: a fresh SQLite database per test, migrated with Alembic (never create_all)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", probe_device="cpu", poll_interval_s=0.05, _env_file=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API without a worker: jobs stay queued unless a test runs the worker itself."""
    with TestClient(create_app(settings, run_worker=False)) as test_client:
        yield test_client

"""A live service with its probe worker for the client's end-to-end tests, and fast probe settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import batchsize_client
import batchsize_client.inprocess
from service.app import create_app
from service.config import Settings
from tests.live_server import live_server

# Probes in these tests: a few seconds and a small budget (the examples leave both at their defaults).
FAST = {"time_budget_s": 4, "memory_budget_bytes": 16 * 2**20}


@pytest.fixture(scope="package")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("client-e2e") / "data"
    settings = Settings(data_dir=data_dir, probe_device="cpu", poll_interval_s=0.05, _env_file=None)
    with live_server(create_app(settings, run_worker=True)) as url:
        yield url


@pytest.fixture
def fast_recommend(monkeypatch: pytest.MonkeyPatch, service_url: str) -> None:
    """`batchsize_client.recommend` against the live service with FAST probe settings."""
    original = batchsize_client.inprocess.recommend

    def fast(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, **FAST, "wait_timeout_s": 300})

    monkeypatch.setenv("BATCHSIZE_URL", service_url)
    monkeypatch.delenv("BATCHSIZE_API_KEY", raising=False)
    monkeypatch.setattr(batchsize_client, "recommend", fast)
    monkeypatch.setattr(batchsize_client.inprocess, "recommend", fast)

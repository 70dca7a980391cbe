"""batchsize_client against a live server (uvicorn on a free loopback port): sync and async, typed."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchsize_client import (
    AsyncBatchsizeClient,
    BatchsizeClient,
    BatchsizeError,
    Job,
    Recipe,
    RecommendationFailed,
    RecommendationTimeout,
    build_request,
)
from service.app import create_app
from service.config import Settings
from tests import exported_models as em
from tests.live_server import live_server

KEY = "client-test-key"


def _settings(tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: object) -> Settings:
    data_dir = tmp_path_factory.mktemp(name) / "data"
    return Settings(data_dir=data_dir, probe_device="cpu", poll_interval_s=0.05, _env_file=None, **overrides)


@pytest.fixture(scope="module")
def working_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with its probe worker and an API key."""
    settings = _settings(tmp_path_factory, "client-worker", api_key=KEY)
    with live_server(create_app(settings, run_worker=True)) as url:
        yield url


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server without a worker: jobs stay queued."""
    with live_server(create_app(_settings(tmp_path_factory, "client-idle"), run_worker=False)) as url:
        yield url


def test_upload_an_exported_cnn_and_get_its_recipe(working_server: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sample = tmp_path / "sample.npz"
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.standard_normal((32, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 32))
    sample.write_bytes(buffer.getvalue())

    with BatchsizeClient(working_server, api_key=KEY, timeout=60) as client:
        assert {m["name"] for m in client.models()} >= {"mlp", "resnet", "gpt"}
        assert client.device()["type"] == "cpu"
        model = client.upload_model(em.cnn_archive(), loss="cross_entropy")
        assert model["meta"]["config"]["target_high"] == 10
        assert client.upload_model(em.cnn_archive(), loss="cross_entropy")["id"] == model["id"]
        data = client.upload_sample(sample)
        assert data["kind"] == "sample" and data["meta"]["examples"] == 32
        assert [a["id"] for a in client.artifacts(kind="model")] == [model["id"]]
        assert client.artifact(data["id"])["filename"] == "sample.npz"

        seen: list[str] = []
        recipe = client.recommend(
            artifact_id=model["id"],
            dataset_size=4096,
            sample_id=data["id"],
            optimizer="adam",
            learning_rate=1e-3,
            reference_batch_size=32,
            memory_budget_bytes=8 * 2**20,
            time_budget_s=5,
            wait_timeout_s=180,
            poll_interval_s=0.2,
            on_progress=lambda job: seen.append(job.status),
        )
        assert isinstance(recipe, Recipe)
        assert (
            recipe.batch_size == recipe.micro_batch_size * recipe.gradient_accumulation_steps * recipe.devices
        )
        assert 1 <= recipe.max_feasible_batch_size <= 4096
        # "sqrt", or "sqrt, saturating at B_noise=..." when the noise scale was measured in time
        assert recipe.learning_rate > 0 and recipe.learning_rate_rule.startswith("sqrt")
        assert recipe.throughput and recipe.throughput[0].samples_per_second > 0  # typed all the way down
        assert recipe.memory.budget_bytes == 8 * 2**20 and recipe.device.type == "cpu"
        assert recipe.result["throughput"]
        assert seen[-1] == "succeeded"

        job = client.get(recipe.id)
        assert isinstance(job, Job) and job.status == "succeeded"
        assert job.request["dataset"]["sample_id"] == data["id"]
        assert recipe.id in [item.id for item in client.list(status="succeeded").items]
        assert client.trials(recipe.id)[0].index == 0
        # The typed model gives back exactly the JSON the server sent: no field added, none lost.
        raw = client._http.get(f"/v1/recommendations/{recipe.id}").json()
        assert job.model_dump(mode="json")["result"] == raw["result"]
        assert Recipe.from_job(raw) == recipe


def test_errors_carry_the_servers_code_and_message(working_server: str, tmp_path: Path) -> None:
    with BatchsizeClient(working_server) as anonymous, pytest.raises(BatchsizeError) as excinfo:
        anonymous.models()
    assert excinfo.value.status_code == 401 and excinfo.value.code == "missing_api_key"

    with BatchsizeClient(working_server, api_key=KEY) as client:
        with pytest.raises(BatchsizeError) as excinfo:
            client.get("does-not-exist")
        assert excinfo.value.status_code == 404 and "does-not-exist" in excinfo.value.message

        with pytest.raises(BatchsizeError) as excinfo:
            client.recommend("no-such-model")
        assert excinfo.value.status_code == 422 and excinfo.value.code == "unknown_model"
        assert "known models" in str(excinfo.value)

        junk = tmp_path / "junk.pt2"
        junk.write_bytes(b"not a zip")
        with pytest.raises(BatchsizeError) as excinfo:
            client.upload_model(junk, loss="mse")
        assert excinfo.value.code == "not_a_zip"

    with (
        BatchsizeClient("http://127.0.0.1:9", timeout=2) as nowhere,
        pytest.raises(BatchsizeError) as excinfo,
    ):
        nowhere.device()
    assert excinfo.value.code == "unreachable"


def test_waiting_times_out_and_cancelled_jobs_raise(idle_server: str) -> None:
    with BatchsizeClient(idle_server) as client:
        job = client.submit(build_request("mlp", dataset_size=1000, time_budget_s=5))
        with pytest.raises(RecommendationTimeout) as timeout:
            client.wait(job.id, timeout_s=0.3, poll_interval_s=0.1)
        assert timeout.value.job.status == "queued" and timeout.value.code == "timeout"

        assert client.cancel(job.id).status == "cancelled"
        with pytest.raises(RecommendationFailed) as failed:
            client.wait(job.id, timeout_s=5)
        assert failed.value.job.status == "cancelled" and failed.value.code == "cancelled"


def test_the_async_client_waits_with_progress_and_raises_the_same_errors(idle_server: str) -> None:
    async def scenario() -> None:
        async with AsyncBatchsizeClient(idle_server) as client:
            job = await client.submit(build_request("mlp", dataset_size=1000, time_budget_s=5, force=True))
            polls: list[str] = []

            async def on_progress(seen: Job) -> None:
                polls.append(seen.status)

            with pytest.raises(RecommendationTimeout):
                await client.wait(job.id, timeout_s=0.3, poll_interval_s=0.1, on_progress=on_progress)
            assert polls and set(polls) == {"queued"}
            assert (await client.cancel(job.id)).status == "cancelled"
            with pytest.raises(RecommendationFailed):
                await client.wait(job.id, timeout_s=5)
            assert any(item.id == job.id for item in (await client.list()).items)
            with pytest.raises(BatchsizeError) as excinfo:
                await client.get("does-not-exist")
            assert excinfo.value.status_code == 404

    asyncio.run(scenario())


def test_build_request_needs_exactly_one_model() -> None:
    with pytest.raises(ValueError, match="give exactly one of model"):
        build_request()
    with pytest.raises(ValueError, match="give exactly one of model"):
        build_request("mlp", artifact_id="abc")
    body = build_request("mlp", config={"hidden_dims": [8]}, memory_budget_bytes=10**6)
    assert body["model"] == {"name": "mlp", "config": {"hidden_dims": [8]}}
    assert body["memory_budget_bytes"] == 10**6 and "device" not in body

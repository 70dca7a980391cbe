"""HTTP clients for the batchsize service: `BatchsizeClient` (sync) and `AsyncBatchsizeClient` (asyncio).

    from batchsize_client import BatchsizeClient

    with BatchsizeClient("http://127.0.0.1:8000") as bs:
        recipe = bs.recommend("resnet", config={"depth": 18}, dataset_size=50_000, learning_rate=0.1)
    print(recipe.micro_batch_size, recipe.gradient_accumulation_steps, recipe.learning_rate)

Both take the URL from `BATCHSIZE_URL` and the key from `BATCHSIZE_API_KEY` when not given. Every error
the server answers with raises `BatchsizeError` (`status_code`, `code`, `message`, `details` from the
server's envelope `{"error": {"code", "message", "details"}}`); a job that ends `failed`/`cancelled` raises
`RecommendationFailed`, one still running at the deadline `RecommendationTimeout`.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import httpx

from batchsize_client.errors import BatchsizeError, RecommendationFailed, RecommendationTimeout
from batchsize_client.models import Job, JobPage, Trial
from batchsize_client.recipe import Recipe

DEFAULT_URL = "http://127.0.0.1:8000"
Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["fp32", "bf16", "fp16"]
Objective = Literal["time_to_target", "throughput", "max_feasible"]
Loss = Literal["cross_entropy", "mse", "l1", "huber", "model_returns_loss"]
ProgressCallback = Callable[[Job], Any]
"""Called with the job after every poll (status, `progress.phase`, `trials_done`/`trials_planned`)."""


def build_request(
    model: str | None = None,
    *,
    config: dict[str, Any] | None = None,
    artifact_id: str | None = None,
    dataset_size: int = 50_000,
    sample_id: str | None = None,
    optimizer: str = "sgd",
    learning_rate: float = 0.1,
    reference_batch_size: int = 32,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    device: dict[str, Any] | None = None,
    memory_budget_bytes: int | None = None,
    objective: str = "time_to_target",
    time_budget_s: float = 120,
    force: bool = False,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The POST /v1/recommendations body for these settings (`training`: further training fields the
    service accepts, e.g. `momentum`, `weight_decay`, `epochs`)."""
    if (model is None) == (artifact_id is None):
        raise ValueError("give exactly one of model (a zoo name) or artifact_id (an uploaded model)")
    model_ref: dict[str, Any] = {"artifact_id": artifact_id} if artifact_id else {"name": model}
    if config:
        model_ref["config"] = config
    body: dict[str, Any] = {
        "model": model_ref,
        "dataset": {"size": dataset_size, "sample_id": sample_id},
        "training": {
            "optimizer": optimizer,
            "learning_rate": learning_rate,
            "reference_batch_size": reference_batch_size,
            "precision": precision,
            "gradient_checkpointing": gradient_checkpointing,
            **(training or {}),
        },
        "objective": objective,
        "time_budget_s": time_budget_s,
        "force": force,
    }
    if device:
        body["device"] = device
    if memory_budget_bytes is not None:
        body["memory_budget_bytes"] = memory_budget_bytes
    return body


def _model_fields(
    loss: str, input: dict[str, Any] | None, target: dict[str, Any] | None, num_classes: int | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"kind": "model", "loss": loss}
    if input is not None:
        fields["input"] = json.dumps(input)
    if target is not None:
        fields["target"] = json.dumps(target)
    if num_classes is not None:
        fields["num_classes"] = str(num_classes)
    return fields


def _error_from(response: httpx.Response) -> BatchsizeError:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    return BatchsizeError(
        str(error.get("message") or response.text[:500] or response.reason_phrase),
        status_code=response.status_code,
        code=str(error.get("code") or f"http_{response.status_code}"),
        details=error.get("details"),
    )


def _decode(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_from(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def _unreachable(base_url: object, exc: Exception) -> BatchsizeError:
    return BatchsizeError(f"cannot reach the batchsize service at {base_url}: {exc}", code="unreachable")


def _settled(job: Job, timeout_s: float, deadline: float) -> bool:
    """True when the job succeeded; raises when it failed or the wait ran out; False to poll again."""
    if job.status == "succeeded":
        return True
    if job.done:
        raise RecommendationFailed(job)
    if time.monotonic() >= deadline:
        raise RecommendationTimeout(job, timeout_s)
    return False


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        self.base_url = (base_url or os.environ.get("BATCHSIZE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("BATCHSIZE_API_KEY")
        self.headers = {"X-API-Key": key} if key else {}


class BatchsizeClient(_Base):
    """Talks to one service, synchronously. A context manager; `close()` otherwise."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> BatchsizeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- recommendations

    def recommend(
        self,
        model: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        artifact_id: str | None = None,
        dataset_size: int = 50_000,
        sample_id: str | None = None,
        optimizer: Optimizer = "sgd",
        learning_rate: float = 0.1,
        reference_batch_size: int = 32,
        precision: Precision = "fp32",
        gradient_checkpointing: bool = False,
        device: dict[str, Any] | None = None,
        memory_budget_bytes: int | None = None,
        objective: Objective = "time_to_target",
        time_budget_s: float = 120,
        force: bool = False,
        training: dict[str, Any] | None = None,
        wait_timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> Recipe:
        """Ask for a recommendation, wait for it (polling) and return its recipe.

        `model` names a zoo model (GET /v1/models) with optional `config` overrides; `artifact_id` an
        uploaded model instead. `training`: further training fields (momentum, weight_decay, epochs...).
        `on_progress(job)` is called after every poll.
        """
        job = self.submit(
            build_request(
                model,
                config=config,
                artifact_id=artifact_id,
                dataset_size=dataset_size,
                sample_id=sample_id,
                optimizer=optimizer,
                learning_rate=learning_rate,
                reference_batch_size=reference_batch_size,
                precision=precision,
                gradient_checkpointing=gradient_checkpointing,
                device=device,
                memory_budget_bytes=memory_budget_bytes,
                objective=objective,
                time_budget_s=time_budget_s,
                force=force,
                training=training,
            )
        )
        done = self.wait(
            job.id, timeout_s=wait_timeout_s, poll_interval_s=poll_interval_s, on_progress=on_progress
        )
        return Recipe.from_job(done)

    def submit(self, body: dict[str, Any]) -> Job:
        """POST /v1/recommendations with a full request body; the job (maybe already finished)."""
        return Job.model_validate(self._request("POST", "/v1/recommendations", json=body))

    def wait(
        self,
        recommendation_id: str,
        *,
        timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job has finished; the job when it succeeded, else raise."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(recommendation_id)
            if on_progress is not None:
                on_progress(job)
            if _settled(job, timeout_s, deadline):
                return job
            time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))

    def get(self, recommendation_id: str) -> Job:
        """GET /v1/recommendations/{id}: status, progress, request, result or error."""
        return Job.model_validate(self._request("GET", f"/v1/recommendations/{recommendation_id}"))

    def recipe(self, recommendation_id: str) -> Recipe:
        """The recipe of a succeeded recommendation."""
        return Recipe.from_job(self.get(recommendation_id))

    def list(
        self, *, status: str | None = None, model: str | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        """A page of recommendations, newest first."""
        params = {"status": status, "model": model, "limit": limit, "offset": offset}
        data = self._request(
            "GET", "/v1/recommendations", params={k: v for k, v in params.items() if v is not None}
        )
        return JobPage.model_validate(data)

    def trials(self, recommendation_id: str) -> builtins.list[Trial]:
        data = self._request("GET", f"/v1/recommendations/{recommendation_id}/trials")
        return [Trial.model_validate(t) for t in data]

    def cancel(self, recommendation_id: str) -> Job:
        return Job.model_validate(self._request("DELETE", f"/v1/recommendations/{recommendation_id}"))

    # -- artifacts

    def upload_model(
        self,
        path: str | Path,
        *,
        loss: Loss,
        input: dict[str, Any] | None = None,
        target: dict[str, Any] | None = None,
        num_classes: int | None = None,
        timeout_s: float = 300,
    ) -> dict[str, Any]:
        """Upload a torch.export archive (.pt2). `input`/`target`: {"shape", "dtype", "high"}, only where
        the program cannot tell (dynamic non-batch dimensions, integer value ranges)."""
        return self._upload(Path(path), _model_fields(loss, input, target, num_classes), timeout_s)

    def upload_sample(self, path: str | Path, *, timeout_s: float = 300) -> dict[str, Any]:
        """Upload a data sample (.npz or .safetensors with arrays x and y)."""
        return self._upload(Path(path), {"kind": "sample"}, timeout_s)

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/artifacts/{artifact_id}")

    def artifacts(self, kind: Literal["model", "sample"] | None = None) -> builtins.list[dict[str, Any]]:
        return self._request("GET", "/v1/artifacts", params={"kind": kind} if kind else None)

    def delete_artifact(self, artifact_id: str) -> None:
        self._request("DELETE", f"/v1/artifacts/{artifact_id}")

    # -- catalog

    def models(self) -> builtins.list[dict[str, Any]]:
        return self._request("GET", "/v1/models")

    def device(self) -> dict[str, Any]:
        return self._request("GET", "/v1/device")

    # -- plumbing

    def _upload(self, path: Path, fields: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            return self._request("POST", "/v1/artifacts", data=fields, files=files, timeout=timeout_s)

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _decode(response)


class AsyncBatchsizeClient(_Base):
    """The same API for asyncio: `async with AsyncBatchsizeClient(url) as bs: await bs.recommend(...)`.

    `on_progress` may be a plain function or a coroutine function.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncBatchsizeClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def recommend(
        self,
        model: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        artifact_id: str | None = None,
        dataset_size: int = 50_000,
        sample_id: str | None = None,
        optimizer: Optimizer = "sgd",
        learning_rate: float = 0.1,
        reference_batch_size: int = 32,
        precision: Precision = "fp32",
        gradient_checkpointing: bool = False,
        device: dict[str, Any] | None = None,
        memory_budget_bytes: int | None = None,
        objective: Objective = "time_to_target",
        time_budget_s: float = 120,
        force: bool = False,
        training: dict[str, Any] | None = None,
        wait_timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | Callable[[Job], Awaitable[Any]] | None = None,
    ) -> Recipe:
        """Ask for a recommendation, wait for it and return its recipe (see BatchsizeClient.recommend)."""
        job = await self.submit(
            build_request(
                model,
                config=config,
                artifact_id=artifact_id,
                dataset_size=dataset_size,
                sample_id=sample_id,
                optimizer=optimizer,
                learning_rate=learning_rate,
                reference_batch_size=reference_batch_size,
                precision=precision,
                gradient_checkpointing=gradient_checkpointing,
                device=device,
                memory_budget_bytes=memory_budget_bytes,
                objective=objective,
                time_budget_s=time_budget_s,
                force=force,
                training=training,
            )
        )
        done = await self.wait(
            job.id, timeout_s=wait_timeout_s, poll_interval_s=poll_interval_s, on_progress=on_progress
        )
        return Recipe.from_job(done)

    async def submit(self, body: dict[str, Any]) -> Job:
        return Job.model_validate(await self._request("POST", "/v1/recommendations", json=body))

    async def wait(
        self,
        recommendation_id: str,
        *,
        timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | Callable[[Job], Awaitable[Any]] | None = None,
    ) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.get(recommendation_id)
            if on_progress is not None:
                outcome = on_progress(job)
                if asyncio.iscoroutine(outcome):
                    await outcome
            if _settled(job, timeout_s, deadline):
                return job
            await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))

    async def get(self, recommendation_id: str) -> Job:
        return Job.model_validate(await self._request("GET", f"/v1/recommendations/{recommendation_id}"))

    async def recipe(self, recommendation_id: str) -> Recipe:
        return Recipe.from_job(await self.get(recommendation_id))

    async def list(
        self, *, status: str | None = None, model: str | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        params = {"status": status, "model": model, "limit": limit, "offset": offset}
        data = await self._request(
            "GET", "/v1/recommendations", params={k: v for k, v in params.items() if v is not None}
        )
        return JobPage.model_validate(data)

    async def trials(self, recommendation_id: str) -> builtins.list[Trial]:
        data = await self._request("GET", f"/v1/recommendations/{recommendation_id}/trials")
        return [Trial.model_validate(t) for t in data]

    async def cancel(self, recommendation_id: str) -> Job:
        return Job.model_validate(await self._request("DELETE", f"/v1/recommendations/{recommendation_id}"))

    async def upload_model(
        self,
        path: str | Path,
        *,
        loss: Loss,
        input: dict[str, Any] | None = None,
        target: dict[str, Any] | None = None,
        num_classes: int | None = None,
        timeout_s: float = 300,
    ) -> dict[str, Any]:
        return await self._upload(Path(path), _model_fields(loss, input, target, num_classes), timeout_s)

    async def upload_sample(self, path: str | Path, *, timeout_s: float = 300) -> dict[str, Any]:
        return await self._upload(Path(path), {"kind": "sample"}, timeout_s)

    async def models(self) -> builtins.list[dict[str, Any]]:
        return await self._request("GET", "/v1/models")

    async def device(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/device")

    async def _upload(self, path: Path, fields: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        content = await asyncio.to_thread(path.read_bytes)
        files = {"file": (path.name, content, "application/octet-stream")}
        return await self._request("POST", "/v1/artifacts", data=fields, files=files, timeout=timeout_s)

    async def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _decode(response)

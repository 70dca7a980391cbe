"""A small typed Python client for the batchsize service (httpx).

    from service.client import BatchsizeClient

    with BatchsizeClient("http://127.0.0.1:8000", api_key=None) as client:
        recipe = client.recommend("mlp", config={"hidden_dims": [256, 256]}, dataset_size=50_000,
                                  optimizer="adamw", learning_rate=3e-4, reference_batch_size=32)
        print(recipe.batch_size, recipe.micro_batch_size, recipe.gradient_accumulation_steps,
              recipe.learning_rate)

        model = client.upload_model("model.pt2", loss="cross_entropy")
        recipe = client.recommend(artifact_id=model["id"], dataset_size=1_281_167)

Every error the server answers with raises `BatchsizeError` carrying its `status_code`, `code`, `message`
and `details` (the server's envelope `{"error": {"code", "message", "details"}}`); a job that ends
`failed` or `cancelled` raises `RecommendationFailed`, one still running at the deadline
`RecommendationTimeout`. Imports httpx only (no torch), so training scripts stay light.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from service.status import ACTIVE, JobStatus

DEFAULT_URL = "http://127.0.0.1:8000"


class BatchsizeError(Exception):
    """An error answered by the service (or a failure to reach it: status_code 0)."""

    def __init__(
        self, message: str, *, status_code: int = 0, code: str = "error", details: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.details = details

    def __str__(self) -> str:
        where = f"HTTP {self.status_code} " if self.status_code else ""
        return f"{where}{self.code}: {self.message}"


class RecommendationFailed(BatchsizeError):
    """The job ended `failed` or `cancelled`; `code`/`message` are the job's error."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        super().__init__(
            str(error.get("message") or f"recommendation {job.get('id')} is {job.get('status')}"),
            code=str(error.get("code") or job.get("status") or "failed"),
            details=job,
        )
        self.job = job


class RecommendationTimeout(BatchsizeError):
    """The job was still queued or running when the wait ran out (it keeps running on the server)."""

    def __init__(self, job: dict[str, Any], timeout_s: float) -> None:
        super().__init__(
            f"recommendation {job.get('id')} is still {job.get('status')} after {timeout_s:g} s; "
            "wait for it again with client.wait(id)",
            code="timeout",
            details=job,
        )
        self.job = job


@dataclass(frozen=True)
class Recipe:
    """The training recipe of a finished recommendation (the full result is in `result`)."""

    id: str
    batch_size: int  # global batch = micro_batch_size x gradient_accumulation_steps x devices
    micro_batch_size: int
    gradient_accumulation_steps: int
    devices: int
    learning_rate: float
    learning_rate_rule: str
    warmup_steps: int
    steps_per_epoch: int
    max_feasible_batch_size: int
    confidence: str
    warnings: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> Recipe:
        r = job.get("result") or {}
        return cls(
            id=str(job["id"]),
            batch_size=int(r["recommended_batch_size"]),
            micro_batch_size=int(r["micro_batch_size"]),
            gradient_accumulation_steps=int(r.get("gradient_accumulation_steps") or 1),
            devices=int(r.get("devices") or 1),
            learning_rate=float(r["learning_rate"]),
            learning_rate_rule=str(r.get("learning_rate_rule") or ""),
            warmup_steps=int(r.get("warmup_steps") or 0),
            steps_per_epoch=int(r.get("steps_per_epoch") or 0),
            max_feasible_batch_size=int(r["max_feasible_batch_size"]),
            confidence=str(r.get("confidence") or ""),
            warnings=list(r.get("warnings") or []),
            result=r,
        )


ProgressCallback = Callable[[dict[str, Any]], None]


class BatchsizeClient:
    """Talks to one service. Usable as a context manager; `close()` otherwise."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
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
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        learning_rate: float = 0.1,
        reference_batch_size: int = 32,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        gradient_checkpointing: bool = False,
        device: dict[str, Any] | None = None,
        memory_budget_bytes: int | None = None,
        objective: Literal["time_to_target", "throughput", "max_feasible"] = "time_to_target",
        time_budget_s: float = 120,
        force: bool = False,
        wait_timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> Recipe:
        """Ask for a recommendation, wait for it (polling) and return its recipe.

        `model` names a zoo model (GET /v1/models) with optional `config` overrides; `artifact_id` an
        uploaded model instead. `on_progress(job)` is called after every poll.
        """
        body = build_request(
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
        )
        job = self.submit(body)
        done = self.wait(
            job["id"], timeout_s=wait_timeout_s, poll_interval_s=poll_interval_s, on_progress=on_progress
        )
        return Recipe.from_job(done)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/recommendations with a full request body; returns the job (maybe already finished)."""
        return self._request("POST", "/v1/recommendations", json=body)

    def wait(
        self,
        recommendation_id: str,
        *,
        timeout_s: float = 900,
        poll_interval_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Poll until the job has finished; return it if it succeeded, else raise."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(recommendation_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] == JobStatus.SUCCEEDED:
                return job
            if job["status"] not in ACTIVE:
                raise RecommendationFailed(job)
            if time.monotonic() >= deadline:
                raise RecommendationTimeout(job, timeout_s)
            time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))

    def get(self, recommendation_id: str) -> dict[str, Any]:
        """GET /v1/recommendations/{id}: status, progress, request, result or error."""
        return self._request("GET", f"/v1/recommendations/{recommendation_id}")

    def list(
        self, *, status: str | None = None, model: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """A page of recommendations, newest first: {"items", "total", "limit", "offset"}."""
        params = {"status": status, "model": model, "limit": limit, "offset": offset}
        return self._request(
            "GET", "/v1/recommendations", params={k: v for k, v in params.items() if v is not None}
        )

    def trials(self, recommendation_id: str) -> builtins.list[dict[str, Any]]:
        return self._request("GET", f"/v1/recommendations/{recommendation_id}/trials")

    def cancel(self, recommendation_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/recommendations/{recommendation_id}")

    # -- artifacts

    def upload_model(
        self,
        path: str | Path,
        *,
        loss: Literal["cross_entropy", "mse", "model_returns_loss"],
        input: dict[str, Any] | None = None,
        target: dict[str, Any] | None = None,
        num_classes: int | None = None,
        timeout_s: float = 300,
    ) -> dict[str, Any]:
        """Upload a torch.export archive (.pt2). `input`/`target`: {"shape", "dtype", "high"}, only where
        the program cannot tell (dynamic non-batch dimensions, integer value ranges)."""
        import json

        fields: dict[str, Any] = {"kind": "model", "loss": loss}
        if input is not None:
            fields["input"] = json.dumps(input)
        if target is not None:
            fields["target"] = json.dumps(target)
        if num_classes is not None:
            fields["num_classes"] = str(num_classes)
        return self._upload(Path(path), fields, timeout_s)

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
            raise BatchsizeError(
                f"cannot reach the batchsize service at {self._http.base_url}: {exc}", code="unreachable"
            ) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()


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
) -> dict[str, Any]:
    """The POST /v1/recommendations body for these settings."""
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

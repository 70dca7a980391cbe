"""Request and response bodies of the HTTP API (pydantic v2). Field names follow docs/design.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)

from batchsize_client.models import JobError, Progress, RecommendationResult  # the client's: one definition
from service.security import MAX_JSON_DEPTH, json_depth
from service.status import JobStatus

MIN_TIME_BUDGET_S = 1.0  # less cannot run even one probe trial
Beta = Annotated[float, Field(ge=0, lt=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    """A zoo model (`name` + optional `config`) or an uploaded model (`artifact_id`)."""

    name: str | None = Field(None, max_length=64, description="Zoo model name (see GET /v1/models).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the zoo config's defaults."
    )
    artifact_id: str | None = Field(None, max_length=64, description="An uploaded model artifact.")

    @field_validator("config")
    @classmethod
    def _shallow(cls, config: dict[str, Any]) -> dict[str, Any]:
        # Bounded before anything recurses over it (serialising, hashing, storing).
        if json_depth(config) > MAX_JSON_DEPTH:
            raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels")
        return config

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.name is None) == (self.artifact_id is None):
            raise ValueError("give exactly one of model.name or model.artifact_id")
        return self


class InputSpec(_Strict):
    shape: list[int] | None = Field(
        None, min_length=1, max_length=8, description="Per-sample input shape (without the batch dimension)."
    )


class DatasetSpec(_Strict):
    size: int = Field(50_000, gt=0, le=10**12, description="Training samples per epoch.")
    sample_id: str | None = Field(
        None, max_length=64, description="An uploaded data sample for the statistics."
    )


class TrainingSpec(_Strict):
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: float = Field(
        0.1, gt=0, le=100, description="Learning rate tuned at reference_batch_size."
    )
    reference_batch_size: int = Field(32, gt=0, le=10**7)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    loop: Literal["pytorch", "lightning"] = Field(
        "pytorch",
        description=(
            "The training loop whose memory the limit is measured in. pytorch: zero_grad(set_to_none=True) "
            "after optimizer.step(), gradients freed before the next forward. lightning: Lightning's "
            "automatic optimisation, where the previous step's gradients live through the forward (zeroed "
            "before backward)."
        ),
    )
    prefetch_batches: int = Field(
        0,
        ge=0,
        le=16,
        description=(
            "Batches the data pipeline holds ahead, in host memory, while a step runs (counted against "
            "the budget on CPU only). Lightning's data fetcher holds 1 when the DataLoader has no length."
        ),
    )
    # The optimizer exactly as the client runs it (the probe trains with these settings).
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (default 0.9); sgd only.")
    nesterov: bool = Field(False, description="Nesterov momentum; sgd only, needs momentum > 0.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam/AdamW [beta1, beta2].")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam/AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="Weight decay (AdamW: decoupled).")
    # The horizon the answer is for; neither: the deepest loss the probe reached (the answer says so).
    epochs: float | None = Field(
        None, gt=0, le=1e6, description="Epochs the client plans to train at reference_batch_size."
    )
    target_loss: float | None = Field(
        None, ge=-1e6, le=1e6, description="The loss to train to, on the data sample's held-out part."
    )
    ignore_index: int = Field(
        -100,
        ge=-(2**31),
        lt=2**31,
        description=(
            "cross_entropy targets equal to this value are left out of the loss and of the data sample's "
            "class-id checks (PyTorch's default -100; e.g. the padding id). Uploaded models only; "
            "a model that computes its own loss applies its own."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("training.nesterov needs optimizer sgd with momentum > 0")
        if self.epochs is not None and self.target_loss is not None:
            raise ValueError("give at most one of training.epochs or training.target_loss")
        return self


class DeviceSpec(_Strict):
    """The device the client will train on. Omit it to mean 'this service's host device'."""

    type: Literal["cpu", "cuda"] | None = None
    name: str | None = Field(None, max_length=128)
    memory_bytes: int | None = Field(None, gt=0, le=2**50)
    count: int = Field(1, ge=1, le=4096, description="Devices for data-parallel training.")
    allow_extrapolation: bool = Field(
        False,
        description="When no worker has this device, let another worker answer by extrapolating its memory "
        "model (flagged `extrapolated`). Otherwise the request waits for a worker that has it.",
    )


class RecommendationCreate(_Strict):
    model: ModelRef
    input: InputSpec = Field(default_factory=InputSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    device: DeviceSpec = Field(default_factory=DeviceSpec)
    memory_budget_bytes: int | None = Field(
        None,
        gt=0,
        le=2**50,
        description="Memory the training may use per device; default: the device's free memory.",
    )
    objective: Literal["time_to_target", "throughput", "max_feasible"] = "time_to_target"
    time_budget_s: float = Field(
        120,
        ge=MIN_TIME_BUDGET_S,
        description=(
            f"Wall-clock budget for the whole probe, at least {MIN_TIME_BUDGET_S:g} s; the largest accepted "
            "is this service's BATCHSIZE_MAX_TIME_BUDGET_S (default 3600 s)."
        ),
    )
    force: bool = Field(False, description="Probe again even if an identical request already succeeded.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "mlp", "config": {"hidden_dims": [256, 256]}},
                    "dataset": {"size": 50000},
                    "training": {"optimizer": "sgd", "learning_rate": 0.1, "reference_batch_size": 32},
                    "memory_budget_bytes": 268435456,
                    "objective": "time_to_target",
                    "time_budget_s": 60,
                }
            ]
        },
    )


class RecommendationOut(BaseModel):
    """A recommendation job: its status and live progress, the stored request, and the result or error."""

    id: str = Field(description="The recommendation's id.")
    status: JobStatus = Field(description="queued, running, succeeded, failed or cancelled.")
    fingerprint: str = Field(description="Hash of everything that changes the answer (64 hex digits).")
    progress: Progress
    request: RecommendationCreate = Field(
        description="The canonical request as stored: every default filled in, `force` left out."
    )
    result: RecommendationResult | None = Field(None, description="The recipe, once the job succeeded.")
    error: JobError | None = Field(None, description="Why the job failed or was cancelled.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    # A job stored under an older schema is still served as stored: the schema documents the fields, it
    # never makes reading a stored job fail.
    @field_validator("request", "result", mode="wrap")
    @classmethod
    def _as_stored_when_it_does_not_fit(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            return value

    # No return annotation: the fields keep their own schemas in the OpenAPI document.
    @field_serializer("request", "result", mode="wrap")
    def _as_stored(self, value: Any, handler: SerializerFunctionWrapHandler):
        if isinstance(value, RecommendationCreate):
            return value.model_dump(mode="json", exclude_unset=True)
        return value if isinstance(value, dict) else handler(value)


class RecommendationPage(BaseModel):
    items: list[RecommendationOut]
    total: int
    limit: int
    offset: int


class TrialOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    phase: str
    batch_size: int | None
    outcome: str
    peak_bytes: int | None
    step_time_s: float | None
    samples_per_second: float | None
    detail: dict[str, Any] | None
    created_at: datetime


class ZooModel(BaseModel):
    name: str
    description: str
    config_schema: dict[str, Any]
    default_config: dict[str, Any]
    input_shape: list[int]
    input_dtype: str
    supports_gradient_checkpointing: bool


class DeviceOut(BaseModel):
    type: Literal["cpu", "cuda"]
    name: str
    memory_bytes: int
    free_bytes: int
    count: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    database: bool
    writable: bool = Field(description="The database takes a write (tried and rolled back).")
    disk_free_bytes: int | None = Field(
        None,
        description="Free bytes on the data disk (under BATCHSIZE_MIN_FREE_DISK_BYTES: not ready).",
    )
    worker: bool | None = Field(
        None, description="Whether the in-process worker is alive (None: not run here)."
    )


class WorkerDevice(BaseModel):
    type: str
    name: str
    memory_bytes: int
    count: int


class WorkerOut(BaseModel):
    id: str = Field(description="host:pid:random")
    host: str
    device: WorkerDevice
    current_job: str | None = None
    started_at: datetime
    heartbeat_at: datetime
    alive: bool = Field(description="Whether its heartbeat is more recent than BATCHSIZE_STALE_AFTER_S.")

"""The service's answers as pydantic models: one definition for the HTTP API's schema, the client, the CLI.

`RecommendationResult` is the `result` of a succeeded recommendation. Every field is optional (a result
stored by an older probe may lack newer fields) and unknown fields are kept (`extra="allow"`: a newer
service may add some), so reading never fails on a field this version does not know. Serialising gives
back exactly the fields that were read: no null is added for a field the result did not have.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATUSES = ("queued", "running")


class OpenModel(BaseModel):
    """Lenient reading (unknown fields kept), faithful writing (only the fields that were given)."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _given_fields_only(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        data = handler(self)
        if not isinstance(data, dict):
            return data
        given = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in data.items() if key in given}


def read_leniently(model: type[OpenModel], data: dict[str, Any]) -> tuple[OpenModel, list[str]]:
    """`model` read from `data`, leaving out the top-level fields this version cannot read as typed (a
    newer service may have changed one, the server's JSON still has it) and saying so in `warnings`;
    returns the instance and the names of the fields left out."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        unreadable = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
        kept = {key: value for key, value in data.items() if key not in unreadable}
        if "warnings" in model.model_fields and "warnings" not in unreadable:
            note = f"fields not read by this client version (changed type): {', '.join(unreadable)}"
            kept["warnings"] = [*(kept.get("warnings") or []), note]
        return model.model_validate(kept), unreadable


# ------------------------------------------------------------------------------------ result parts


class ThroughputPoint(OpenModel):
    batch_size: int = Field(description="Micro-batch size timed.")
    samples_per_second: float | None = Field(None, description="Median training samples per second.")
    step_time_s: float | None = Field(None, description="Median seconds per training step.")


class TimeToTargetPoint(OpenModel):
    batch_size: int = Field(description="Global batch size.")
    relative_time: float = Field(
        description="Predicted wall time to the target loss, relative to the recommended batch (1.0)."
    )


class ThroughputModel(OpenModel):
    kind: str | None = Field(
        None, description="`affine` (step time = overhead + per-sample cost, fitted) or `interpolated`."
    )
    overhead_s: float | None = Field(None, description="Fitted fixed cost of one step, seconds.")
    per_sample_s: float | None = Field(None, description="Fitted cost per sample, seconds.")
    rel_rms: float | None = Field(None, description="Relative rms error of the fit over the ladder.")


class MemoryModel(OpenModel):
    fixed_bytes: int | None = Field(None, description="Memory a step needs at any batch size (weights...).")
    per_sample_bytes: int | None = Field(None, description="Additional memory per sample of the micro-batch.")
    optimizer_peak_bytes: int | None = Field(
        None, description="Peak of the optimizer step at the maximum batch (can dominate for small models)."
    )
    overhead_ratio: float | None = Field(None, description="Measured peak over the modelled one.")
    budget_bytes: int | None = Field(None, description="The memory budget the search respected.")


class DeviceInfo(OpenModel):
    type: str | None = Field(None, description="`cpu` or `cuda`.")
    name: str | None = Field(None, description="Device name.")
    memory_bytes: int | None = Field(None, description="Device memory.")


class TargetDevice(DeviceInfo):
    count: int | None = Field(None, description="Devices for data-parallel training.")


class NoiseScale(OpenModel):
    value: float | None = Field(None, description="Gradient noise scale B_simple (null when unresolved).")
    low: float | None = Field(None, description="Lower end of its bootstrap interval.")
    high: float | None = Field(None, description="Upper end (null: unbounded).")
    measured_on: str | None = Field(
        None, description="Whose data: `client` or `builtin:<name>` (built-in data: low confidence)."
    )
    status: str | None = Field(None, description="`ok`, `unresolved` or `non_finite_loss`.")
    method: str | None = Field(None, description="Estimator (`two_batch_size`).")
    draws: int | None = Field(None, description="Gradient draws averaged.")
    b_small: int | None = Field(None, description="Small batch of the two-batch-size estimator.")
    b_big: int | None = Field(None, description="Large batch of the two-batch-size estimator.")
    preconditioned: bool | None = Field(
        None, description="Measured on the Adam-preconditioned gradient (Adam-family optimizers)."
    )
    warmup_steps: int | None = Field(None, description="Training steps before the estimate.")
    plain: dict[str, float | None] | None = Field(
        None, description="The unpreconditioned estimate, when `preconditioned`."
    )


class Race(OpenModel):
    batch_size: int | None = Field(None, description="Global batch size raced.")
    learning_rate: float | None = Field(None, description="Learning rate it raced with.")
    status: str | None = Field(
        None, description="`reached`, `diverged`, `skipped`, `no_progress`, `not_reached`..."
    )
    steps: int | None = Field(None, description="Training steps run.")
    best_loss: float | None = Field(None, description="Lowest evaluation loss seen.")
    train_seconds: float | None = Field(None, description="Seconds spent training.")
    steps_to_level: float | None = Field(None, description="Steps to the common loss level (interpolated).")
    lag_steps: float | None = Field(
        None, description="Steps an SGD momentum buffer takes to fill; the S(B) fit counts the steps after."
    )


class Races(OpenModel):
    status: str | None = Field(
        None, description="`ok` (fitted), `above_range`/`below_range` (a bound only), `insufficient`..."
    )
    value: float | None = Field(None, description="B_noise fitted from S(B) = S_min(1 + B_noise/B).")
    bound: str | None = Field(None, description="`lower` or `upper` when `value` is only a bound.")
    rel_rms: float | None = Field(None, description="Relative rms error of the fit.")
    level: float | None = Field(None, description="The loss level every usable race reached.")
    points: int | None = Field(None, description="Races in the fit.")
    races: list[Race] | None = Field(None, description="Each race.")
    seconds: float | None = Field(None, description="Seconds the races took.")


class DataSample(OpenModel):
    measured_on: str | None = Field(None, description="`client` or `builtin:<name>`.")
    size: int | None = Field(None, description="Examples in the sample.")
    description: str | None = Field(None, description="What the sample is.")


class AccumulationCheck(OpenModel):
    micro_batch_size: int | None = Field(None, description="The recipe's micro-batch after the check.")
    peak_bytes: int | None = Field(
        None, description="Peak of its accumulating step, measured (null when not measured)."
    )
    fits: bool | None = Field(
        None, description="The micro-batch first chosen fitted while accumulating (null: not measured)."
    )
    verified: bool | None = Field(None, description="micro_batch_size was measured within the budget.")
    trials: int | None = Field(None, description="Accumulating steps measured.")
    batch_sizes_tried: list[list[int | str]] | None = Field(
        None, description="[micro-batch, outcome] per accumulating trial."
    )
    convention: str | None = Field(None, description="What the accumulating step keeps alive.")


class SearchSummary(OpenModel):
    trials: int | None = Field(None, description="Trials the memory search ran.")
    measured_convention: str | None = Field(
        None, description="When gradients are freed in the measured step (what the limit assumes)."
    )
    loop: str | None = Field(
        None, description='The training loop measured: "pytorch" or "lightning" (training.loop).'
    )
    max_batch_size_measured: int | None = Field(None, description="Largest micro-batch verified on the host.")
    bracket: list[int | None] | None = Field(
        None, description="[largest that fit, smallest that failed or null]."
    )
    capped: bool | None = Field(None, description="Stopped at the batch size cap, not at the memory limit.")
    converged: bool | None = Field(None, description="The limit was pinned down before trials ran out.")
    batch_sizes_tried: list[list[int | str]] | None = Field(
        None, description="[batch size, outcome] per trial."
    )
    accumulation_checked: AccumulationCheck | None = Field(
        None,
        description="The micro-batch measured with gradients accumulating over two micro-steps (null "
        "when the recipe does not accumulate).",
    )


class ProbeInfo(OpenModel):
    version: str | None = Field(None, description="Probe version.")
    torch: str | None = Field(None, description="torch version the probe ran on.")
    duration_s: float | None = Field(None, description="Seconds the probe took.")


# ---------------------------------------------------------------------------------------- result


class Phase(OpenModel):
    phase: str | None = Field(
        None, description="`setup`, `memory`, `throughput`, `statistics` or `accumulation`."
    )
    ran: bool | None = Field(None, description="False when the objective or the time budget skipped it.")
    seconds: float | None = Field(None, description="Wall time it took.")
    note: str | None = Field(None, description="Why it was skipped or cut short.")


class LearningRateCeiling(OpenModel):
    value: float | None = Field(None, description="The cap applied at the recommended batch size.")
    batch_size: int | None = Field(None, description="The batch size it was observed at.")
    learning_rate: float | None = Field(None, description="The learning rate seen training stably there.")
    source: str | None = Field(None, description="`warmup`, `race` or `reference` (nothing observed).")
    capped: bool | None = Field(None, description="The scaling rule asked for more and was capped.")


class RecommendationResult(OpenModel):
    """A succeeded recommendation: the training recipe, and the measurements it was derived from."""

    # The recipe
    recommended_batch_size: int | None = Field(
        None, description="Global batch = micro_batch_size x gradient_accumulation_steps x devices."
    )
    micro_batch_size: int | None = Field(None, description="Per-device batch of one forward/backward.")
    gradient_accumulation_steps: int | None = Field(None, description="Micro-batches per optimizer step.")
    devices: int | None = Field(None, description="Data-parallel devices the recipe is for.")
    learning_rate: float | None = Field(None, description="Learning rate for the recommended batch.")
    learning_rate_rule: str | None = Field(None, description="How it was scaled from the reference.")
    reference_learning_rate: float | None = Field(None, description="The client's reference learning rate.")
    reference_batch_size: int | None = Field(None, description="The batch the reference was tuned at.")
    warmup_steps: int | None = Field(None, description="Linear warm-up steps from the reference rate.")
    warmup_rule: str | None = Field(None, description="Why that warm-up.")
    steps_per_epoch: int | None = Field(None, description="Optimizer steps per epoch at the global batch.")
    objective: str | None = Field(None, description="The objective asked for.")
    objective_used: str | None = Field(
        None,
        description="The objective applied (`throughput` when no noise estimate allowed time to target).",
    )
    batch_choice: str | None = Field(
        None,
        description="How the size was chosen: `point estimate`, or `robust: ...` (the smallest 80 % bound of "
        "the time ratio given B_noise's spread at the horizon, moved halfway in ln B to the step-time knee).",
    )
    learning_rate_scaled: float | None = Field(
        None, description="What the scaling rule alone gave, before the ceiling."
    )
    learning_rate_ceiling: LearningRateCeiling | None = Field(
        None, description="The largest learning rate the probe saw train stably, and whether it capped."
    )
    optimizer_settings: dict[str, Any] | None = Field(
        None, description="The optimizer the probe trained (momentum, nesterov, betas, eps, weight_decay)."
    )
    horizon: dict[str, Any] | None = Field(
        None,
        description="B_noise carried to the client's horizon (epochs or target_loss) with an interval; "
        "steps, epochs and predicted time for the recommended and reference sizes; the time-ratio interval.",
    )
    # Memory
    max_feasible_batch_size: int | None = Field(None, description="Largest micro-batch that fits the budget.")
    max_feasible_batch_size_aligned: int | None = Field(None, description="The same, a multiple of 8.")
    max_feasible_is_lower_bound: bool | None = Field(
        None, description="The time budget ended the search: the true maximum may be larger."
    )
    memory: MemoryModel | None = Field(None, description="The fitted memory model.")
    # Speed and statistics
    throughput: list[ThroughputPoint] | None = Field(None, description="Samples/s per micro-batch size.")
    throughput_source: str | None = Field(
        None, description="`ladder`, or `memory_search` when the search's own steps were reused."
    )
    throughput_model: ThroughputModel | None = Field(None, description="Step-time model used.")
    time_to_target_curve: list[TimeToTargetPoint] | None = Field(
        None, description="Predicted relative time to target around the recommendation."
    )
    b_noise: float | None = Field(None, description="The critical batch B_noise the recipe used.")
    b_noise_bound: str | None = Field(
        None, description="`lower` when B_noise is only known to exceed `b_noise` (implausibly large)."
    )
    noise_scale_source: str | None = Field(
        None, description="Where B_noise came from: `races`, `gradient_noise_scale` or `combined`."
    )
    noise_scale_stability_factor: float | None = Field(
        None,
        description="What SGD's measured B_noise was multiplied by for its stability limit: "
        "min(1, 0.1 (1+momentum)/(1-momentum)); 1 for Adam.",
    )
    gradient_noise_scale: NoiseScale | None = Field(None, description="The measured gradient noise scale.")
    races: Races | None = Field(None, description="Short training races at a few sizes.")
    data_sample: DataSample | None = Field(None, description="The data the statistics were measured on.")
    # Where and how
    device: DeviceInfo | None = Field(None, description="The device the probe measured on.")
    target_device: TargetDevice | None = Field(None, description="The client's target, when it differs.")
    extrapolated: bool | None = Field(
        None, description="The memory limit was predicted for the target device, not verified there."
    )
    search: SearchSummary | None = Field(None, description="The memory search.")
    probe: ProbeInfo | None = Field(None, description="Probe version, torch version, duration.")
    confidence: str | None = Field(None, description="`high`, `medium` or `low`.")
    confidence_reasons: list[str] | None = Field(None, description="What lowered the confidence.")
    partial: bool | None = Field(None, description="The time budget cut a phase the objective needs.")
    phases: list[Phase] | None = Field(None, description="Each probe phase: whether it ran, its seconds.")
    warnings: list[str] | None = Field(None, description="Things to know before using the recipe.")


# ------------------------------------------------------------------------------------------- jobs


class Progress(BaseModel):
    phase: str | None = Field(None, description="The probe phase running now.")
    trials_done: int = Field(0, description="Trials finished.")
    trials_planned: int = Field(0, description="Trials planned so far (grows as phases start).")
    reason: str | None = Field(
        None, description="Only while a queued job waits (phase `waiting_for_device`): why, and for what."
    )

    @model_serializer(mode="wrap")
    def _reason_only_when_waiting(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("reason") is None:
            data.pop("reason", None)
        return data


class JobError(BaseModel):
    code: str = Field(description="Stable error code, e.g. `oom_at_min_batch`, `timeout`, `model_error`.")
    message: str = Field(description="What went wrong, for people.")


class Job(BaseModel):
    """A recommendation job as the client sees it (`request` is the stored, canonical request)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: Status
    fingerprint: str = ""
    progress: Progress = Field(default_factory=Progress)
    request: dict[str, Any] = Field(default_factory=dict)
    result: RecommendationResult | None = None
    error: JobError | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @field_validator("result", mode="before")
    @classmethod
    def _result_as_far_as_readable(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return read_leniently(RecommendationResult, value)[0]
        return value

    @property
    def done(self) -> bool:
        return self.status not in ACTIVE_STATUSES


class JobPage(BaseModel):
    items: list[Job]
    total: int
    limit: int
    offset: int


class Trial(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    phase: str
    batch_size: int | None = None
    outcome: str
    peak_bytes: int | None = None
    step_time_s: float | None = None
    samples_per_second: float | None = None
    detail: dict[str, Any] | None = None
    created_at: datetime | None = None

"""The probe's result as typed dicts: what `engine.run_probe` returns and the worker stores.

Plain TypedDicts (no pydantic here, the engine runs with torch only). The HTTP API's schema and the
Python client read the same fields through `batchsize_client.models.RecommendationResult`; a test
checks that the two name the same fields. `total=False`: a phase that did not run leaves its fields out
or null, and newer fields may be added.
"""

from __future__ import annotations

from typing import Any, TypedDict


class ThroughputPoint(TypedDict, total=False):
    batch_size: int
    samples_per_second: float | None
    step_time_s: float | None


class TimeToTargetPoint(TypedDict, total=False):
    batch_size: int
    relative_time: float


class ThroughputModel(TypedDict, total=False):
    kind: str
    overhead_s: float
    per_sample_s: float
    rel_rms: float | None


class MemoryModel(TypedDict, total=False):
    fixed_bytes: int
    per_sample_bytes: int
    optimizer_peak_bytes: int
    overhead_ratio: float
    budget_bytes: int


class DeviceInfo(TypedDict, total=False):
    type: str
    name: str | None
    memory_bytes: int | None


class TargetDevice(DeviceInfo, total=False):
    count: int


class NoiseScale(TypedDict, total=False):
    value: float | None
    low: float | None
    high: float | None
    measured_on: str | None
    status: str
    method: str
    draws: int
    b_small: int
    b_big: int
    preconditioned: bool
    warmup_steps: int
    plain: dict[str, float | None]


class Race(TypedDict, total=False):
    batch_size: int
    learning_rate: float | None
    status: str
    steps: int
    best_loss: float | None
    train_seconds: float
    steps_to_level: float | None
    lag_steps: float  # SGD momentum's fill-up steps, not counted in the fit


class Races(TypedDict, total=False):
    status: str
    value: float | None
    bound: str | None
    rel_rms: float | None
    level: float | None
    points: int
    races: list[Race]
    seconds: float


class DataSample(TypedDict, total=False):
    measured_on: str
    size: int
    description: str


class AccumulationCheck(TypedDict, total=False):
    micro_batch_size: int  # the recipe's micro-batch after the check
    peak_bytes: int | None  # its accumulating step's measured peak (None when not measured)
    fits: bool | None  # the micro-batch first chosen fitted that way (None when not measured)
    verified: bool
    trials: int
    batch_sizes_tried: list[list[int | str]]
    convention: str


class SearchSummary(TypedDict, total=False):
    trials: int
    measured_convention: str
    loop: str  # the training loop measured: "pytorch" or "lightning"
    max_batch_size_measured: int
    bracket: list[int | None]
    capped: bool
    converged: bool
    batch_sizes_tried: list[list[int | str]]
    accumulation_checked: AccumulationCheck | None  # None when the recipe does not accumulate


class ProbeInfo(TypedDict, total=False):
    version: str
    torch: str
    duration_s: float


class Phase(TypedDict, total=False):
    phase: str
    ran: bool
    seconds: float
    note: str


class LearningRateCeiling(TypedDict, total=False):
    value: float
    batch_size: int
    learning_rate: float
    source: str
    capped: bool


class ProbeResult(TypedDict, total=False):
    """The recipe, and the measurements it was derived from (field names: a client contract)."""

    # The recipe (recipe.recommend)
    recommended_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    devices: int
    learning_rate: float
    learning_rate_rule: str
    reference_learning_rate: float
    reference_batch_size: int
    warmup_steps: int
    warmup_rule: str
    steps_per_epoch: int
    objective: str
    objective_used: str
    batch_choice: str  # "point estimate", or "robust: ..." (then to the step-time knee) with a spread
    learning_rate_scaled: float
    learning_rate_ceiling: LearningRateCeiling
    optimizer_settings: dict[str, Any]
    horizon: dict[str, Any]
    # Memory (search)
    max_feasible_batch_size: int
    max_feasible_batch_size_aligned: int
    max_feasible_is_lower_bound: bool
    memory: MemoryModel
    # Speed and statistics
    throughput: list[ThroughputPoint]
    throughput_source: str
    throughput_model: ThroughputModel
    time_to_target_curve: list[TimeToTargetPoint]
    b_noise: float | None
    b_noise_bound: str | None
    noise_scale_source: str | None
    noise_scale_stability_factor: float
    gradient_noise_scale: NoiseScale | None
    races: Races | None
    data_sample: DataSample | None
    # Where and how
    device: DeviceInfo
    target_device: TargetDevice | None
    extrapolated: bool
    search: SearchSummary
    probe: ProbeInfo
    confidence: str
    confidence_reasons: list[str]
    partial: bool
    phases: list[Phase]
    warnings: list[str]

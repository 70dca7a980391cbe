"""Jobs for the UI tests, stored the way a worker stores them (claim, trials, progress, finish)."""

from __future__ import annotations

import math
from typing import Any

from service import repository
from service.db.session import session_scope
from service.state import AppState

BUDGET = 256 * 2**20
NOISE_SCALE = {"value": 180.0, "low": 110.0, "high": 300.0, "measured_on": "builtin:digits"}
THROUGHPUT = [
    (8, 21_000.0), (16, 38_000.0), (32, 64_000.0), (64, 98_000.0), (128, 131_000.0),
    (256, 152_000.0), (512, 160_000.0), (1024, 163_000.0), (2040, 161_000.0),
]  # fmt: skip
MEMORY = {
    "fixed_bytes": 18_000_000,
    "per_sample_bytes": 120_000,
    "optimizer_peak_bytes": 26_000_000,
    "budget_bytes": BUDGET,
}


def _relative_times() -> list[dict[str, float]]:
    raw = [(b, (b + NOISE_SCALE["value"]) / s) for b, s in THROUGHPUT]
    best = min(t for _, t in raw)
    return [{"batch_size": b, "relative_time": round(t / best, 4)} for b, t in raw]


def result(**overrides: Any) -> dict[str, Any]:
    """A realistic result for the zoo MLP on a CPU host with a 256 MiB budget."""
    body: dict[str, Any] = {
        "max_feasible_batch_size": 2043,
        "max_feasible_batch_size_aligned": 2040,
        "recommended_batch_size": 128,
        "micro_batch_size": 128,
        "gradient_accumulation_steps": 1,
        "devices": 1,
        "learning_rate": 0.4,
        "learning_rate_rule": "linear (SGD): 0.1 × 128 / 32",
        "warmup_steps": 100,
        "steps_per_epoch": math.ceil(50_000 / 128),
        "gradient_noise_scale": dict(NOISE_SCALE),
        "throughput": [{"batch_size": b, "samples_per_second": s} for b, s in THROUGHPUT],
        "time_to_target_curve": _relative_times(),
        "memory": dict(MEMORY),
        "device": {"type": "cpu", "name": "x86_64 test CPU", "memory_bytes": 24 * 2**30},
        "extrapolated": False,
        "confidence": "medium",
        "warnings": ["the gradient noise scale was measured on a built-in sample (builtin:digits)"],
    }
    body.update(overrides)
    return body


def memory_trials() -> list[dict[str, Any]]:
    def peak(b: int) -> int:
        return max(MEMORY["optimizer_peak_bytes"], MEMORY["fixed_bytes"] + MEMORY["per_sample_bytes"] * b)

    return [
        {"phase": "memory", "batch_size": 8, "outcome": "ok", "peak_bytes": peak(8), "step_time_s": 0.0004},
        {
            "phase": "memory",
            "batch_size": 128,
            "outcome": "ok",
            "peak_bytes": peak(128),
            "step_time_s": 0.001,
        },
        {"phase": "memory", "batch_size": 2100, "outcome": "over_budget", "peak_bytes": peak(2100)},
        {
            "phase": "memory",
            "batch_size": 2043,
            "outcome": "ok",
            "peak_bytes": peak(2043),
            "step_time_s": 0.012,
        },
    ]


def all_trials() -> list[dict[str, Any]]:
    trials = memory_trials()
    for b, s in THROUGHPUT:
        trials.append(
            {"phase": "throughput", "batch_size": b, "outcome": "ok", "step_time_s": b / s,
             "samples_per_second": s, "detail": {"timed_steps": 7}}
        )  # fmt: skip
    for b in (32, 256):
        trials.append({"phase": "noise_scale", "batch_size": b, "outcome": "ok", "detail": {"draws": 64}})
    return trials


def claim(state: AppState, recommendation_id: str) -> None:
    with session_scope(state.writes) as session:
        job = repository.claim_next_queued(session, worker_id="test:ui")
        assert job is not None and job.id == recommendation_id, "seed jobs one at a time"


def add_trials(
    state: AppState, recommendation_id: str, trials: list[dict[str, Any]], **progress: Any
) -> None:
    with session_scope(state.writes) as session:
        if progress:
            repository.record_progress(session, recommendation_id, **progress)
        for trial in trials:
            repository.add_trial(session, recommendation_id, trial)


def finish(state: AppState, recommendation_id: str, **outcome: Any) -> None:
    with session_scope(state.writes) as session:
        repository.finish(session, recommendation_id, **outcome)


def succeeded(state: AppState, recommendation_id: str, body: dict[str, Any] | None = None) -> None:
    """Claim a queued job, store every trial, and finish it with `body` (default: result())."""
    claim(state, recommendation_id)
    add_trials(state, recommendation_id, all_trials(), phase="memory", trials_planned=len(all_trials()))
    finish(state, recommendation_id, status="succeeded", result=body if body is not None else result())


def request(dataset_size: int = 50_000, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": "mlp"},
        "dataset": {"size": dataset_size},
        "memory_budget_bytes": BUDGET,
        **extra,
    }

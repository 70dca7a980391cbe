"""Runs one probe: build the model, find the largest batch size that fits, time a throughput ladder,
measure the gradient noise scale and race a few sizes on real data, and assemble the recommendation.
Streams progress as JSON-ready event dicts through `emit`.

Events:
    {"event": "phase", "phase": "setup" | "warmup" | "memory" | "throughput" | "statistics",
     "trials_planned": int}
    {"event": "trial", "phase": ..., "batch_size": int, "outcome": "ok" | "oom" | "over_budget" | "error",
     "peak_bytes": int | None, "step_time_s": float | None, "samples_per_second": float | None,
     "detail": {...}}

Failures raise ProbeError with a stable code: invalid_spec, unknown_model, invalid_config,
device_unavailable, unsupported_precision, unsupported_option, budget_exceeds_device,
budget_below_model, oom_at_min_batch, nan_loss, model_error, invalid_sample.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from models.registry import get_model, make_config
from service.probing import horizon
from service.probing.data import sample_for_model
from service.probing.memory import (
    check_budget_covers_model,
    cuda_memory_budget,
    describe_device,
    is_oom,
    measure_step,
    resolve_budget,
)
from service.probing.races import run_statistics
from service.probing.recipe import recommend
from service.probing.search import (
    PLANNED_TRIALS,
    SearchResult,
    Trial,
    align_batch_size,
    search_max_batch_size,
)
from service.probing.spec import PROBE_VERSION, ProbeError, ProbeSpec
from service.probing.step import MEASURED_CONVENTION, TrainingStep, build_optimizer, is_precision_error
from service.probing.throughput import measure_throughput, throughput_ladder

Emit = Callable[[dict[str, Any]], None]

# Share of the time left after the memory search that the throughput ladder may use; the rest is
# kept for the phases that follow it (gradient noise scale, training races).
THROUGHPUT_TIME_SHARE = 0.4
# Share of what is left after the ladder for the statistics phase: the rest is slack for the last step
# of each phase overrunning its share and for assembling the answer inside the client's time budget.
STATISTICS_TIME_SHARE = 0.85
# Below this many seconds the noise-scale warm-up cannot train long enough to say anything.
MIN_STATISTICS_S = 2.0
# Memory kept free when a memory model measured here is extrapolated to another device: its allocator
# and runtime (CUDA context, fragmentation) take memory the tensors measured here do not show.
EXTRAPOLATION_MARGIN = 0.1


def run_probe(spec: ProbeSpec, emit: Emit) -> dict[str, Any]:
    """Run the probe described by `spec`, calling `emit(event)` as it goes; return the result dict."""
    started = time.monotonic()
    _validate(spec)
    device = _probe_device(spec.device)
    host = describe_device(device)
    target = _target_device(spec.target_device, host)
    # With a different target device the client's budget is the target's; the host uses its default.
    budget = resolve_budget(None if target else spec.memory_budget_bytes, host)
    cap = max(1, min(spec.max_batch_size, spec.dataset_size))
    emit({"event": "phase", "phase": "setup", "trials_planned": 0})

    model_spec, config = _resolve_model(spec)
    with _model_errors(spec):
        step = TrainingStep.from_spec(spec, model_spec, config)
        check_budget_covers_model(budget, step.state_bytes())
        with _device_budget(device, budget):
            _warm_up(step, budget, cap, emit)
            check_budget_covers_model(budget, step.state_bytes())  # now with the real optimizer state
            emit({"event": "phase", "phase": "memory", "trials_planned": min(PLANNED_TRIALS, cap)})
            search = search_max_batch_size(_trial_measurer(step, budget, emit), budget, cap)
            ladder_time = THROUGHPUT_TIME_SHARE * max(0.0, spec.time_budget_s - (time.monotonic() - started))
            throughput = _throughput_phase(step, search.max_batch_size, ladder_time, emit)
            del step  # free the measured model before the statistics phase builds a fresh one
            statistics_time = STATISTICS_TIME_SHARE * (spec.time_budget_s - (time.monotonic() - started))
            statistics = _statistics_phase(
                spec, model_spec, config, device, search.max_batch_size, throughput, statistics_time, emit
            )

    warnings = _warnings(spec, host, search, throughput, ladder_time)
    extrapolation = _extrapolate(spec, target, search, cap, warnings) if target else None
    return _assemble_result(
        spec,
        search=search,
        throughput=throughput,
        statistics=statistics,
        device=host,
        budget_bytes=budget,
        extrapolation=extrapolation,
        warnings=warnings,
        duration_s=time.monotonic() - started,
    )


# --------------------------------------------------------------------------------------------------
# Setup


def _validate(spec: ProbeSpec) -> None:
    checks = {
        "dataset_size must be >= 1": spec.dataset_size >= 1,
        "max_batch_size must be >= 1": spec.max_batch_size >= 1,
        "reference_batch_size must be >= 1": spec.reference_batch_size >= 1,
        "learning_rate must be > 0": spec.learning_rate > 0,
        "time_budget_s must be > 0": spec.time_budget_s > 0,
        "device_count must be >= 1": spec.device_count >= 1,
        "objective must be time_to_target, throughput or max_feasible": spec.objective
        in ("time_to_target", "throughput", "max_feasible"),
    }
    failed = [message for message, ok in checks.items() if not ok]
    if failed:
        raise ProbeError("invalid_spec", "; ".join(failed))


def _probe_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ProbeError("device_unavailable", "the probe asked for cuda but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    raise ProbeError("invalid_spec", f"unknown probe device {name!r}; expected cpu or cuda")


def _resolve_model(spec: ProbeSpec) -> tuple[Any, Any]:
    if spec.model_artifact_path is not None:  # an uploaded torch.export archive
        from service.probing.exported import resolve_exported

        return resolve_exported(spec)
    try:
        model_spec = get_model(spec.model_name)
    except KeyError as exc:
        raise ProbeError("unknown_model", str(exc)) from exc
    try:
        return model_spec, make_config(model_spec, spec.model_config)
    except (ValueError, TypeError) as exc:
        raise ProbeError("invalid_config", f"invalid config for {spec.model_name!r}: {exc}") from exc


@contextlib.contextmanager
def _model_errors(spec: ProbeSpec) -> Iterator[None]:
    """Turn exceptions raised by model code into ProbeErrors the client can read."""
    try:
        yield
    except ProbeError:
        raise
    except Exception as exc:
        if is_oom(exc):  # outside a measured trial: building or moving the model itself
            raise ProbeError(
                "budget_below_model", f"ran out of memory before any batch could be measured: {exc}"
            ) from exc
        if spec.precision != "fp32" and is_precision_error(exc):
            raise ProbeError(
                "unsupported_precision", f"{spec.precision} on {spec.device}: {type(exc).__name__}: {exc}"
            ) from exc
        raise ProbeError(
            "model_error", f"training step of {spec.model_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


@contextlib.contextmanager
def _device_budget(device: torch.device, budget_bytes: int) -> Iterator[None]:
    """CUDA: cap the allocator for the whole probe. CPU: each trial carries its own guard."""
    if device.type == "cuda":
        with cuda_memory_budget(device, budget_bytes):
            yield
    else:
        yield


# --------------------------------------------------------------------------------------------------
# Phases


def _trial_event(phase: str, trial: Trial) -> dict[str, Any]:
    sps = trial.batch_size / trial.step_time_s if trial.ok and trial.step_time_s else None
    detail = dict(trial.detail)
    for name in ("fwd_bwd_peak_bytes", "step_peak_bytes", "baseline_bytes"):
        if getattr(trial, name) is not None:
            detail[name] = getattr(trial, name)
    return {
        "event": "trial",
        "phase": phase,
        "batch_size": trial.batch_size,
        "outcome": trial.outcome,
        "peak_bytes": trial.peak_bytes,
        "step_time_s": trial.step_time_s,
        "samples_per_second": sps,
        "detail": detail,
    }


def _measure(step: TrainingStep, batch_size: int, budget: int) -> Trial:
    return measure_step(
        step.run,
        batch_size,
        budget,
        step.device,
        roots=step.memory_roots(),
        cleanup=step.discard_gradients,
    )


def _warm_up(step: TrainingStep, budget: int, cap: int, emit: Emit) -> None:
    """The first step creates the optimizer state: run it (guarded) before measuring.

    At batch 2 when allowed, since BatchNorm cannot train on one sample whose last feature map is 1x1;
    at batch 1 when 2 does not fit.
    """
    emit({"event": "phase", "phase": "warmup", "trials_planned": 1})
    for batch_size in sorted({min(2, cap), 1}, reverse=True):
        losses: list[torch.Tensor] = []
        trial = measure_step(
            lambda size, recorder, losses=losses: losses.append(step.run(size, recorder)),
            batch_size,
            budget,
            step.device,
            roots=step.memory_roots(),
            cleanup=step.discard_gradients,
        )
        emit(_trial_event("warmup", trial))
        if trial.ok:
            step.check_finite_loss(float(losses[0]), batch_size)
            return
    raise ProbeError(
        "oom_at_min_batch",
        f"the first training step at batch size 1 does not fit the memory budget of {budget} bytes "
        f"({trial.detail.get('error', trial.outcome)})",
    )


def _trial_measurer(step: TrainingStep, budget: int, emit: Emit) -> Callable[[int], Trial]:
    def measure(batch_size: int) -> Trial:
        try:
            trial = _measure(step, batch_size, budget)
        except Exception as exc:  # model code failed: record the trial, then let _model_errors map it
            failed = Trial(batch_size, "error", detail={"error": f"{type(exc).__name__}: {exc}"})
            emit(_trial_event("memory", failed))
            raise
        emit(_trial_event("memory", trial))
        return trial

    return measure


def _throughput_phase(
    step: TrainingStep, max_batch_size: int, time_budget_s: float, emit: Emit
) -> list[dict]:
    # From 2 up: BatchNorm cannot train on one sample whose last feature map is 1x1 (and B=1 says little).
    sizes = [b for b in throughput_ladder(max_batch_size) if b >= min(2, max_batch_size)]
    emit({"event": "phase", "phase": "throughput", "trials_planned": len(sizes)})

    def on_point(point: dict[str, Any]) -> None:
        keys = ("warmup_steps", "timed_steps", "step_times_s", "spread", "outlier")
        detail = {k: point[k] for k in keys if k in point}
        emit(
            {
                "event": "trial",
                "phase": "throughput",
                "batch_size": point["batch_size"],
                "outcome": point["outcome"],
                "peak_bytes": None,
                "step_time_s": point["step_time_s"],
                "samples_per_second": point["samples_per_second"],
                "detail": detail,
            }
        )

    points = measure_throughput(step, sizes, time_budget_s=time_budget_s, on_point=on_point, is_oom=is_oom)
    if any(p["outcome"] != "ok" for p in points):
        step.discard_gradients()
    return [
        {
            "batch_size": p["batch_size"],
            "samples_per_second": p["samples_per_second"],
            "step_time_s": p["step_time_s"],
            "spread": p.get("spread"),
            "outlier": p.get("outlier", False),
        }
        for p in points
        if p["outcome"] == "ok"
    ]


def _statistics_phase(
    spec: ProbeSpec,
    model_spec: Any,
    config: Any,
    device: torch.device,
    max_batch_size: int,
    throughput: list[dict],
    time_budget_s: float,
    emit: Emit,
) -> dict[str, Any]:
    """Gradient noise scale and training races on real data (races.run_statistics), in fp32.

    Returns run_statistics' dict ({"gradient_noise_scale", "races", "cut_short"}), with only
    "cut_short" filled when no real data fits the model or no time is left.
    """
    try:
        sample = sample_for_model(
            list(model_spec.input_shape(config)),
            model_spec.input_dtype,
            int(model_spec.num_classes(config)),
            spec.sample_path,
        )
    except ValueError as exc:
        raise ProbeError("invalid_sample", f"the data sample does not fit the model: {exc}") from exc
    skipped = {"gradient_noise_scale": None, "races": None}
    if sample is None:
        return {
            **skipped,
            "cut_short": ["no real data sample fits this model: the noise scale was not measured"],
        }
    if time_budget_s < MIN_STATISTICS_S:
        return {**skipped, "cut_short": ["no time was left for the gradient noise scale and training races"]}
    emit({"event": "phase", "phase": "statistics", "trials_planned": 2})
    torch.manual_seed(spec.seed)
    model = model_spec.build(config, spec.gradient_checkpointing).to(device)
    smallest_timed = min((p["batch_size"] for p in throughput), default=1)
    try:
        statistics = run_statistics(
            model,
            model_spec.loss,
            lambda params, lr: build_optimizer(spec.optimizer, params, lr, **spec.optimizer_options()),
            sample.x.to(device),
            sample.y.to(device),
            optimizer=spec.optimizer,
            learning_rate=spec.learning_rate,
            reference_batch_size=spec.reference_batch_size,
            max_batch_size=max_batch_size,
            time_budget_s=time_budget_s,
            measured_on=sample.measured_on,
            min_batch_size=max(8, smallest_timed),
            seed=spec.seed,
        )
    except Exception as exc:
        if not is_oom(exc):
            raise
        return {**skipped, "cut_short": [f"the statistics phase ran out of memory and was dropped: {exc}"]}
    gns = statistics["gradient_noise_scale"] or {}
    emit(
        {
            "event": "trial",
            "phase": "noise",
            "batch_size": gns.get("b_big"),
            "outcome": "ok" if gns.get("status") in ("ok", "unresolved") else "error",
            "peak_bytes": None,
            "step_time_s": None,
            "samples_per_second": None,
            "detail": {k: v for k, v in gns.items() if isinstance(v, str | int | float | bool) or v is None},
        }
    )
    for race in (statistics.get("races") or {}).get("races", []):
        emit(
            {
                "event": "trial",
                "phase": "race",
                "batch_size": race.get("batch_size"),
                "outcome": "ok" if race.get("status") not in ("diverged", "skipped") else "error",
                "peak_bytes": None,
                "step_time_s": None,
                "samples_per_second": None,
                "detail": race,
            }
        )
    statistics["sample"] = sample.info()
    return statistics


# --------------------------------------------------------------------------------------------------
# Target device and warnings


def _target_device(target: dict[str, Any] | None, host: dict[str, Any]) -> dict[str, Any] | None:
    """The client's target device when it differs from the host in type, name or memory, else None."""
    if not target:
        return None
    differs = any(
        target.get(key) is not None and target.get(key) != host.get(key)
        for key in ("type", "name", "memory_bytes")
    )
    return dict(target) if differs else None


def _extrapolate(
    spec: ProbeSpec, target: dict[str, Any], search: SearchResult, cap: int, warnings: list[str]
) -> dict[str, Any]:
    """Scale the host's memory model to the target device's memory (less EXTRAPOLATION_MARGIN)."""
    label = target.get("name") or target.get("type") or "the target device"
    memory = target.get("memory_bytes")
    if spec.memory_budget_bytes is not None:
        memory = spec.memory_budget_bytes if memory is None else min(memory, spec.memory_budget_bytes)
    if memory is None:
        warnings.append(
            f"target device {label} differs from the probe host but gives no memory_bytes: the memory "
            "limit is the host's and may not hold on the target"
        )
        return {"target": target, "budget_bytes": None, "max_batch_size": search.max_batch_size}
    budget = int(memory * (1 - EXTRAPOLATION_MARGIN))
    predicted = search.memory_model.max_batch_size(budget)
    if predicted < 1:
        raise ProbeError(
            "budget_below_model",
            f"the memory model measured on the host predicts that no batch fits the {budget} bytes usable "
            f"on {label} (fixed {search.memory_model.fixed_bytes} bytes, "
            f"per sample {search.memory_model.per_sample_bytes:.0f} bytes)",
        )
    max_batch = cap if math.isinf(predicted) else max(1, min(cap, int(predicted)))
    warnings.append(
        f"extrapolated: the memory limit for {label} ({max_batch}) is predicted from a memory model "
        f"measured on the host, for {budget} bytes ({memory} less {EXTRAPOLATION_MARGIN:.0%}), not verified "
        "there; the throughput curve is the host's"
    )
    return {"target": target, "budget_bytes": budget, "max_batch_size": max_batch}


def _warnings(
    spec: ProbeSpec, host: dict[str, Any], search: SearchResult, throughput: list[dict], ladder_time: float
) -> list[str]:
    warnings: list[str] = []
    if search.capped:
        warnings.append(
            f"the search stopped at the batch size cap ({search.max_batch_size}), not at the memory limit"
        )
    if host["type"] == "cpu":
        warnings.append(
            "CPU limit counts tensor bytes; the process's resident memory can reach ~1.9x that (allocator "
            "caching), keep headroom beyond the budget"
        )
    if not throughput or ladder_time <= 0:
        warnings.append("no time was left for the throughput ladder")
    return warnings


# --------------------------------------------------------------------------------------------------
# The recommendation


def _assemble_result(
    spec: ProbeSpec,
    *,
    search: SearchResult,
    throughput: list[dict],
    statistics: dict[str, Any],
    device: dict[str, Any],
    budget_bytes: int,
    extrapolation: dict[str, Any] | None,
    warnings: list[str],
    duration_s: float,
) -> dict[str, Any]:
    """The result dict (field names are a client contract, see DESIGN.md): recipe.recommend's training
    recipe, plus the memory limit, curves and measurements it was derived from."""
    max_batch = extrapolation["max_batch_size"] if extrapolation else search.max_batch_size
    carried = horizon.carry(statistics, spec)  # B_noise at the client's horizon
    recommendation = recommend(
        throughput=throughput,
        max_feasible_batch_size=max_batch,
        dataset_size=spec.dataset_size,
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        reference_batch_size=spec.reference_batch_size,
        objective=spec.objective,
        devices=spec.device_count,
        gradient_noise_scale=statistics.get("gradient_noise_scale"),
        races=statistics.get("races"),
        cut_short=statistics.get("cut_short", ()),
        horizon=carried,
    )
    horizon.attach(
        recommendation, carried, statistics=statistics, spec=spec, throughput=throughput,
        max_micro_batch=max_batch,
    )  # fmt: skip
    confidence = recommendation["confidence"]
    if extrapolation:
        confidence = "low"
    return {
        **recommendation,
        "max_feasible_batch_size": max_batch,
        "max_feasible_batch_size_aligned": align_batch_size(max_batch),
        "throughput": throughput,
        "memory": {**search.memory_model.to_dict(search.max_batch_size), "budget_bytes": budget_bytes},
        "device": {key: device[key] for key in ("type", "name", "memory_bytes")},
        "target_device": extrapolation["target"] if extrapolation else None,
        "extrapolated": extrapolation is not None,
        # null, not a dict of nulls, when the phase did not run (no real data, no time left)
        "gradient_noise_scale": recommendation["gradient_noise_scale"]
        if statistics.get("gradient_noise_scale")
        else None,
        "confidence": confidence,
        "warnings": warnings + recommendation["warnings"],
        "data_sample": statistics.get("sample"),
        "search": {
            "trials": len(search.trials),
            "measured_convention": MEASURED_CONVENTION,
            "max_batch_size_measured": search.max_batch_size,
            "bracket": list(search.bracket),
            "capped": search.capped,
            "converged": search.converged,
            "batch_sizes_tried": [[t.batch_size, t.outcome] for t in search.trials],
        },
        "probe": {"version": PROBE_VERSION, "torch": torch.__version__, "duration_s": round(duration_s, 3)},
    }

"""Runs one probe: build the model, find the largest batch size that fits, time a throughput ladder,
measure the gradient noise scale and race a few sizes on real data, and assemble the recommendation.
Streams progress as JSON-ready event dicts through `emit`.

Only the phases the objective needs run (PHASES), inside the client's time budget: each phase plans
from the step times measured so far and starts no trial it cannot finish. What the budget cut short is
answered with what was verified, flagged (`partial`, `max_feasible_is_lower_bound`) and explained in a
warning that names the budget that would have covered it. `phases` in the result says what ran and
what it cost.

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
from collections.abc import Iterator
from typing import Any, cast

import torch

from models.registry import get_model, make_config
from service.probing import horizon, sample_check
from service.probing.accumulation import AccumulationCheck
from service.probing.data import sample_for_model
from service.probing.memory import (
    check_budget_covers_model,
    cuda_memory_budget,
    describe_device,
    is_oom,
    resolve_budget,
)
from service.probing.races import run_statistics
from service.probing.recipe import choose_batch, recommend, stability_factor
from service.probing.result import ProbeResult
from service.probing.search import (
    PLANNED_TRIALS,
    SearchResult,
    align_batch_size,
    search_max_batch_size,
)
from service.probing.spec import PROBE_VERSION, ProbeError, ProbeSpec
from service.probing.step import (
    MEASURED_CONVENTIONS,
    TrainingStep,
    build_optimizer,
    is_precision_error,
)
from service.probing.throughput import measure_throughput, throughput_ladder
from service.probing.trials import TIME_SAFETY, Emit, StepCosts, trial_measurer, warm_up

# How a probe spends its time budget. Every phase plans from the step times measured so far and never
# starts a trial it cannot finish before its deadline; the whole probe ends by `time_budget_s` (counted
# from the probe process's start) less FINISH_RESERVE_S, kept for assembling the answer.
FINISH_RESERVE_S = 0.5
# Phases each objective needs, and the share of the time left that the memory search may use.
PHASES = {
    "max_feasible": ("memory",),
    "throughput": ("memory", "throughput"),
    "time_to_target": ("memory", "throughput", "statistics"),
}
SEARCH_TIME_SHARE = {"max_feasible": 1.0, "throughput": 0.6, "time_to_target": 0.5}
# time_to_target: share of the time left after the memory search that the throughput ladder may use;
# the rest is kept for the statistics (gradient noise scale, training races).
THROUGHPUT_TIME_SHARE = 0.4
# Share of what is left after the ladder for the statistics phase: the rest is slack for the last step
# of a race or a noise-scale draw overrunning its share.
STATISTICS_TIME_SHARE = 0.75
# Below this many seconds the noise-scale warm-up cannot train long enough to say anything; the
# statistics also need at least this many steps at the reference batch size.
MIN_STATISTICS_S = 2.0
MIN_STATISTICS_STEPS = 20
# Statistics time that gives a noise estimate worth using on a small model (for the budget hints).
USEFUL_STATISTICS_S = 10.0
# A recipe with gradient_accumulation_steps > 1 has its micro-batch measured accumulating
# (accumulation.AccumulationCheck) within this share of the time left.
ACCUMULATION_TIME_SHARE = 0.9
# Memory kept free when a memory model measured here is extrapolated to another device: its allocator
# and runtime (CUDA context, fragmentation) take memory the tensors measured here do not show.
EXTRAPOLATION_MARGIN = 0.1


def run_probe(spec: ProbeSpec, emit: Emit, *, started: float | None = None) -> ProbeResult:
    """Run the probe described by `spec`, calling `emit(event)` as it goes; return the result dict.

    `started` (time.monotonic()) is when the time budget began: the probe process's start when the
    runner knows it, else now. Runs only the phases the objective needs (PHASES).
    """
    clock = _Clock(time.monotonic() if started is None else started, spec.time_budget_s)
    _validate(spec)
    device = _probe_device(spec.device)
    host = describe_device(device)
    target = _target_device(spec.target_device, host)
    # With a different target device the client's budget is the target's; the host uses its default.
    budget = resolve_budget(None if target else spec.memory_budget_bytes, host)
    cap = max(1, min(spec.max_batch_size, spec.dataset_size))
    needed = PHASES[spec.objective]
    emit({"event": "phase", "phase": "setup", "trials_planned": 0})

    model_spec, config = _resolve_model(spec)
    costs = StepCosts()
    notes: list[str] = []
    throughput: list[dict] = []
    statistics: dict[str, Any] = {"gradient_noise_scale": None, "races": None, "cut_short": []}
    with _model_errors(spec):
        step = TrainingStep.from_spec(spec, model_spec, config)
        gradient_bytes = step.state_bytes()["gradients"]
        check_budget_covers_model(budget, step.state_bytes())
        with _device_budget(device, budget):
            warm_up(step, budget, cap, emit, costs)
            check_budget_covers_model(budget, step.state_bytes())  # now with the real optimizer state
            clock.lap("setup")
            emit({"event": "phase", "phase": "memory", "trials_planned": min(PLANNED_TRIALS, cap)})
            search_deadline = time.monotonic() + SEARCH_TIME_SHARE[spec.objective] * clock.left()
            search = search_max_batch_size(
                trial_measurer(step, budget, emit, costs),
                budget,
                cap,
                affordable=lambda size: costs.largest_within(size, search_deadline - time.monotonic()),
            )
            clock.lap("memory")
            if "throughput" in needed:
                share = 1.0 if spec.objective == "throughput" else THROUGHPUT_TIME_SHARE
                throughput = _throughput_phase(
                    step, search.max_batch_size, share * clock.left(), costs, emit, notes
                )
                clock.lap("throughput")
            else:
                clock.skip("throughput", f"not needed for {spec.objective}")
            del step  # free the measured model before the statistics phase builds a fresh one
            settled = _answer_without_noise_scale(spec, search.max_batch_size, throughput)
            if "statistics" not in needed:
                clock.skip("statistics", f"not needed for {spec.objective}")
            elif settled is None:
                statistics = _statistics_phase(
                    spec, model_spec, config, device, search.max_batch_size, throughput, clock, costs, emit
                )
                clock.lap("statistics", ran=statistics.get("gradient_noise_scale") is not None)
            else:
                # Not measured, but a client's sample the model cannot use still fails the job.
                _checked_sample(spec, model_spec, config, device)
                clock.skip("statistics", settled)
                statistics["noise_independent"] = settled

    throughput_source = "ladder"
    if not throughput or len(throughput) < 2 <= len(_search_points(search)):
        # max_feasible, or no time for a ladder of two sizes: the search's own (tracked) steps
        throughput, throughput_source = _search_points(search), "memory_search"
    warnings = notes + _warnings(spec, host, search, throughput_source)
    warnings += _budget_warnings(spec, search, statistics, clock, costs)
    extrapolation = _extrapolate(spec, target, search, cap, warnings) if target else None
    result = _assemble_result(
        spec,
        search=search,
        throughput=throughput,
        throughput_source=throughput_source,
        statistics=statistics,
        device=host,
        budget_bytes=budget,
        extrapolation=extrapolation,
        warnings=warnings,
        clock=clock,
    )
    if result["gradient_accumulation_steps"] > 1 and extrapolation is None:
        accumulation = AccumulationCheck(spec, model_spec, config, device, budget, costs, emit)
        with _model_errors(spec), _device_budget(device, budget):
            accumulation.run(result, search, gradient_bytes, ACCUMULATION_TIME_SHARE * clock.left())
        clock.lap("accumulation", ran=bool(accumulation.trials))  # result["phases"] is clock.phases
        result["probe"]["duration_s"] = round(clock.elapsed(), 3)
    return result


class _Clock:
    """The probe's time budget: what is left of it, and what each phase cost."""

    def __init__(self, started: float, budget_s: float) -> None:
        self.started = started
        self.budget_s = budget_s
        self.deadline = started + budget_s - FINISH_RESERVE_S
        self.phases: list[dict[str, Any]] = []
        self._lap = started

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def lap(self, phase: str, *, ran: bool = True, note: str | None = None) -> None:
        now = time.monotonic()
        entry = {"phase": phase, "ran": ran, "seconds": round(now - self._lap, 3)}
        self.phases.append(entry if note is None else {**entry, "note": note})
        self._lap = now

    def skip(self, phase: str, note: str) -> None:
        self.phases.append({"phase": phase, "ran": False, "seconds": 0.0, "note": note})

    def ran(self, phase: str) -> bool:
        return any(p["phase"] == phase and p["ran"] for p in self.phases)


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


def _throughput_phase(
    step: TrainingStep,
    max_batch_size: int,
    time_budget_s: float,
    costs: StepCosts,
    emit: Emit,
    notes: list[str],
) -> list[dict]:
    """The throughput ladder, planned to end inside `time_budget_s` (see `_plan_ladder`) from plain
    step times (`_plain_costs`); its own timings then replace the search's in `costs`."""
    deadline = time.monotonic() + time_budget_s
    plain = _plain_costs(step, max_batch_size, time_budget_s, costs)
    sizes = _plan_ladder(max_batch_size, (2 / 3) * max(0.0, deadline - time.monotonic()), plain)
    time_budget_s = max(0.0, deadline - time.monotonic())
    if not sizes:
        notes.append(
            f"no throughput ladder: {time_budget_s:.1f} s left could not cover two steps at each of its "
            "sizes; the throughput curve comes from the memory search's steps"
        )
        return []
    # Each round of timed steps starts only before the deadline: keep one round's time in hand (the
    # plan above used two thirds of the time for two steps per size).
    round_s = TIME_SAFETY * sum(plain.predict(b) for b in sizes)
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

    points = measure_throughput(
        step, sizes, time_budget_s=max(0.0, time_budget_s - round_s), on_point=on_point, is_oom=is_oom
    )
    if any(p["outcome"] != "ok" for p in points):
        step.discard_gradients()
    costs.seconds = {
        p["batch_size"]: p["step_time_s"] for p in points if p.get("step_time_s")
    } or costs.seconds
    if sizes[-1] < max_batch_size:
        notes.append(
            f"throughput ladder stopped at {sizes[-1]} (of {max_batch_size}): larger sizes did not fit "
            "in the time budget"
        )
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


def _answer_without_noise_scale(spec: ProbeSpec, max_batch_size: int, throughput: list[dict]) -> str | None:
    """Why the statistics phase cannot change a time_to_target answer, or None when it can.

    The chosen batch grows with B_noise; when the same layout wins for a B_noise far below every size
    measured and for one far above the largest that fits, measuring B_noise changes nothing, and when
    that batch is at most the reference batch size the learning rate needs no observation either (it
    is the reference's, scaled down).
    """
    if spec.objective != "time_to_target" or not throughput:
        return None
    ends = [
        choose_batch(
            throughput=throughput,
            max_feasible_batch_size=max_batch_size,
            b_noise=b_noise,
            devices=spec.device_count,
            dataset_size=spec.dataset_size,
        )["recommended_batch_size"]
        for b_noise in (1.0, 100.0 * max_batch_size * spec.device_count)
    ]
    if ends[0] == ends[1] and ends[0] <= spec.reference_batch_size:
        return (
            f"skipped: batch {ends[0]} is best for any B_noise between 1 and 100x the largest batch that "
            "fits, at or below the reference batch size; measuring B_noise would not change the answer"
        )
    return None


def _plain_costs(step: TrainingStep, max_batch_size: int, seconds: float, tracked: StepCosts) -> StepCosts:
    """Step times without the memory tracker (which adds a fixed cost per operation: a small model's
    tracked step can take 100x its plain one): one plain step at the smallest ladder size and, when the
    tracked time says it fits a third of `seconds`, one at the largest. Falls back on the tracked times
    for what it could not time."""
    plain = StepCosts()
    for batch_size in sorted({min(2, max_batch_size), max_batch_size}):
        if TIME_SAFETY * tracked.predict(batch_size) > seconds / 3:
            return tracked
        try:
            inputs, targets = step.make_batch(batch_size)
            step.synchronize()
            began = time.perf_counter()
            step.train_on(inputs, targets)
            step.synchronize()
        except Exception as exc:
            if not is_oom(exc):
                raise
            step.discard_gradients()
            return tracked
        plain.add(batch_size, time.perf_counter() - began)
    return plain


def _plan_ladder(max_batch_size: int, seconds: float, costs: StepCosts) -> list[int]:
    """The ladder's sizes that fit `seconds`: each size costs at least a warm-up and a timed step
    (predicted step times; the caller keeps one more round in hand). The ladder is
    thinned first (fewer sizes up to the maximum); when even its ends do not fit, the largest sizes go.
    From 2 up: BatchNorm cannot train on one sample whose last feature map is 1x1 (and B=1 says little).
    """

    def cost(sizes: list[int]) -> float:
        return 2 * TIME_SAFETY * sum(costs.predict(b) for b in sizes)

    def ladder(points: int) -> list[int]:
        return [b for b in throughput_ladder(max_batch_size, points) if b >= min(2, max_batch_size)]

    for points in range(16, 1, -1):
        sizes = ladder(points)
        if cost(sizes) <= seconds:
            return sizes
    kept: list[int] = []
    for b in ladder(16):
        if cost([*kept, b]) > seconds:
            break
        kept.append(b)
    return kept


def _search_points(search: SearchResult) -> list[dict]:
    """Samples/s of the memory search's successful steps (timed under the memory tracker: slower than
    plain steps, so a pessimistic curve): what `max_feasible` reports without running a ladder."""
    return [
        {
            "batch_size": t.batch_size,
            "samples_per_second": t.batch_size / t.step_time_s,
            "step_time_s": t.step_time_s,
        }
        for t in sorted(search.trials, key=lambda t: t.batch_size)
        if t.ok and t.step_time_s
    ]


def _checked_sample(spec: ProbeSpec, model_spec: Any, config: Any, device: torch.device) -> Any:
    """The statistics' data (data.sample_for_model: the client's sample, a built-in one, or None); a
    client's sample first trains one step on a slice, and one the model cannot use fails the job
    (invalid_sample)."""
    shape, dtype = list(model_spec.input_shape(config)), model_spec.input_dtype
    classes = int(model_spec.num_classes(config))
    task = sample_check.Task.for_model(
        config, input_shape=shape, input_dtype=dtype, num_classes=classes, ignore_index=spec.ignore_index
    )
    try:
        sample = sample_for_model(shape, dtype, classes, spec.sample_path, task=task)
    except ValueError as exc:
        raise ProbeError("invalid_sample", f"the data sample does not fit the model: {exc}") from exc
    if sample is not None and not sample.builtin:  # one step on a slice settles whether it fits
        try:
            checked = model_spec.build(config, spec.gradient_checkpointing).to(device)
            sample_check.dry_step(checked, model_spec.loss, sample.x.to(device), sample.y.to(device), task)
        except ValueError as exc:
            raise ProbeError("invalid_sample", f"the data sample does not fit the model: {exc}") from exc
        del checked
    return sample


def _statistics_phase(
    spec: ProbeSpec,
    model_spec: Any,
    config: Any,
    device: torch.device,
    max_batch_size: int,
    throughput: list[dict],
    clock: _Clock,
    costs: StepCosts,
    emit: Emit,
) -> dict[str, Any]:
    """Gradient noise scale and training races on real data (races.run_statistics), in fp32.

    Gets STATISTICS_TIME_SHARE of the time left; runs only when that covers MIN_STATISTICS_S and
    MIN_STATISTICS_STEPS steps at the reference batch size (predicted from the steps measured so far).
    Returns run_statistics' dict ({"gradient_noise_scale", "races", "cut_short"}), with only
    "cut_short" filled when no real data fits the model or no time is left. A client's sample is checked
    (`_checked_sample`) even then: a sample the model cannot use fails the job.
    """
    skipped = {"gradient_noise_scale": None, "races": None}
    sample = _checked_sample(spec, model_spec, config, device)
    time_budget_s = STATISTICS_TIME_SHARE * clock.left()
    needed = max(
        MIN_STATISTICS_S, TIME_SAFETY * MIN_STATISTICS_STEPS * costs.predict(spec.reference_batch_size)
    )
    if time_budget_s < needed:
        return {
            **skipped,
            "cut_short": [
                f"no time was left for the gradient noise scale and training races ({time_budget_s:.1f} s "
                f"of the {needed:.1f} s they need at least)"
            ],
            "no_time": True,
        }
    if sample is None:
        return {
            **skipped,
            "cut_short": ["no real data sample fits this model: the noise scale was not measured"],
        }
    emit({"event": "phase", "phase": "statistics", "trials_planned": 2})
    torch.manual_seed(spec.seed)
    model = model_spec.build(config, spec.gradient_checkpointing).to(device)
    time_budget_s = STATISTICS_TIME_SHARE * clock.left()  # after loading the sample and the model
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
    spec: ProbeSpec, host: dict[str, Any], search: SearchResult, throughput_source: str
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
    if throughput_source == "memory_search":
        warnings.append(
            "throughput from the memory search's steps (timed under the memory tracker, slower than plain "
            "steps), not from a throughput ladder"
        )
    return warnings


def _plain_sgd_warning(spec: ProbeSpec, recommendation: dict[str, Any]) -> list[str]:
    """Plain SGD's tuned learning rate stops growing at a curvature limit (about 2 / the Hessian's
    largest eigenvalue) that neither the races nor the noise scale see; past it a larger batch stops
    saving steps. The recipe's stability factor is a correction set on the benchmark, not a measurement
    of this model, so a size above the reference may still be slower than predicted."""
    if spec.optimizer != "sgd" or spec.momentum > 0:
        return []
    if recommendation["recommended_batch_size"] <= spec.reference_batch_size:
        return []
    return [
        "plain SGD (momentum 0): its largest stable learning rate is set by the loss's curvature, which "
        "the probe does not measure; past it a larger batch stops saving steps. The batch was chosen for "
        f"B_noise x{stability_factor(0.0):g} (noise_scale_stability_factor, a correction set on the "
        "benchmark suite, not measured on this model), and may still be too large: on the suite's "
        "plain-SGD tasks it was above the best size on about half of the task-depths "
        "(docs/benchmarks/convergence.md)"
    ]


def _round_up(seconds: float, step: float = 10.0) -> int:
    return int(step * math.ceil(seconds / step))


def _budget_warnings(
    spec: ProbeSpec,
    search: SearchResult,
    statistics: dict[str, Any],
    clock: _Clock,
    costs: StepCosts,
) -> list[str]:
    """What the time budget cut short, each with the budget that would have covered it (estimated from
    the step times measured here)."""
    warnings: list[str] = []
    times = {p["phase"]: p["seconds"] for p in clock.phases}
    if search.time_limited:
        upper = f"below {search.bracket[1]}" if search.bracket[1] else "not found"
        remaining = 2 * TIME_SAFETY * costs.predict(search.next_batch_size or search.max_batch_size)
        needed = (
            times.get("setup", 0.0)
            + (times.get("memory", 0.0) + remaining) / SEARCH_TIME_SHARE[spec.objective]
        )
        warnings.append(
            f"the time budget ended the memory search: max_feasible_batch_size {search.max_batch_size} is a "
            f"verified lower bound (the limit is {upper}; the next trial, at {search.next_batch_size}, "
            f"would not have finished in time); a time_budget_s of about {_round_up(needed)} would finish it"
        )
    if statistics.get("no_time"):
        before = sum(times.get(p, 0.0) for p in ("setup", "memory"))
        statistics_share = STATISTICS_TIME_SHARE * (1 - THROUGHPUT_TIME_SHARE)
        needed = before / SEARCH_TIME_SHARE["time_to_target"] + USEFUL_STATISTICS_S / statistics_share
        warnings.append(
            f"time_to_target answered with the throughput knee: no time was left to measure the noise "
            f"scale; a time_budget_s of about {_round_up(needed)} would"
        )
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
    clock: _Clock,
    throughput_source: str,
) -> ProbeResult:
    """The result dict (field names are a client contract, see docs/design.md): recipe.recommend's training
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
        noise_independent=statistics.get("noise_independent"),
        horizon=carried,
        sgd_momentum=spec.sgd_momentum,
    )
    horizon.attach(
        recommendation, carried, statistics=statistics, spec=spec, throughput=throughput,
        max_micro_batch=max_batch,
    )  # fmt: skip
    confidence = recommendation["confidence"]
    if extrapolation or search.time_limited:
        confidence = "low"
    # Partial: the time budget kept the probe from a phase the objective needs.
    no_ladder = spec.objective != "max_feasible" and throughput_source == "memory_search"
    partial = search.time_limited or bool(statistics.get("no_time")) or no_ladder
    result: dict[str, Any] = {
        **recommendation,
        "max_feasible_batch_size": max_batch,
        "max_feasible_batch_size_aligned": align_batch_size(max_batch),
        "max_feasible_is_lower_bound": search.time_limited,
        "partial": partial,
        "phases": clock.phases,
        "throughput": throughput,
        "throughput_source": throughput_source,
        "memory": {**search.memory_model.to_dict(search.max_batch_size), "budget_bytes": budget_bytes},
        "device": {key: device[key] for key in ("type", "name", "memory_bytes")},
        "target_device": extrapolation["target"] if extrapolation else None,
        "extrapolated": extrapolation is not None,
        # null, not a dict of nulls, when the phase did not run (no real data, no time left)
        "gradient_noise_scale": recommendation["gradient_noise_scale"]
        if statistics.get("gradient_noise_scale")
        else None,
        "confidence": confidence,
        "warnings": warnings + recommendation["warnings"] + _plain_sgd_warning(spec, recommendation),
        "data_sample": statistics.get("sample"),
        "search": {
            "trials": len(search.trials),
            "measured_convention": MEASURED_CONVENTIONS[spec.loop],
            "loop": spec.loop,
            "max_batch_size_measured": search.max_batch_size,
            "bracket": list(search.bracket),
            "capped": search.capped,
            "converged": search.converged,
            "batch_sizes_tried": [[t.batch_size, t.outcome] for t in search.trials],
            "time_limited": search.time_limited,
            "next_batch_size": search.next_batch_size,
            "accumulation_checked": None,  # set by AccumulationCheck when the recipe accumulates
        },
        "probe": {
            "version": PROBE_VERSION,
            "torch": torch.__version__,
            "duration_s": round(clock.elapsed(), 3),
            "time_budget_s": spec.time_budget_s,
        },
    }
    # Built from plain dicts (recipe.recommend, the search, the clock): ProbeResult names their fields.
    return cast(ProbeResult, result)

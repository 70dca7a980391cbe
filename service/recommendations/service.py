"""Recommendation use cases: validate a request against the zoo and the host, fingerprint it, queue it."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import repository
from service.artifacts import sample_fit
from service.config import Settings
from service.db.models import Recommendation, Trial
from service.db.session import session_scope
from service.errors import Conflict, InvalidRequest, NotFound
from service.fleet import device_requirement
from service.probing.spec import PROBE_VERSION, ProbeSpec, build_probe_spec
from service.schemas import RecommendationCreate
from service.status import JobStatus

# Bytes per parameter that must fit before any activation: weights + gradients + optimizer state.
_STATE_COPIES = {"sgd": 3, "adam": 4, "adamw": 4}
# The least time a probe needs before its first verified answer: process start-up (interpreter, torch)
# plus the warm-up step and the first search trial (6 samples), at a compute rate no host reaches.
# Both are on the low side, so only hopeless budgets are refused.
_PROBE_STARTUP_S = 2.0
_FIRST_ANSWER_SAMPLES = 6
_GENEROUS_FLOPS = {"cpu": 1e11, "cuda": 1e13}


@dataclass(frozen=True)
class HostDevice:
    """What this host probes on (see service.probing.memory.describe_device)."""

    type: str
    name: str
    memory_bytes: int
    free_bytes: int
    count: int


def create_recommendation(
    *,
    reads: sessionmaker[Session],
    writes: sessionmaker[Session],
    payload: RecommendationCreate,
    host: HostDevice,
    settings: Settings,
) -> tuple[dict[str, Any], bool]:
    """Queue a probe for this request, or return the stored/active job with the same fingerprint.

    Returns (the job's public view, created). Validation and the cache lookup run on a read session:
    a cached answer never takes SQLite's write lock, so a burst of repeated requests cannot queue up
    behind it. Only a miss opens a short write transaction, committed before the response is sent.
    """
    with session_scope(reads) as session:
        request = resolve_request(session, payload=payload, host=host, settings=settings)
        fingerprint = fingerprint_request(request, host=host)
        if existing := _existing_job(session, fingerprint, force=payload.force):
            return to_public(existing), False
        fit = _sample_fit_check(session, request)
    if fit is not None:  # one training step on the sample, in a subprocess: outside any session
        sample_fit.require_fit(fit, settings=settings)
    with session_scope(writes) as session:
        if active := repository.find_active(session, fingerprint):  # queued meanwhile by another request
            return to_public(active), False
        model_name = request["model"].get("name") or f"artifact:{request['model']['artifact_id']}"
        try:
            with session.begin_nested():
                created = repository.add_recommendation(
                    session,
                    recommendation_id=uuid.uuid4().hex,
                    fingerprint=fingerprint,
                    model_name=model_name,
                    request=request,
                    device=device_requirement(payload.device),
                )
        except IntegrityError:
            # PostgreSQL: another request with this fingerprint was queued between the check and insert.
            if active := repository.find_active(session, fingerprint):
                return to_public(active), False
            raise
        return to_public(created), True


def answer_key(payload: RecommendationCreate) -> str | None:
    """Key under which a succeeded answer to this payload may be memoised, None when it may not.

    The same payload (`force` aside) always resolves to the same fingerprint on this host, so its succeeded
    answer stays valid, except where it references artifacts, which can be deleted.
    """
    if payload.model.artifact_id is not None or payload.dataset.sample_id is not None:
        return None
    return hashlib.sha256(payload.model_dump_json(exclude={"force"}).encode()).hexdigest()  # bounded size


def _existing_job(session: Session, fingerprint: str, *, force: bool) -> Recommendation | None:
    """The succeeded job this request can reuse (unless forced), else an identical one in flight."""
    if not force and (done := repository.find_succeeded(session, fingerprint)):
        return done
    return repository.find_active(session, fingerprint)


def get_recommendation(session: Session, recommendation_id: str) -> Recommendation:
    recommendation = repository.get_recommendation(session, recommendation_id)
    if recommendation is None:
        raise NotFound(f"recommendation {recommendation_id!r} does not exist")
    return recommendation


def cancel_recommendation(session: Session, recommendation_id: str) -> Recommendation:
    """Cancel a queued job at once; ask the worker to stop a running one. Finished jobs can't be cancelled."""
    recommendation = get_recommendation(session, recommendation_id)
    if recommendation.status == JobStatus.QUEUED:
        accepted = repository.cancel_queued(session, recommendation_id)
    elif recommendation.status == JobStatus.RUNNING:
        accepted = repository.request_cancel(session, recommendation_id)
    else:
        accepted = False
    session.flush()
    session.refresh(recommendation)
    if not accepted:
        raise Conflict(
            f"recommendation {recommendation_id!r} is already {recommendation.status} and cannot be cancelled"
        )
    return recommendation


# --- validation ----------------------------------------------------------------------------------


def resolve_request(
    session: Session, *, payload: RecommendationCreate, host: HostDevice, settings: Settings
) -> dict[str, Any]:
    """Check everything that can be checked without probing; return the canonical request to store."""
    from models import config_to_dict, get_model, make_config

    request = payload.model_dump(mode="json", exclude={"force"})
    if payload.time_budget_s > settings.max_time_budget_s:
        raise InvalidRequest(
            f"time_budget_s {payload.time_budget_s:g} exceeds this service's limit of "
            f"{settings.max_time_budget_s:g} s",
            code="time_budget_too_large",
        )
    if payload.model.artifact_id is not None:
        return _resolve_artifact_request(session, payload=payload, request=request, host=host)
    try:
        spec = get_model(payload.model.name or "")
    except KeyError as exc:
        raise InvalidRequest(str(exc.args[0]) if exc.args else str(exc), code="unknown_model") from exc
    try:
        config = make_config(spec, payload.model.config)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"model.config: {exc}", code="invalid_model_config") from exc
    request["model"]["config"] = config_to_dict(config)

    expected_shape = list(spec.input_shape(config))
    if payload.input.shape is not None and list(payload.input.shape) != expected_shape:
        raise InvalidRequest(
            f"input.shape {payload.input.shape} does not match model {spec.name!r} with this config, whose "
            f"per-sample input is {expected_shape}; change model.config or omit input.shape",
            code="input_shape_mismatch",
        )
    request["input"]["shape"] = expected_shape

    if payload.training.gradient_checkpointing and not spec.supports_gradient_checkpointing:
        raise InvalidRequest(
            f"model {spec.name!r} does not support gradient checkpointing", code="unsupported_option"
        )
    _check_sample(
        session,
        payload,
        input_shape=expected_shape,
        input_dtype=spec.input_dtype,
        num_classes=spec.num_classes(config),
    )

    request["device"] = _resolve_target_device(payload, host)
    _check_budget(
        payload,
        parameter_bytes_of=lambda: parameter_bytes(spec, config),
        device_memory=request["device"]["memory_bytes"],
    )
    _check_time_budget(payload, _training_flops_per_sample(spec.name, config), host)
    return request


def _resolve_artifact_request(
    session: Session, *, payload: RecommendationCreate, request: dict[str, Any], host: HostDevice
) -> dict[str, Any]:
    """resolve_request for an uploaded torch.export model: its training task was inferred at upload."""
    artifact_id = payload.model.artifact_id
    artifact = repository.get_artifact(session, artifact_id or "")
    if artifact is None or artifact.kind != "model":
        raise InvalidRequest(
            f"model.artifact_id {artifact_id!r} is not an uploaded model (POST /v1/artifacts, kind=model)",
            code="unknown_artifact",
        )
    if payload.model.config:
        raise InvalidRequest(
            "model.config does not apply to an uploaded model: its loss and input were declared at upload",
            code="invalid_model_config",
        )
    meta = artifact.meta or {}
    config = dict(meta.get("config") or {})
    expected_shape = list(config.get("input_shape") or [])
    if payload.input.shape is not None and list(payload.input.shape) != expected_shape:
        raise InvalidRequest(
            f"input.shape {payload.input.shape} does not match the uploaded model, whose per-sample input "
            f"is {expected_shape}; omit input.shape",
            code="input_shape_mismatch",
        )
    if payload.training.gradient_checkpointing:
        raise InvalidRequest(
            "uploaded models do not support gradient checkpointing", code="unsupported_option"
        )
    _check_sample(
        session,
        payload,
        input_shape=expected_shape,
        input_dtype=str(config.get("input_dtype", "float32")),
        num_classes=0,
        config=config,
    )
    request["model"]["config"] = config
    request["input"]["shape"] = expected_shape
    request["device"] = _resolve_target_device(payload, host)
    _check_budget(
        payload,
        parameter_bytes_of=lambda: int(meta.get("trainable_parameter_bytes") or 0),
        device_memory=request["device"]["memory_bytes"],
    )
    _check_time_budget(payload, 6.0 * int(meta.get("trainable_parameter_bytes") or 0) / 4, host)
    return request


def _check_sample(
    session: Session,
    payload: RecommendationCreate,
    *,
    input_shape: list[int],
    input_dtype: str,
    num_classes: int,
    config: Any = None,
) -> None:
    """dataset.sample_id names an uploaded sample whose stored description fits the model's task
    (`sample_check.problem`: the loss's needs, not dtype rules; the probe then runs a step on it)."""
    from service.probing import sample_check

    if payload.dataset.sample_id is None:
        return
    sample = repository.get_artifact(session, payload.dataset.sample_id)
    if sample is None or sample.kind != "sample":
        raise InvalidRequest(
            f"dataset.sample_id {payload.dataset.sample_id!r} is not an uploaded data sample",
            code="unknown_sample",
        )
    task = sample_check.Task.for_model(
        config,
        input_shape=input_shape,
        input_dtype=input_dtype,
        num_classes=num_classes,
        ignore_index=payload.training.ignore_index,
    )
    problem = sample_check.problem(sample.meta or {}, task)
    if problem:
        raise InvalidRequest(f"dataset.sample_id: {problem}", code="sample_mismatch")


def _sample_fit_check(session: Session, request: dict[str, Any]) -> sample_fit.FitCheck | None:
    """The submission-time step check of an uploaded model against the request's sample, if both."""
    model_id, sample_id = request["model"].get("artifact_id"), request["dataset"].get("sample_id")
    if not model_id or not sample_id:
        return None
    model, sample = repository.get_artifact(session, model_id), repository.get_artifact(session, sample_id)
    return sample_fit.pending_check(model, sample, request)


def _resolve_target_device(payload: RecommendationCreate, host: HostDevice) -> dict[str, Any]:
    target = payload.device
    target_type = target.type or host.type
    if target_type != host.type and target.memory_bytes is None:
        raise InvalidRequest(
            f"device.memory_bytes is required when the target device ({target_type}) differs from this "
            f"host's ({host.type}): the memory model is extrapolated to it",
            code="target_memory_required",
        )
    resolved = {
        "type": target_type,
        "name": target.name or (host.name if target_type == host.type else None),
        "memory_bytes": target.memory_bytes or host.memory_bytes,
        "count": target.count,
    }
    if target.allow_extrapolation:  # only when set: other requests keep their fingerprints
        resolved["allow_extrapolation"] = True
    return resolved


def _check_budget(
    payload: RecommendationCreate, *, parameter_bytes_of: Callable[[], int], device_memory: int
) -> None:
    budget = payload.memory_budget_bytes
    if budget is None:
        _check_fits_device(payload, parameter_bytes_of(), device_memory)
        return
    if budget > device_memory:
        raise InvalidRequest(
            f"memory_budget_bytes {budget} exceeds the device's memory ({device_memory} bytes)",
            code="budget_exceeds_device",
        )
    minimum = parameter_bytes_of() * _STATE_COPIES[payload.training.optimizer]
    if budget < minimum:
        raise InvalidRequest(
            f"memory_budget_bytes {budget} is smaller than the model's weights, gradients and "
            f"{payload.training.optimizer} state alone ({minimum} bytes), before any activation",
            code="budget_below_model",
        )


def _check_fits_device(payload: RecommendationCreate, parameter_bytes: int, device_memory: int) -> None:
    """Without a budget the probe may use the whole device: refuse a model whose state alone exceeds it."""
    minimum = parameter_bytes * _STATE_COPIES[payload.training.optimizer]
    if minimum > device_memory:
        raise InvalidRequest(
            f"the model's weights, gradients and {payload.training.optimizer} state alone ({minimum} bytes) "
            f"exceed the device's memory ({device_memory} bytes)",
            code="model_exceeds_device",
        )


def _check_time_budget(payload: RecommendationCreate, flops_per_sample: float, host: HostDevice) -> None:
    """Refuse a time budget below the least a probe of this model needs on this host for any answer."""
    rate = _GENEROUS_FLOPS.get(host.type, _GENEROUS_FLOPS["cpu"])
    minimum = _PROBE_STARTUP_S + _FIRST_ANSWER_SAMPLES * flops_per_sample / rate
    if payload.time_budget_s < minimum:
        raise InvalidRequest(
            f"time_budget_s {payload.time_budget_s:g} is below the least this model needs on this host "
            f"({host.type}) for any verified answer: about {minimum:.1f} s (probe start-up, a warm-up step "
            f"and the first memory trial); ask for at least {math.ceil(minimum)} s, and more for a full "
            "search, the throughput ladder and the noise scale",
            code="time_budget_too_small",
        )


def _training_flops_per_sample(name: str, config: Any) -> float:
    """A lower bound on a zoo model's training FLOPs per sample (forward + backward = 6 per weight use),
    by arithmetic on its config: the largest layers only, no model built."""
    if name == "mlp":
        dims = [config.input_dim, *config.hidden_dims, config.num_classes]
        return 6.0 * sum(a * b for a, b in itertools.pairwise(dims))
    if name == "gpt":
        return 6.0 * config.block_size * config.n_layer * 12 * config.n_embd**2
    if name == "resnet":  # the last stage alone: 3x3 convs at width 8w over (image/8)^2 or (image/32)^2
        side = max(1, config.image_size // (8 if config.stem == "cifar" else 32))
        convs = {18: 4, 34: 6, 50: 3}.get(config.depth, 3)
        return 6.0 * convs * 9 * (8 * config.width) ** 2 * side**2
    return 0.0


def parameter_bytes(spec: Any, config: Any) -> int:
    """Bytes of the model's fp32 parameters, computed from the config: no module is built."""
    from models import parameter_count

    return 4 * (parameter_count(spec, config) or 0)


def fingerprint_request(request: dict[str, Any], *, host: HostDevice) -> str:
    """Hash of everything that changes the answer: the canonical request, the host, torch, the probe."""
    import torch

    parts = {
        "request": request,
        "host": {"type": host.type, "name": host.name, "memory_bytes": host.memory_bytes},
        "torch": torch.__version__,
        "probe_version": PROBE_VERSION,
    }
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def probe_spec_from_request(request: dict[str, Any], *, host: HostDevice) -> ProbeSpec:
    """Translate a stored (canonical) request into the probe subprocess's input."""
    target = request["device"]
    differs = target["type"] != host.type or target["memory_bytes"] != host.memory_bytes
    model = request["model"]
    return build_probe_spec(
        model_name=model["name"] or f"artifact:{model['artifact_id'][:12]}",
        model_config=model["config"],
        training=request["training"],
        device=host.type,  # type: ignore[arg-type]
        memory_budget_bytes=request.get("memory_budget_bytes"),
        time_budget_s=request["time_budget_s"],
        objective=request["objective"],
        dataset_size=request["dataset"]["size"],
        device_count=target["count"],
        target_device=target if differs else None,
    )


def to_public(recommendation: Recommendation) -> dict[str, Any]:
    """The API's view of a job (RecommendationOut)."""
    error = None
    if recommendation.error_code:
        error = {"code": recommendation.error_code, "message": recommendation.error_message or ""}
    return {
        "id": recommendation.id,
        "status": recommendation.status,
        "fingerprint": recommendation.fingerprint,
        "progress": {
            "phase": recommendation.phase,
            "trials_done": recommendation.trials_done,
            "trials_planned": recommendation.trials_planned,
            "reason": recommendation.waiting_reason,
        },
        "request": recommendation.request,
        "result": recommendation.result,
        "error": error,
        "created_at": recommendation.created_at,
        "started_at": recommendation.started_at,
        "finished_at": recommendation.finished_at,
    }


def list_trials(session: Session, recommendation_id: str) -> list[dict[str, Any]]:
    """A job's trials as the API shows them (TrialOut), in order; NotFound for an unknown job."""
    get_recommendation(session, recommendation_id)
    return [trial_public(trial) for trial in repository.list_trials(session, recommendation_id)]


def trial_public(trial: Trial) -> dict[str, Any]:
    """The API's view of one trial (TrialOut)."""
    return {
        "index": trial.index,
        "phase": trial.phase,
        "batch_size": trial.batch_size,
        "outcome": trial.outcome,
        "peak_bytes": trial.peak_bytes,
        "step_time_s": trial.step_time_s,
        "samples_per_second": trial.samples_per_second,
        "detail": trial.detail,
        "created_at": trial.created_at,
    }


def list_recommendations(
    session: Session,
    *,
    status: str | None = None,
    model_name: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """A page of jobs, newest first, as the API shows them, and how many match in all."""
    items, total = repository.list_recommendations(
        session, status=status, model_name=model_name, limit=limit, offset=offset
    )
    return [to_public(r) for r in items], total

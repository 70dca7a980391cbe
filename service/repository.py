"""All SQL lives here: small functions that take a Session and say what they do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Artifact, Recommendation, Trial, Worker, utcnow
from service.status import ACTIVE, JobStatus

# --- recommendations ---------------------------------------------------------------------------


def get_recommendation(session: Session, recommendation_id: str) -> Recommendation | None:
    return session.get(Recommendation, recommendation_id)


def find_succeeded(session: Session, fingerprint: str) -> Recommendation | None:
    """The newest successful recommendation for this fingerprint, if any."""
    query = (
        select(Recommendation)
        .where(Recommendation.fingerprint == fingerprint, Recommendation.status == JobStatus.SUCCEEDED)
        .order_by(Recommendation.finished_at.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def find_active(session: Session, fingerprint: str) -> Recommendation | None:
    """The queued or running job for this fingerprint (at most one exists: a partial unique index)."""
    query = select(Recommendation).where(
        Recommendation.fingerprint == fingerprint, Recommendation.status.in_(ACTIVE)
    )
    return session.scalars(query).first()


def add_recommendation(
    session: Session,
    *,
    recommendation_id: str,
    fingerprint: str,
    model_name: str,
    request: dict[str, Any],
    device: dict[str, Any] | None = None,
) -> Recommendation:
    """Queue a job. `device`: the routing columns (service.fleet.device_requirement); None: any worker."""
    recommendation = Recommendation(
        id=recommendation_id,
        fingerprint=fingerprint,
        status=JobStatus.QUEUED,
        model_name=model_name,
        request=request,
        trials_done=0,
        trials_planned=0,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
        **{"allow_extrapolation": False, **(device or {})},
    )
    session.add(recommendation)
    session.flush()
    return recommendation


def list_recommendations(
    session: Session, *, status: str | None, model_name: str | None, limit: int, offset: int
) -> tuple[Sequence[Recommendation], int]:
    """A page of recommendations, newest first, and the total matching count."""
    conditions = []
    if status:
        conditions.append(Recommendation.status == status)
    if model_name:
        conditions.append(Recommendation.model_name == model_name)
    total = session.scalar(select(func.count()).select_from(Recommendation).where(*conditions)) or 0
    query = (
        select(Recommendation)
        .where(*conditions)
        .order_by(Recommendation.created_at.desc(), Recommendation.id)
        .limit(limit)
        .offset(offset)
    )
    return session.scalars(query).all(), total


def list_trials(session: Session, recommendation_id: str) -> Sequence[Trial]:
    query = select(Trial).where(Trial.recommendation_id == recommendation_id).order_by(Trial.index)
    return session.scalars(query).all()


def cancel_queued(session: Session, recommendation_id: str) -> bool:
    """Cancel a job that no worker has claimed yet. False if it was no longer queued."""
    result = session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), phase=None)
    )
    return result.rowcount == 1


def request_cancel(session: Session, recommendation_id: str) -> bool:
    """Ask the worker running this job to stop it. False if it was no longer running."""
    result = session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
    )
    return result.rowcount == 1


# --- the worker's side ---------------------------------------------------------------------------


def claim_next_queued(
    session: Session,
    *,
    worker_id: str,
    device: WorkerDevice | None = None,
    live_after: datetime | None = None,
) -> Recommendation | None:
    """Atomically move the oldest queued job this worker can serve to running for this worker.

    `device` is what the worker probes on (None: it may take any job); a job that names a device needs a
    worker that has it, or allows extrapolation and no worker alive since `live_after` has it.
    PostgreSQL locks the chosen row with `FOR UPDATE SKIP LOCKED`, so concurrent workers pick different jobs
    without waiting on each other. SQLite (one writer at a time) uses the conditional UPDATE
    (`status = 'queued'`): only one worker gets the row back for a given job.
    """
    query = (
        select(Recommendation.id)
        .where(Recommendation.status == JobStatus.QUEUED)
        .order_by(Recommendation.created_at, Recommendation.id)
    )
    if device is not None:
        query = query.where(_can_take(device, live_after=live_after or stale_cutoff(60.0)))
    if session.get_bind().dialect.name == "postgresql":
        candidates = session.scalars(query.limit(1).with_for_update(skip_locked=True)).all()
    else:
        candidates = session.scalars(query.limit(5)).all()
    now = utcnow()
    for candidate in candidates:
        attempts = session.scalar(
            update(Recommendation)
            .where(Recommendation.id == candidate, Recommendation.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                attempts=Recommendation.attempts + 1,
                phase="starting",
                trials_done=0,
                trials_planned=0,
                cancel_requested=False,
                waiting_reason=None,
            )
            .returning(Recommendation.attempts)
        )
        if attempts is not None:
            if attempts > 1:  # a re-queued job starts over: drop the trials of the attempt that died
                session.execute(delete(Trial).where(Trial.recommendation_id == candidate))
            return session.get(Recommendation, candidate, populate_existing=True)
    return None


# --- routing by device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerDevice:
    """What a worker probes on, as the routing conditions compare it."""

    type: str
    name: str
    memory_bytes: int


def _has_device(worker_type: Any, worker_name: Any, worker_memory: Any) -> ColumnElement[bool]:
    """A job's requirement (type, name pattern, least memory) is met by this device (values or columns)."""
    job = Recommendation
    return and_(
        or_(job.device_type.is_(None), job.device_type == worker_type),
        or_(job.device_name_like.is_(None), func.lower(worker_name).like(job.device_name_like, escape="\\")),
        or_(job.device_memory_bytes.is_(None), worker_memory >= job.device_memory_bytes),
    )


def _live_worker_has_device(live_after: datetime) -> ColumnElement[bool]:
    return exists(
        select(Worker.id).where(
            Worker.heartbeat_at >= live_after,
            _has_device(Worker.device_type, Worker.device_name, Worker.memory_bytes),
        )
    )


def _can_take(device: WorkerDevice, *, live_after: datetime) -> ColumnElement[bool]:
    """The job can be taken by a worker with `device`: it has the device asked for, or the job allows
    extrapolation and no live worker has that device (an exact match is always preferred)."""
    has = _has_device(literal(device.type), literal(device.name), literal(device.memory_bytes))
    return or_(has, and_(Recommendation.allow_extrapolation.is_(True), ~_live_worker_has_device(live_after)))


def _names_a_device() -> ColumnElement[bool]:
    job = Recommendation
    return or_(
        job.device_type.isnot(None), job.device_name_like.isnot(None), job.device_memory_bytes.isnot(None)
    )


def jobs_without_a_device(session: Session, *, live_after: datetime) -> Sequence[Recommendation]:
    """Queued jobs that name a device no live worker can serve (by exact match or allowed extrapolation)."""
    any_live = exists(select(Worker.id).where(Worker.heartbeat_at >= live_after))
    servable = or_(
        _live_worker_has_device(live_after), and_(Recommendation.allow_extrapolation.is_(True), any_live)
    )
    query = select(Recommendation).where(
        Recommendation.status == JobStatus.QUEUED, _names_a_device(), ~servable
    )
    return session.scalars(query).all()


def mark_waiting(session: Session, recommendation_id: str, reason: str) -> None:
    session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.QUEUED)
        .values(phase="waiting_for_device", waiting_reason=reason)
    )


def clear_waiting(session: Session, *, keep: Sequence[str]) -> int:
    """Clear the waiting status of queued jobs not in `keep` (a worker for them has come up)."""
    query = update(Recommendation).where(
        Recommendation.status == JobStatus.QUEUED, Recommendation.phase == "waiting_for_device"
    )
    if keep:
        query = query.where(Recommendation.id.not_in(keep))
    return session.execute(query.values(phase=None, waiting_reason=None)).rowcount


def fail_queued(session: Session, recommendation_id: str, *, error_code: str, error_message: str) -> bool:
    """End a job that was never claimed as failed. False if it was no longer queued."""
    result = session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.FAILED, error_code=error_code, error_message=error_message, finished_at=utcnow()
        )
    )
    return result.rowcount == 1


# --- workers -------------------------------------------------------------------------------------


def register_worker(
    session: Session,
    *,
    worker_id: str,
    host: str,
    device_type: str,
    device_name: str,
    memory_bytes: int,
    device_count: int,
) -> None:
    now = utcnow()
    session.merge(
        Worker(
            id=worker_id,
            host=host,
            device_type=device_type,
            device_name=device_name,
            memory_bytes=memory_bytes,
            device_count=device_count,
            current_job=None,
            started_at=now,
            heartbeat_at=now,
        )
    )


def worker_heartbeat(session: Session, worker_id: str, *, current_job: str | None) -> bool:
    """Refresh a worker's heartbeat. False when its row is gone (pruned): it must register again."""
    result = session.execute(
        update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow(), current_job=current_job)
    )
    return result.rowcount == 1


def unregister_worker(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def list_workers(session: Session) -> Sequence[Worker]:
    return session.scalars(select(Worker).order_by(Worker.host, Worker.id)).all()


def live_workers(session: Session, *, live_after: datetime) -> Sequence[Worker]:
    query = select(Worker).where(Worker.heartbeat_at >= live_after).order_by(Worker.host, Worker.id)
    return session.scalars(query).all()


def prune_workers(session: Session, *, older_than: datetime) -> int:
    """Forget workers whose heartbeat stopped long ago (they crashed without unregistering)."""
    return session.execute(delete(Worker).where(Worker.heartbeat_at < older_than)).rowcount


def _owned(recommendation_id: str, worker_id: str | None) -> ColumnElement[bool]:
    """This job, and (when a worker is named) still running for that worker: a worker whose job was
    re-queued and claimed by another (its heartbeat went stale) can no longer write to it."""
    condition = Recommendation.id == recommendation_id
    if worker_id is None:
        return condition
    return and_(condition, Recommendation.status == JobStatus.RUNNING, Recommendation.worker_id == worker_id)


def record_progress(
    session: Session,
    recommendation_id: str,
    *,
    phase: str | None = None,
    trials_planned: int | None = None,
    worker_id: str | None = None,
) -> None:
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if trials_planned is not None:
        values["trials_planned"] = Recommendation.trials_done + trials_planned
    session.execute(update(Recommendation).where(_owned(recommendation_id, worker_id)).values(**values))


def add_trial(
    session: Session, recommendation_id: str, trial: dict[str, Any], *, worker_id: str | None = None
) -> None:
    """Store one finished trial and count it towards the job's progress (if the worker still owns it)."""
    recommendation = session.scalars(
        select(Recommendation).where(_owned(recommendation_id, worker_id))
    ).first()
    if recommendation is None:
        return
    session.add(
        Trial(
            recommendation_id=recommendation_id,
            index=recommendation.trials_done,
            phase=str(trial.get("phase") or recommendation.phase or "unknown"),
            batch_size=trial.get("batch_size"),
            outcome=str(trial.get("outcome", "ok")),
            peak_bytes=trial.get("peak_bytes"),
            step_time_s=trial.get("step_time_s"),
            samples_per_second=trial.get("samples_per_second"),
            detail=trial.get("detail"),
            created_at=utcnow(),
        )
    )
    recommendation.trials_done += 1
    recommendation.trials_planned = max(recommendation.trials_planned, recommendation.trials_done)
    recommendation.heartbeat_at = utcnow()


def heartbeat(session: Session, recommendation_id: str, *, worker_id: str | None = None) -> bool:
    """Refresh the job's heartbeat; returns whether its probe should stop: cancellation was requested,
    or (when a worker is named) the job is no longer this worker's."""
    owned = _owned(recommendation_id, worker_id)
    if session.execute(update(Recommendation).where(owned).values(heartbeat_at=utcnow())).rowcount != 1:
        return worker_id is not None
    return bool(session.scalar(select(Recommendation.cancel_requested).where(owned)))


def finish(
    session: Session,
    recommendation_id: str,
    *,
    status: str,
    result: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    worker_id: str | None = None,
) -> bool:
    """End a running job. False when it was not running (for this worker, when one is named)."""
    updated = session.execute(
        update(Recommendation)
        .where(_owned(recommendation_id, worker_id), Recommendation.status == JobStatus.RUNNING)
        .values(
            status=status,
            result=result,
            error_code=error_code,
            error_message=error_message,
            finished_at=utcnow(),
            phase="done" if status == JobStatus.SUCCEEDED else None,
        )
    )
    return updated.rowcount == 1


def requeue(
    session: Session,
    recommendation_id: str,
    *,
    worker_id: str | None = None,
    stale_before: datetime | None = None,
) -> bool:
    """Put a running job back in the queue (its worker stopped before finishing it).

    With `worker_id`, only if that worker still holds it; with `stale_before`, only if its heartbeat is
    still older than that (checked in the same UPDATE, so a worker that just beat keeps its job).
    """
    query = update(Recommendation).where(
        _owned(recommendation_id, worker_id), Recommendation.status == JobStatus.RUNNING
    )
    if stale_before is not None:
        query = query.where(Recommendation.heartbeat_at < stale_before)
    result = session.execute(
        query.values(status=JobStatus.QUEUED, worker_id=None, phase=None, started_at=None, heartbeat_at=None)
    )
    return result.rowcount == 1


def running_jobs(session: Session) -> Sequence[Recommendation]:
    return session.scalars(select(Recommendation).where(Recommendation.status == JobStatus.RUNNING)).all()


def stale_running_jobs(session: Session, *, older_than: datetime) -> Sequence[Recommendation]:
    query = select(Recommendation).where(
        Recommendation.status == JobStatus.RUNNING, Recommendation.heartbeat_at < older_than
    )
    return session.scalars(query).all()


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Recommendation.status, func.count()).group_by(Recommendation.status))
    return {status: count for status, count in rows}


# --- artifacts -----------------------------------------------------------------------------------


def get_artifact(session: Session, artifact_id: str) -> Artifact | None:
    return session.get(Artifact, artifact_id)


def add_artifact(
    session: Session, *, artifact_id: str, kind: str, filename: str, size_bytes: int, path: str, meta: dict
) -> Artifact:
    artifact = Artifact(
        id=artifact_id,
        kind=kind,
        filename=filename,
        size_bytes=size_bytes,
        path=path,
        meta=meta,
        created_at=utcnow(),
    )
    session.add(artifact)
    session.flush()
    return artifact


def list_artifacts(session: Session, *, kind: str | None = None) -> Sequence[Artifact]:
    query = select(Artifact).order_by(Artifact.created_at.desc())
    if kind:
        query = query.where(Artifact.kind == kind)
    return session.scalars(query).all()


def delete_artifact(session: Session, artifact_id: str) -> bool:
    return session.execute(delete(Artifact).where(Artifact.id == artifact_id)).rowcount == 1


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)

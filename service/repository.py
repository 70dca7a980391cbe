"""All SQL lives here: small functions that take a Session and say what they do."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.models import Artifact, Recommendation, Trial, utcnow
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
    session: Session, *, recommendation_id: str, fingerprint: str, model_name: str, request: dict[str, Any]
) -> Recommendation:
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


def claim_next_queued(session: Session, *, worker_id: str) -> Recommendation | None:
    """Atomically move the oldest queued job to running for this worker.

    The conditional UPDATE (`status = 'queued'`) makes the claim safe when several workers share one
    database: only one of them sees rowcount 1 for a given job.
    """
    candidates = session.scalars(
        select(Recommendation.id)
        .where(Recommendation.status == JobStatus.QUEUED)
        .order_by(Recommendation.created_at, Recommendation.id)
        .limit(5)
    ).all()
    now = utcnow()
    for candidate in candidates:
        claimed = session.execute(
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
            )
        )
        if claimed.rowcount == 1:
            # A re-queued job starts over: drop the trials of the attempt that died.
            session.execute(delete(Trial).where(Trial.recommendation_id == candidate))
            session.flush()
            recommendation = session.get(Recommendation, candidate)
            session.refresh(recommendation)
            return recommendation
    return None


def record_progress(
    session: Session, recommendation_id: str, *, phase: str | None = None, trials_planned: int | None = None
) -> None:
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if trials_planned is not None:
        values["trials_planned"] = Recommendation.trials_done + trials_planned
    session.execute(update(Recommendation).where(Recommendation.id == recommendation_id).values(**values))


def add_trial(session: Session, recommendation_id: str, trial: dict[str, Any]) -> None:
    """Store one finished trial and count it towards the job's progress."""
    recommendation = session.get(Recommendation, recommendation_id)
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


def heartbeat(session: Session, recommendation_id: str) -> bool:
    """Refresh the job's heartbeat; returns whether cancellation was requested."""
    session.execute(
        update(Recommendation).where(Recommendation.id == recommendation_id).values(heartbeat_at=utcnow())
    )
    return bool(
        session.scalar(select(Recommendation.cancel_requested).where(Recommendation.id == recommendation_id))
    )


def finish(
    session: Session,
    recommendation_id: str,
    *,
    status: str,
    result: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.RUNNING)
        .values(
            status=status,
            result=result,
            error_code=error_code,
            error_message=error_message,
            finished_at=utcnow(),
            phase="done" if status == JobStatus.SUCCEEDED else None,
        )
    )


def requeue(session: Session, recommendation_id: str) -> None:
    """Put a running job back in the queue (its worker stopped before finishing it)."""
    session.execute(
        update(Recommendation)
        .where(Recommendation.id == recommendation_id, Recommendation.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, worker_id=None, phase=None, started_at=None, heartbeat_at=None)
    )


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

"""Routing jobs to workers by device, and what the fleet of workers looks like.

A request that names a device (`device.type`, a `device.name` glob such as `"NVIDIA H100*"`, or
`device.memory_bytes`) is claimed only by a worker that has it: the same type, a name matching the
pattern (case-insensitive), at least that much memory. With `device.allow_extrapolation` a worker with
another device may take it when no live worker has the one asked for; the answer is then flagged
`extrapolated`. A request that names no device goes to any worker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service import repository
from service.db.models import Recommendation, Worker


def device_requirement(device: Any) -> dict[str, Any] | None:
    """The routing columns for a request's `device` (schemas.DeviceSpec); None when it names none."""
    if device.type is None and device.name is None and device.memory_bytes is None:
        return None
    return {
        "device_type": device.type,
        "device_name_like": glob_to_like(device.name) if device.name else None,
        "device_memory_bytes": device.memory_bytes,
        "allow_extrapolation": bool(getattr(device, "allow_extrapolation", False)),
    }


def names_no_device(job: Recommendation) -> bool:
    return job.device_type is None and job.device_name_like is None and job.device_memory_bytes is None


def glob_to_like(pattern: str) -> str:
    """A case-insensitive shell glob (`*`, `?`) as a lower-case SQL LIKE pattern escaped with `\\`."""
    escaped = pattern.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def like_to_glob(like: str) -> str:
    """The inverse of glob_to_like, to show a requirement the way the client wrote it (lower-cased)."""
    out, index = [], 0
    while index < len(like):
        char = like[index]
        if char == "\\" and index + 1 < len(like):
            out.append(like[index + 1])
            index += 2
            continue
        out.append({"%": "*", "_": "?"}.get(char, char))
        index += 1
    return "".join(out)


def describe_requirement(job: Recommendation) -> str:
    parts = [job.device_type or "any"]
    parts.append("device")
    if job.device_name_like:
        parts.append(f"named like {like_to_glob(job.device_name_like)!r}")
    if job.device_memory_bytes:
        parts.append(f"with at least {job.device_memory_bytes / 2**30:.1f} GiB")
    return " ".join(parts)


def describe_worker(worker: Worker) -> str:
    return (
        f"{worker.device_type} {worker.device_name!r} {worker.memory_bytes / 2**30:.1f} GiB on {worker.host}"
    )


def waiting_reason(job: Recommendation, live: list[Worker]) -> str:
    """Why nobody claims this job, naming what it needs and what is there."""
    reason = f"waiting for a worker with a {describe_requirement(job)}"
    if not live:
        return reason + "; no worker is running"
    shown = "; ".join(describe_worker(worker) for worker in live[:5])
    more = f" and {len(live) - 5} more" if len(live) > 5 else ""
    hint = "" if job.allow_extrapolation else " (device.allow_extrapolation lets one of them extrapolate)"
    return f"{reason}; live workers: {shown}{more}{hint}"


def route_waiting_jobs(
    session: Session, *, live_after: datetime, give_up_before: datetime
) -> tuple[list[str], list[str]]:
    """Flag queued jobs no live worker can serve as `waiting_for_device` (with the reason), fail those
    queued since before `give_up_before`, and clear the flag of jobs a worker has come up for.

    Returns (ids now waiting, ids failed).
    """
    live = list(repository.live_workers(session, live_after=live_after))
    waiting, failed = [], []
    for job in repository.jobs_without_a_device(session, live_after=live_after):
        reason = waiting_reason(job, live)
        if job.created_at < give_up_before:
            message = f"no worker could serve this request in time: {reason}"
            if repository.fail_queued(session, job.id, error_code="no_device", error_message=message):
                failed.append(job.id)
        else:
            repository.mark_waiting(session, job.id, reason)
            waiting.append(job.id)
    repository.clear_waiting(session, keep=waiting)
    return waiting, failed


def worker_view(worker: Worker, *, live_after: datetime) -> dict[str, Any]:
    """The API's view of a worker (schemas.WorkerOut)."""
    return {
        "id": worker.id,
        "host": worker.host,
        "device": {
            "type": worker.device_type,
            "name": worker.device_name,
            "memory_bytes": worker.memory_bytes,
            "count": worker.device_count,
        },
        "current_job": worker.current_job,
        "started_at": worker.started_at,
        "heartbeat_at": worker.heartbeat_at,
        "alive": worker.heartbeat_at >= live_after,
    }


def list_workers(session: Session, *, stale_after_s: float) -> list[dict[str, Any]]:
    """Every registered worker's public view; alive when its heartbeat is newer than `stale_after_s`."""
    live_after = repository.stale_cutoff(stale_after_s)
    return [worker_view(worker, live_after=live_after) for worker in repository.list_workers(session)]

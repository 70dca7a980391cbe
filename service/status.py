"""The words a recommendation job's status takes, defined once for the API, the database, the worker,
the metrics, the report and the client."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """queued → running → succeeded | failed | cancelled (a running job can also go back to queued)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})  # may still change
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})  # never changes again

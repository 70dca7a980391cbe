"""Errors: every one is a `BatchsizeError` with a stable `code`."""

from __future__ import annotations

from typing import Any


class BatchsizeError(Exception):
    """An error answered by the service (`status_code`, `code`, `message`, `details`), or a failure to
    reach it (`status_code` 0, code `unreachable`)."""

    def __init__(
        self, message: str, *, status_code: int = 0, code: str = "error", details: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.details = details

    def __str__(self) -> str:
        where = f"HTTP {self.status_code} " if self.status_code else ""
        return f"{where}{self.code}: {self.message}"


class RecommendationFailed(BatchsizeError):
    """The job ended `failed` or `cancelled`; `code`/`message` are the job's error, `job` the job."""

    def __init__(self, job: Any) -> None:
        error = job.error
        super().__init__(
            error.message if error else f"recommendation {job.id} is {job.status}",
            code=error.code if error else job.status,
            details=job,
        )
        self.job = job


class RecommendationTimeout(BatchsizeError):
    """The job was still queued or running when the wait ran out (it keeps running on the server)."""

    def __init__(self, job: Any, timeout_s: float) -> None:
        super().__init__(
            f"recommendation {job.id} is still {job.status} after {timeout_s:g} s; "
            "wait for it again with client.wait(id)",
            code="timeout",
            details=job,
        )
        self.job = job


class ExportError(BatchsizeError):
    """The model (or its example inputs or data) could not be turned into an archive the service accepts.

    Codes: `invalid_inputs`, `static_batch_dimension`, `export_failed`, `unsupported_outputs`,
    `invalid_dataset`, `torch_missing`.
    """

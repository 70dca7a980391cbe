"""Does an uploaded data sample fit an uploaded model? Checked when a recommendation names both.

The stored descriptions (`sample_check.problem`) settle shapes, dtypes and ranges without data; what
only the model can tell (its output against the targets, under the declared loss) needs a training
step. So on `POST /v1/recommendations` with an uploaded model and a `sample_id`, the sample is loaded
against the model's stored config and one forward, loss and backward runs on its first rows, in the
same sandboxed subprocess as an upload's dry run (`python -m service.probing.exported`, mode
`sample`): a sample the model cannot train on is a 422 `sample_mismatch` with the reason, before any
job is queued.

Verdicts are cached in this process per (model sha256, sample sha256, loss, ignore_index): artifacts
are stored by content hash, so the same pair always gets the same verdict and repeated requests do
not start a process. A check that cannot run (timeout, crash, no sandbox) does not block the
request: it is logged and the probe's own check at its start remains (it fails the job
`invalid_sample`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from service.artifacts.service import ChildTimeout, run_exported_child
from service.config import Settings
from service.db.models import Artifact
from service.errors import InvalidRequest
from service.probing.protocol import RESULT  # torch-free
from service.probing.sandbox import SandboxLimits  # torch-free
from service.probing.spec import ProbeError  # torch-free

log = logging.getLogger(__name__)

CHECK_NICENESS = 10
MAX_CACHED = 4096

_VERDICTS: dict[tuple[str, str, str, int], str | None] = {}  # key -> None (fits) or the reason
_LOCK = threading.Lock()


@dataclass(frozen=True)
class FitCheck:
    """What one check needs, read from the database while its session is open."""

    model_id: str
    model_path: str
    sample_id: str
    sample_path: str
    config: dict[str, Any]
    ignore_index: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.model_id, self.sample_id, str(self.config.get("loss")), self.ignore_index)


def pending_check(
    model: Artifact | None, sample: Artifact | None, request: dict[str, Any]
) -> FitCheck | None:
    """The check a resolved request needs: an uploaded model and a sample, else None."""
    if model is None or sample is None or model.kind != "model" or sample.kind != "sample":
        return None
    return FitCheck(
        model_id=model.id,
        model_path=model.path,
        sample_id=sample.id,
        sample_path=sample.path,
        config=dict(request["model"]["config"]),
        ignore_index=int(request["training"].get("ignore_index", -100)),
    )


def require_fit(check: FitCheck, *, settings: Settings) -> None:
    """InvalidRequest `sample_mismatch` when the model cannot train on the sample; returns when it can
    or when the check could not run (logged)."""
    with _LOCK:
        known = check.key in _VERDICTS
        reason = _VERDICTS.get(check.key)
    if not known:
        try:
            reason = _run(check, settings=settings)
        except _Undecided as exc:
            log.warning(
                "sample %s against model %s not checked at submission (%s); the probe checks it at its start",
                check.sample_id[:12],
                check.model_id[:12],
                exc,
            )
            return
        with _LOCK:
            if len(_VERDICTS) >= MAX_CACHED:
                _VERDICTS.clear()
            _VERDICTS[check.key] = reason
    if reason is not None:
        raise InvalidRequest(f"dataset.sample_id: {reason}", code="sample_mismatch")


def clear_cache() -> None:
    """Forget every verdict (tests; a deleted artifact re-uploaded has the same hash and verdict)."""
    with _LOCK:
        _VERDICTS.clear()


class _Undecided(Exception):
    """The check did not reach a verdict (timeout, crash, the model would not load)."""


def _run(check: FitCheck, *, settings: Settings) -> str | None:
    """The subprocess's verdict: None (fits) or the reason; _Undecided when it gave none."""
    request = {
        "mode": "sample",
        "path": check.model_path,
        "config": check.config,
        "sample_path": check.sample_path,
        "ignore_index": check.ignore_index,
    }
    timeout_s = settings.artifact_dry_run_timeout_s
    try:
        limits = SandboxLimits.from_settings(settings)
        outcome = run_exported_child(request, timeout_s=timeout_s, limits=limits, niceness=CHECK_NICENESS)
    except ChildTimeout:
        raise _Undecided(f"no verdict within {timeout_s:g} s") from None
    except ProbeError as exc:  # the sandbox could not be set up
        raise _Undecided(exc.message) from exc
    final = outcome.final
    if final is None:
        raise _Undecided(f"the check process exited with status {outcome.returncode} and no verdict")
    if final["event"] == RESULT:
        return None
    if final.get("code") == "sample_mismatch":
        return str(final.get("message", ""))
    raise _Undecided(f"{final.get('code')}: {str(final.get('message', ''))[:300]}")

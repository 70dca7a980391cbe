"""Fake probes that tests/test_ray_executor.py runs as Ray tasks on its local cluster's nodes.

They live in their own light module because the nodes import them by name (the test cluster's nodes
get the repository on PYTHONPATH). Each reports where it ran (Ray node id, process id) in its trial's
`detail`, so the test reads the placement back from the database like any trial.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from service.probing.spec import ProbeError, ProbeSpec

# A directory the test and the nodes share; `release-<time_budget_s>` in it lets a waiting probe finish.
RELEASE_DIR_ENV = "BATCHSIZE_TEST_RAY_DIR"


def _where() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def _report(on_event: Any) -> None:
    on_event({"event": "phase", "phase": "memory", "trials_planned": 1})
    on_event({"event": "trial", "phase": "memory", "batch_size": 8, "outcome": "ok", "detail": _where()})


def report_node(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict[str, Any]:
    """Report where it runs and finish at once."""
    _report(on_event)
    return {"max_feasible_batch_size": 8}


def wait_for_release(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict[str, Any]:
    """Report where it runs, then finish only once the test creates its release file (never checks for a
    cancel: only Ray can stop it)."""
    _report(on_event)
    release = Path(os.environ[RELEASE_DIR_ENV]) / f"release-{spec.time_budget_s:g}"
    deadline = time.monotonic() + 300
    while not release.exists():
        if time.monotonic() > deadline:
            raise ProbeError("timeout", f"{release} never appeared")
        time.sleep(0.05)
    return {"max_feasible_batch_size": 8}


def fail_with_reason(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict[str, Any]:
    """Report where it runs, then fail the way a probe does."""
    _report(on_event)
    raise ProbeError("oom_at_min_batch", "batch size 1 needs 3 GiB, over the 1 GiB budget")

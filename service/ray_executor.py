"""Ray as the probe executor of a fleet (`BATCHSIZE_EXECUTOR=ray`).

The worker still claims jobs from the database, beats their heartbeats and writes their trials; only the
probe itself runs elsewhere: as a Ray task on a node that has the worker's device kind.

- **Resources.** A CUDA probe asks for `num_gpus=1` and `accelerator_type` named the way Ray names the
  GPU a node detects ("NVIDIA H100 80GB HBM3" -> `H100`, "NVIDIA A100-SXM4-40GB" -> `A100`); a CPU probe
  asks for one CPU and the custom resource `batchsize_cpu` (start CPU nodes meant for probes with
  `ray start --resources='{"batchsize_cpu": 1}'`; the count is how many CPU probes the node runs at once).
- **Progress.** The task is a streaming generator: it runs the probe (by default the same sandboxed
  subprocess a local worker runs) and yields each event as a JSON string the moment the probe emits it,
  then the result or the error. The worker reads them in order and writes them to the database as a
  local probe's. No queue actor to place or clean up, and only strings cross the wire.
- **Cancel and timeout.** The worker keeps polling the job's row; a cancel, a shutdown or the deadline
  `ray.cancel(..., force=True)`s the task, which kills its Ray worker process; the probe subprocess
  under it exits with its parent (service.probing.runner).
- **A node lost mid-probe** (the task fails with Ray's node-died, worker-crashed or object-lost error)
  raises ProbeError(NODE_LOST); the worker re-queues the job so that it starts over on a live node.

`ray` is imported only here, and only when a worker uses this executor.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from service.probing.spec import ProbeError, ProbeSpec

log = logging.getLogger(__name__)

NODE_LOST = "node_lost"
CPU_RESOURCE = "batchsize_cpu"
POLL_INTERVAL_S = 0.1
# Ray's own naming of an NVIDIA GPU (ray._private.accelerators.nvidia_gpu), kept here so that the
# requested accelerator_type is the one Ray puts on a node that has that GPU.
_NVIDIA_GPU_NAME = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")


def accelerator_type(device_name: str) -> str | None:
    """The `accelerator_type` Ray gives a node with this NVIDIA GPU (None for an empty name)."""
    match = _NVIDIA_GPU_NAME.match(device_name)
    found = match.group(1).replace(" ", "-") if match else None
    if found and len(found) > 1:
        return found
    cleaned = re.sub(r"^NVIDIA\s+", "", device_name).strip()
    return cleaned.replace(" ", "-") or None


def task_options(device_type: str, device_name: str) -> dict[str, Any]:
    """The Ray task options that place a probe for this device kind on a node that has it."""
    if device_type == "cuda":
        options: dict[str, Any] = {"num_gpus": 1}
        if kind := accelerator_type(device_name):
            options["accelerator_type"] = kind
        return options
    return {"num_cpus": 1, "resources": {CPU_RESOURCE: 1}}


def run_on_node(probe: Callable[..., dict[str, Any]], spec_fields: dict[str, Any], timeout_s: float | None
                ) -> Iterator[str]:  # fmt: skip
    """The Ray task: run `probe` here and yield its events, then its result or error, as JSON lines.

    The first line says where it runs ({"event": "node", ...}). The probe runs in a thread of this task
    so that each event is yielded as soon as it is emitted.
    """
    import os
    import queue
    import socket
    import threading

    import ray

    spec = ProbeSpec(**spec_fields)
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            result = probe(spec, on_event=events.put, timeout_s=timeout_s, should_cancel=lambda: False)
            events.put({"event": "result", "result": result})
        except ProbeError as exc:
            events.put({"event": "error", "code": exc.code, "message": exc.message})
        except Exception as exc:  # a bug in the probe: report it as the local runner does
            message = f"{type(exc).__name__}: {exc}"
            events.put({"event": "error", "code": "internal_error", "message": message})

    node = ray.get_runtime_context().get_node_id()
    yield json.dumps({"event": "node", "node_id": node, "host": socket.gethostname(), "pid": os.getpid()})
    threading.Thread(target=work, name="probe", daemon=True).start()
    while True:
        message = events.get()
        yield json.dumps(message, default=str)
        if message.get("event") in ("result", "error"):
            return


class RayExecutor:
    """Runs probes as Ray tasks on the cluster at `address` (`auto`, `HOST:PORT`, `ray://HOST:PORT`)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._remote: Any = None

    def connect(self) -> None:
        """Join the cluster (once per process) and build the remote task. Raises when Ray is missing or
        the cluster cannot be reached."""
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError(
                "BATCHSIZE_EXECUTOR=ray needs the `ray` package: pip install 'batchsize-service[ray]'"
            ) from exc
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level=logging.WARNING)
        if self._remote is None:
            self._remote = ray.remote(run_on_node)

    def bind(
        self, probe: Callable[..., dict[str, Any]], *, device_type: str, device_name: str
    ) -> Callable[..., dict[str, Any]]:
        """A `run_probe(spec, on_event, timeout_s, should_cancel)` that runs `probe` through Ray on a node
        with this device kind (what the worker calls instead of the local subprocess)."""

        def run_probe(
            spec: ProbeSpec,
            on_event: Callable[[dict[str, Any]], None] | None = None,
            timeout_s: float | None = None,
            should_cancel: Callable[[], bool] = lambda: False,
        ) -> dict[str, Any]:
            return self.run(
                probe, spec, options=task_options(device_type, device_name), on_event=on_event,
                timeout_s=timeout_s, should_cancel=should_cancel,
            )  # fmt: skip

        return run_probe

    def run(
        self,
        probe: Callable[..., dict[str, Any]],
        spec: ProbeSpec,
        *,
        options: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
        should_cancel: Callable[[], bool] = lambda: False,
    ) -> dict[str, Any]:
        """Submit the probe, stream its events to `on_event`, return its result or raise ProbeError.

        `timeout_s` counts from submission (a task waiting for a node with the device counts too).
        """
        import ray

        self.connect()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # max_retries=0: a task Ray re-ran by itself would write its trials twice; the worker re-queues.
        task = self._remote.options(num_returns="streaming", max_retries=0, **options)
        stream = task.remote(probe, spec.to_json_dict(), timeout_s)
        try:
            return self._follow(stream, on_event, deadline, should_cancel, timeout_s)
        except ProbeError:
            _cancel(stream)  # cancelled, timed out, or the probe failed (then the task is over already)
            raise
        except _node_lost_errors() as exc:
            raise ProbeError(NODE_LOST, f"the Ray node running the probe was lost: {exc}") from exc
        except ray.exceptions.RayError as exc:
            _cancel(stream)
            raise ProbeError("crashed", f"the Ray task running the probe failed: {exc}") from exc

    def _follow(
        self,
        stream: Any,
        on_event: Callable[[dict[str, Any]], None] | None,
        deadline: float | None,
        should_cancel: Callable[[], bool],
        timeout_s: float | None,
    ) -> dict[str, Any]:
        import ray

        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise ProbeError("timeout", f"probe did not finish within {timeout_s:g} s and was cancelled")
            if should_cancel():
                raise ProbeError("cancelled", "probe was cancelled")
            ready, _ = ray.wait([stream], timeout=POLL_INTERVAL_S)
            if not ready:
                continue
            try:
                ref = next(stream)
            except StopIteration:
                raise ProbeError("crashed", "the Ray task ended without a result") from None
            message = json.loads(ray.get(ref))
            kind = message.get("event")
            if kind == "result":
                return dict(message["result"])
            if kind == "error":
                raise ProbeError(str(message.get("code", "probe_error")), str(message.get("message", "")))
            if kind == "node":
                log.info("probe running on Ray node %s (%s)", message.get("node_id"), message.get("host"))
            if on_event is not None:
                on_event(message)


def _cancel(stream: Any) -> None:
    """Force-cancel the task (Ray kills its worker process); a task that is over already is left alone."""
    import ray

    try:
        ray.cancel(stream, force=True)
    except Exception:  # the outcome being reported matters more than a failed cancel
        log.warning("could not cancel the Ray task of a probe", exc_info=True)


def _node_lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose node or worker process went away (not the probe's own failure)."""
    from ray import exceptions

    return (
        exceptions.NodeDiedError,
        exceptions.WorkerCrashedError,
        exceptions.LocalRayletDiedError,
        exceptions.ObjectLostError,
    )

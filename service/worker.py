"""The worker: claims queued jobs, runs each probe in a subprocess, streams its trials into the database.

It runs as a thread inside `batchsize serve` or alone as `batchsize worker`. Several workers (on several
hosts) may share one database: claims are atomic. Run one worker per device: a worker runs one probe at a
time, which is what keeps two probes from fighting over one GPU's memory.

Each worker registers its device in the `workers` table and takes only jobs it can serve (service.fleet).
Its heartbeat (and its running job's) tells the others it is alive: a job whose heartbeat went stale is
re-queued by any worker, on any host; a worker that lost its job that way can no longer write to it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import fleet, repository
from service.config import Settings
from service.db.session import session_scope
from service.errors import client_message
from service.probing.spec import ProbeError
from service.recommendations.service import HostDevice, probe_spec_from_request
from service.status import JobStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

# Extra wall time a probe gets beyond its own time budget (start-up, the last trial) before it is killed.
_GRACE_FACTOR = 1.5
_GRACE_S = 60.0


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _worker_is_dead(worker_id: str | None, *, my_worker_id: str) -> bool:
    """Whether the worker that claimed a job is gone, as far as this host can tell."""
    if not worker_id:
        return True
    host, _, rest = worker_id.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host's worker: only a stale heartbeat tells (see requeue_stale)
    pid = int(pid_text)
    if pid == os.getpid():
        return worker_id != my_worker_id  # an earlier run of this very process id (e.g. PID 1 in Docker)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        host: HostDevice,
        run_probe: Callable[..., dict[str, Any]] | None = None,
        metrics: Any = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.host = host
        self.worker_id = make_worker_id()
        self.stop_event = threading.Event()
        self._run_probe = run_probe
        self.metrics = metrics  # service.observability.Metrics, when the app exposes /metrics
        self._thread: threading.Thread | None = None
        self._standby: Any = None  # service.probing.sandbox.ProbeStandby, while run_forever runs
        self._executor: Any = None  # service.ray_executor.RayExecutor with BATCHSIZE_EXECUTOR=ray
        self.current_job: str | None = None
        self.device = repository.WorkerDevice(type=host.type, name=host.name, memory_bytes=host.memory_bytes)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="batchsize-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_forever(self) -> None:
        log.info("worker %s started on %s (%s)", self.worker_id, self.host.type, self.host.name)
        self._standby = self._new_standby()
        try:
            self._loop()
        finally:
            self._close_standby()
        try:
            self._write(repository.unregister_worker, self.worker_id)
        except Exception:  # the database may be gone; the row then ages out (prune_workers)
            log.warning("worker %s could not unregister", self.worker_id)
        log.info("worker %s stopped", self.worker_id)

    def _loop(self) -> None:
        last_beat = last_maintenance = -float("inf")
        while not self.stop_event.is_set():
            try:
                if last_beat == -float("inf"):
                    if self.settings.executor == "ray":
                        self._ray_executor().connect()  # no job is claimed before the cluster is reached
                    self.register()
                    self.recover_orphans()
                    last_beat = time.monotonic()
                if time.monotonic() - last_beat >= self.settings.heartbeat_interval_s:
                    self.beat()
                    last_beat = time.monotonic()
                if time.monotonic() - last_maintenance >= min(10.0, self.settings.stale_after_s / 2):
                    self.requeue_stale()
                    self.route_waiting_jobs()
                    last_maintenance = time.monotonic()
                if not self.run_next():
                    self.keep_standby()  # also replaces one that died while waiting
                    self.stop_event.wait(self.settings.poll_interval_s)
            except Exception:  # the loop must survive anything, e.g. the database being away for a while
                log.exception("worker loop error; retrying")
                self.stop_event.wait(min(5.0, self.settings.poll_interval_s * 4))

    # --- standby probe process ----------------------------------------------------------------------

    def _new_standby(self) -> Any:
        """The standby probe process holder while run_forever runs (BATCHSIZE_PROBE_STANDBY), started as
        a job's probe would be on this worker's device. None when off or with an injected run_probe."""
        if not self.settings.probe_standby or self._run_probe is not None or self.settings.executor == "ray":
            return None
        from service.probing.sandbox import ProbeStandby, SandboxLimits

        return ProbeStandby(limits=SandboxLimits.from_settings(self.settings), cuda=self.host.type == "cuda")

    def keep_standby(self) -> None:
        """Have one probe process waiting for the next job; start a new one when it was taken or died."""
        if self._standby is not None and not self.stop_event.is_set():
            self._standby.ensure()

    def standby_ready(self) -> bool:
        """Whether a standby probe process is waiting with its start-up done (False when off)."""
        standby = self._standby
        return standby is not None and standby.ready()

    def _close_standby(self) -> None:
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.close()

    # --- registration ------------------------------------------------------------------------------

    def register(self) -> None:
        """Say in the database what this worker probes on (GET /v1/workers; routing by device)."""
        self._write(
            repository.register_worker,
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device_type=self.host.type,
            device_name=self.host.name,
            memory_bytes=self.host.memory_bytes,
            device_count=self.host.count,
        )

    def beat(self) -> None:
        """Refresh this worker's heartbeat (registering again if its row was pruned meanwhile)."""
        if not self._write(repository.worker_heartbeat, self.worker_id, current_job=self.current_job):
            self.register()

    def route_waiting_jobs(self) -> tuple[list[str], list[str]]:
        """Flag jobs no live worker can serve, fail those that waited too long, forget long-dead workers."""
        live_after = repository.stale_cutoff(self.settings.stale_after_s)
        waiting, failed = self._write(
            fleet.route_waiting_jobs,
            live_after=live_after,
            give_up_before=repository.stale_cutoff(self.settings.device_wait_timeout_s),
        )
        for job_id in failed:
            log.warning("job %s failed: no worker has the device it asks for", job_id)
        self._write(
            repository.prune_workers, older_than=repository.stale_cutoff(self.settings.stale_after_s * 60)
        )
        return waiting, failed

    # --- recovery ----------------------------------------------------------------------------------

    def recover_orphans(self) -> list[str]:
        """Re-queue jobs left `running` by a dead worker on this host, or without a recent heartbeat."""
        requeued = []
        with session_scope(self.sessions) as session:
            for job in repository.running_jobs(session):
                dead = _worker_is_dead(job.worker_id, my_worker_id=self.worker_id)
                if dead and repository.requeue(session, job.id, worker_id=job.worker_id):
                    requeued.append(job.id)
        requeued += self.requeue_stale()
        for job_id in requeued:
            log.warning("re-queued job %s left running by a dead worker", job_id)
        return requeued

    def requeue_stale(self) -> list[str]:
        """Re-queue running jobs whose heartbeat stopped (their worker died, here or on another host)."""
        cutoff = repository.stale_cutoff(self.settings.stale_after_s)
        with session_scope(self.sessions) as session:
            stale = [job.id for job in repository.stale_running_jobs(session, older_than=cutoff)]
            return [job_id for job_id in stale if repository.requeue(session, job_id, stale_before=cutoff)]

    # --- running jobs ------------------------------------------------------------------------------

    def run_next(self) -> bool:
        """Claim and run one queued job. Returns False when the queue was empty."""
        live_after = repository.stale_cutoff(self.settings.stale_after_s)
        with session_scope(self.sessions) as session:
            job = repository.claim_next_queued(
                session, worker_id=self.worker_id, device=self.device, live_after=live_after
            )
            if job is None:
                return False
            job_id, request = job.id, job.request
            if fleet.names_no_device(job):
                request = self._on_own_device(request)
        self.current_job = job_id
        try:
            self._run_job(job_id, request)
        finally:
            self.current_job = None
        return True

    def _on_own_device(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request that named no device is answered for this worker's device (the API replica that
        queued it filled in its own host's, which may be another kind)."""
        own = {"type": self.host.type, "name": self.host.name, "memory_bytes": self.host.memory_bytes}
        return {**request, "device": {**request["device"], **own}}

    def _run_job(self, job_id: str, request: dict[str, Any]) -> None:
        log.info("running job %s", job_id)
        probe_started: float | None = None
        try:
            spec = probe_spec_from_request(request, host=self.host)
            spec.sample_path = self._artifact_path(request["dataset"].get("sample_id"), what="sample")
            spec.model_artifact_path = self._artifact_path(
                request["model"].get("artifact_id"), what="artifact"
            )
            timeout_s = min(self.settings.probe_timeout_s, spec.time_budget_s * _GRACE_FACTOR + _GRACE_S)
            probe_started = time.monotonic()
            result = self._probe(spec, job_id=job_id, timeout_s=timeout_s)
            self._observe_probe(JobStatus.SUCCEEDED, probe_started)
        except ProbeError as exc:
            self._observe_probe(exc.code, probe_started)
            if self.stop_event.is_set() and exc.code == "cancelled":
                self._write(repository.requeue, job_id, worker_id=self.worker_id)
                log.info("job %s re-queued at shutdown", job_id)
                return
            if exc.code == "node_lost" and self._requeue_lost(job_id):
                return
            status = JobStatus.CANCELLED if exc.code == "cancelled" else JobStatus.FAILED
            message = client_message(exc.message)  # the full text goes to the log below and the trials
            if self._finish(job_id, status=status, error_code=exc.code, error_message=message):
                log.info("job %s %s: %s", job_id, status, exc.message)
            return
        except Exception as exc:
            self._observe_probe("internal_error", probe_started)
            log.exception("job %s failed unexpectedly", job_id)
            self._finish(
                job_id,
                status=JobStatus.FAILED,
                error_code="internal_error",
                error_message=client_message(repr(exc)),
            )
            return
        if self._finish(job_id, status=JobStatus.SUCCEEDED, result=result):
            log.info("job %s succeeded", job_id)

    def _requeue_lost(self, job_id: str) -> bool:
        """Re-queue a job whose Ray node was lost mid-probe, unless it has had BATCHSIZE_RAY_MAX_ATTEMPTS."""
        with session_scope(self.sessions) as session:
            job = repository.get_recommendation(session, job_id)
            attempts = job.attempts if job is not None else self.settings.ray_max_attempts
        if attempts >= self.settings.ray_max_attempts:
            return False
        requeued = bool(self._write(repository.requeue, job_id, worker_id=self.worker_id))
        if requeued:
            log.warning("job %s re-queued: its Ray node was lost (attempt %d)", job_id, attempts)
        return requeued

    def _ray_executor(self) -> Any:
        """The Ray executor (service.ray_executor), created on first use: `ray` is needed only then."""
        if self._executor is None:
            from service.ray_executor import RayExecutor

            self._executor = RayExecutor(self.settings.ray_address)
        return self._executor

    def _finish(self, job_id: str, **outcome: Any) -> bool:
        """Store the job's outcome, unless it is no longer this worker's (re-queued as stale meanwhile)."""
        if self._write(repository.finish, job_id, worker_id=self.worker_id, **outcome):
            return True
        log.warning(
            "job %s was taken from worker %s (stale heartbeat); its outcome is dropped",
            job_id,
            self.worker_id,
        )
        return False

    def _observe_probe(self, outcome: str, started: float | None) -> None:
        if self.metrics is not None and started is not None:
            self.metrics.observe_probe(outcome, time.monotonic() - started)

    def _artifact_path(self, artifact_id: str | None, *, what: str) -> str | None:
        """Where an uploaded artifact the request names lies on disk (None when it names none)."""
        if not artifact_id:
            return None
        with session_scope(self.sessions) as session:
            artifact = repository.get_artifact(session, artifact_id)
            if artifact is None:
                raise ProbeError(f"unknown_{what}", f"{what} {artifact_id!r} was deleted")
            return artifact.path

    def _probe(self, spec: Any, *, job_id: str, timeout_s: float) -> dict[str, Any]:
        run_probe = self._run_probe
        if run_probe is None:
            import functools

            from service.probing.sandbox import SandboxLimits, run_probe_subprocess

            limits = SandboxLimits.from_settings(self.settings)
            run_probe = functools.partial(run_probe_subprocess, limits=limits, standby=self._standby)
        if self.settings.executor == "ray":
            run_probe = self._ray_executor().bind(
                run_probe, device_type=self.host.type, device_name=self.host.name
            )

        last_beat = [time.monotonic()]  # the claim has just stamped the job's heartbeat

        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == "phase":
                self._write(
                    repository.record_progress,
                    job_id,
                    phase=event.get("phase"),
                    trials_planned=event.get("trials_planned"),
                    worker_id=self.worker_id,
                )
            elif kind == "trial":
                self._write(repository.add_trial, job_id, event, worker_id=self.worker_id)
                if self.metrics is not None:
                    self.metrics.count_trial(event)

        def should_cancel() -> bool:
            if self.stop_event.is_set():
                return True
            now = time.monotonic()
            if now - last_beat[0] < self.settings.heartbeat_interval_s:
                return False
            last_beat[0] = now
            self.beat()
            # True also when the job is no longer this worker's: its probe stops, its outcome is dropped.
            return bool(self._write(repository.heartbeat, job_id, worker_id=self.worker_id))

        try:
            return run_probe(spec, on_event=on_event, timeout_s=timeout_s, should_cancel=should_cancel)
        finally:
            # The next standby starts once this job's probe is done, so that its start-up (several
            # CPU-seconds of imports) does not run beside the job's timed trials.
            self.keep_standby()

    def _write(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one repository write in its own transaction, retrying briefly if the database is locked."""
        for attempt in range(5):
            try:
                with session_scope(self.sessions) as session:
                    return operation(session, *args, **kwargs)
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

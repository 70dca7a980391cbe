"""Fleet benchmark: N worker processes against one PostgreSQL, with a fake fast probe.

For each worker count (default 1, 2, 4, 8) a fresh database gets --jobs jobs (at most --backlog queued at a
time, topped up as the queue drains, as a steady stream of requests would); N `Worker` processes (the real
worker loop, claims and writes: only the probe is replaced by one that emits a phase event and one trial,
sleeps --probe-ms and returns) drain the queue. Measured: jobs per minute (from the first
claim to the last stored outcome), and claim latency (from the worker asking for a job to its probe
starting: the claim transaction, its commit and the request's translation), p50/p99.

Then the chaos run: --chaos-jobs jobs, --chaos-workers workers, and every --kill-every seconds (on
average, exponentially distributed) a random worker is SIGKILLed and a new one started in its place. The
jobs a killed worker held are re-queued by the others (same-host pid check at a new worker's start, or
the stale heartbeat after --stale-after seconds). Checked from the workers' logs and the database:
- double claims: a job claimed by a worker while the worker that claimed it before was neither killed
  nor done with it (nor had lost it to the stale-heartbeat re-queue, counted separately);
- double completions: a job whose outcome was stored by two workers;
- lost jobs: jobs not `succeeded` at the end (kills stop at --timeout; the fleet then drains what is
  left until it makes no progress for 3 x --stale-after + 30 s).

Needs PostgreSQL: --url of a server it may create databases on, else it starts a throwaway cluster with
scripts/postgres (the `postgresql` Debian package). Loopback only.

    .venv/bin/python bench/fleet.py                                     # the default run (a few minutes)
    .venv/bin/python bench/fleet.py --workers 1 2 --jobs 200 --chaos-jobs 500 --json out.json
    .venv/bin/python bench/fleet.py --workers --chaos-jobs 10000 --chaos-workers 4 --kill-every 45
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUEST = {
    "model": {"name": "mlp", "config": {"hidden_dims": [16]}},
    "input": {"shape": [64]},
    "dataset": {"size": 1000, "sample_id": None},
    "training": {"optimizer": "sgd", "learning_rate": 0.1, "reference_batch_size": 32, "precision": "fp32",
                 "gradient_checkpointing": False},
    "device": {"type": "cpu", "name": "bench", "memory_bytes": 2**34, "count": 1},
    "memory_budget_bytes": None, "objective": "max_feasible", "time_budget_s": 5,
}  # fmt: skip


# --- a worker process (run as `python bench/fleet.py --worker URL LOG`) ----------------------------


def run_worker(url: str, log_path: str, *, probe_ms: float, stale_after_s: float, heartbeat_s: float) -> None:
    """The real worker loop with a fake probe; logs each claim and each outcome it stored to log_path."""
    from service.config import Settings
    from service.db.session import make_engine, make_session_factories
    from service.recommendations.service import HostDevice
    from service.worker import Worker

    log = open(log_path, "a", buffering=1)  # noqa: SIM115  (line-buffered: a SIGKILL loses at most a line)
    settings = Settings(
        database_url=url,
        poll_interval_s=0.05,
        heartbeat_interval_s=heartbeat_s,
        stale_after_s=stale_after_s,
        _env_file=None,
    )
    engine = make_engine(settings)
    _, writes = make_session_factories(engine)
    host = HostDevice(type="cpu", name="bench", memory_bytes=2**34, free_bytes=2**34, count=1)
    asked = [0.0]

    def probe(spec: Any, *, on_event: Any, should_cancel: Any, **_: Any) -> dict:
        job_id = worker.current_job
        latency = time.perf_counter() - asked[0]
        log.write(json.dumps({"e": "claim", "job": job_id, "t": time.time(), "lat": latency}) + "\n")
        on_event({"event": "phase", "phase": "memory", "trials_planned": 1})
        time.sleep(probe_ms / 1000)
        should_cancel()
        on_event({"event": "trial", "phase": "memory", "batch_size": 8, "outcome": "ok", "peak_bytes": 1})
        return {"max_feasible_batch_size": 8}

    class LoggingWorker(Worker):
        def run_next(self) -> bool:
            asked[0] = time.perf_counter()
            return super().run_next()

        def _finish(self, job_id: str, **outcome: Any) -> bool:
            stored = super()._finish(job_id, **outcome)
            log.write(json.dumps({"e": "finish", "job": job_id, "t": time.time(), "stored": stored}) + "\n")
            return stored

    worker = LoggingWorker(settings=settings, sessions=writes, host=host, run_probe=probe)
    log.write(json.dumps({"e": "start", "worker": worker.worker_id, "t": time.time()}) + "\n")
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    worker.run_forever()


# --- the orchestrator ---------------------------------------------------------------------------


def start_postgres(directory: Path) -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "postgres"), "start", str(directory)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"could not start PostgreSQL: {out.stderr.strip()}")
    return out.stdout.strip()


def fresh_database(server_url: str, name: str) -> str:
    from sqlalchemy import create_engine, make_url, text

    from service.db import migrate

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    return url


def queue_jobs(url: str, count: int, *, first: int = 0) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from service import repository

    engine = create_engine(url)
    with Session(engine) as session:
        for index in range(first, first + count):
            repository.add_recommendation(
                session,
                recommendation_id=uuid.uuid4().hex,
                fingerprint=f"{index:064d}",
                model_name="mlp",
                request=REQUEST,
            )
        session.commit()
    engine.dispose()


def job_counts(engine: Any) -> dict[str, int]:
    from sqlalchemy.orm import Session

    from service import repository

    with Session(engine) as session:
        return repository.count_by_status(session)


def run_fleet(
    url: str, *, workers: int, jobs: int, logs: Path, args: argparse.Namespace, kill_every: float | None
) -> dict[str, Any]:
    """Drain `jobs` jobs with `workers` processes (killing one at random every ~kill_every s). At most
    --backlog jobs are queued at a time: more are added as the queue drains to half of that."""
    queued = min(jobs, args.backlog or jobs)
    queue_jobs(url, queued)
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    kills: list[dict[str, Any]] = []
    serial = [0]

    def spawn() -> subprocess.Popen:
        serial[0] += 1
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", url,
                   str(logs / f"worker-{serial[0]}.log"), "--probe-ms", str(args.probe_ms),
                   "--stale-after", str(args.stale_after), "--heartbeat", str(args.heartbeat)]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(logs / "stderr.log", "a"))

    from sqlalchemy import create_engine

    # One connection for the progress polls: a new one each poll would fork a server backend each time.
    engine = create_engine(url, pool_size=1)
    loads: list[float] = []
    rng = random.Random(args.seed)
    cpu_before = _cpu_seconds(args.postmaster)
    started = time.monotonic()
    processes = [spawn() for _ in range(workers)]
    next_kill = started + rng.expovariate(1 / kill_every) if kill_every else float("inf")
    # Kills stop at the deadline; then the fleet drains what is left until it stops making progress.
    deadline = started + args.timeout
    stalled_after = 3 * args.stale_after + 30
    last_done, last_progress = -1, time.monotonic()
    # With --queue-for, no job is queued after that many seconds: the run ends when those queued are done.
    queue_until = started + args.queue_for if args.queue_for else float("inf")
    try:
        while True:
            time.sleep(0.5)
            counts = job_counts(engine)
            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
            done = counts.get("succeeded", 0) + counts.get("failed", 0)
            waiting = counts.get("queued", 0)
            if queued < jobs and waiting <= args.backlog // 2 and time.monotonic() < queue_until:
                more = min(jobs - queued, args.backlog - waiting)
                queue_jobs(url, more, first=queued)
                queued += more
            if done != last_done:
                last_done, last_progress = done, time.monotonic()
            if done >= (jobs if time.monotonic() < queue_until else queued) or (
                time.monotonic() > deadline and time.monotonic() - last_progress > stalled_after
            ):
                break
            if time.monotonic() < next_kill or time.monotonic() >= deadline:
                continue
            victim = rng.randrange(len(processes))
            processes[victim].kill()
            kills.append({"pid": processes[victim].pid, "t": time.time()})
            processes[victim].wait()
            processes[victim] = spawn()
            assert kill_every  # next_kill is finite only with it
            next_kill = time.monotonic() + rng.expovariate(1 / kill_every)
    finally:
        elapsed = time.monotonic() - started
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    counts = job_counts(engine)
    engine.dispose()
    cpu_after = _cpu_seconds(args.postmaster)
    cpu = {side: cpu_after[side] - cpu_before[side] for side in cpu_after}
    succeeded = max(1, counts.get("succeeded", 0))
    cpu_ms_per_job = {side: seconds / succeeded * 1000 for side, seconds in cpu.items()}
    return {
        "workers": workers,
        "jobs": queued,
        "jobs_asked": jobs,
        "elapsed_s": elapsed,
        "counts": counts,
        "kills": kills,
        "processes_started": serial[0],
        "cpu_ms_per_job": cpu_ms_per_job,
        "loadavg_1min": _load_summary(loads),
        **analyse(logs, kills, queued, counts, elapsed),
    }


def _load_summary(loads: list[float]) -> dict[str, float] | None:
    """The host's 1-minute load average as sampled during a run (this benchmark's own processes included)."""
    if not loads:
        return None
    return {"min": min(loads), "mean": round(statistics.fmean(loads), 2), "max": max(loads)}


def _cpu_seconds(postmaster: int | None) -> dict[str, float]:
    """CPU seconds used so far by this script's finished worker processes and, when this script started
    the server, by PostgreSQL (the postmaster's own and its reaped backends', from /proc)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"workers": children.ru_utime + children.ru_stime}
    if postmaster:
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out["postgres"] = sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime
    return out


def analyse(logs: Path, kills: list[dict], jobs: int, counts: dict[str, int], elapsed: float) -> dict:
    """Claim latency and the correctness checks, from the workers' logs and the final counts."""
    events: list[dict[str, Any]] = []
    for path in sorted(logs.glob("worker-*.log")):
        worker = None
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the last line of a SIGKILLed worker may be cut short
                continue
            if event["e"] == "start":
                worker = event["worker"]
            else:
                events.append({**event, "worker": worker})
    killed_at = {kill["pid"]: kill["t"] for kill in kills}

    def pid(worker: str) -> int:
        return int(worker.split(":")[1])

    by_job: dict[str, list[dict]] = {}
    for event in sorted(events, key=lambda e: e["t"]):
        by_job.setdefault(event["job"], []).append(event)
    double_claims = double_completions = lost_ownership = 0
    for history in by_job.values():
        holder: dict | None = None
        for event in history:
            if event["e"] == "claim":
                if holder is not None:
                    kill_time = killed_at.get(pid(holder["worker"]))
                    if kill_time is None or kill_time > event["t"]:
                        double_claims += 1
                holder = event
            elif event["e"] == "finish":
                if not event["stored"]:
                    lost_ownership += 1
                elif holder is not None and holder["worker"] == event["worker"]:
                    holder = None
        double_completions += max(0, sum(1 for e in history if e["e"] == "finish" and e["stored"]) - 1)
    latencies = sorted(e["lat"] * 1000 for e in events if e["e"] == "claim")
    claims = len(latencies)
    # Draining time: the first claim to the last stored outcome (the workers' start-up left out).
    stored = [e["t"] for e in events if e["e"] == "finish" and e["stored"]]
    first_claim = min((e["t"] for e in events if e["e"] == "claim"), default=0.0)
    drain_s = max(stored) - first_claim if stored else elapsed
    return {
        "drain_s": drain_s,
        "jobs_per_minute": counts.get("succeeded", 0) / drain_s * 60 if drain_s > 0 else None,
        "claims": claims,
        "claim_ms_p50": statistics.median(latencies) if latencies else None,
        "claim_ms_p99": latencies[min(claims - 1, int(claims * 0.99))] if latencies else None,
        "double_claims": double_claims,
        "double_completions": double_completions,
        "outcomes_dropped_after_losing_the_job": lost_ownership,
        "lost_jobs": jobs - counts.get("succeeded", 0),
        "reclaimed_jobs": sum(1 for h in by_job.values() if sum(e["e"] == "claim" for e in h) > 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a PostgreSQL server URL (default: start a throwaway cluster)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per worker count")
    parser.add_argument("--chaos-workers", type=int, default=8)
    parser.add_argument("--chaos-jobs", type=int, default=1000)
    parser.add_argument("--kill-every", type=float, default=8.0, help="mean seconds between kills")
    parser.add_argument(
        "--backlog",
        type=int,
        default=500,
        help="most jobs queued at once (topped up as they drain); 0: all at the start",
    )
    parser.add_argument("--heartbeat", type=float, default=1.0, help="BATCHSIZE_HEARTBEAT_INTERVAL_S")
    parser.add_argument(
        "--queue-for",
        type=float,
        default=0.0,
        help="queue no more jobs after this many seconds (0: until --jobs are queued)",
    )
    parser.add_argument("--probe-ms", type=float, default=5.0, help="the fake probe's duration")
    parser.add_argument("--stale-after", type=float, default=10.0, help="BATCHSIZE_STALE_AFTER_S")
    parser.add_argument("--timeout", type=float, default=300.0, help="per run: no kills after it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker[0], args.worker[1], probe_ms=args.probe_ms, stale_after_s=args.stale_after,
                   heartbeat_s=args.heartbeat)  # fmt: skip
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up (workers, the server) on SIGTERM too
    scratch = Path(tempfile.mkdtemp(prefix="batchsize-fleet-"))
    # Its own folder: the server's user must reach it.
    pg_dir = Path(tempfile.mkdtemp(prefix="batchsize-fleet-pg-")) if not args.url else scratch
    server = args.url or start_postgres(pg_dir)
    args.postmaster = None if args.url else int((pg_dir / "data" / "postmaster.pid").read_text().split()[0])
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]
    runs = []
    version = _server_version(server)
    try:
        for count in args.workers:
            url = fresh_database(server, f"fleet_{count}")
            result = run_fleet(url, workers=count, jobs=args.jobs, logs=scratch / f"run-{count}", args=args,
                               kill_every=None)  # fmt: skip
            print(_line(result), flush=True)
            runs.append(result)
        chaos = None
        if args.chaos_jobs:
            url = fresh_database(server, "fleet_chaos")
            chaos = run_fleet(url, workers=args.chaos_workers, jobs=args.chaos_jobs, logs=scratch / "chaos",
                              args=args, kill_every=args.kill_every)  # fmt: skip
            print("chaos: " + _line(chaos), flush=True)
    finally:
        if not args.url:
            subprocess.run([str(ROOT / "scripts" / "postgres"), "stop", str(pg_dir)], check=False)
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/fleet.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": _torch_version(),
            "loadavg_before": uptime_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        },
        "postgres": version,
        "settings": {
            "backlog": args.backlog,
            "probe_ms": args.probe_ms,
            "stale_after_s": args.stale_after,
            "heartbeat_interval_s": args.heartbeat,
            "queue_for_s": args.queue_for,
            "kill_every_s": args.kill_every,
        },
        "runs": [_without_kills(run) for run in runs],
        "chaos": None if chaos is None else _without_kills(chaos),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["machine"]))


def _without_kills(run: dict) -> dict:
    return {**{k: v for k, v in run.items() if k != "kills"}, "kills": len(run["kills"])}


def _torch_version() -> str | None:
    """The installed torch (the fake probe does not use it; recorded as every result file records it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _server_version(url: str) -> str | None:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar()
        engine.dispose()
        return str(version)
    except Exception:  # the server was stopped already: the version is only informative
        return None


def _line(run: dict) -> str:
    return (
        f"{run['workers']} workers: {run['jobs']} jobs drained in {run['drain_s']:.1f} s "
        f"({run['elapsed_s']:.1f} s with start-up) = "
        f"{run['jobs_per_minute']:.0f} jobs/min; claim p50 {run['claim_ms_p50']:.1f} ms p99 "
        f"{run['claim_ms_p99']:.1f} ms; kills {len(run['kills'])}; double claims {run['double_claims']}; "
        f"double completions {run['double_completions']}; lost {run['lost_jobs']}; "
        f"re-claimed {run['reclaimed_jobs']}; "
        f"outcomes dropped {run['outcomes_dropped_after_losing_the_job']}; "
        f"CPU ms per job {json.dumps({k: round(v, 1) for k, v in run['cpu_ms_per_job'].items()})}; "
        f"host load (1 min) {json.dumps(run['loadavg_1min'])}"
    )


if __name__ == "__main__":
    main()

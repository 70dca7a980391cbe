"""Read load on API replicas sharing one PostgreSQL: 1 replica against 2, under `wrk`.

Each replica is a separate process serving the app the way `batchsize serve --no-worker` does (bench/load.py's
`--serve service`: one uvicorn process, asyncio loop, httptools, a JSON log line per request), all on one
PostgreSQL database. The database gets --jobs finished recommendations (POSTed through the first replica,
then claimed and finished with a stored result the way a worker does); every replica must answer the same
job as `succeeded` before any load starts. Targets, each at each --concurrency (total connections):
    get    GET /v1/recommendations/{id} of a finished job (served from the replica's finished-job cache
           after its first read)
    list   GET /v1/recommendations?limit=20 (newest first; a database query and 20 validated jobs each time)
With 2 replicas each one gets its own `wrk` with half the connections, run at the same time (no balancer
in front: a proxy would be one more process on the same cores). Requests/s is the sum; p50/p99 are each
replica's own (wrk's latency distribution), and the table shows the higher of the two. Errors: non-2xx
answers and socket errors. After each cell the benchmark waits until every replica answers the target
again (requests wrk left in flight, or a stall, would otherwise spill into the next cell) and records
how long that took. Loopback only; every cell is bounded (--duration seconds after a 1 s warm-up).

Needs `wrk` (Debian package) and PostgreSQL (--url of a server it may create a database on, else a
throwaway cluster from scripts/postgres).

    .venv/bin/python bench/fleet_reads.py --json docs/benchmarks/fleet-reads.json
    .venv/bin/python bench/fleet_reads.py --replicas 1 2 --concurrency 10 --duration 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import fleet  # noqa: E402  (bench/fleet.py: the throwaway server and a fresh database)
import load  # noqa: E402  (bench/load.py: the stored result, the replica's serving code, wrk's parsing)


def start_replica(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """One API replica (no worker) on a free loopback port: (process, base URL). See wait_healthy."""
    port = load._free_port()
    command = [sys.executable, str(BENCH / "load.py"), "--serve", "service", "--port", str(port)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    return process, f"http://127.0.0.1:{port}"


def seed(replica: str, database_url: str, jobs: int) -> list[str]:
    """POST `jobs` distinct requests through one replica and store a result for each as a worker would."""
    import httpx

    from service import repository
    from service.config import Settings
    from service.db.session import make_engine, make_session_factories, session_scope

    ids = []
    with httpx.Client(timeout=60) as client:
        for index in range(jobs):
            request = {**load.REQUEST, "dataset": {"size": 50000 + index}}
            response = client.post(f"{replica}/v1/recommendations", json=request)
            response.raise_for_status()
            ids.append(response.json()["id"])
    engine = make_engine(Settings(database_url=database_url, _env_file=None))
    _, writes = make_session_factories(engine)
    for _ in ids:
        with session_scope(writes) as session:
            job = repository.claim_next_queued(session, worker_id="bench:0:seed")
            assert job is not None
            repository.add_trial(session, job.id, {"phase": "throughput", "batch_size": 64, "outcome": "ok"})
            assert repository.finish(session, job.id, status="succeeded", result=load.RESULT)
    engine.dispose()
    return ids


def check_replicas(replicas: list[str], job_id: str) -> None:
    """Every replica answers the job (POSTed through the first) as succeeded: they share the database."""
    import httpx

    for replica in replicas:
        response = httpx.get(f"{replica}/v1/recommendations/{job_id}", timeout=30)
        if response.status_code != 200 or response.json()["status"] != "succeeded":
            raise SystemExit(f"{replica} answered {response.status_code} {response.text[:300]}")


def measure(urls: list[str], concurrency: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """Run one wrk per URL at the same time, the connections split evenly; sum and per-replica numbers."""
    share = max(1, concurrency // len(urls))
    with ThreadPoolExecutor(len(urls)) as pool:
        parts = list(pool.map(lambda url: load.run_wrk(url, share, seconds, None, workdir), urls))
    # wrk reports 0 ms percentiles when no request completed within the cell: say None instead.
    done = all(part["requests"] for part in parts)
    return {
        "requests_per_s": sum(part["requests_per_s"] for part in parts),
        "p50_ms": max(part["p50_ms"] for part in parts) if done else None,
        "p99_ms": max(part["p99_ms"] for part in parts) if done else None,
        "requests": sum(part["requests"] for part in parts),
        "errors": sum(part["errors"] for part in parts),
        "per_replica": parts,
    }


def settle(urls: list[str], timeout: float = 120.0) -> float | None:
    """Seconds until every URL answers 200 again after a cell (requests wrk left in flight, or a stall,
    can hold a replica up); None when one still does not after `timeout`. Keeps cells independent."""
    import httpx

    started = time.monotonic()
    for url in urls:
        while True:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.5)
    return time.monotonic() - started


def _ms(value: float | None) -> str:
    return "none completed" if value is None else f"{value:.1f}"


def _loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a PostgreSQL server URL (default: start a throwaway cluster)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50], help="total connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell, after a 1 s warm-up")
    parser.add_argument("--jobs", type=int, default=100, help="finished recommendations in the database")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the replicas and the server on SIGTERM too
    workdir = Path(tempfile.mkdtemp(prefix="batchsize-fleet-reads-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="batchsize-fleet-reads-pg-")) if not args.url else workdir
    server = args.url or fleet.start_postgres(pg_dir)
    processes: list[subprocess.Popen] = []
    results: list[dict[str, Any]] = []
    load_before = _loadavg()
    try:
        database_url = fleet.fresh_database(server, "fleet_reads")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSIZE_")}
        env.update(BATCHSIZE_DATABASE_URL=database_url, BATCHSIZE_DATA_DIR=str(workdir / "data"),
                   BATCHSIZE_RUN_WORKER="false", BATCHSIZE_PROBE_DEVICE="cpu")  # fmt: skip
        replicas = []
        for index in range(max(args.replicas)):
            process, url = start_replica(env, workdir / f"replica-{index + 1}.log")
            processes.append(process)
            replicas.append(url)
        for index, (process, url) in enumerate(zip(processes, replicas, strict=True)):
            # Start-up (imports, the host's device, migrations under their lock) is slow on a busy host.
            load._wait_healthy(url + "/healthz", process, workdir / f"replica-{index + 1}.log", timeout=600)
        ids = seed(replicas[0], database_url, args.jobs)
        check_replicas(replicas, ids[0])
        targets = {"get": f"/v1/recommendations/{ids[0]}", "list": "/v1/recommendations?limit=20"}
        for count in args.replicas:
            for concurrency in args.concurrency:
                for name, path in targets.items():
                    urls = [replica + path for replica in replicas[:count]]
                    measure(urls, concurrency, 1.0, workdir)  # warm-up: connections, pools, caches
                    loads = [float(_loadavg()[0])]
                    row = {"replicas": count, "target": name, "concurrency": concurrency,
                           **measure(urls, concurrency, args.duration, workdir)}  # fmt: skip
                    row["loadavg_1min"] = [*loads, float(_loadavg()[0])]
                    row["answering_again_after_s"] = settle(urls)
                    results.append(row)
                    print(f"{count} replica(s) {name:4s} c={concurrency:<3d} "
                          f"{row['requests_per_s']:7.0f} req/s  p50 {row['p50_ms']} ms  "
                          f"p99 {row['p99_ms']} ms  errors {row['errors']}  load {row['loadavg_1min']}  "
                          f"answering again after {row['answering_again_after_s']} s",
                          flush=True)  # fmt: skip
        version = fleet._server_version(server)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if not args.url:
            subprocess.run([str(ROOT / "scripts" / "postgres"), "stop", str(pg_dir)], check=False)
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    import torch

    from service.probing.memory import cpu_model_name

    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/fleet_reads.py", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_model_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        },
        "postgres": version,
        "client": "wrk",
        "duration_s": args.duration,
        "jobs": args.jobs,
        "results": results,
    }
    print()
    print("| replicas | target | connections | requests/s | p50 ms | p99 ms | errors | settled s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        again = row["answering_again_after_s"]
        cells = [row["replicas"], row["target"], row["concurrency"], f"{row['requests_per_s']:.0f}",
                 _ms(row["p50_ms"]), _ms(row["p99_ms"]), row["errors"],
                 "no" if again is None else f"{again:.1f}"]  # fmt: skip
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

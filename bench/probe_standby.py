"""Probe start-up: max_feasible through the API with the worker's standby probe process on and off.

For each setting (BATCHSIZE_PROBE_STANDBY off, then on) it starts the app with its worker in this
process, then runs the same max_feasible request --runs times, one after the other, each time on an
idle worker: with the standby on, the next POST waits until the standby has said it is ready (its
imports done), which is the state a worker is in between jobs that are not back to back. Per run: wall
time from POST to the finished job seen by polling (every 50 ms), pickup (created -> started) and the
probe (started -> finished) from the job's timestamps, and the probe's own setup phase (from its
process start when fresh, from its request when on standby). Medians are printed and written to a
markdown file with a JSON file beside it.

    .venv/bin/python bench/probe_standby.py                       # mlp-adam-fp32 (16 MiB), 3 runs each
    .venv/bin/python bench/probe_standby.py --runs 5 --out docs/benchmarks/max_batch_standby.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLL_S = 0.05
# The mlp-adam-fp32 case of bench/max_batch.py (its 16 MiB budget), as a user would ask it.
BODY: dict[str, Any] = {
    "model": {"name": "mlp", "config": {}},
    "dataset": {"size": 8192},
    "training": {"optimizer": "adam", "learning_rate": 1e-3, "precision": "fp32"},
    "device": {"type": "cpu"},
    "memory_budget_bytes": 16 * 2**20,
    "objective": "max_feasible",
    "time_budget_s": 600,
    "force": True,
}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_until(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(POLL_S)
    return False


def one_run(client: Any) -> dict[str, Any]:
    """POST the request and poll it to the end; the timings of that one job."""
    started = time.perf_counter()
    job = client.post("/v1/recommendations", json=BODY).json()
    while job["status"] in ("queued", "running"):
        time.sleep(POLL_S)
        job = client.get(f"/v1/recommendations/{job['id']}").json()
    wall = time.perf_counter() - started
    stamps = {k: dt.datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")}
    phases = (job.get("result") or {}).get("phases") or []
    return {
        "status": job["status"],
        "error": job.get("error"),
        "wall_s": wall,
        "pickup_s": (stamps["started_at"] - stamps["created_at"]).total_seconds(),
        "probe_s": (stamps["finished_at"] - stamps["started_at"]).total_seconds(),
        "setup_s": next((p["seconds"] for p in phases if p["phase"] == "setup"), None),
        "found": (job.get("result") or {}).get("max_feasible_batch_size"),
    }


def run_setting(standby: bool, runs: int, log: Any) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    with tempfile.TemporaryDirectory(prefix="probe_standby_") as root:
        settings = Settings(
            data_dir=Path(root),
            probe_device="cpu",
            poll_interval_s=POLL_S,
            probe_standby=standby,
            _env_file=None,
        )
        app = create_app(settings, run_worker=True)
        with TestClient(app) as client:
            worker = app.state.batchsize.worker
            results = []
            for index in range(runs):
                if standby and not wait_until(worker.standby_ready, 120):
                    raise SystemExit("the standby probe process did not become ready within 120 s")
                result = one_run(client)
                log(f"standby={'on' if standby else 'off'} run {index + 1}: {json.dumps(result)}")
                results.append(result)
    return results


def median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r[key] is not None]
    return statistics.median(values) if values else None


def render(meta: dict[str, Any], by_setting: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "# Probe start-up: standby probe process on and off",
        "",
        f"- machine: {meta['machine']}; torch {meta['torch']}, Python {meta['python']}",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        f"- host load average (1, 5, 15 min): {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end",
        f"- request: max_feasible, mlp (zoo defaults), adam fp32, {BODY['memory_budget_bytes'] // 2**20} MiB "
        f"budget, dataset size 8192; {meta['runs']} runs per setting, each on an idle worker",
        "",
        "| BATCHSIZE_PROBE_STANDBY | POST -> finished s (median) | pickup s | probe s | probe setup phase s "
        "| runs (POST -> finished s) | found |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, results in by_setting.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in results)
        found = ", ".join(str(r["found"]) for r in results)
        lines.append(
            f"| {name} | {median(results, 'wall_s'):.2f} | {median(results, 'pickup_s'):.2f} "
            f"| {median(results, 'probe_s'):.2f} | {median(results, 'setup_s') or 0:.2f} "
            f"| {walls} | {found} |"
        )
    off, on = (median(by_setting[k], "wall_s") for k in ("off", "on"))
    if off and on:
        lines += ["", f"Median POST -> finished with the standby: **{on / off:.2f}x** of without it."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the probe (OMP_NUM_THREADS)")
    parser.add_argument("--out", default="docs/benchmarks/max_batch_standby.md", help="markdown; JSON beside")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # as bench/max_batch.py: one thread on a shared host

    import torch

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    meta: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", sys.argv[0], *sys.argv[1:]]),
        "load_start": load_average(),
        "runs": args.runs,
    }
    by_setting = {"off": run_setting(False, args.runs, log), "on": run_setting(True, args.runs, log)}
    meta["load_end"] = load_average()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(meta, by_setting)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": by_setting}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

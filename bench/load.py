"""Load benchmark: the cached read paths against a bare FastAPI endpoint, served the same way.

Targets, each at rising concurrency (default 1, 10, 50 connections), on loopback only:
    bare       GET /bare: a bare FastAPI app (`async def`, no database, no middleware) returning the
               same JSON document as the service's GET
    get        GET /v1/recommendations/{id} of a succeeded recommendation
    post-hit   POST /v1/recommendations with the same request again: the cached 200 answer

Both servers run as separate processes, started by this script with the same code path
(`configure_logging("json")` + `uvicorn.run(app, **service.cli.SERVER)`: one process, asyncio event loop,
httptools parser), as `batchsize serve --no-worker` does. The service logs one
JSON line per request (to a file), as in production. Load comes from `wrk` (Debian package `wrk`) when
it is installed, else from an asyncio httpx client in this process (slower: it then shares the CPU).
Every run is bounded in time (--duration seconds per cell, after a 1 s warm-up) and loopback only.

    .venv/bin/python bench/load.py                          # 1, 10, 50 clients, 5 s each
    .venv/bin/python bench/load.py --concurrency 1 10 --duration 2 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST = {
    "model": {"name": "mlp", "config": {"hidden_dims": [64]}},
    "dataset": {"size": 50000},
    "memory_budget_bytes": 64 * 2**20,
    "time_budget_s": 30,
}
# A realistic stored result (the shape of a real probe's), so responses are the size users get.
RESULT = {
    "max_feasible_batch_size": 50000, "max_feasible_batch_size_aligned": 50000, "recommended_batch_size": 256,
    "micro_batch_size": 256, "gradient_accumulation_steps": 1, "devices": 1, "learning_rate": 0.8,
    "learning_rate_rule": "linear", "warmup_steps": 100, "steps_per_epoch": 196,
    "gradient_noise_scale": {"value": 210.0, "low": 120.0, "high": 380.0, "measured_on": "builtin"},
    "throughput": [{"batch_size": b, "samples_per_second": 1000.0 * b ** 0.5} for b in (1, 8, 64, 512, 4096)],
    "memory": {"fixed_bytes": 120000, "per_sample_bytes": 1200, "optimizer_peak_bytes": 200000,
               "budget_bytes": 67108864},
    "device": {"type": "cpu", "name": "bench", "memory_bytes": 2**34}, "extrapolated": False,
    "confidence": "medium", "warnings": [],
}  # fmt: skip


# --- the servers (run as `python bench/load.py --serve KIND --port N`) ----------------------------


def bare_app(document: dict[str, Any]) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/bare")
    async def bare() -> dict[str, Any]:
        return document

    return app


def serve(kind: str, port: int, document_path: str | None) -> None:
    import uvicorn

    from service.observability import configure_logging

    configure_logging("json", "info")
    if kind == "service":
        from service.app import create_app
        from service.config import Settings

        app = create_app(Settings(), run_worker=False)
    else:
        app = bare_app(json.loads(Path(document_path or "").read_text()))
    from service.cli import SERVER

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", **SERVER)


# --- set-up -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(kind: str, env: dict[str, str], log: Path, document: Path | None = None) -> tuple[Any, str]:
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port)]
    if document is not None:
        command += ["--document", str(document)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url + ("/healthz" if kind == "service" else "/bare"), process, log)
    return process, url


def _wait_healthy(url: str, process: Any, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited; its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not start within {timeout:g} s")


def _seed(url: str, data_dir: Path) -> str:
    """Queue the benchmark request and store a result for it the way a worker would. Returns its id."""
    import httpx

    from service import repository
    from service.config import Settings
    from service.db.session import make_engine, make_session_factories, session_scope

    response = httpx.post(f"{url}/v1/recommendations", json=REQUEST, timeout=60)
    response.raise_for_status()
    job_id = response.json()["id"]
    engine = make_engine(Settings(data_dir=data_dir, _env_file=None))
    _, writes = make_session_factories(engine)
    with session_scope(writes) as session:
        claimed = repository.claim_next_queued(session, worker_id="bench:0:seed")
        assert claimed is not None and claimed.id == job_id
    with session_scope(writes) as session:
        for index, batch_size in enumerate((1, 8, 64, 512, 4096)):
            repository.add_trial(
                session,
                job_id,
                {
                    "phase": "throughput",
                    "batch_size": batch_size,
                    "outcome": "ok",
                    "step_time_s": 0.001 * (index + 1),
                },
            )
        repository.finish(session, job_id, status="succeeded", result=RESULT)
    engine.dispose()
    cached = httpx.post(f"{url}/v1/recommendations", json=REQUEST, timeout=60)
    assert cached.status_code == 200 and cached.json()["id"] == job_id, cached.text
    return job_id


# --- load generators ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def run_wrk(url: str, concurrency: int, duration: float, body: str | None, workdir: Path) -> dict[str, Any]:
    script = workdir / "post.lua"
    seconds = max(1, round(duration))
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if body is not None:
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body)}\n"
        )
        command += ["-s", str(script)]
    output = subprocess.run([*command, url], capture_output=True, text=True, timeout=duration + 60).stdout
    percentiles = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
    }


def run_httpx(url: str, concurrency: int, duration: float, body: str | None) -> dict[str, Any]:
    import httpx

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        deadline = time.monotonic() + duration
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:

            async def one_client() -> None:
                nonlocal errors
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    if body is None:
                        response = await client.get(url)
                    else:
                        headers = {"content-type": "application/json"}
                        response = await client.post(url, content=body, headers=headers)
                    latencies.append((time.perf_counter() - started) * 1000)
                    errors += response.status_code >= 300

            started = time.monotonic()
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            elapsed = time.monotonic() - started
        latencies.sort()
        return {
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "requests": len(latencies),
            "errors": errors,
        }

    return asyncio.run(main())


def _measure(
    client: str, url: str, concurrency: int, seconds: float, body: str | None, workdir: Path
) -> dict[str, Any]:
    if client == "wrk":
        return run_wrk(url, concurrency, seconds, body, workdir)
    return run_httpx(url, concurrency, seconds, body)


# --- the benchmark ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell, after a warm-up")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--serve", choices=["service", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--document", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.document)
        return 0

    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    workdir = Path(tempfile.mkdtemp(prefix="batchsize-load-"))
    data_dir = workdir / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSIZE_")}
    env.update(BATCHSIZE_DATA_DIR=str(data_dir), BATCHSIZE_RUN_WORKER="false", BATCHSIZE_PROBE_DEVICE="cpu")
    processes = []
    try:
        service, service_url = _start("service", env, workdir / "service.log")
        processes.append(service)
        job_id = _seed(service_url, data_dir)
        import httpx

        document = workdir / "document.json"
        document.write_text(httpx.get(f"{service_url}/v1/recommendations/{job_id}").text)
        bare, bare_url = _start("bare", env, workdir / "bare.log", document)
        processes.append(bare)

        body = json.dumps(REQUEST)
        targets = {
            "bare": (f"{bare_url}/bare", None),
            "get": (f"{service_url}/v1/recommendations/{job_id}", None),
            "post-hit": (f"{service_url}/v1/recommendations", body),
        }
        results: list[dict[str, Any]] = []
        for concurrency in args.concurrency:
            for name, (url, payload) in targets.items():
                _measure(client, url, concurrency, 1.0, payload, workdir)  # warm-up: connections, pools
                measured = _measure(client, url, concurrency, args.duration, payload, workdir)
                row = {"target": name, "concurrency": concurrency, **measured}
                results.append(row)
                print(f"{name:9s} c={concurrency:<3d} {row['requests_per_s']:8.0f} req/s  "
                      f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}",
                      flush=True)  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    bare_rps = {r["concurrency"]: r["requests_per_s"] for r in results if r["target"] == "bare"}
    for row in results:
        row["vs_bare"] = row["requests_per_s"] / bare_rps[row["concurrency"]]
    from service.probing.memory import cpu_model_name  # on the path since _seed

    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "client": client,
        "duration_s": args.duration,
        "command": " ".join(["python", "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
    }
    print()
    print("| target | clients | requests/s | p50 ms | p99 ms | vs bare | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        cells = [row["target"], row["concurrency"], f"{row['requests_per_s']:.0f}", f"{row['p50_ms']:.2f}",
                 f"{row['p99_ms']:.2f}", f"{row['vs_bare']:.0%}", row["errors"]]  # fmt: skip
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

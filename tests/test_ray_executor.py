"""The Ray executor on a real local Ray cluster: placement by device kind, cancel, a node lost mid-probe.

The cluster: a head node standing in for an H100 host (one GPU declared, `accelerator_type:H100`, and
`batchsize_cpu` for CPU probes) and two nodes standing in for A100 hosts. No GPU is used: the probes are
the fake ones in tests/ray_probes.py, which report the Ray node they ran on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import repository
from service.db.session import session_scope
from service.probing.spec import ProbeError
from service.ray_executor import CPU_RESOURCE, NODE_LOST, RayExecutor, accelerator_type, task_options
from service.recommendations.service import HostDevice
from tests import ray_probes
from tests.helpers import make_worker

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"  # the `ray` command installed beside this Python
H100 = HostDevice(type="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, free_bytes=0, count=1)
A100 = HostDevice(type="cuda", name="NVIDIA A100-SXM4-40GB", memory_bytes=40 * 2**30, free_bytes=0, count=1)
CPU = HostDevice(type="cpu", name="Test CPU", memory_bytes=8 * 2**30, free_bytes=0, count=1)
MLP = {"model": {"name": "mlp"}, "time_budget_s": 30}
WAIT_S = 120.0  # generous: a loaded 2-core host starts Ray worker processes slowly


@dataclass
class Cluster:
    address: str
    release_dir: Path
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # name -> `ray start --block`

    def node_resources(self, node_id: str) -> dict[str, float]:
        return next(node["Resources"] for node in ray.nodes() if node["NodeID"] == node_id)


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`ray start ... --block` in its own process group (killing the group kills that node)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", "--include-log-monitor=false",
             "--num-cpus=1", "--num-gpus=1", "--object-store-memory=100000000", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions `text` (this cluster's temp dir: its Ray processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not RAY.exists():
        pytest.skip(f"no `ray` command at {RAY}")
    temp = Path(tempfile.mkdtemp(prefix="bsray", dir="/tmp"))  # short: Ray's socket paths must fit
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        ray_probes.RELEASE_DIR_ENV: str(temp),
        "RAY_USAGE_STATS_ENABLED": "0",
        # A killed node is declared dead within about two seconds instead of the default ~30 s.
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    head_resources = json.dumps({"accelerator_type:H100": 1, CPU_RESOURCE: 1})
    a100_resources = json.dumps({"accelerator_type:A100": 1})
    running = Cluster(address=f"127.0.0.1:{port}", release_dir=temp)
    try:
        running.nodes["head"] = _ray_start(
            ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             f"--temp-dir={temp}", f"--resources={head_resources}"], env, temp / "head.log",
        )  # fmt: skip
        _wait_for(lambda: _try_connect(running.address), "the Ray head")
        for index, name in enumerate(("a100-1", "a100-2"), start=1):
            running.nodes[name] = _ray_start(
                [f"--address={running.address}", "--node-ip-address=127.0.0.1",
                 f"--resources={a100_resources}"], env, temp / f"{name}.log",
            )  # fmt: skip
            _wait_for(lambda i=index: _node_started(temp, i), f"Ray node {name} to start")
        _wait_for(lambda: _live_nodes() == 3, "three live Ray nodes")
        yield running
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for process in running.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in _processes_mentioning(str(temp)):  # Ray worker processes lead their own groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _live_nodes() -> int:
    return len([node for node in ray.nodes() if node["Alive"]])


def _node_started(temp: Path, index: int) -> bool:
    """Whether the `index`-th extra node on this host has bound its sockets (or joined already). Nodes
    started at once on one host would race for the same socket names: each waits for the previous one."""
    sockets = [path for session in temp.glob("session_2*") for path in (session / "sockets").glob("*")]
    names = {path.name for path in sockets}
    return {f"raylet.{index}", f"plasma_store.{index}"} <= names or _live_nodes() > index


def _try_connect(address: str) -> bool:
    """Join the cluster the way a worker does (from a thread, as a worker's loop runs)."""
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            RayExecutor(address).connect()
        except Exception as exc:  # not up yet (ConnectionError, or Ray's own errors while it starts)
            failed.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    thread.join()
    return not failed


def _ray_worker(client: TestClient, probe: Any, host: HostDevice, cluster: Cluster, **changes: Any) -> Any:
    return make_worker(
        client.app, probe, host=host, executor="ray", ray_address=cluster.address, probe_standby=False,
        heartbeat_interval_s=0.2, poll_interval_s=0.1, **changes,
    )  # fmt: skip


def _trials(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/recommendations/{job_id}/trials").json()


def _status(client: TestClient, job_id: str) -> str:
    return client.get(f"/v1/recommendations/{job_id}").json()["status"]


# --- without a cluster ------------------------------------------------------------------------------


def test_task_options_follow_rays_names_for_gpus_and_the_cpu_resource() -> None:
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "Tesla V100-SXM2-16GB", "NVIDIA L4",
                 "NVIDIA GeForce RTX 4090"):  # fmt: skip
        assert accelerator_type(name) == NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(name)
    assert task_options("cuda", "NVIDIA H100 80GB HBM3") == {"num_gpus": 1, "accelerator_type": "H100"}
    assert task_options("cpu", "AMD EPYC 9654") == {"num_cpus": 1, "resources": {CPU_RESOURCE: 1}}


def test_a_lost_node_requeues_the_job_until_its_attempts_run_out(client: TestClient) -> None:
    def node_dies(spec: Any, **_: Any) -> dict[str, Any]:
        raise ProbeError(NODE_LOST, "the Ray node running the probe was lost")

    job_id = client.post("/v1/recommendations", json=MLP).json()["id"]
    worker = make_worker(client.app, node_dies, ray_max_attempts=2)
    assert worker.run_next()
    assert _status(client, job_id) == "queued"  # first attempt lost: back in the queue
    assert worker.run_next()
    failed = client.get(f"/v1/recommendations/{job_id}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == NODE_LOST


# --- on the local cluster ---------------------------------------------------------------------------


def test_probes_land_on_a_node_with_the_worker_device_kind(client: TestClient, cluster: Cluster) -> None:
    cases = [
        (H100, {"type": "cuda", "name": "*H100*", "memory_bytes": 80 * 2**30}, "accelerator_type:H100"),
        (A100, {"type": "cuda", "name": "*A100*", "memory_bytes": 40 * 2**30}, "accelerator_type:A100"),
        (CPU, {"type": "cpu"}, CPU_RESOURCE),
    ]
    workers = [_ray_worker(client, ray_probes.report_node, host, cluster) for host, _, _ in cases]
    for worker in workers:
        worker.register()
    for index, (host, device, resource) in enumerate(cases):
        job = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 30 + index, "device": device})
        job_id = job.json()["id"]
        assert next(w for w in workers if w.run_next()).host is host  # routing picked the matching worker
        done = client.get(f"/v1/recommendations/{job_id}").json()
        assert done["status"] == "succeeded", done["error"]
        (trial,) = _trials(client, job_id)
        assert resource in cluster.node_resources(trial["detail"]["node_id"]), (host.name, trial)


@pytest.mark.slow  # about 30 s on a busy 2-core host (torch's start-up in the probe process on the node)
def test_the_real_probe_runs_through_ray(client: TestClient, cluster: Cluster) -> None:
    """Without an injected probe the task runs the local worker's sandboxed probe subprocess, on the node."""
    tiny = {"model": {"name": "mlp", "config": {"hidden_dims": [16]}}, "dataset": {"size": 512},
            "memory_budget_bytes": 64 * 2**20, "time_budget_s": 5, "device": {"type": "cpu"}}  # fmt: skip
    job_id = client.post("/v1/recommendations", json=tiny).json()["id"]
    host = client.app.state.batchsize.host
    assert host.type == "cpu"
    assert _ray_worker(client, None, host, cluster).run_next()
    done = client.get(f"/v1/recommendations/{job_id}").json()
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["max_feasible_batch_size"] >= 1
    assert _trials(client, job_id)  # streamed from the node while the probe ran


def test_a_probe_failing_on_a_node_fails_the_job_with_a_reason(client: TestClient, cluster: Cluster) -> None:
    job_id = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 35}).json()["id"]
    assert _ray_worker(client, ray_probes.fail_with_reason, CPU, cluster).run_next()
    failed = client.get(f"/v1/recommendations/{job_id}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "oom_at_min_batch",
        "message": "batch size 1 needs 3 GiB, over the 1 GiB budget",
    }


def test_cancelling_a_job_cancels_its_ray_task(client: TestClient, cluster: Cluster) -> None:
    job_id = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 41}).json()["id"]
    worker = _ray_worker(client, ray_probes.wait_for_release, A100, cluster)
    thread = threading.Thread(target=worker.run_next)
    thread.start()
    try:
        (trial,) = _wait_for(lambda: _trials(client, job_id), "the probe's first trial")
        pid = trial["detail"]["pid"]
        assert Path(f"/proc/{pid}").exists()  # the Ray worker process running the task
        assert client.delete(f"/v1/recommendations/{job_id}").status_code == 200
        thread.join(WAIT_S)
        assert not thread.is_alive()
        assert _status(client, job_id) == "cancelled"
        # The fake probe never looks for a cancel: only ray.cancel(force=True) ends its process.
        _wait_for(lambda: not _alive(pid), f"Ray worker process {pid} to be killed")
    finally:
        (cluster.release_dir / "release-41").touch()
        thread.join(WAIT_S)


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _node_of(pid: int, cluster: Cluster) -> str:
    """Which `ray start` process group the Ray worker `pid` belongs to (its parent is that node's raylet)."""
    status = Path(f"/proc/{pid}/status").read_text()
    raylet = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    group = os.getpgid(raylet)
    return next(name for name, process in cluster.nodes.items() if process.pid == group)


def test_a_job_whose_node_dies_mid_probe_runs_again_elsewhere(client: TestClient, cluster: Cluster) -> None:
    job_id = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 42}).json()["id"]
    worker = _ray_worker(client, ray_probes.wait_for_release, A100, cluster)
    worker.start_in_thread()
    try:
        (first,) = _wait_for(lambda: _trials(client, job_id), "the probe's first trial")
        lost_node, pid = first["detail"]["node_id"], first["detail"]["pid"]
        name = _node_of(pid, cluster)
        assert name.startswith("a100")
        os.killpg(cluster.nodes[name].pid, signal.SIGKILL)  # the node's raylet and its helpers
        os.kill(pid, signal.SIGKILL)  # and the task's worker process (it leads its own group)

        def rerun_elsewhere() -> dict[str, Any] | None:
            trials = _trials(client, job_id)
            return trials[0] if trials and trials[0]["detail"]["node_id"] != lost_node else None

        second = _wait_for(rerun_elsewhere, "the job to run again on another node")
        assert "accelerator_type:A100" in cluster.node_resources(second["detail"]["node_id"])
        (cluster.release_dir / "release-42").touch()
        _wait_for(lambda: _status(client, job_id) == "succeeded", "the job to succeed")
    finally:
        (cluster.release_dir / "release-42").touch()
        worker.stop(timeout=WAIT_S)
    with session_scope(client.app.state.batchsize.reads) as session:
        assert repository.get_recommendation(session, job_id).attempts == 2
    trials = _trials(client, job_id)
    assert [t["detail"]["node_id"] for t in trials] == [second["detail"]["node_id"]]  # no trial twice

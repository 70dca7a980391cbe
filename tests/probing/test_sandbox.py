"""The probe in a child process: results, reported errors, crashes, kills, hangs and cancellation.

Faults are injected with the runner's test hook, BATCHSIZE_PROBE_TEST_FAULT (see runner.py): the child
writes one event, then crashes, kills itself, hangs, or writes a non-JSON line and carries on.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.probing.runner import TEST_FAULT_ENV
from service.probing.sandbox import (
    PROJECT_ROOT,
    ProbeStandby,
    SandboxLimits,
    default_address_space_bytes,
    run_probe_subprocess,
    sandboxed_module,
    scrubbed_environment,
)
from service.probing.spec import ProbeError, ProbeSpec

SPEC = ProbeSpec(
    model_name="mlp",
    model_config={"input_dim": 16, "hidden_dims": [32]},
    memory_budget_bytes=2**20,
    time_budget_s=1.0,
    max_batch_size=512,
)


def _fault(name: str) -> dict[str, str]:
    return {TEST_FAULT_ENV: name}


def test_normal_run_streams_events_then_returns_the_result() -> None:
    events: list[dict] = []
    # The garbage fault also writes a non-JSON line into the protocol: it must be skipped, not fatal.
    result = run_probe_subprocess(SPEC, events.append, timeout_s=300, env=_fault("garbage"))
    assert 1 <= result["max_feasible_batch_size"] <= 512
    assert result["device"]["type"] == "cpu"
    assert any(e["event"] == "trial" and e["phase"] == "memory" for e in events)
    assert next(e["phase"] for e in events if e["event"] == "phase") == "setup"
    assert all(e["event"] in ("phase", "trial") for e in events)


def test_error_reported_by_the_child_keeps_its_code() -> None:
    bad = ProbeSpec(model_name="mlp", model_config={"hidden_dims": "wide"})
    with pytest.raises(ProbeError) as info:
        run_probe_subprocess(bad, timeout_s=300)
    assert info.value.code == "invalid_config"
    assert "hidden_dims" in info.value.message


def test_crash_without_result() -> None:
    events: list[dict] = []
    with pytest.raises(ProbeError) as info:
        run_probe_subprocess(SPEC, events.append, timeout_s=60, env=_fault("crash"))
    assert info.value.code == "crashed"
    assert "exited with status 3" in info.value.message
    assert "test fault: crashing" in info.value.message  # the tail of its stderr
    assert events == [{"event": "phase", "phase": "setup", "trials_planned": 0}]  # streamed before the crash


def test_killed_by_a_signal() -> None:
    with pytest.raises(ProbeError) as info:
        run_probe_subprocess(SPEC, timeout_s=60, env=_fault("sigkill"))
    assert info.value.code == "crashed"
    assert "probe process exited with signal 9" in info.value.message


def test_hang_times_out_and_the_process_group_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(ProbeError) as info:
        run_probe_subprocess(SPEC, timeout_s=2.0, env=_fault("hang"))
    assert info.value.code == "timeout"
    assert time.monotonic() - started < 10


def test_cancel() -> None:
    events: list[dict] = []
    with pytest.raises(ProbeError) as info:
        run_probe_subprocess(
            SPEC, events.append, timeout_s=60, should_cancel=lambda: bool(events), env=_fault("hang")
        )
    assert info.value.code == "cancelled"


def test_prints_in_the_child_do_not_reach_the_protocol() -> None:
    """fd 1 is pointed at stderr before anything runs: even C-level writes to fd 1 stay out."""
    code = (
        "import os, sys; from service.probing.protocol import open_stream; p = open_stream(); "
        "print('python print'); os.write(1, b'raw fd write\\n'); p.write('{\"event\": \"x\"}\\n'); p.flush()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == '{"event": "x"}\n'
    assert "python print" in done.stderr and "raw fd write" in done.stderr


# --------------------------------------------------------------------------------------------------
# The sandbox: limits, a private TMPDIR, no secrets


def _in_sandbox(
    request: dict, limits: SandboxLimits | None = None, *, cuda: bool = False, niceness: int = 0
) -> dict:
    with (
        tempfile.TemporaryFile() as stderr,
        sandboxed_module(
            "tests.probing.sandbox_child", stderr, limits=limits, cuda=cuda, niceness=niceness
        ) as process,
    ):
        output, _ = process.communicate(json.dumps(request).encode(), timeout=60)
        stderr.seek(0)
        assert process.returncode == 0, stderr.read().decode()
    return json.loads(output)


def test_the_child_environment_holds_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "BATCHSIZE_API_KEY": "k",
        "MY_SERVICE_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "PGPASSWORD": "p",
        "BATCHSIZE_DATABASE_URL": "sqlite:///x.db",
        "CACHE_URL": "redis://user:hunter2@cache:6379/0",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BATCHSIZE_KEEP_THIS", "1")
    names = set(_in_sandbox({"action": "report"})["env"])
    assert not names & set(secrets)
    assert {"BATCHSIZE_KEEP_THIS", "PATH", "PYTHONPATH", "TMPDIR"} <= names


def test_the_child_gets_a_private_temporary_directory_removed_afterwards() -> None:
    report = _in_sandbox({"action": "report"})
    tmp = Path(report["tmp"])
    assert tmp != Path(tempfile.gettempdir()) and tmp.name.startswith("batchsize-probe-")
    assert report["tmp_mode"] == 0o700
    assert not tmp.exists()  # removed, with the file the child left in it


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit is Linux-only")
def test_the_child_runs_under_the_requested_limits() -> None:
    limits = SandboxLimits(address_space_bytes=3 * 2**30, file_bytes=2**20, processes=1000)
    report = _in_sandbox({"action": "report"}, limits)["limits"]
    assert report == {"RLIMIT_AS": 3 * 2**30, "RLIMIT_FSIZE": 2**20, "RLIMIT_NPROC": 1000}
    # CUDA children keep the address space: the driver maps far more than it uses.
    cuda = _in_sandbox({"action": "report"}, limits, cuda=True)["limits"]
    assert cuda["RLIMIT_AS"] == resource.getrlimit(resource.RLIMIT_AS)[0]
    # The default: a generous address-space limit, the documented file and process limits.
    default = _in_sandbox({"action": "report"})["limits"]
    assert default["RLIMIT_AS"] == default_address_space_bytes() >= 8 * 2**30
    assert default["RLIMIT_FSIZE"] == 2**30 and default["RLIMIT_NPROC"] == 4096


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit is Linux-only")
def test_the_limits_hold_writes_and_allocations_past_them_fail() -> None:
    limits = SandboxLimits(address_space_bytes=2**30, file_bytes=2**20)
    assert _in_sandbox({"action": "write", "bytes": 2**20 + 1}, limits)["outcome"] == "OSError errno 27"
    assert _in_sandbox({"action": "write", "bytes": 2**19}, limits)["outcome"] == "ok"
    assert _in_sandbox({"action": "allocate", "bytes": 2 * 2**30}, limits)["outcome"] == "MemoryError"
    assert _in_sandbox({"action": "allocate", "bytes": 2**20}, limits)["outcome"] == "ok"


def test_secret_names_and_urls_with_passwords_are_scrubbed() -> None:
    environ = {
        "PATH": "/bin",
        "HF_TOKEN": "x",
        "private_key_file": "x",
        "DATABASE_URL": "postgresql://db/x",
        "UPSTREAM": "https://u:pw@example.invalid/",
        "DOCS": "https://example.invalid/a:b",
    }
    assert scrubbed_environment(environ) == {"PATH": "/bin", "DOCS": "https://example.invalid/a:b"}


def test_a_niceness_lowers_the_child_priority() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert _in_sandbox({"action": "report"})["nice"] == own
    if own < 10:
        assert _in_sandbox({"action": "report"}, niceness=10)["nice"] == 10


# --------------------------------------------------------------------------------------------------
# The standby process: waits with the engine imported, serves one job, cleaned up however it ends


def _tmpdir_of(pid: int) -> Path:
    """The child's TMPDIR from /proc. Popen returns once exec closed the close-on-exec pipe, which the
    kernel does before it writes the new environment, so for a moment the file can still be empty."""
    found: list[bytes] = []

    def read() -> bool:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        found[:] = [v for v in environ if v.startswith(b"TMPDIR=")]
        return bool(found)

    _wait_until(read, timeout_s=10)
    return Path(found[0].split(b"=", 1)[1].decode())


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_job_takes_the_standby_which_serves_it_alone_then_exits() -> None:
    standby = ProbeStandby()
    try:
        assert standby.ensure()
        process = standby.process
        assert process is not None
        tmp = _tmpdir_of(process.pid)
        assert tmp.name.startswith("batchsize-probe-") and tmp.is_dir()
        _wait_until(standby.ready)  # its imports are done and it says so
        assert standby.process is process and process.poll() is None
        events: list[dict] = []
        result = run_probe_subprocess(SPEC, events.append, timeout_s=300, standby=standby)
        assert 1 <= result["max_feasible_batch_size"] <= 512
        assert any(e["event"] == "trial" for e in events)
        assert all(e["event"] in ("phase", "trial") for e in events)  # its ready notice is not an event
        assert not standby.ready()
        assert standby.process is None  # taken: it served this job, it does not come back
        assert process.returncode == 0 and not tmp.exists()
    finally:
        standby.close()


def test_a_standby_that_fails_its_job_is_killed_like_a_fresh_process() -> None:
    standby = ProbeStandby(env=_fault("hang"))
    try:
        assert standby.ensure()
        process = standby.process
        assert process is not None
        with pytest.raises(ProbeError) as info:
            run_probe_subprocess(SPEC, timeout_s=2.0, env=_fault("hang"), standby=standby)
        assert info.value.code == "timeout"
        assert process.returncode == -9 and standby.process is None
    finally:
        standby.close()


def test_a_job_whose_process_would_start_differently_gets_a_fresh_one() -> None:
    standby = ProbeStandby(limits=SandboxLimits(file_bytes=2**30))
    try:
        assert standby.ensure()
        waiting = standby.process
        assert waiting is not None
        # Other environment overrides, then other limits: neither may run in the waiting process.
        with pytest.raises(ProbeError, match="test fault: crashing"):
            run_probe_subprocess(SPEC, timeout_s=60, env=_fault("crash"), standby=standby)
        run_probe_subprocess(SPEC, timeout_s=300, limits=SandboxLimits(file_bytes=2**29), standby=standby)
        assert standby.process is waiting and waiting.poll() is None
    finally:
        standby.close()
    assert waiting.returncode == -9


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_closing_the_standby_kills_it_and_removes_its_temporary_directory() -> None:
    standby = ProbeStandby()
    assert standby.ensure()
    process = standby.process
    assert process is not None
    tmp = _tmpdir_of(process.pid)
    standby.close()
    assert process.returncode is not None and standby.process is None
    assert not tmp.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # its process group is gone too


def test_a_standby_that_died_while_waiting_is_replaced_after_the_delay() -> None:
    standby = ProbeStandby(restart_delay_s=0.5)
    try:
        assert standby.ensure()
        first = standby.process
        assert first is not None
        first.kill()
        first.wait()
        assert not standby.ensure()  # found dead: cleaned up, not restarted at once (no restart loop)
        assert standby.process is None
        _wait_until(standby.ensure, timeout_s=30)
        second = standby.process
        assert second is not None and second.pid != first.pid and second.poll() is None
        # A job finds the replacement and runs in it.
        assert run_probe_subprocess(SPEC, timeout_s=300, standby=standby)["max_feasible_batch_size"] >= 1
        assert second.returncode == 0
    finally:
        standby.close()


def test_a_dead_standby_is_not_handed_to_a_job() -> None:
    standby = ProbeStandby()
    try:
        assert standby.ensure()
        process = standby.process
        assert process is not None
        process.kill()
        process.wait()
        assert run_probe_subprocess(SPEC, timeout_s=300, standby=standby)["max_feasible_batch_size"] >= 1
        assert standby.process is None  # the dead one was cleaned up; the job ran in a fresh process
    finally:
        standby.close()

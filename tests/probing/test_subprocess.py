"""The probe in a child process: results, reported errors, crashes, kills, hangs and cancellation.

Faults are injected with the runner's test hook, BATCHSIZE_PROBE_TEST_FAULT (see runner.py): the child
writes one event, then crashes, kills itself, hangs, or writes a non-JSON line and carries on.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from service.probing.runner import TEST_FAULT_ENV
from service.probing.spec import ProbeError, ProbeSpec
from service.probing.subprocess import PROJECT_ROOT, run_probe_subprocess

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
    assert [e["phase"] for e in events if e["event"] == "phase"][-1] == "throughput"
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
        "import os, sys; from service.probing.runner import _protocol_stream; p = _protocol_stream(); "
        "print('python print'); os.write(1, b'raw fd write\\n'); p.write('{\"event\": \"x\"}\\n'); p.flush()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == '{"event": "x"}\n'
    assert "python print" in done.stderr and "raw fd write" in done.stderr

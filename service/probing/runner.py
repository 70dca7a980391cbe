"""Probe subprocess entry point: `python -m service.probing.runner`.

Reads one ProbeSpec as JSON on stdin and writes JSON lines to the protocol stream
(`service.probing.protocol`): every event, then `{"event": "result", "result": {...}}` or
`{"event": "error", "code": ..., "message": ...}`. Exit status is 0 whenever a result or error line
was written.

With `--standby` (a worker's waiting process, service.probing.sandbox.ProbeStandby) it imports
torch and the engine, runs one tiny CPU training step per optimizer (torch's lazy first-step set-up),
writes `{"event": "ready"}`, then reads its request; the probe's time budget starts when the request
has been read instead of when the process started.

Test hook: when the environment variable BATCHSIZE_PROBE_TEST_FAULT is set, the runner misbehaves
on purpose after writing its first event, so the parent's handling can be tested:
    crash   -> exits with status 3 without a result
    sigkill -> kills itself with SIGKILL (as the kernel's OOM killer would)
    hang    -> sleeps forever
    garbage -> writes a non-JSON line, then carries on normally
It is read only here, only when set, and changes nothing else.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import fields
from typing import Any

from service.probing.protocol import READY, emitter, error_message, open_stream, result_message
from service.probing.spec import ProbeError, ProbeSpec

TEST_FAULT_ENV = "BATCHSIZE_PROBE_TEST_FAULT"


def _parse_spec(text: str) -> ProbeSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError("invalid_spec", f"probe spec is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProbeError("invalid_spec", "probe spec must be a JSON object")
    known = {f.name for f in fields(ProbeSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProbeError("invalid_spec", f"unknown probe spec fields: {', '.join(unknown)}")
    try:
        return ProbeSpec(**data)
    except TypeError as exc:
        raise ProbeError("invalid_spec", f"invalid probe spec: {exc}") from exc


def _apply_test_fault(fault: str) -> None:
    if fault == "crash":
        print("test fault: crashing", file=sys.stderr, flush=True)
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        while True:
            time.sleep(3600)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Die when the worker that started us dies (we run in our own session, so no signal reaches us)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _process_started() -> float:
    """When this process started, on the time.monotonic() clock: the probe's time budget counts the
    interpreter's and torch's start-up too. Linux: /proc/self/stat's start time (clock ticks since
    boot) against CLOCK_BOOTTIME; elsewhere, now."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as stat:
            fields_after_name = stat.read().rsplit(")", 1)[1].split()
        started_s = int(fields_after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_s
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 600 else now


def _load_engine(*, prewarm: bool = False) -> Any:
    from service.probing.engine import run_probe

    if prewarm:
        _first_steps()
        gc.collect()  # the prewarm's garbage, before the rest is frozen
    gc.freeze()  # torch's import-time objects: keeps gc.collect() after each failed trial cheap
    return run_probe


def _first_steps() -> None:
    """One training step of a tiny CPU model per optimizer the engine builds. Torch initialises much
    lazily on a process's first step (seconds on a small CPU host, the bulk of a small probe's setup); a
    standby pays that while it waits. Its tensors are freed before the request is read."""
    import torch

    from service.probing.step import build_optimizer

    for name in ("sgd", "adam", "adamw"):
        model = torch.nn.Linear(4, 2)
        optimizer = build_optimizer(name, model.parameters(), 1e-3)
        model(torch.randn(2, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    standby = "--standby" in (sys.argv[1:] if argv is None else argv)
    started = _process_started()
    _exit_with_parent()
    protocol = open_stream()
    emit = emitter(protocol)

    fault = os.environ.get(TEST_FAULT_ENV)
    try:
        run_probe = None
        if standby:
            run_probe = _load_engine(prewarm=True)
            emit({"event": READY})  # start-up done: lets the worker tell a ready standby apart
        spec = _parse_spec(sys.stdin.read())
        if standby:
            started = time.monotonic()  # the wait for a job is not the job's time
        if fault:
            emit({"event": "phase", "phase": "setup", "trials_planned": 0})
            if fault == "garbage":
                protocol.write("this is not json\n")
                protocol.flush()
            _apply_test_fault(fault)
        if run_probe is None:
            run_probe = _load_engine()  # imported after the spec is read: a bad spec fails fast
        result = run_probe(spec, emit, started=started)
        emit(result_message(result))
    except ProbeError as exc:
        emit(error_message(exc.code, exc.message))
    except Exception as exc:  # a bug in the probe engine itself: report it, keep the traceback in stderr
        traceback.print_exc()
        emit(error_message("internal_error", f"{type(exc).__name__}: {exc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

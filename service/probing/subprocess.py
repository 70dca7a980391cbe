"""Parent side of a probe: run `service.probing.runner` in its own process and stream its events.

An OOM, a crash or a hang in the probe never touches the caller: the child runs in a new session
(its own process group, so killing it also kills anything it started), its protocol stream is parsed
as JSON only (never pickle), and every way it can end maps to a result or a ProbeError:

    result line, exit 0          -> the result dict
    error line                   -> ProbeError(code, message) as the child reported it
    deadline passed              -> ProbeError("timeout", ...)   (process group killed)
    should_cancel() turned true  -> ProbeError("cancelled", ...) (process group killed)
    anything else                -> ProbeError("crashed", "probe process exited with signal 9 ...")
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from service.probing.spec import ProbeError, ProbeSpec

# The directory holding the `service` and `models` packages, put on the child's PYTHONPATH.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
STDERR_TAIL_LINES = 20
POLL_INTERVAL_S = 0.1
# After the protocol stream closes, how long the child may take to exit before it is killed.
EXIT_GRACE_S = 10.0


def run_probe_subprocess(
    spec: ProbeSpec,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    *,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the probe for `spec` in a child process and return its result dict.

    `on_event(event)` is called, in this thread, for every event line as it arrives (not for the final
    result or error). `timeout_s` bounds the whole run (None: no limit). `should_cancel` is polled
    about every POLL_INTERVAL_S. `env` adds or overrides environment variables for the child.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with tempfile.TemporaryFile(mode="w+b") as stderr_file:
        process = _start(spec, stderr_file, env)
        try:
            final = _read_protocol(process, on_event, deadline, should_cancel, timeout_s)
            return_code = _wait_for_exit(process)
        finally:
            if process.poll() is None:
                kill_group(process)
            process.stdout.close()
        if final is not None and final.get("event") == "error":
            raise ProbeError(str(final.get("code", "probe_error")), str(final.get("message", "")))
        if final is not None and final.get("event") == "result" and return_code == 0:
            return final["result"]
        raise ProbeError("crashed", _crash_message(return_code, final, _tail(stderr_file)))


def _start(spec: ProbeSpec, stderr_file: IO[bytes], env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    process = start_module("service.probing.runner", stderr_file, env)
    try:
        process.stdin.write(json.dumps(spec.to_json_dict()).encode())
        process.stdin.close()
    except BrokenPipeError:
        pass  # the child died at once; its exit status tells why
    return process


def _read_protocol(
    process: subprocess.Popen[bytes],
    on_event: Callable[[dict[str, Any]], None] | None,
    deadline: float | None,
    should_cancel: Callable[[], bool],
    timeout_s: float | None,
) -> dict[str, Any] | None:
    """Read JSON lines until the stream closes; return the final result/error message, if any."""
    final: dict[str, Any] | None = None
    buffer = b""
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                kill_group(process)
                raise ProbeError("timeout", f"probe did not finish within {timeout_s:g} s and was killed")
            if should_cancel():
                kill_group(process)
                raise ProbeError("cancelled", "probe was cancelled")
            if not selector.select(timeout=POLL_INTERVAL_S):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # end of stream: the child exited or closed it
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = _parse_line(line)
                if message is None:
                    continue
                if message.get("event") in ("result", "error"):
                    final = message
                elif on_event is not None:
                    on_event(message)
    return final


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """One protocol line as a dict; anything else (blank, not JSON, not an object) is ignored."""
    line = line.strip()
    if not line:
        return None
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None


def _wait_for_exit(process: subprocess.Popen[bytes]) -> int:
    try:
        return process.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return process.wait()


def start_module(
    module: str, stderr_file: IO[bytes], env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module` from the project root, pipes for stdin/stdout, in its own process group.

    The child sees this environment plus the project on PYTHONPATH, unbuffered output, and `env`.
    """
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        env=child_env,
        cwd=str(PROJECT_ROOT),
        start_new_session=True,  # its own process group: one killpg reaches everything it started
    )


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (it leads its own session), then reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(stderr_file: IO[bytes]) -> str:
    stderr_file.seek(0)
    lines = stderr_file.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def _crash_message(return_code: int, final: dict[str, Any] | None, stderr_tail: str) -> str:
    if return_code < 0:
        number = -return_code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        how = f"probe process exited with signal {number} ({name})"
        if number == signal.SIGKILL:
            how += ", possibly killed by the system for using too much memory"
    elif return_code != 0:
        how = f"probe process exited with status {return_code}"
    else:
        how = "probe process exited without a result"
    if final is None:
        how += " before reporting a result"
    return f"{how}; last lines of its stderr:\n{stderr_tail}" if stderr_tail else how

"""Parent side of a probe: run `service.probing.runner` in its own process and stream its events.

An OOM, a crash or a hang in the probe never touches the caller: the child runs in a new session
(its own process group, so killing it also kills anything it started), its protocol stream is parsed
as JSON only (never pickle), and every way it can end maps to a result or a ProbeError:

    result line, exit 0          -> the result dict
    error line                   -> ProbeError(code, message) as the child reported it
    deadline passed              -> ProbeError("timeout", ...)   (process group killed)
    should_cancel() turned true  -> ProbeError("cancelled", ...) (process group killed)
    anything else                -> ProbeError("crashed", "probe process exited with signal 9 ...")

A worker may keep one probe process on standby (ProbeStandby): started the same way, sandbox
included, it imports torch and the engine, then waits for its request; a job takes it instead of
starting a process, and it still serves that one job only and is killed on any failure as above.

This module is the one place probe and dry-run processes are started (`sandboxed_module`). The child
reads untrusted files (uploaded archives and samples), so it also gets the operating system's cheap
protections, applied with `prlimit` after it starts and before it is sent its request:

- `RLIMIT_AS` (address space; off for CUDA probes, whose driver maps far more than it uses),
  `RLIMIT_FSIZE` (largest file it may write, its stderr included) and `RLIMIT_NPROC` (processes and
  threads of its user; the kernel ignores it for root);
- a private temporary directory (TMPDIR/TMP/TEMP, mode 0700), removed when the child is done;
- an environment scrubbed of secrets: variables whose names contain KEY, TOKEN, SECRET, PASSWORD,
  PASSWD, CREDENTIAL or AUTH, the database URL, and any value holding a URL with a password.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service.probing.protocol import ERROR, READY, RESULT, is_final, parse_line
from service.probing.spec import ProbeError, ProbeSpec

log = logging.getLogger(__name__)

# The directory holding the `service` and `models` packages, put on the child's PYTHONPATH.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUNNER = "service.probing.runner"
# Tells the runner to import torch and the engine first, then wait for its request (ProbeStandby).
STANDBY_ARG = "--standby"
STDERR_TAIL_LINES = 20
POLL_INTERVAL_S = 0.1
# After the protocol stream closes, how long the child may take to exit before it is killed.
EXIT_GRACE_S = 10.0
# After a standby died while waiting, or could not start, how long until the next try (no restart loop).
STANDBY_RESTART_DELAY_S = 5.0


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:[^/@\s]*@")
_DATABASE_URLS = frozenset({"BATCHSIZE_DATABASE_URL", "DATABASE_URL"})


def _gib(n: float) -> int:
    return int(n * 1024**3)


def default_address_space_bytes() -> int:
    """Three quarters of physical memory, at least 8 GiB (torch reserves GBs of address space idle)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 0
    return max(_gib(8), physical * 3 // 4)


@dataclass(frozen=True)
class SandboxLimits:
    """Operating-system limits for a probe or dry-run child. None or 0: that limit is not set."""

    address_space_bytes: int | None = None  # None: default_address_space_bytes(); 0: off
    file_bytes: int | None = _gib(1)
    processes: int | None = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> SandboxLimits:
        """From the service's settings (`probe_max_address_space_bytes`, `probe_max_file_bytes`,
        `probe_max_processes`); read by name so that this engine module stays free of the app."""
        return cls(
            address_space_bytes=settings.probe_max_address_space_bytes,
            file_bytes=settings.probe_max_file_bytes,
            processes=settings.probe_max_processes,
        )

    def resolved_address_space(self, *, cuda: bool) -> int | None:
        if cuda:
            return None  # the CUDA driver maps far more address space than memory: it would fail
        if self.address_space_bytes is None:
            return default_address_space_bytes()
        return self.address_space_bytes or None


def scrubbed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without secrets: names with KEY/TOKEN/SECRET/PASSWORD/..., the database URL, and any
    variable whose value holds a URL with a password."""
    return {
        name: value
        for name, value in environ.items()
        if not _SECRET_NAME.search(name)
        and name.upper() not in _DATABASE_URLS
        and not _URL_WITH_PASSWORD.search(value)
    }


def run_probe_subprocess(
    spec: ProbeSpec,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    *,
    env: Mapping[str, str] | None = None,
    limits: SandboxLimits | None = None,
    standby: ProbeStandby | None = None,
) -> dict[str, Any]:
    """Run the probe for `spec` in a child process and return its result dict.

    `on_event(event)` is called, in this thread, for every event line as it arrives (not for the final
    result or error). `timeout_s` bounds the whole run (None: no limit). `should_cancel` is polled
    about every POLL_INTERVAL_S. `env` adds or overrides environment variables for the child.
    `limits`: the child's operating-system limits (default: SandboxLimits()). `standby`: the job
    takes its waiting process when that was started exactly as this job's would be (see
    ProbeStandby), else a fresh process is started; either way the process serves this job alone.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    cuda = spec.device == "cuda"
    with contextlib.ExitStack() as stack:
        warm = standby.take(env=env, limits=limits, cuda=cuda) if standby is not None else None
        if warm is not None:
            stack.enter_context(warm)  # on exit: killed if still running, its TMPDIR removed
            process, stderr_file = warm.process, warm.stderr_file
        else:
            stderr_file = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            process = stack.enter_context(
                sandboxed_module(RUNNER, stderr_file, env, limits=limits, cuda=cuda)
            )
        try:
            _send(process, json.dumps(spec.to_json_dict()))
            final = _read_protocol(process, on_event, deadline, should_cancel, timeout_s)
            return_code = _wait_for_exit(process)
        finally:
            if process.poll() is None:
                kill_group(process)
            _stdout(process).close()
        if final is not None and final.get("event") == ERROR:
            raise ProbeError(str(final.get("code", "probe_error")), str(final.get("message", "")))
        if final is not None and final.get("event") == RESULT and return_code == 0:
            return final["result"]
        raise ProbeError("crashed", _crash_message(return_code, final, _tail(stderr_file)))


def _send(process: subprocess.Popen[bytes], request: str) -> None:
    try:
        stdin = _stdin(process)
        stdin.write(request.encode())
        stdin.close()
    except BrokenPipeError:
        pass  # the child died at once; its exit status tells why


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
    fd = _stdout(process).fileno()
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
                message = parse_line(line)
                if message is None:
                    continue
                if is_final(message):
                    final = message
                elif message.get("event") == READY:
                    continue  # a standby's start-up notice, not part of the job's events
                elif on_event is not None:
                    on_event(message)
    return final


def _stdin(process: subprocess.Popen[bytes]) -> IO[bytes]:
    """The child's stdin: `start_module` always opens it as a pipe."""
    if process.stdin is None:
        raise RuntimeError("the child process has no stdin pipe")
    return process.stdin


def _stdout(process: subprocess.Popen[bytes]) -> IO[bytes]:
    """The child's protocol stream: `start_module` always opens it as a pipe."""
    if process.stdout is None:
        raise RuntimeError("the child process has no stdout pipe")
    return process.stdout


def _wait_for_exit(process: subprocess.Popen[bytes]) -> int:
    try:
        return process.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return process.wait()


def _launch_key(
    env: Mapping[str, str] | None, limits: SandboxLimits | None, cuda: bool
) -> tuple[dict[str, str], dict[str, str], SandboxLimits, bool]:
    """What a probe process's start depends on: the environment it inherits, its overrides, its limits
    and its device kind. A standby serves a job only when both keys are equal."""
    return scrubbed_environment(os.environ), dict(env or {}), limits or SandboxLimits(), cuda


class WarmProbe:
    """A probe process started before its job (`runner --standby`): sandboxed as `sandboxed_module` does
    it, torch and the engine imported, waiting for its one request on stdin. It serves one job and
    exits; as a context manager, leaving it kills its process group if still running and removes its
    private TMPDIR."""

    def __init__(
        self,
        key: tuple[Any, ...],
        stack: contextlib.ExitStack,
        process: subprocess.Popen[bytes],
        stderr_file: IO[bytes],
    ) -> None:
        self.key = key
        self._stack = stack
        self.process = process
        self.stderr_file = stderr_file

    @classmethod
    def start(cls, *, env: Mapping[str, str] | None, limits: SandboxLimits | None, cuda: bool) -> WarmProbe:
        key = _launch_key(env, limits, cuda)
        with contextlib.ExitStack() as stack:
            stderr_file = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            process = stack.enter_context(
                sandboxed_module(RUNNER, stderr_file, env, limits=limits, cuda=cuda, args=(STANDBY_ARG,))
            )
            return cls(key, stack.pop_all(), process, stderr_file)  # started: it owns them from here

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self._stack.close()  # kills the group if still running, removes TMPDIR, closes the stderr file
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def __enter__(self) -> WarmProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProbeStandby:
    """One worker's standby probe process: at most one WarmProbe, started with the environment
    overrides, limits and device kind the worker's jobs get, so that a job skips the interpreter's,
    torch's and the engine's start-up. A job whose process would start differently, or that finds the
    standby dead, gets a fresh process (`run_probe_subprocess`). Used from one thread (the worker's).
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
        cuda: bool = False,
        restart_delay_s: float = STANDBY_RESTART_DELAY_S,
    ) -> None:
        self._env = dict(env or {})
        self._limits = limits or SandboxLimits()
        self._cuda = cuda
        self._restart_delay_s = restart_delay_s
        self._not_before = 0.0  # time.monotonic() before which no new standby is started
        self._warm: WarmProbe | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The waiting process, if any (dead or alive)."""
        return self._warm.process if self._warm is not None else None

    def ready(self) -> bool:
        """Whether a standby is waiting with its start-up done (its ready line is there to read). Only
        looks, so another thread may ask (a benchmark waiting for the machine to be quiet)."""
        warm = self._warm
        if warm is None or not warm.alive():
            return False
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(_stdout(warm.process), selectors.EVENT_READ)
                return bool(selector.select(timeout=0))
        except (OSError, ValueError):  # closed meanwhile: taken by a job or cleaned up
            return False

    def ensure(self) -> bool:
        """Start the standby when there is none or it died while waiting. True when one is waiting."""
        if self._warm is not None:
            if self._warm.alive():
                return True
            status = self._warm.process.poll()
            log.warning("the standby probe process exited while waiting (status %s)", status)
            self._discard()
            self._not_before = time.monotonic() + self._restart_delay_s
        if time.monotonic() < self._not_before:
            return False
        try:
            self._warm = WarmProbe.start(env=self._env, limits=self._limits, cuda=self._cuda)
        except (OSError, ProbeError) as exc:  # the next job starts its own process and reports the cause
            log.warning("could not start a standby probe process: %s", exc)
            self._not_before = time.monotonic() + self._restart_delay_s
            return False
        return True

    def take(
        self, *, env: Mapping[str, str] | None, limits: SandboxLimits | None, cuda: bool
    ) -> WarmProbe | None:
        """Hand the standby to a job whose process would be started the same way; None otherwise (a
        standby that does not match stays; one that died is cleaned up)."""
        warm = self._warm
        if warm is None:
            return None
        if not warm.alive():
            self._discard()
            return None
        if warm.key != _launch_key(env, limits, cuda):
            return None
        self._warm = None
        return warm

    def close(self) -> None:
        """Kill the waiting process (and its group) and remove its TMPDIR."""
        self._discard()

    def _discard(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()


@contextlib.contextmanager
def sandboxed_module(
    module: str,
    stderr_file: IO[bytes],
    env: Mapping[str, str] | None = None,
    *,
    limits: SandboxLimits | None = None,
    cuda: bool = False,
    niceness: int = 0,
    args: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m module` under the protections in this module's docstring; yields the process.

    The limits are in place before the caller writes the child's request (the child reads no
    untrusted file before that). `niceness` > 0 lowers its CPU priority (threads it starts inherit
    it), for work that must not starve the service. On exit the process group is killed if still
    running and the private temporary directory removed.
    """
    limits = limits or SandboxLimits()
    private_tmp = tempfile.mkdtemp(prefix="batchsize-probe-")
    try:
        child_env = scrubbed_environment(os.environ)
        child_env.update(TMPDIR=private_tmp, TMP=private_tmp, TEMP=private_tmp)
        child_env.update(env or {})
        process = start_module(module, stderr_file, child_env, inherit=False, args=args)
        try:
            apply_limits(process.pid, limits, cuda=cuda)
            if niceness > 0 and hasattr(os, "setpriority"):
                with contextlib.suppress(OSError):  # exited already, or not permitted: priority only
                    os.setpriority(os.PRIO_PROCESS, process.pid, niceness)
            yield process
        finally:
            if process.poll() is None:
                kill_group(process)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # anything it left behind in its group
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def apply_limits(pid: int, limits: SandboxLimits, *, cuda: bool) -> None:
    """Set the child's resource limits (soft and hard) with prlimit; a no-op where it is unsupported."""
    try:
        import resource
    except ImportError:  # not a POSIX host
        return
    prlimit = getattr(resource, "prlimit", None)
    if prlimit is None:  # not Linux
        return
    for name, value in (
        ("RLIMIT_AS", limits.resolved_address_space(cuda=cuda)),
        ("RLIMIT_FSIZE", limits.file_bytes),
        ("RLIMIT_NPROC", limits.processes),
    ):
        number = getattr(resource, name, None)
        if not value or number is None:
            continue
        try:
            _, hard = prlimit(pid, number)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            prlimit(pid, number, (value, value))
        except ProcessLookupError:
            return  # it exited already: its exit status tells why
        except OSError as exc:  # fail closed: no untrusted input goes to an unprotected child
            raise ProbeError("sandbox_failed", f"cannot set {name} on the probe process: {exc}") from exc


def start_module(
    module: str,
    stderr_file: IO[bytes],
    env: Mapping[str, str] | None = None,
    *,
    inherit: bool = True,
    args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """`python -m module *args` from the project root, pipes for stdin/stdout, in its own process group.

    The child sees `env` on top of this process's environment (`inherit=False`: `env` alone), plus
    the project on PYTHONPATH and unbuffered output. Untrusted work goes through `sandboxed_module`.
    """
    child_env = dict(os.environ) if inherit else {}
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
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

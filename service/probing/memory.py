"""Measuring a training step's memory and enforcing a budget, on CPU and on CUDA.

CPU: the CPU build of torch keeps no allocator statistics, so `CPUMemoryBudget` counts live tensor
bytes itself. It is a `TorchDispatchMode` that sees every aten op, adds the bytes of each *new* output
storage once, subtracts them when the storage dies (a `weakref` finalizer on the `UntypedStorage`),
follows storages that are resized, and starts from registered roots (parameters, gradients, buffers,
optimizer state). On an MLP step it matches the profiler's allocator peak exactly; scratch memory
freed inside a single op is invisible to it. Past its budget it raises the CPU allocator's own OOM
message, which Lightning and Accelerate both recognise, so it also guards their batch-size searches.

CUDA: the caching allocator's statistics (`max_memory_allocated` per phase, `max_memory_reserved`
for the step) and `torch.cuda.set_per_process_memory_fraction` for the budget; OOM is detected by type.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from service.probing.search import Outcome, Trial
from service.probing.spec import ProbeError

FORWARD_BACKWARD = "forward_backward"
OPTIMIZER_STEP = "optimizer_step"

# The exact text of the CPU allocator's failure: Lightning (`is_out_of_cpu_memory`) and Accelerate
# (`should_reduce_batch_size`) match on it, provided the RuntimeError has exactly one argument.
CPU_OOM_MESSAGE = "DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes."
_OOM_MARKERS = (
    "DefaultCPUAllocator: can't allocate memory",
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)
# Without an explicit budget a CPU probe may use this share of MemAvailable: the process's RSS can
# reach ~1.9x the tracked tensor bytes (glibc keeps freed pages), so half keeps the host safe.
CPU_DEFAULT_BUDGET_SHARE = 0.5


class CPUBudgetExceeded(RuntimeError):
    """Raised by `CPUMemoryBudget` past its budget. A RuntimeError with one argument whose text is the
    CPU allocator's OOM message, so code that handles real OOMs handles this one the same way."""


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: `torch.OutOfMemoryError`, or a RuntimeError carrying an OOM text."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _OOM_MARKERS)


# --------------------------------------------------------------------------------------------------
# CPU: live-bytes tracker and budget guard


def _release(tracker_ref: weakref.ReferenceType[CPUMemoryBudget], key: int) -> None:
    """Finalizer of a tracked storage; holds the tracker weakly so dead trackers are not kept alive."""
    tracker = tracker_ref()
    if tracker is not None:
        tracker._forget(key)


class CPUMemoryBudget(TorchDispatchMode):
    """Tracks live CPU tensor bytes while active and raises the CPU OOM error past `budget_bytes`.

    Usage::

        with CPUMemoryBudget(budget_bytes, roots=[model, optimizer]) as tracker:
            with tracker.phase("forward_backward"):
                ...
        tracker.peak_bytes, tracker.phase_peaks["forward_backward"]

    `roots` are what is alive before the mode starts and must count: modules (parameters, their
    gradients, buffers), optimizers (state tensors), GradScalers, tensors, or iterables of those.
    Tensors created while the mode is active are counted automatically. The check runs after each
    op that allocates, so an op may overshoot the budget by its own output before the error is raised
    (roots alone over the budget raise at the first allocation).
    """

    def __init__(self, budget_bytes: int | None = None, roots: Iterable[Any] = ()) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None
        self._live: dict[int, int] = {}  # storage key -> bytes counted for it
        self._self_ref = weakref.ref(self)
        self._original_resize: Callable[..., Any] | None = None
        self.track(roots)

    # -- public API

    def track(self, *objects: Any) -> None:
        """Count the storages of these objects (see the class docstring) if they are not counted yet."""
        for tensor in _tensors_of(objects):
            self._count(tensor.untyped_storage())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak reached inside this block separately under `name`."""
        previous, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current_bytes)
        try:
            yield
        finally:
            self._phase = previous

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.phase_peaks.clear()

    # -- the dispatch mode

    def __enter__(self) -> CPUMemoryBudget:
        # Storages resized from Python (`UntypedStorage.resize_`) bypass the dispatcher: wrap it.
        self._original_resize = original = torch.UntypedStorage.resize_
        tracker_ref = self._self_ref

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            tracker = tracker_ref()
            if tracker is not None:
                tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
        try:
            return super().__enter__()
        except BaseException:
            torch.UntypedStorage.resize_ = original  # type: ignore[method-assign,assignment]
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign,assignment]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {key for t in _cpu_tensors(tree_leaves((args, kwargs))) if (key := _storage_key(t))}
        added = 0
        for tensor in _cpu_tensors(tree_leaves(out)):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._live:
                added += self._resized(storage)  # `out=` and in-place ops may resize what they write to
            elif key not in inputs:  # a view or in-place result of an untracked input is not new memory
                added += self._count(storage)
        if added > 0 and self._over_budget():
            # Drop every reference this frame holds so the overshoot is freed as the error unwinds: a
            # traceback kept alive by the caller's `except` (Lightning's) would otherwise pin it.
            del out, tensor, storage
            self._raise_oom(added)
        return out

    # -- bookkeeping

    def _count(self, storage: torch.UntypedStorage) -> int:
        key = storage._cdata
        if key in self._live:
            return 0
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        weakref.finalize(storage, _release, self._self_ref, key)
        self._add(nbytes)
        return nbytes

    def _resized(self, storage: torch.UntypedStorage) -> int:
        key = storage._cdata
        if key not in self._live:
            return 0
        delta = storage.nbytes() - self._live[key]
        self._live[key] += delta
        self._add(delta)
        return delta

    def _forget(self, key: int) -> None:
        self._add(-self._live.pop(key, 0))

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        if self._phase is not None and self.current_bytes > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.current_bytes

    def _over_budget(self) -> bool:
        return self.budget_bytes is not None and self.current_bytes > self.budget_bytes

    def _raise_oom(self, nbytes: int) -> None:
        raise CPUBudgetExceeded(CPU_OOM_MESSAGE.format(nbytes=nbytes))


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None


def _cpu_tensors(leaves: Iterable[Any]) -> Iterator[torch.Tensor]:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and _storage_key(leaf) is not None:
            yield leaf


def _tensors_of(objects: Any) -> Iterator[torch.Tensor]:
    """Every CPU tensor reachable from modules, optimizers, GradScalers, tensors and containers."""
    if isinstance(objects, torch.Tensor):
        yield from _cpu_tensors([objects])
    elif isinstance(objects, torch.nn.Module):
        for parameter in objects.parameters():
            yield from _tensors_of([parameter, parameter.grad])
        yield from _tensors_of(list(objects.buffers()))
    elif isinstance(objects, torch.optim.Optimizer):
        for state in objects.state.values():
            yield from _tensors_of(list(state.values()))
    elif isinstance(objects, torch.amp.GradScaler):
        yield from _tensors_of([getattr(objects, "_scale", None), getattr(objects, "_growth_tracker", None)])
    elif isinstance(objects, dict):
        yield from _tensors_of(list(objects.values()))
    elif isinstance(objects, list | tuple | set):
        for item in objects:
            yield from _tensors_of(item)


# --------------------------------------------------------------------------------------------------
# Measuring one step (CPU and CUDA) as a search Trial

# `run_step(batch_size, recorder)` runs one training step, entering `recorder.phase(FORWARD_BACKWARD)`
# and `recorder.phase(OPTIMIZER_STEP)` around its two halves (see step.TrainingStep.run).
RunStep = Callable[[int, Any], Any]


def measure_step(
    run_step: RunStep,
    batch_size: int,
    budget_bytes: int,
    device: torch.device,
    *,
    roots: Iterable[Any] = (),
    cleanup: Callable[[], None] = lambda: None,
) -> Trial:
    """Run one step at `batch_size` under the budget and return its Trial.

    Outcomes: "ok"; "over_budget" when the budget guard stopped it (CPU) or it fitted the allocator
    but its peak exceeded the budget (CUDA); "oom" for a real allocator OOM. Any other exception
    propagates. After a failure `cleanup()` (drop gradients) runs and memory is released.
    """
    if device.type == "cuda":
        return _measure_cuda_step(run_step, batch_size, budget_bytes, device, cleanup)
    return _measure_cpu_step(run_step, batch_size, budget_bytes, roots, cleanup)


def _measure_cpu_step(
    run_step: RunStep, batch_size: int, budget_bytes: int, roots: Iterable[Any], cleanup: Callable[[], None]
) -> Trial:
    tracker = CPUMemoryBudget(budget_bytes, roots=roots)
    baseline = tracker.current_bytes
    started = time.perf_counter()
    try:
        with tracker:
            run_step(batch_size, tracker)
    except Exception as exc:
        if not is_oom(exc):
            raise
        outcome: Outcome = "over_budget" if isinstance(exc, CPUBudgetExceeded) else "oom"
        message = str(exc)
    else:
        elapsed = time.perf_counter() - started
        return Trial(
            batch_size=batch_size,
            outcome="ok",
            peak_bytes=tracker.peak_bytes,
            fwd_bwd_peak_bytes=tracker.phase_peaks.get(FORWARD_BACKWARD),
            step_peak_bytes=tracker.phase_peaks.get(OPTIMIZER_STEP),
            baseline_bytes=baseline,
            step_time_s=elapsed,
            detail={"measured_by": "cpu_tracker", "tracker_overhead_in_time": True},
        )
    _release_after_failure(cleanup, None)
    return Trial(
        batch_size=batch_size,
        outcome=outcome,
        peak_bytes=tracker.peak_bytes,  # a lower bound: the step stopped when it crossed the budget
        baseline_bytes=baseline,
        detail={"measured_by": "cpu_tracker", "error": message},
    )


class CUDAPhaseRecorder:
    """Per-phase peaks from the caching allocator: `max_memory_allocated` (tensors) for each phase,
    `max_memory_reserved` (what the budget constrains) over the whole step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phase_peaks: dict[str, int] = {}
        self.reserved_peak_bytes = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # Allocations are booked on the host when kernels are queued, so no synchronisation is needed.
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.phase_peaks[name] = torch.cuda.max_memory_allocated(self.device)
            self.reserved_peak_bytes = max(
                self.reserved_peak_bytes, torch.cuda.max_memory_reserved(self.device)
            )


def _measure_cuda_step(
    run_step: RunStep, batch_size: int, budget_bytes: int, device: torch.device, cleanup: Callable[[], None]
) -> Trial:
    torch.cuda.synchronize(device)
    # Start each trial from an empty cache, so the reserved peak is this step's and not a leftover.
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    recorder = CUDAPhaseRecorder(device)
    started = time.perf_counter()
    message = None
    try:
        run_step(batch_size, recorder)
        torch.cuda.synchronize(device)
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if message is not None:
        # Outside the except block: the traceback, which holds the step's tensors, is gone by now.
        _release_after_failure(cleanup, device)
        return Trial(
            batch_size, "oom", baseline_bytes=baseline, detail={"measured_by": "cuda", "error": message}
        )
    elapsed = time.perf_counter() - started
    reserved = recorder.reserved_peak_bytes
    return Trial(
        batch_size=batch_size,
        outcome="over_budget" if reserved > budget_bytes else "ok",
        peak_bytes=reserved,
        fwd_bwd_peak_bytes=recorder.phase_peaks.get(FORWARD_BACKWARD),
        step_peak_bytes=recorder.phase_peaks.get(OPTIMIZER_STEP),
        baseline_bytes=baseline,
        step_time_s=elapsed,
        detail={"measured_by": "cuda", "allocated_peak_bytes": max(recorder.phase_peaks.values(), default=0)},
    )


def _release_after_failure(cleanup: Callable[[], None], device: torch.device | None) -> None:
    """Free what a failed step left behind: gradients, cycles held by the traceback, the CUDA cache."""
    cleanup()
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def cuda_memory_budget(device: torch.device, budget_bytes: int) -> Iterator[None]:
    """Cap this process's CUDA caching allocator at `budget_bytes` on `device` while the block runs.

    The cap covers what the allocator reserves (not the CUDA context itself)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# --------------------------------------------------------------------------------------------------
# Devices and budgets


def describe_device(device: torch.device | str) -> dict[str, Any]:
    """{"type", "name", "memory_bytes", "free_bytes", "count"} of the device a probe runs on."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "memory_bytes": int(total),
            "free_bytes": int(free),
            "count": torch.cuda.device_count(),
        }
    meminfo = _read_meminfo()
    return {
        "type": "cpu",
        "name": cpu_model_name(),
        "memory_bytes": meminfo.get("MemTotal", 0),
        "free_bytes": meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        "count": 1,
    }


def _read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """MemTotal, MemAvailable, ... in bytes (the file says kB). Falls back on sysconf off Linux."""
    values: dict[str, int] = {}
    try:
        with open(path) as file:
            for line in file:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        page = os.sysconf("SC_PAGE_SIZE")
        values["MemTotal"] = page * os.sysconf("SC_PHYS_PAGES")
        values["MemAvailable"] = page * os.sysconf("SC_AVPHYS_PAGES")
    return values


def cpu_model_name(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the OS reports it (benchmarks print it too)."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_budget_bytes(device_info: dict[str, Any]) -> int:
    """CUDA: the device's free memory. CPU: half of MemAvailable (see CPU_DEFAULT_BUDGET_SHARE)."""
    if device_info["type"] == "cuda":
        return int(device_info["free_bytes"])
    return int(device_info["free_bytes"] * CPU_DEFAULT_BUDGET_SHARE)


def resolve_budget(requested_bytes: int | None, device_info: dict[str, Any]) -> int:
    """The budget a probe enforces: the requested one, or the default; never more than the device has."""
    if requested_bytes is None:
        return default_budget_bytes(device_info)
    if requested_bytes <= 0:
        raise ProbeError("invalid_budget", f"memory budget must be positive, got {requested_bytes} bytes")
    if requested_bytes > device_info["memory_bytes"]:
        raise ProbeError(
            "budget_exceeds_device",
            f"memory budget of {requested_bytes} bytes exceeds the {device_info['memory_bytes']} bytes "
            f"of the probe device ({device_info['type']}: {device_info['name']})",
        )
    return int(requested_bytes)


def check_budget_covers_model(budget_bytes: int, state_bytes: dict[str, int]) -> None:
    """Raise ProbeError("budget_below_model") when parameters + gradients + optimizer state alone
    (no activations yet) exceed the budget. `state_bytes` comes from TrainingStep.state_bytes()."""
    needed = sum(state_bytes.values())
    if needed > budget_bytes:
        parts = ", ".join(f"{name} {value}" for name, value in state_bytes.items())
        raise ProbeError(
            "budget_below_model",
            f"memory budget of {budget_bytes} bytes is below the {needed} bytes the model needs before "
            f"any activation ({parts} bytes)",
        )

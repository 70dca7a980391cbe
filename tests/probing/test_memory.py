"""The CPU live-bytes tracker and budget guard, OOM detection, device description and budgets."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from service.probing.memory import (
    CPU_OOM_MESSAGE,
    FORWARD_BACKWARD,
    OPTIMIZER_STEP,
    CPUBudgetExceeded,
    CPUMemoryBudget,
    check_budget_covers_model,
    default_budget_bytes,
    describe_device,
    is_oom,
    measure_step,
    resolve_budget,
)
from service.probing.spec import ProbeError

F32 = 4


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int) -> None:
    inputs, targets = torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,))
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _profiler_peak_delta(fn) -> int:
    """Peak of the CPU allocator's live bytes above the starting point, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def test_tracker_counts_new_outputs_once_and_frees_them() -> None:
    with CPUMemoryBudget() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:]  # a view: no new memory
        a.add_(1)  # in place: no new memory
        b = a * 2  # 4000 new bytes
        assert tracker.current_bytes == 2 * 1000 * F32
        del a
        assert tracker.current_bytes == 2 * 1000 * F32  # the view keeps a's storage alive
        del view
        assert tracker.current_bytes == 1000 * F32
        del b
        assert tracker.current_bytes == 0
    assert tracker.peak_bytes == 2 * 1000 * F32


def test_tracker_follows_resizes() -> None:
    with CPUMemoryBudget() as tracker:
        out = torch.empty(0)
        torch.add(torch.ones(100), 1, out=out)  # `out=` resizes a tracked storage inside an op
        assert tracker.current_bytes == 100 * F32  # the temporary ones(100) is gone again
        out.untyped_storage().resize_(1000)  # resized from Python, outside the dispatcher
        assert tracker.current_bytes == 1000
        del out
    assert tracker.current_bytes == 0


def test_tracker_hand_count_of_a_linear_layer() -> None:
    layer = nn.Linear(100, 50)
    with CPUMemoryBudget(roots=[layer]) as tracker:
        assert tracker.current_bytes == (100 * 50 + 50) * F32
        inputs = torch.randn(8, 100)
        outputs = layer(inputs)
        del outputs, inputs
    # Peak: parameters + input (8x100) + output (8x50).
    assert tracker.peak_bytes == (100 * 50 + 50 + 8 * 100 + 8 * 50) * F32


def test_tracker_matches_the_profiler_on_an_mlp_training_step() -> None:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer, 4)  # optimizer state exists from here on
    tracker = CPUMemoryBudget(roots=[model, optimizer])
    baseline = tracker.current_bytes
    param_bytes = sum(p.numel() for p in model.parameters()) * F32
    assert baseline == pytest.approx(
        3 * param_bytes, abs=64
    )  # parameters + two Adam moments (+ step counters)
    with tracker:
        _train_step(model, optimizer, 512)
    assert tracker.current_bytes == baseline  # everything the step made is gone again
    profiled = _profiler_peak_delta(lambda: _train_step(model, optimizer, 512))
    assert tracker.peak_bytes - baseline == profiled  # exact on an MLP (docs/design.md: 1.000)


def test_phase_peaks_are_recorded_separately() -> None:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer, 4)

    def step(batch_size: int, recorder: CPUMemoryBudget) -> None:
        with recorder.phase(FORWARD_BACKWARD):
            inputs, targets = torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,))
            nn.functional.cross_entropy(model(inputs), targets).backward()
        with recorder.phase(OPTIMIZER_STEP):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    small = measure_step(step, 4, 10**9, torch.device("cpu"), roots=[model, optimizer])
    large = measure_step(step, 1024, 10**9, torch.device("cpu"), roots=[model, optimizer])
    # The optimizer step does not grow with the batch (only the batch itself is alive); the
    # forward/backward peak does, and at small sizes the optimizer step is the larger one.
    assert small.step_peak_bytes > small.fwd_bwd_peak_bytes
    assert large.fwd_bwd_peak_bytes - small.fwd_bwd_peak_bytes > 1000 * 1000
    assert large.step_peak_bytes - small.step_peak_bytes == (1024 - 4) * (
        64 * F32 + 8
    )  # inputs + int64 labels
    assert large.peak_bytes == max(large.fwd_bwd_peak_bytes, large.step_peak_bytes)
    assert small.baseline_bytes == large.baseline_bytes


def test_budget_guard_raises_the_cpu_allocator_oom_error() -> None:
    # PT012: the first allocation must fit inside the same budget; the error must leave the guard.
    with pytest.raises(RuntimeError) as info, CPUMemoryBudget(budget_bytes=10_000):  # noqa: PT012
        keep = torch.ones(1000)  # 4000 bytes: fits
        torch.ones(2000)  # 8000 more: over the budget
    exc = info.value
    assert isinstance(exc, CPUBudgetExceeded)
    assert exc.args == (CPU_OOM_MESSAGE.format(nbytes=8000),)  # exactly one argument
    assert str(exc) == "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000 bytes."
    assert is_oom(exc)
    del keep


def test_budget_guard_error_survives_autograd() -> None:
    """Raised inside backward (the autograd engine calls the dispatcher), it still arrives as itself."""
    layer = nn.Linear(256, 256)
    inputs = torch.randn(64, 256)
    with CPUMemoryBudget(budget_bytes=10**9, roots=[layer]) as guard:
        loss = layer(inputs).square().sum()
        guard.budget_bytes = guard.current_bytes + 1000  # the backward's first output crosses it
        with pytest.raises(CPUBudgetExceeded):
            loss.backward()


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_accelerate_recognises_the_guard_and_shrinks_the_batch() -> None:
    from accelerate.utils.memory import find_executable_batch_size, should_reduce_batch_size

    assert should_reduce_batch_size(CPUBudgetExceeded(CPU_OOM_MESSAGE.format(nbytes=1)))
    tried = []

    @find_executable_batch_size(starting_batch_size=256)
    def allocate(batch_size: int) -> int:
        tried.append(batch_size)
        torch.ones(batch_size, 1000)  # 4000 bytes per sample
        return batch_size

    with CPUMemoryBudget(budget_bytes=500_000):
        found = allocate()
    assert found == tried[-1] == 121  # 256 -> 230 -> ... -> 135 -> 121, each 0.9x after an "OOM"
    assert all(b * 4000 > 500_000 for b in tried[:-1])
    assert tried[-1] * 4000 <= 500_000


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="lightning not installed")
def test_lightning_recognises_the_guard() -> None:
    from pytorch_lightning.utilities.memory import is_oom_error

    assert is_oom_error(CPUBudgetExceeded(CPU_OOM_MESSAGE.format(nbytes=1)))


def test_is_oom() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 bytes."))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("CUDA out of memory"))


def test_describe_cpu() -> None:
    info = describe_device("cpu")
    assert set(info) == {"type", "name", "memory_bytes", "free_bytes", "count"}
    assert info["type"] == "cpu" and info["count"] == 1
    assert 0 < info["free_bytes"] <= info["memory_bytes"]
    assert isinstance(info["name"], str) and info["name"]


def test_budgets() -> None:
    cpu = {"type": "cpu", "name": "test", "memory_bytes": 16 * 2**30, "free_bytes": 8 * 2**30}
    assert default_budget_bytes(cpu) == 4 * 2**30  # half of what is available
    assert default_budget_bytes({**cpu, "type": "cuda"}) == 8 * 2**30  # all of the free memory
    assert resolve_budget(None, cpu) == 4 * 2**30
    assert resolve_budget(2**30, cpu) == 2**30
    with pytest.raises(ProbeError) as info:
        resolve_budget(32 * 2**30, cpu)
    assert info.value.code == "budget_exceeds_device"
    with pytest.raises(ProbeError) as info:
        check_budget_covers_model(1000, {"parameters": 600, "gradients": 600, "optimizer_state": 1200})
    assert info.value.code == "budget_below_model"
    assert "2400" in info.value.message and "parameters 600" in info.value.message
    check_budget_covers_model(3000, {"parameters": 600, "gradients": 600, "optimizer_state": 1200})


class _FakeCUDA:
    """Just enough of torch.cuda's allocator statistics to drive the CUDA measurement without a GPU."""

    def __init__(self) -> None:
        self.allocated = 1000
        self.peak_allocated = self.allocated
        self.reserved = self.peak_reserved = 2 * 2**20
        self.emptied = 0

    def allocate(self, nbytes: int, reserved_extra: int = 0) -> None:
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.reserved = max(self.reserved, self.allocated + reserved_extra)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: setattr(self, "emptied", self.emptied + 1))
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak_allocated)
        monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: self.peak_reserved)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self._reset)

    def _reset(self, device=None) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved


def test_cuda_measurement_logic_with_fake_allocator_statistics(monkeypatch) -> None:
    fake = _FakeCUDA()
    fake.install(monkeypatch)
    cuda0 = torch.device("cuda", 0)

    def step(batch_size: int, recorder) -> None:
        with recorder.phase(FORWARD_BACKWARD):
            fake.allocate(100 * batch_size, reserved_extra=4096)  # activations
            fake.allocate(-100 * batch_size)
            fake.allocate(500)  # gradients
        with recorder.phase(OPTIMIZER_STEP):
            fake.allocate(300)
            fake.allocate(-800)

    trial = measure_step(step, 64, 10**9, cuda0)
    assert trial.outcome == "ok"
    assert trial.baseline_bytes == 1000
    assert trial.fwd_bwd_peak_bytes == 1000 + 6400
    assert trial.step_peak_bytes == 1000 + 500 + 300
    assert trial.peak_bytes == fake.reserved  # the budget constrains reserved memory
    assert fake.emptied >= 1  # each trial starts from an empty cache

    cleaned = []

    def out_of_memory(batch_size: int, recorder) -> None:
        with recorder.phase(FORWARD_BACKWARD):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    emptied = fake.emptied
    trial = measure_step(out_of_memory, 4096, 10**9, cuda0, cleanup=lambda: cleaned.append(True))
    assert trial.outcome == "oom" and trial.peak_bytes is None
    assert "CUDA out of memory" in trial.detail["error"]
    assert cleaned == [True] and fake.emptied == emptied + 2  # before the trial and after the failure

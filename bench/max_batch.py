"""Max-batch benchmark: this service's memory search against Lightning, Accelerate and the exact answer.

For each case (a zoo model, optimizer, precision and memory budget) it runs, under the same budget:

    service             service.probing: a warm-up step at batch 1 (creates the optimizer state), then
                        search_max_batch_size with measure_step (one real step per trial), as the engine
                        does; cap 8192 (the search alone, in this process)
    service-api         the same question through the API, end to end: POST /v1/recommendations
                        (objective max_feasible, dataset size 8192) to an app with its worker running in
                        this process; the worker starts the probe subprocess (interpreter, torch, model,
                        warm-up, search). Wall time is POST to the finished job seen by polling (every
                        50 ms); pickup (created -> started) and the probe (started -> finished) come from
                        the job's timestamps. The child gets the same torch threads (OMP_NUM_THREADS).
                        With the worker's standby probe process (on by default), the job runs in a
                        process that already imported torch and the engine; the benchmark lets each new
                        standby finish its start-up before timing anything else.
    lightning-power     Lightning Tuner.scale_batch_size(mode="power"): doubles from 2 until OOM, 3 steps
                        per trial (Lightning's defaults; max_val 8192)
    lightning-binsearch the same, then bisects; the answer is reduced by Lightning's default 5 % margin
    accelerate          Accelerate find_executable_batch_size from 8192 (1024 for ResNet-50 on CUDA), x0.9
                        after each OOM; the inner function runs two real training steps
    exhaustive          the exact maximum: galloping up from 2, then bisection, until B fits (two guarded
                        real steps, optimizer state present) and B + 1 fails, both measured

The budget is enforced the same way for all of them. CPU: service.probing.memory.CPUMemoryBudget (counts
live tensor bytes, raises the CPU allocator's OOM error past the budget, which Lightning and Accelerate
recognise) around each searcher (the service puts one around each of its trials). CUDA:
torch.cuda.set_per_process_memory_fraction (budget / device memory) for all of them.

Step conventions (what "fits" means), documented because they change the maximum:
    service step   forward, loss, backward, optimizer.step(), zero_grad(set_to_none=True) (service/probing/
                   step.py). Used by service, accelerate, exhaustive and the "holds later" checks.
    Lightning loop Lightning's automatic optimization zeroes gradients after training_step, before
                   backward, so the previous step's gradients live through the forward; its data fetcher
                   also holds the next batch. Its maximum is lower: the Lightning rows are compared with
                   an exact maximum measured in Lightning's own loop (fit, two steps; marked with a dagger)
                   and the found/step % column compares them with the service step's maximum as well.

"Holds later": a fresh model at the found size, optimizer state present, three more real steps under the
same budget (service step: a warm-up at batch 1, then 3 steps; Lightning rows: a 4-step fit in Lightning's
loop). Timings include each method's own overheads (Lightning's checkpoint save/restore), not model builds.

Process set-up, the same for every method: CPU runs use one torch thread by default (--threads): on a
shared 2-core machine OpenMP barriers stall every op when another process holds a core (a Lightning trial
went from 3 s to 0.4 s). `gc.freeze()` after the imports: all methods call gc.collect() (Lightning before
every trial, Accelerate and the service after every OOM), which otherwise walks the ~360k objects of torch,
Lightning and Accelerate (0.6 s a collection here) and would time the benchmark's heap, not the search.

    .venv/bin/python bench/max_batch.py                    # CPU, all cases (< 10 min on 2 cores)
    .venv/bin/python bench/max_batch.py --quick            # smaller budgets (~2 min)
    .venv/bin/python bench/max_batch.py --device cuda --out $OUT/max_batch.md   # GPU cases
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models import get_model, make_config  # noqa: E402
from service.probing.memory import (  # noqa: E402
    CPUBudgetExceeded,
    CPUMemoryBudget,
    cuda_memory_budget,
    describe_device,
    is_oom,
    measure_step,
)
from service.probing.search import Trial, search_max_batch_size  # noqa: E402
from service.probing.step import TrainingStep, build_optimizer  # noqa: E402

CAP = 8192  # Lightning's default max_val; also the service's cap and Accelerate's starting size here
LEARNING_RATES = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}  # memory does not depend on them
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
HOLD_STEPS = 3
METHODS = ("service", "service-api", "lightning-power", "lightning-binsearch", "accelerate", "exhaustive")
API_POLL_S = 0.05
MiB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: dict[str, Any]
    optimizer: str
    precision: str
    budget_mib: float
    quick_budget_mib: float
    # Accelerate's starting size. 8192 (the cap) except for ResNet-50 on CUDA, where making a 224 px
    # batch of 8192 on the host (4.9 GB of randn per trial) would dominate the run.
    accelerate_start: int = 8192


_SMALL_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 64}
CPU_CASES = [
    Case("mlp-adam-fp32", "mlp", {}, "adam", "fp32", 16, 8),
    Case("gpt-adamw-fp32", "gpt", _SMALL_GPT, "adamw", "fp32", 256, 96),
    Case("gpt-adamw-bf16", "gpt", _SMALL_GPT, "adamw", "bf16", 64, 24),  # CPU bf16 matmuls are slow
    Case("resnet18w4-sgd-fp32", "resnet", {"depth": 18, "width": 4, "image_size": 16}, "sgd", "fp32", 48, 16),
]
_RESNET50 = {"depth": 50, "stem": "imagenet", "image_size": 224, "num_classes": 1000}
_GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512, "vocab_size": 50304}
CUDA_CASES = [
    Case("resnet50-sgd-fp32", "resnet", _RESNET50, "sgd", "fp32", 12 * 1024, 6 * 1024, 1024),
    Case("resnet50-sgd-bf16", "resnet", _RESNET50, "sgd", "bf16", 12 * 1024, 6 * 1024, 1024),
    Case("gpt2s-adamw-fp32", "gpt", _GPT2_SMALL, "adamw", "fp32", 16 * 1024, 8 * 1024),
    Case("gpt2s-adamw-bf16", "gpt", _GPT2_SMALL, "adamw", "bf16", 16 * 1024, 8 * 1024),
]


@dataclass
class MethodResult:
    method: str
    loop: str  # "service step" or "lightning loop": the step convention its answer is for
    trials: int = 0  # batch sizes tried (the service's warm-up not included)
    steps: int = 0  # real training steps started, warm-up and failed ones included
    wall_s: float = 0.0
    cpu_s: float | None = 0.0  # this process's CPU time (all threads); None: it ran in another process
    found: int | None = None
    tried: list[list[Any]] = field(default_factory=list)  # [batch_size, outcome]
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    true_max: int | None = None
    found_pct: float | None = None  # found / true maximum of its own loop
    found_pct_step: float | None = None  # found / true maximum of the service step
    holds_later: bool | None = None


# --------------------------------------------------------------------------------------------------
# Budgets and building blocks


class ReleasingBudget(CPUMemoryBudget):
    """CPUMemoryBudget whose OOM error does not keep the overshooting tensor alive.

    CPUMemoryBudget raises from inside `__torch_dispatch__`, whose frame (held by the traceback) still
    references the output that crossed the budget (loop variables `tensor` and `storage`), so until the
    handler finishes the tracker stays over budget and every allocation inside an `except` block fails.
    A real allocator never allocates the failed block. Lightning allocates inside its OOM handler (it
    re-creates the DataLoader and prefetches a batch), so without this it dies with a second "OOM".
    Re-raising a fresh error from outside the handler frees the overshoot first (and keeps no reference
    cycle, so the failed step's tensors are freed by reference counting, as after a real OOM).
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except CPUBudgetExceeded as exc:
            message = exc.args  # not the exception: a local holding it would make a reference cycle
        raise CPUBudgetExceeded(*message)


@contextlib.contextmanager
def budget_guard(device: torch.device, budget: int, roots: list[Any]) -> Iterator[None]:
    """The budget around a whole searcher: CPUMemoryBudget on CPU, the CUDA memory fraction on CUDA."""
    if device.type == "cuda":
        with cuda_memory_budget(device, budget):
            yield
    else:
        with ReleasingBudget(budget, roots=roots):
            yield


@contextlib.contextmanager
def cuda_cap_only(device: torch.device, budget: int) -> Iterator[None]:
    """For searchers that guard each CPU step themselves (measure_step): only the CUDA cap is global."""
    if device.type == "cuda":
        with cuda_memory_budget(device, budget):
            yield
    else:
        yield


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def new_step(case: Case, device: torch.device) -> TrainingStep:
    spec = get_model(case.model)
    return TrainingStep(
        spec,
        make_config(spec, case.config),
        optimizer=case.optimizer,
        learning_rate=LEARNING_RATES[case.optimizer],
        precision=case.precision,
        device=device,
        seed=0,
    )


def measure(step: TrainingStep, batch_size: int, budget: int) -> Trial:
    """One real step under the budget, as the engine measures a trial (measure_step: a CPUMemoryBudget
    around the step on CPU; OOM or reserved memory over the budget on CUDA)."""
    roots, cleanup = step.memory_roots(), step.discard_gradients
    return measure_step(step.run, batch_size, budget, step.device, roots=roots, cleanup=cleanup)


def guarded_step(step: TrainingStep, batch_size: int, budget: int) -> bool:
    return measure(step, batch_size, budget).ok


def exact_boundary(probe: Callable[[int], bool], start: int, cap: int) -> tuple[int, int | None]:
    """Largest B in [1, cap] with probe(B) true and smallest failing one (None when cap fits), assuming
    probe is monotone. Gallops from `start` (steps 1, 2, 4, ... away from it), then bisects; both ends
    of the returned bracket were measured. Raises RuntimeError when even batch size 1 fails."""
    start = max(1, min(start, cap))
    lo: int | None = None
    hi: int | None = None
    if probe(start):
        lo, stride = start, 1
        while lo < cap:
            candidate = min(lo + stride, cap)
            if probe(candidate):
                lo, stride = candidate, stride * 2
            else:
                hi = candidate
                break
    else:
        hi, stride = start, 1
        while lo is None:
            if hi == 1:
                raise RuntimeError("batch size 1 does not fit the budget")
            candidate = max(hi - stride, 1)
            if probe(candidate):
                lo = candidate
            else:
                hi, stride = candidate, stride * 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


# --------------------------------------------------------------------------------------------------
# Lightning


def lightning() -> Any:
    """`pytorch_lightning`, or the unified `lightning.pytorch` package when only that is installed."""
    pl: Any
    try:
        pl = importlib.import_module("pytorch_lightning")
    except ImportError:
        pl = importlib.import_module("lightning.pytorch")
    for name in (pl.__name__, "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
    warnings.filterwarnings("ignore", message=r".*(IterableDataset|num_workers|does not have many workers).*")
    return pl


class SyntheticBatches(torch.utils.data.IterableDataset):
    """Endless ready-made batches from the zoo's make_batch (the DataLoader is built with batch_size=None)."""

    def __init__(self, case: Case, batch_size: int, seed: int = 0) -> None:
        self.spec = get_model(case.model)
        self.config = make_config(self.spec, case.config)
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.spec.make_batch(self.config, self.batch_size, torch.device("cpu"), generator)


_MODULE_CLASS: type | None = None


def lightning_module_class() -> type:
    """A LightningModule around a zoo model with a `batch_size` attribute the Tuner scales."""
    global _MODULE_CLASS
    if _MODULE_CLASS is not None:
        return _MODULE_CLASS
    lightning_module: Any = lightning().LightningModule  # a base chosen at run time: typed as Any

    class ZooModule(lightning_module):
        def __init__(self, case: Case, batch_size: int, counter: dict[str, int]) -> None:
            super().__init__()
            self.case = case
            self.spec = get_model(case.model)
            torch.manual_seed(0)
            self.model = self.spec.build(make_config(self.spec, case.config), False)
            self.batch_size = batch_size
            self.counter = counter

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.counter["steps"] += 1
            inputs, targets = batch
            return self.spec.loss(self.model(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            name = self.case.optimizer
            return build_optimizer(name, self.parameters(), LEARNING_RATES[name])

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(SyntheticBatches(self.case, self.batch_size), batch_size=None)

    _MODULE_CLASS = ZooModule
    return ZooModule


def make_trainer(case: Case, device: torch.device, root: str, max_steps: int = -1) -> Any:
    pl = lightning()
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=LIGHTNING_PRECISION[case.precision],
        max_steps=max_steps,
        max_epochs=1 if max_steps > 0 else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )


def run_lightning(case: Case, device: torch.device, budget: int, mode: str, root: str) -> MethodResult:
    pl = lightning()
    scaling: Any = importlib.import_module(pl.__name__ + ".tuner.batch_size_scaling")
    result = MethodResult(f"lightning-{mode}", "lightning loop")
    counter = {"steps": 0}
    original = scaling._try_loop_run

    def counted(trainer: Any, params: dict[str, Any]) -> None:  # one call = one trial
        size = trainer.lightning_module.batch_size
        try:
            original(trainer, params)
        except BaseException as exc:
            result.tried.append([size, "oom" if is_oom(exc) else "error"])
            raise
        result.tried.append([size, "ok"])

    module = lightning_module_class()(case, 2, counter)
    trainer = make_trainer(case, device, root)
    free_memory(device)
    scaling._try_loop_run = counted
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        with budget_guard(device, budget, roots=[module]):
            result.found = pl.tuner.Tuner(trainer).scale_batch_size(module, mode=mode, max_val=CAP)
    except Exception as exc:  # reported, not fatal: the other methods still run
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        scaling._try_loop_run = original
        result.wall_s = time.perf_counter() - started
        result.cpu_s = time.process_time() - cpu_started
    result.trials, result.steps = len(result.tried), counter["steps"]
    ok = [size for size, outcome in result.tried if outcome == "ok"]
    result.extra["largest_ok_trial"] = max(ok) if ok else None
    del trainer, module
    free_memory(device)
    return result


def lightning_fit_fits(
    case: Case, device: torch.device, budget: int, batch_size: int, steps: int, root: str
) -> bool:
    """`steps` real steps of a fresh Lightning fit at `batch_size` under the budget; False on OOM."""
    counter = {"steps": 0}
    module = lightning_module_class()(case, batch_size, counter)
    trainer = make_trainer(case, device, root, max_steps=steps)
    free_memory(device)
    try:
        with budget_guard(device, budget, roots=[module]):
            trainer.fit(module)
        fitted = counter["steps"] == steps
    except Exception as exc:
        if not is_oom(exc):
            raise
        fitted = False
    del trainer, module
    free_memory(device)
    return fitted


# --------------------------------------------------------------------------------------------------
# The service, Accelerate, the exact maximum


def run_service(case: Case, device: torch.device, budget: int) -> MethodResult:
    result = MethodResult("service", "service step")
    step = new_step(case, device)
    free_memory(device)
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        with cuda_cap_only(device, budget):
            if not guarded_step(step, 1, budget):  # the engine's warm-up: creates the optimizer state
                raise RuntimeError("warm-up at batch size 1 does not fit")
            search = search_max_batch_size(lambda size: measure(step, size, budget), budget, CAP)
        result.found = search.max_batch_size
        result.tried = [[t.batch_size, t.outcome] for t in search.trials]
        result.extra = {"bracket": list(search.bracket), "converged": search.converged}
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    result.wall_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    result.trials = len(result.tried)
    result.steps = result.trials + 1
    return result


def wait_for_standby(client: Any, timeout_s: float = 120.0) -> None:
    """Let the worker's standby probe process (BATCHSIZE_PROBE_STANDBY) finish its start-up, so that its
    imports do not share the CPU with the next method being timed, and the next API job finds the worker
    idle and warm."""
    worker = client.app.state.batchsize.worker
    if worker is None or not worker.settings.probe_standby:
        return
    deadline = time.perf_counter() + timeout_s
    while not worker.standby_ready() and time.perf_counter() < deadline:
        time.sleep(API_POLL_S)


def run_api(case: Case, device: torch.device, budget: int, client: Any) -> MethodResult:
    """max_feasible through the API (see the module docstring): `client` is a TestClient on an app whose
    worker runs in this process."""
    result = MethodResult("service-api", "service step", cpu_s=None)
    body = {
        "model": {"name": case.model, "config": case.config},
        "dataset": {"size": CAP},
        "training": {
            "optimizer": case.optimizer,
            "learning_rate": LEARNING_RATES[case.optimizer],
            "precision": case.precision,
        },
        "device": {"type": device.type},
        "memory_budget_bytes": budget,
        "objective": "max_feasible",
        "time_budget_s": 600,
        "force": True,
    }
    started = time.perf_counter()
    response = client.post("/v1/recommendations", json=body)
    if response.status_code not in (200, 202):
        result.error = f"POST {response.status_code}: {response.text[:200]}"
        return result
    job = response.json()
    while job["status"] in ("queued", "running"):
        time.sleep(API_POLL_S)
        job = client.get(f"/v1/recommendations/{job['id']}").json()
    result.wall_s = time.perf_counter() - started
    wait_for_standby(client)  # the next one starts when this job is done
    stamps = {
        k: dt.datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at") if job[k]
    }
    if len(stamps) == 3:
        result.extra["pickup_s"] = (stamps["started_at"] - stamps["created_at"]).total_seconds()
        result.extra["probe_s"] = (stamps["finished_at"] - stamps["started_at"]).total_seconds()
    if job["status"] != "succeeded":
        result.error = f"{job['status']}: {(job.get('error') or {}).get('message', '')[:200]}"
        return result
    answer = job["result"]
    result.found = answer["max_feasible_batch_size"]
    result.tried = answer["search"]["batch_sizes_tried"]
    result.trials = len(result.tried)
    result.steps = result.trials + 1  # the engine's warm-up step
    result.extra.update(
        phases=answer.get("phases"),
        probe_duration_s=answer["probe"]["duration_s"],
        converged=answer["search"]["converged"],
        lower_bound=answer.get("max_feasible_is_lower_bound"),
    )
    return result


def run_accelerate(case: Case, device: torch.device, budget: int) -> MethodResult:
    from accelerate.utils import find_executable_batch_size

    result = MethodResult("accelerate", "service step")
    step = new_step(case, device)  # no warm-up: the first step that fits creates the optimizer state

    def train(batch_size: int) -> int:
        result.tried.append([batch_size, "oom"])
        step.discard_gradients()  # a failed call may have left gradients (a careful user's loop does this)
        for _ in range(2):
            result.steps += 1
            step.run(batch_size)
        result.tried[-1][1] = "ok"
        return batch_size

    free_memory(device)
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        with budget_guard(device, budget, roots=step.memory_roots()):
            result.found = find_executable_batch_size(train, starting_batch_size=case.accelerate_start)()
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    result.wall_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    result.trials = len(result.tried)
    return result


def run_exhaustive(case: Case, device: torch.device, budget: int) -> MethodResult:
    """The exact maximum of the service step (two guarded real steps after a warm-up), found cold."""
    result = MethodResult("exhaustive", "service step")
    step = new_step(case, device)

    def probe(batch_size: int) -> bool:
        fits = True
        for _ in range(2):
            result.steps += 1
            if not guarded_step(step, batch_size, budget):
                fits = False
                break
        result.tried.append([batch_size, "ok" if fits else "oom"])
        return fits

    free_memory(device)
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        with cuda_cap_only(device, budget):
            if not guarded_step(step, 1, budget):
                raise RuntimeError("warm-up at batch size 1 does not fit")
            result.steps += 1
            lo, hi = exact_boundary(probe, 2, CAP)
        result.found = lo
        result.extra = {"smallest_failing": hi}
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    result.wall_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    result.trials = len(result.tried)
    return result


def lightning_loop_exact(
    case: Case, device: torch.device, budget: int, seed: int, root: str
) -> dict[str, Any]:
    """The exact maximum in Lightning's own loop (two-step fits), galloping from a seed (a reference
    value, not a searcher: its trial count is not comparable)."""
    tried: list[list[Any]] = []

    def probe(batch_size: int) -> bool:
        fits = lightning_fit_fits(case, device, budget, batch_size, 2, root)
        tried.append([batch_size, "ok" if fits else "oom"])
        return fits

    started = time.perf_counter()
    lo, hi = exact_boundary(probe, seed, CAP)
    return {"max": lo, "smallest_failing": hi, "tried": tried, "wall_s": time.perf_counter() - started}


def holds_later_service(case: Case, device: torch.device, budget: int, batch_size: int) -> bool:
    step = new_step(case, device)
    free_memory(device)
    with cuda_cap_only(device, budget):
        holds = guarded_step(step, 1, budget) and all(
            guarded_step(step, batch_size, budget) for _ in range(HOLD_STEPS)
        )
    return holds


# --------------------------------------------------------------------------------------------------
# One case, the report


def run_case(
    case: Case,
    device: torch.device,
    budget_mib: float,
    root: str,
    log: Callable[[str], None],
    api: Any,
) -> dict[str, Any]:
    budget = int(budget_mib * MiB)
    log(f"== {case.name}: budget {budget_mib:g} MiB")
    results: list[MethodResult] = []
    runners: list[tuple[str, Callable[[], MethodResult]]] = [
        ("service", lambda: run_service(case, device, budget)),
        ("service-api", lambda: run_api(case, device, budget, api)),
        ("lightning-power", lambda: run_lightning(case, device, budget, "power", root)),
        ("lightning-binsearch", lambda: run_lightning(case, device, budget, "binsearch", root)),
        ("accelerate", lambda: run_accelerate(case, device, budget)),
        ("exhaustive", lambda: run_exhaustive(case, device, budget)),
    ]
    for name, runner in runners:
        result = runner()
        free_memory(device)  # the runner's model and optimizer are gone with its frame
        results.append(result)
        log(
            f"   {name:20s} found {result.found} trials {result.trials} steps {result.steps} "
            f"{result.wall_s:.1f}s {result.error or ''}"
        )
    by_name = {r.method: r for r in results}
    step_max = by_name["exhaustive"].found

    # Seed: binsearch's largest fitting trial (exact for Lightning's loop when it finished), else the
    # service step's maximum (Lightning's loop needs at least as much memory).
    binsearch = by_name["lightning-binsearch"]
    seed = step_max if binsearch.error else binsearch.extra.get("largest_ok_trial")
    lightning_exact: dict[str, Any] | None = None
    if seed:
        try:
            lightning_exact = lightning_loop_exact(case, device, budget, seed, root)
            log(f"   exact in Lightning's loop: {lightning_exact['max']} ({lightning_exact['wall_s']:.1f}s)")
        except Exception as exc:
            lightning_exact = {"max": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    lightning_max = lightning_exact["max"] if lightning_exact else None
    loop_max = {"service step": step_max, "lightning loop": lightning_max}

    holds_started = time.perf_counter()
    holds_cache: dict[tuple[str, int], bool] = {}
    for result in results:
        result.true_max = loop_max[result.loop]
        if result.found is None:
            continue
        if result.true_max:
            result.found_pct = 100.0 * result.found / result.true_max
        if step_max:
            result.found_pct_step = 100.0 * result.found / step_max
        key = (result.loop, result.found)
        if key not in holds_cache:
            if result.loop == "lightning loop":
                steps = 1 + HOLD_STEPS
                holds_cache[key] = lightning_fit_fits(case, device, budget, result.found, steps, root)
            else:
                holds_cache[key] = holds_later_service(case, device, budget, result.found)
                free_memory(device)
        result.holds_later = holds_cache[key]
    log(
        "   holds later: "
        + ", ".join(f"{r.method} {r.holds_later}" for r in results)
        + f" ({time.perf_counter() - holds_started:.1f}s)"
    )
    return {
        "case": case.name,
        "model": case.model,
        "config": case.config,
        "optimizer": case.optimizer,
        "precision": case.precision,
        "budget_mib": budget_mib,
        "budget_bytes": budget,
        "true_max": {"service_step": step_max, "lightning_loop": loop_max["lightning loop"]},
        "lightning_loop_exact": lightning_exact,
        "methods": [asdict(r) for r in results],
    }


def summarise(cases: list[dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        entries = [m for c in cases for m in c["methods"] if m["method"] == method and m["found"] is not None]

        def median(key: str, items: list[dict] = entries) -> float | None:
            values = [m[key] for m in items if m[key] is not None]
            return statistics.median(values) if values else None

        def min_of(key: str, items: list[dict] = entries) -> float | None:
            return min((m[key] for m in items if m[key] is not None), default=None)

        failed = [m for c in cases for m in c["methods"] if m["method"] == method and m["found"] is None]
        rows.append(
            {
                "method": method,
                "cases": len(entries),
                "failed": len(failed),
                "median_trials": median("trials"),
                "median_steps": median("steps"),
                "median_wall_s": median("wall_s"),
                "median_cpu_s": median("cpu_s"),
                "median_found_pct": median("found_pct"),
                "min_found_pct": min_of("found_pct"),
                "median_found_pct_step": median("found_pct_step"),
                "holds_later": f"{sum(bool(m['holds_later']) for m in entries)}/{len(entries)}",
            }
        )
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return str(value)


def end_to_end_rows(cases: list[dict]) -> list[dict]:
    """Per case: the search alone, the API end to end, and Lightning's binsearch, from the same run."""
    rows = []
    for case in cases:
        by = {m["method"]: m for m in case["methods"]}
        api, search, binsearch = by.get("service-api"), by.get("service"), by.get("lightning-binsearch")
        if api is None:
            continue
        extra = api.get("extra") or {}
        answered = binsearch is not None and binsearch["found"] is not None and not api["error"]
        ratio = None
        if binsearch is not None and answered and binsearch["wall_s"]:
            ratio = api["wall_s"] / binsearch["wall_s"]
        rows.append(
            {
                "case": case["case"],
                "search_s": search["wall_s"] if search else None,
                "api_s": None if api["error"] else api["wall_s"],
                "pickup_s": extra.get("pickup_s"),
                "probe_s": extra.get("probe_s"),
                "phases": extra.get("phases") or [],
                "binsearch_s": binsearch["wall_s"] if binsearch else None,
                "ratio": ratio,
                "found": api["found"],
                "error": api["error"],
            }
        )
    return rows


def end_to_end_section(cases: list[dict]) -> list[str]:
    rows = end_to_end_rows(cases)
    if not rows:
        return []
    lines = [
        "",
        "## max_feasible end to end through the API",
        "",
        "POST /v1/recommendations (objective max_feasible) to the finished job, against the search alone in "
        "this process and Lightning's binsearch in the same run. Pickup: created -> started (the worker "
        "polls every 50 ms); probe: started -> finished (with the standby probe process: model build, "
        "warm-up, search, result; without it also the process start and imports); phases: the probe's own "
        "account (setup counts from its process start, or a standby's request).",
        "",
        "| case | search only s | API end to end s | pickup s | probe s | probe phases | found "
        "| Lightning binsearch s | API / binsearch |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        phases = ", ".join(f"{p['phase']} {p['seconds']:.1f}" for p in row["phases"] if p.get("ran"))
        lines.append(
            f"| {row['case']} | {_fmt(row['search_s'])} | {_fmt(row['api_s'])} | {_fmt(row['pickup_s'], 2)} "
            f"| {_fmt(row['probe_s'])} | {phases or row['error'] or '–'} | {_fmt(row['found'])} "
            f"| {_fmt(row['binsearch_s'])} | {_fmt(row['ratio'], 2)} |"
        )
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    pickups = [r["pickup_s"] for r in rows if r["pickup_s"] is not None]
    setups = [
        next((p["seconds"] for p in r["phases"] if p["phase"] == "setup"), 0.0) / r["probe_s"]
        for r in rows
        if r["probe_s"]
    ]
    if ratios:
        lines += [
            "",
            f"Median API end to end / Lightning binsearch: **{statistics.median(ratios):.2f}x** "
            f"(goal <= 0.25x); median pickup {statistics.median(pickups):.2f} s (goal <= 1 s)."
            if pickups
            else f"Median API end to end / Lightning binsearch: **{statistics.median(ratios):.2f}x**.",
        ]
    if setups:
        lines += [
            "",
            "The probe's setup (model build, warm-up step; without a standby also the interpreter's and "
            "torch's start-up) is a "
            f"median {100 * statistics.median(setups):.0f} % of its time; a failed Lightning run has no "
            "ratio.",
        ]
    lines += [
        "",
        "Start-up with and without the worker's standby probe process (BATCHSIZE_PROBE_STANDBY): "
        "`bench/probe_standby.py`, results in max_batch_standby.md.",
    ]
    return lines


def render_markdown(meta: dict, cases: list[dict], summary: list[dict]) -> str:
    lines = [
        "# Max-batch benchmark: the service's memory search vs Lightning, Accelerate and the exact maximum",
        "",
        "Generated by `bench/max_batch.py` (its docstring describes the method). Do not edit by hand.",
        "",
        f"- machine: {meta['machine']}",
        f"- torch {meta['torch']}, lightning {meta['lightning']}, accelerate {meta['accelerate']}, "
        f"python {meta['python']}",
        f"- date: {meta['date']}; load average at start / end: {meta['load_start']} / "
        f"{meta.get('load_end', '?')} (a shared machine: wall times are noisy, trials and steps are not)",
        f"- command: `{meta['command']}`",
        f"- device {meta['device']}; torch threads {meta['torch_threads']}; budget enforced by "
        f"{meta['guard']}; cap {CAP} for every method; `gc.freeze()` after imports",
        "",
        "## Results",
        "",
        "| case | method | trials | steps | wall s | cpu s | found | true max | found/true % "
        "| found/step max % | holds later |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for case in cases:
        for m in case["methods"]:
            dagger = " †" if m["loop"] == "lightning loop" and m["true_max"] is not None else ""
            found = _fmt(m["found"])
            if m["error"]:
                largest_ok = m["extra"].get("largest_ok_trial")
                found = f"failed ‡ (largest ok trial {largest_ok})" if largest_ok else "failed ‡"
            lines.append(
                f"| {case['case']} ({case['budget_mib']:g} MiB) | {m['method']} | {m['trials']} "
                f"| {m['steps']} "
                f"| {_fmt(m['wall_s'])} | {_fmt(m['cpu_s'])} | {found} | {_fmt(m['true_max'])}{dagger} "
                f"| {_fmt(m['found_pct'])} "
                f"| {_fmt(m['found_pct_step'])} | {_fmt(m['holds_later'])} |"
            )
    lines += [
        "",
        "trials: batch sizes tried (the service's warm-up step at batch 1 not included); steps: real "
        "training steps started (warm-up and failed steps included; Lightning runs 3 per trial, "
        "Accelerate and the exhaustive search 2). † the exact maximum in Lightning's own loop (see "
        "below); found/step max: against the service step's exact maximum.",
    ]
    failures = [(c["case"], m) for c in cases for m in c["methods"] if m["error"]]
    if failures:
        lines += ["", "‡ failed runs (trials and steps are those done before the failure):", ""]
        lines += [f"- {case} / {m['method']}: `{m['error']}`" for case, m in failures]
        if any(m["loop"] == "lightning loop" and "allocate memory" in m["error"] for _, m in failures):
            lines += [
                "",
                "Lightning's tuner handles an OOM inside its `except` block: it re-creates the DataLoader "
                "and prefetches a batch at the next size while the traceback still holds the failed step's "
                "tensors. When what is left of the budget is smaller than that batch, this second OOM is "
                "raised from the handler and ends `scale_batch_size` with an exception (no batch size is "
                "returned). On CUDA the prefetched batch lives in host memory: a CPU-only failure.",
            ]
    lines += [
        "",
        "## Summary (medians over cases)",
        "",
        "| method | answered | failed | trials | steps | wall s | cpu s | found/true % "
        "| worst found/true % | found/step max % | holds later |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in summary:
        lines.append(
            f"| {row['method']} | {row['cases']} | {row['failed']} | {_fmt(row['median_trials'])} "
            f"| {_fmt(row['median_steps'])} | {_fmt(row['median_wall_s'])} | {_fmt(row['median_cpu_s'])} "
            f"| {_fmt(row['median_found_pct'])} | {_fmt(row['min_found_pct'])} "
            f"| {_fmt(row['median_found_pct_step'])} | {row['holds_later']} |"
        )
    lines += end_to_end_section(cases)
    lines += [
        "",
        "## Lightning's loop needs more memory than the service step",
        "",
        "Lightning zeroes gradients after `training_step`, before backward, so the previous step's "
        "gradients are alive during the forward; its data fetcher also keeps the next batch. The exact "
        "maxima of the two loops under the same budget (both: largest B whose two real steps fit, B + 1 "
        "measured failing):",
        "",
        "| case | service step | Lightning loop | Lightning / service | service's answer fits Lightning "
        "loop |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for case in cases:
        step_max, loop_max = case["true_max"]["service_step"], case["true_max"]["lightning_loop"]
        ratio = 100.0 * loop_max / step_max if step_max and loop_max else None
        service = next(m for m in case["methods"] if m["method"] == "service")["found"]
        fits = None if service is None or loop_max is None else service <= loop_max
        lines.append(
            f"| {case['case']} | {_fmt(step_max)} | {_fmt(loop_max)} | {_fmt(ratio)} % | {_fmt(fits)} |"
        )
    lines += [
        "",
        "The service measures its own step (gradients freed after `optimizer.step()`); a client training "
        "with Lightning needs the gradients' memory on top during the forward, and should say so (or keep "
        "a margin): the service's answer is for the step it measured.",
        "",
        "## Conventions",
        "",
        "- Every method runs on a freshly built model (seed 0), same optimizer, precision and budget.",
        "- service: the engine's warm-up step at batch 1, then `search_max_batch_size` with `measure_step` "
        "(one real step per trial, optimizer state present; CPUMemoryBudget per trial), cap 8192.",
        "- lightning-*: `Tuner.scale_batch_size` with its defaults (init 2, 3 steps per trial, 25 trials, "
        "binsearch margin 5 %, max_val 8192) on a LightningModule wrapping the zoo model; the DataLoader "
        "yields ready batches from the zoo's `make_batch`. One guard around the whole tuner call "
        "(checkpoint save and restore included).",
        "- accelerate: `find_executable_batch_size(starting_batch_size=8192)` (1024 for ResNet-50 on "
        "CUDA); the inner function drops "
        "leftover gradients, then runs two real service steps. One guard around the whole call.",
        "- exhaustive: the service step after a warm-up; galloping from 2 then bisection; B fits when two "
        "guarded steps fit. The result is exact for the service step (B fits, B + 1 fails, both measured; "
        "memory is monotone in B).",
        "- holds later: a fresh model, optimizer state present, three more steps at the found size under "
        "the budget (Lightning rows: a 4-step fit in Lightning's loop).",
        "- Same process set-up for all: one torch thread on CPU (`--threads`), `gc.freeze()` after imports "
        "(every method's `gc.collect()` calls would otherwise walk the imported libraries' objects).",
        "- CPU guard for Lightning and Accelerate: a subclass of CPUMemoryBudget that frees the tensor which "
        "crossed the budget before the OOM error propagates (CPUMemoryBudget keeps it alive while the "
        "error is being handled, unlike a real allocator; see `ReleasingBudget`). The service's own trials "
        "use CPUMemoryBudget unchanged (its handler allocates nothing).",
        "- CPU: the budget counts live tensor bytes (scratch memory inside single ops is not counted); RSS "
        "can be higher. CUDA: `set_per_process_memory_fraction` caps what the caching allocator reserves.",
        "",
    ]
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    info = describe_device(device)
    if device.type == "cuda":
        return f"{info['name']} ({info['memory_bytes'] / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{info['name']}, {os.cpu_count()} cores, {info['memory_bytes'] / 2**30:.0f} GiB RAM"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated zoo names (mlp,gpt,resnet)")
    parser.add_argument("--cases", default=None, help="comma-separated case names; default all")
    parser.add_argument("--budget-mib", type=float, default=None, help="one budget for every case (MiB)")
    parser.add_argument("--quick", action="store_true", help="smaller budgets (about 2 min on 2 CPU cores)")
    parser.add_argument("--max-seconds", type=float, default=None, help="start no new case after this")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch threads (default 1: on a shared machine OpenMP barriers stall every op)",
    )
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--out", default="docs/benchmarks/max_batch.md", help="markdown; JSON next to it")
    args = parser.parse_args(argv)

    cases = CUDA_CASES if args.device == "cuda" else CPU_CASES
    if args.models:
        wanted = set(args.models.split(","))
        cases = [c for c in cases if c.model in wanted]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    if not cases:
        parser.error("no case matches --models / --cases")
    if args.list:
        for case in cases:  # building each config checks it without a device
            make_config(get_model(case.model), case.config)
            budget = args.budget_mib or (case.quick_budget_mib if args.quick else case.budget_mib)
            print(f"{case.name}: {case.model} {case.config} {case.optimizer} {case.precision} {budget:g} MiB")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # An explicit index: torch.cuda.set_per_process_memory_fraction refuses a bare "cuda" device.
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    import accelerate

    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    lightning()
    # Every method calls gc.collect() (Lightning before each trial, Accelerate and the service after each
    # OOM); with torch, Lightning and Accelerate imported that walks ~360k objects (0.6 s here). Freezing
    # them makes those collections cheap for all methods alike.
    gc.collect()
    gc.freeze()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine_description(device),
        "device": device.type,
        "guard": "torch.cuda.set_per_process_memory_fraction"
        if device.type == "cuda"
        else "service.probing.memory.CPUMemoryBudget (around Lightning and Accelerate: ReleasingBudget)",
        "torch": torch.__version__,
        "lightning": lightning().__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/max_batch.py", *sys.argv[1:]])
        if argv is None
        else "main(" + repr(argv) + ")",
        "load_start": load_average(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "cap": CAP,
    }

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    if device.type == "cpu":  # the probe subprocess: the same torch threads as every other method
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    results: list[dict] = []
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory(prefix="max_batch_"))
        settings = Settings(
            data_dir=Path(root) / "api", probe_device=device.type, poll_interval_s=API_POLL_S, _env_file=None
        )
        api = stack.enter_context(TestClient(create_app(settings, run_worker=True)))
        wait_for_standby(api)
        for case in cases:
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                log(f"-- skipping {case.name}: --max-seconds {args.max_seconds:g} reached")
                continue
            budget_mib = args.budget_mib or (case.quick_budget_mib if args.quick else case.budget_mib)
            results.append(run_case(case, device, budget_mib, root, log, api))
            meta["load_end"] = load_average()
            meta["total_s"] = round(time.perf_counter() - started, 1)
            summary = summarise(results)
            # Written after every case, so a run cut short still leaves its results.
            out.write_text(render_markdown(meta, results, summary))
            out.with_suffix(".json").write_text(
                json.dumps({"meta": meta, "cases": results, "summary": summary}, indent=2) + "\n"
            )
    print(render_markdown(meta, results, summarise(results)))
    log(f"total {time.perf_counter() - started:.0f}s; wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

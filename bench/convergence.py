"""Convergence benchmark: is the probe's recommended batch size (nearly) the fastest to a target loss?

For each task an ORACLE trains from the same initialisation to a target loss at batch sizes 8..512
(powers of two; the half-octaves 24..384 too, outside the sweep's cost), tuning the learning rate per
size on a grid of powers of two (then of sqrt 2 around the best), and computes wall time to target =
steps to target x the step time at that size. The step time is measured separately, interleaved across
sizes over several rounds, and is each size's fastest round (CPU timing drifts 1.2-2x between passes;
steps to target do not depend on it, so the sweep's runs can go in parallel).

The SERVICE side runs what a probe runs: the throughput ladder (service/probing/throughput.py when it is
importable, else a simple timing loop), the statistics phase (warm-up, gradient noise scale, training
races: service/probing/races.run_statistics) and the recipe (service/probing/recipe.recommend), with the
maximum feasible batch size fixed at 512 (the memory search is not part of this benchmark).

The grid runs first; the probe then gets PROBE_SHARE of the grid's training seconds as its time budget
(a fixed number of seconds would be a different share of the grid on a faster or busier machine).

Reported per task: the oracle's best size and time; the recommended size; the ratio oracle time at the
recommended size / oracle best time; time to target when training at the recommended size with the
recommended learning rate; the probe's cost as a fraction of the sweep's; batch 32 and 512 (tuned) as
naive choices.

    .venv/bin/python bench/convergence.py              # full run (~15 min on 2 cores)
    .venv/bin/python bench/convergence.py --quick      # fewer sizes and runs, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models import get_model, make_config  # noqa: E402
from service.probing import data, races, recipe  # noqa: E402
from service.probing.memory import cpu_model_name  # noqa: E402
from service.probing.throughput import throughput_ladder  # noqa: E402

SIZES = [8, 16, 32, 64, 128, 256, 512]  # the sweep the probe's cost is compared with
# Sizes the recipe may also recommend: tuned and timed like the sweep's (so any answer is scored on a
# measurement, and the oracle's best is the best of all of them) but not counted in the sweep's cost.
HALF_OCTAVES = [24, 48, 96, 192, 384]
QUICK_SIZES = [16, 64, 256]
MAX_FEASIBLE = 512  # stands in for the memory search's answer (see module docstring)
REFERENCE_BATCH = 32
LADDER_SHARE = 0.4  # of the probe's budget for the throughput ladder, as engine.THROUGHPUT_TIME_SHARE
# The probe's time budget: this share of what the oracle's grid cost in the same run. A fixed number of
# seconds would be a different share on a faster or busier machine (the gpt's grid: 72-117 s in one day).
PROBE_SHARE = 0.09
REPEAT_SEEDS = 3  # extra minibatch orders for each finalist lr (the oracle's steps: the mean of 1 + these)
FINALISTS = 2  # the grid's best lrs re-run with those orders; the one with the lowest mean wins


def probe_ladder() -> list[int]:
    """The sizes the probe's throughput ladder times: the engine's ladder, from the sweep's smallest."""
    return [b for b in throughput_ladder(MAX_FEASIBLE) if b >= SIZES[0]]


@dataclass(frozen=True)
class Task:
    name: str
    model: str
    config: dict[str, Any]
    optimizer: str  # "sgd" (momentum 0.9) or "adamw"
    reference_lr: float  # what a client would send: a conventional lr at batch 32, not tuned here
    target_loss: float  # on a fixed 512-example subset of the training data (training loss)
    max_run_steps: int
    description: str = ""
    refine_lr: bool = True  # after the x2 grid, try the best lr x/÷ sqrt(2)
    extra: dict[str, Any] = field(default_factory=dict)


TASKS = {
    t.name: t
    for t in (
        Task(
            "mlp-digits", "mlp", {"hidden_dims": [128, 128]}, "sgd", 0.05, 0.05, 2000,
            "MLP 64-128-128-10 on sklearn digits (1797 examples), SGD momentum 0.9",
        ),
        Task(
            "cnn-digits", "resnet", {"depth": 18, "width": 4, "image_size": 8, "in_channels": 1}, "sgd",
            0.05, 0.1, 1200,
            "zoo ResNet-18 at width 4 (channels 4-32, 45k params) on digits 8x8x1, SGD momentum 0.9",
        ),
        Task(
            "gpt-text", "gpt", {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "adamw",
            3e-3, 2.45, 1500,
            "zoo GPT, 1 layer, 32-dim, 16-byte context (21k params) on 600 KB of Python stdlib source, AdamW",
            refine_lr=False,
        ),
    )
}  # fmt: skip


# ------------------------------------------------------------------------------------------ setup


class Setup:
    """A task's model spec, data, fixed evaluation subset and initial weights (deterministic per task)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.spec = get_model(task.model)
        self.config = make_config(self.spec, task.config)
        shape = self.spec.input_shape(self.config)
        sample = data.builtin_sample(shape, self.spec.input_dtype, self.spec.num_classes(self.config))
        assert sample is not None, f"no built-in sample fits {task.name}"
        self.sample = sample
        generator = torch.Generator().manual_seed(0)
        self.eval_idx = torch.randperm(len(sample), generator=generator)[:512]
        torch.manual_seed(0)
        model = self.spec.build(self.config, False)
        self.init_state = copy.deepcopy(model.state_dict())
        self.make_optimizer(list(model.parameters()), 0.1)  # the first optimizer imports torch._dynamo (~8 s)

    def fresh_model(self) -> torch.nn.Module:
        model = self.spec.build(self.config, False)
        model.load_state_dict(self.init_state)
        return model

    def make_optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.task.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr)


_SETUPS: dict[str, Setup] = {}


def _setup(name: str) -> Setup:
    if name not in _SETUPS:
        _SETUPS[name] = Setup(TASKS[name])
    return _SETUPS[name]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- oracle


def run_to_target(
    task_name: str, batch_size: int, lr: float, max_steps: int, seed: int = 0
) -> dict[str, Any]:
    """Train from the initial weights until the evaluation loss reaches the target; steps interpolated.

    `seed` picks the order minibatches are drawn in (the initial weights are always the task's).
    """
    s = _setup(task_name)
    model = s.fresh_model()
    opt = s.make_optimizer(list(model.parameters()), lr)
    x, y = s.sample.x, s.sample.y
    race = races.train_race(
        model, s.spec.loss, opt, x, y, x[s.eval_idx], y[s.eval_idx],
        batch_size=batch_size, max_seconds=math.inf, stop_below=s.task.target_loss, max_steps=max_steps,
        seed=seed, eval_growth=1.04,  # the oracle evaluates densely: its steps are the yardstick
    )  # fmt: skip
    steps = races.steps_to_level(race["curve"], s.task.target_loss) if race["status"] == "reached" else None
    return {"lr": lr, "steps": steps, "status": race["status"], "train_seconds": race["train_seconds"]}


def tune_size(task_name: str, batch_size: int, refine: bool, max_runs: int = 8) -> dict[str, Any]:
    """Steps to target at the best learning rate on the grid reference_lr·2^k (k integer; then k ± 1/2).

    Starts at the square-root-scaled lr, walks towards the better neighbour while it improves. Runs
    after the first are capped at 1.5x the best steps so far (they cannot win past that).
    """
    task = TASKS[task_name]
    runs: dict[float, dict[str, Any]] = {}

    def run(k: float) -> float:
        if k not in runs:
            best = min((r["steps"] for r in runs.values() if r["steps"]), default=None)
            cap = task.max_run_steps if best is None else min(task.max_run_steps, math.ceil(1.5 * best) + 5)
            runs[k] = run_to_target(task_name, batch_size, task.reference_lr * 2**k, cap)
        return runs[k]["steps"] or math.inf

    k0 = round(0.5 * math.log2(batch_size / REFERENCE_BATCH))
    for k in (k0, k0 + 1, k0 - 1):
        run(k)
    while len(runs) < max_runs:
        best_k = min(runs, key=lambda k: run(k))
        lower, upper = math.floor(min(runs)), math.ceil(max(runs))
        if best_k == upper and run(best_k) < math.inf:
            run(upper + 1)
        elif best_k == lower and run(best_k) < math.inf:
            run(lower - 1)
        elif all(r["steps"] is None for r in runs.values()):
            run(lower - 1)  # nothing reached the target: try smaller learning rates
        else:
            break
    if refine:
        best_k = min(runs, key=lambda k: run(k))
        run(best_k + 0.5)
        run(best_k - 0.5)
    # The grid's minimum is partly a lucky draw: re-run its best lrs with fresh minibatch orders and keep
    # the lowest mean, so one fortunate run can neither pick the lr nor make a size look best.
    finalists = sorted((k for k in runs if runs[k]["steps"]), key=lambda k: runs[k]["steps"])[:FINALISTS]
    per_order: dict[float, list[float | None]] = {}
    repeats: list[dict[str, Any]] = []
    for k in finalists:
        more = [
            run_to_target(task_name, batch_size, task.reference_lr * 2**k, task.max_run_steps, seed=seed)
            for seed in range(1, 1 + REPEAT_SEEDS)
        ]
        repeats += more
        per_order[k] = [runs[k]["steps"], *(r["steps"] for r in more)]

    def mean_steps(k: float) -> float:
        steps = per_order[k]
        return math.inf if None in steps else statistics.mean(v for v in steps if v is not None)

    best_k = min(per_order, key=mean_steps) if per_order else min(runs)
    reached = best_k in per_order and mean_steps(best_k) < math.inf
    return {
        "batch_size": batch_size,
        "best_lr": task.reference_lr * 2**best_k if reached else None,
        "best_steps": mean_steps(best_k) if reached else None,
        "best_steps_per_seed": per_order.get(best_k, [None]),
        "finalists": {task.reference_lr * 2**k: per_order[k] for k in per_order},
        "runs": [runs[k] for k in sorted(runs)],
        "sweep_seconds": sum(r["train_seconds"] for r in runs.values()),
        "repeat_seconds": sum(r["train_seconds"] for r in repeats),
    }


def measure_step_times(
    setup: Setup, sizes: list[int], rounds: int, min_seconds: float
) -> dict[int, list[float]]:
    """Seconds per training step at each size, one median per round: rounds interleave the sizes, each
    times >= 3 steps and >= `min_seconds`."""
    model = setup.fresh_model()
    opt = setup.make_optimizer(list(model.parameters()), 1e-6)  # compute does not depend on the lr
    x, y = setup.sample.x, setup.sample.y
    generator = torch.Generator().manual_seed(1)
    per_size: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for b in sizes:
            times: list[float] = []
            started = time.perf_counter()
            for i in range(1000):
                t0 = time.perf_counter()
                idx = torch.randint(0, len(x), (b,), generator=generator)
                opt.zero_grad(set_to_none=True)
                setup.spec.loss(model(x[idx]), y[idx]).backward()
                opt.step()
                if i >= 1:  # the first step of a round warms caches up
                    times.append(time.perf_counter() - t0)
                if len(times) >= 3 and time.perf_counter() - started > min_seconds:
                    break
            per_size[b].append(statistics.median(times))
    return per_size


# ------------------------------------------------------------------------------------------ probe


class _Adapter:
    """throughput.measure_throughput's `Trainable` over the task's real data."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.model = setup.fresh_model()
        self.opt = setup.make_optimizer(list(self.model.parameters()), 1e-6)
        self.generator = torch.Generator().manual_seed(2)

    def make_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.setup.sample), (batch_size,), generator=self.generator)
        return self.setup.sample.x[idx], self.setup.sample.y[idx]

    def train_on(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.setup.spec.loss(self.model(inputs), targets).backward()
        self.opt.step()

    def synchronize(self) -> None:
        pass


def measure_ladder(setup: Setup, sizes: list[int], budget_s: float) -> tuple[list[dict[str, Any]], str]:
    """The throughput ladder, with the service's own code when it is importable."""
    try:
        from service.probing.throughput import measure_throughput
    except ImportError:
        measure_throughput = None
    adapter = _Adapter(setup)
    if measure_throughput is not None:
        points = measure_throughput(adapter, sizes, time_budget_s=budget_s)
        return [p for p in points if p.get("samples_per_second")], "service.probing.throughput"
    points = []
    for b in sizes:
        inputs, targets = adapter.make_batch(b)
        adapter.train_on(inputs, targets)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            adapter.train_on(inputs, targets)
            times.append(time.perf_counter() - t0)
        points.append({"batch_size": b, "samples_per_second": b / statistics.median(times)})
    return points, "bench timing loop"


def run_probe(setup: Setup, sizes: list[int], budget_s: float) -> dict[str, Any]:
    """What the service's probe does for this task (minus the memory search), timed."""
    task = setup.task
    started = time.monotonic()
    ladder, ladder_source = measure_ladder(setup, sizes, LADDER_SHARE * budget_s)
    ladder_s = time.monotonic() - started
    stats = races.run_statistics(
        setup.fresh_model(), setup.spec.loss, setup.make_optimizer, setup.sample.x, setup.sample.y,
        optimizer=task.optimizer, learning_rate=task.reference_lr, reference_batch_size=REFERENCE_BATCH,
        max_batch_size=MAX_FEASIBLE, time_budget_s=budget_s - ladder_s, measured_on=setup.sample.measured_on,
    )  # fmt: skip
    rec = recipe.recommend(
        throughput=ladder, max_feasible_batch_size=MAX_FEASIBLE, dataset_size=len(setup.sample),
        optimizer=task.optimizer, learning_rate=task.reference_lr, reference_batch_size=REFERENCE_BATCH,
        gradient_noise_scale=stats["gradient_noise_scale"], races=stats["races"],
        cut_short=stats["cut_short"],
    )  # fmt: skip
    return {
        "seconds": time.monotonic() - started,
        "ladder_seconds": ladder_s,
        "ladder_source": ladder_source,
        "throughput": [{k: p[k] for k in ("batch_size", "samples_per_second")} for p in ladder],
        "recipe": rec,
        "stats": stats,
    }


# ------------------------------------------------------------------------------------------- main


def bench_task(name: str, args: argparse.Namespace, pool: ProcessPoolExecutor) -> dict[str, Any]:
    setup = _setup(name)
    task = setup.task
    sizes = QUICK_SIZES if args.quick else SIZES
    refine = task.refine_lr and not args.quick
    print(f"\n== {name}: {task.description}; target loss {task.target_loss}", flush=True)
    # The oracle's grid first: the probe's budget is a share of what it cost.
    started = time.monotonic()
    extra_sizes = [] if args.quick else HALF_OCTAVES
    futures = {b: pool.submit(tune_size, name, b, refine) for b in sorted(sizes + extra_sizes)}
    tuned = {b: f.result() for b, f in futures.items()}
    sweep_wall = time.monotonic() - started
    sweep_cost = sum(tuned[b]["sweep_seconds"] for b in sizes)
    budget = PROBE_SHARE * sweep_cost * (0.5 if args.quick else 1.0)
    probe = run_probe(setup, QUICK_SIZES if args.quick else probe_ladder(), budget)  # alone: the pool is idle
    rec = probe["recipe"]
    b_rec, lr_rec = rec["recommended_batch_size"], rec["learning_rate"]
    print(
        f"probe {probe['seconds']:.1f}s of {budget:.1f}s: "
        f"B_simple={_fmt(rec['gradient_noise_scale']['value'])} "
        f"races={_fmt((rec['races'] or {}).get('value'))} ({(rec['races'] or {}).get('status')}) "
        f"-> B={b_rec} lr={lr_rec:.3g} [{rec['noise_scale_source']}, {rec['confidence']}]",
        flush=True,
    )
    timing_sizes = sorted(set(tuned) | {b_rec})
    rounds = measure_step_times(setup, timing_sizes, rounds=args.rounds, min_seconds=0.2)
    # The recommended size when the grid did not cover it (a half-octave), and its recommended lr.
    extra = {b: pool.submit(tune_size, name, b, refine) for b in timing_sizes if b not in tuned}
    rec_futures = [
        pool.submit(run_to_target, name, b_rec, lr_rec, task.max_run_steps, seed=seed)
        for seed in range(1 + REPEAT_SEEDS)
    ]
    tuned.update({b: f.result() for b, f in extra.items()})
    rec_runs = [f.result() for f in rec_futures]
    rec_steps = [r["steps"] for r in rec_runs]
    rec_run = {
        "lr": lr_rec,
        "steps": statistics.mean(rec_steps) if None not in rec_steps else None,
        "steps_per_seed": rec_steps,
        "status": [r["status"] for r in rec_runs],
    }
    # Time again now the sweep is done. Each size's step time is its fastest round of both passes: a busy
    # spell of the shared host only ever adds time, and it would land on some sizes and not others.
    after = measure_step_times(setup, timing_sizes, rounds=args.rounds, min_seconds=0.2)
    spread = {
        b: max(statistics.median(rounds[b]), statistics.median(after[b]))
        / min(statistics.median(rounds[b]), statistics.median(after[b]))
        for b in timing_sizes
    }
    step_s = {b: min(rounds[b] + after[b]) for b in timing_sizes}
    # Diagnostic: the same statistics with the bench's interleaved step times instead of the probe's ladder.
    bench_ladder = [{"batch_size": b, "samples_per_second": b / step_s[b]} for b in timing_sizes]
    stats_only = recipe.recommend(
        throughput=bench_ladder, max_feasible_batch_size=MAX_FEASIBLE, dataset_size=len(setup.sample),
        optimizer=task.optimizer, learning_rate=task.reference_lr, reference_batch_size=REFERENCE_BATCH,
        gradient_noise_scale=probe["stats"]["gradient_noise_scale"], races=probe["stats"]["races"],
    )  # fmt: skip
    times = {b: (t["best_steps"] * step_s[b] if t["best_steps"] else math.inf) for b, t in tuned.items()}
    sweep_sizes = [b for b in sizes]
    best = min(times, key=lambda b: times[b])  # of every size timed: half-octaves too
    rec_time = rec_run["steps"] * step_s[b_rec] if rec_run["steps"] else math.inf
    # What the oracle's own steps say B_noise is at the target (same S(B) fit as the races).
    reached = [b for b in tuned if tuned[b]["best_steps"]]
    oracle_fit = races.fit_steps(reached, [tuned[b]["best_steps"] for b in reached])
    result = {
        "task": asdict(task),
        "measured_on": setup.sample.measured_on,
        "sample": setup.sample.description,
        "step_seconds": step_s,
        "step_seconds_pass_spread": spread,
        "recommended_batch_size_bench_ladder": stats_only["recommended_batch_size"],
        "oracle": {b: {**tuned[b], "time_to_target_s": times[b]} for b in timing_sizes},
        "oracle_best_batch_size": best,
        "oracle_b_noise_fit": oracle_fit,
        "oracle_best_time_s": times[best],
        "recommended_batch_size": b_rec,
        "recommended_lr": lr_rec,
        "ratio": times[b_rec] / times[best],
        "recommended_run": {**rec_run, "time_to_target_s": rec_time, "ratio": rec_time / times[best]},
        "probe_budget_s": budget,
        "probe_seconds": probe["seconds"],
        "sweep_seconds": sweep_cost,
        "repeat_seconds": sum(tuned[b]["repeat_seconds"] for b in sweep_sizes),
        "sweep_wall_seconds": sweep_wall,
        "probe_fraction": probe["seconds"] / sweep_cost,
        "naive": {str(b): times[b] / times[best] for b in (32, MAX_FEASIBLE) if b in times},
        "probe": probe,
    }
    for b in timing_sizes:
        t = tuned[b]
        print(
            f"  B={b:4d} lr*={_fmt(t['best_lr'])} steps={_fmt(t['best_steps'])} step={step_s[b] * 1e3:.2f}ms "
            f"time={times[b]:.2f}s runs={len(t['runs'])}",
            flush=True,
        )
    print(
        f"  oracle best B={best} {times[best]:.2f}s | rec B={b_rec}: ratio {result['ratio']:.2f}, "
        f"with rec lr {rec_time:.2f}s ({result['recommended_run']['ratio']:.2f}x) | probe "
        f"{probe['seconds']:.1f}s = {result['probe_fraction']:.1%} of sweep {sweep_cost:.0f}s",
        flush=True,
    )
    return result


def repeat_probes(args: argparse.Namespace) -> None:
    """The probe's run-to-run spread: its answers, scored against a stored oracle, and its cost."""
    stored = json.loads(Path(args.out).with_suffix(".json").read_text())
    print(f"oracle from {stored['meta']['date']} ({args.out}.json)")
    for result in stored["tasks"]:
        name = result["task"]["name"]
        if name not in args.tasks.split(","):
            continue
        times = {int(b): o["time_to_target_s"] for b, o in result["oracle"].items()}
        setup = _setup(name)
        for _ in range(args.probe_repeats):
            probe = run_probe(setup, probe_ladder(), PROBE_SHARE * result["sweep_seconds"])
            rec = probe["recipe"]
            b = rec["recommended_batch_size"]
            cost = probe["seconds"] / result["sweep_seconds"]
            ratio = _interpolated_time(times, b) / result["oracle_best_time_s"]  # as in the full run
            print(
                f"{name}: probe {probe['seconds']:.1f} s ({cost:.1%} of the stored sweep) "
                f"B_simple={_fmt(rec['gradient_noise_scale']['value'])} "
                f"races={_fmt((rec['races'] or {}).get('value'))} -> B_noise={_fmt(rec['b_noise'])} "
                f"({rec['noise_scale_source']}) B={b}: ratio {ratio:.2f}",
                flush=True,
            )


def _interpolated_time(times: dict[int, float], batch_size: int) -> float:
    """Oracle time at `batch_size`: measured, else log-log between the nearest timed sizes."""
    if batch_size in times:
        return times[batch_size]
    lo = max((b for b in times if b < batch_size), default=min(times))
    hi = min((b for b in times if b > batch_size), default=max(times))
    if lo == hi:
        return times[lo]
    frac = math.log(batch_size / lo) / math.log(hi / lo)
    return math.exp((1 - frac) * math.log(times[lo]) + frac * math.log(times[hi]))


def _scored(result: dict[str, Any], batch_size: int) -> str:
    """`B (ratio)`, the ratio marked ~ when interpolated between timed sizes."""
    times = {int(b): o["time_to_target_s"] for b, o in result["oracle"].items()}
    ratio = _interpolated_time(times, batch_size) / result["oracle_best_time_s"]
    return f"{batch_size} ({'' if batch_size in times else '~'}{ratio:.2f})"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path, seconds: float) -> None:
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model_name(),
        "cores": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_process": args.threads,
        "workers": args.workers,
        "command": "python " + " ".join(sys.argv),
        "total_seconds": seconds,
        "quick": args.quick,
        "load_average_at_end": [round(v, 2) for v in __import__("os").getloadavg()],
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=1, default=str))
    lines = [
        "# Convergence benchmark",
        "",
        f"- date: {meta['date']}; machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, "
        f"Python {meta['python']}",
        f"- command: `{meta['command']}` ({seconds / 60:.1f} min)",
        f"- torch.set_num_threads({args.threads}) in every process; the sweep's runs in {args.workers} "
        "worker processes (steps to target do not depend on timing); step times measured while no other "
        "bench process runs, in two passes (after the probe, and after the recommended lr's runs), each "
        f"interleaving the sizes over {args.rounds} rounds; a size's step time is its fastest round (a busy "
        "spell of the shared host only adds time)",
        "- time to target = steps to target (interpolated between evaluations every ~4 % of steps) x step "
        "time; the target is a loss on a fixed 512-example subset of the training data; the oracle's best "
        "is the fastest of every size timed, half-octaves (24, 48, 96, 192, 384) included; the sweep whose "
        "cost the probe is compared with is the powers of two 8..512",
        f"- steps to target at a size: the grid (one minibatch order per lr) picks {FINALISTS} finalist lrs; "
        f"each is re-run with {REPEAT_SEEDS} more orders, and the lower mean over {1 + REPEAT_SEEDS} orders "
        "is the size's steps to target (its lr: the tuned lr); the recommended size with its recommended lr "
        "likewise over the same orders. "
        "The sweep cost the probe is compared with is the grid's alone (one order): the repeats only make "
        "the oracle's answer more precise",
        f"- maximum feasible batch size fixed at {MAX_FEASIBLE} (the memory search is not part of this "
        "benchmark); data: the service's built-in samples",
        f"- the probe's time budget is {PROBE_SHARE:.0%} of the grid's training seconds in the same run: the "
        "grid runs first, then the probe alone (what it then spends, evaluations included, is the cost "
        "reported)",
        "",
        "| task | oracle best B | oracle best time | recommended B (lr) | ratio "
        "| time at rec. B with rec. lr "
        "| probe cost / sweep | B=32 | B=512 | B_simple | races B_noise | source, confidence "
        "| B_noise, oracle fit | rec. B, bench ladder |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rec = r["probe"]["recipe"]
        race = rec["races"] or {}
        fit = r["oracle_b_noise_fit"]
        lines.append(
            f"| {r['task']['name']} | {r['oracle_best_batch_size']} | {r['oracle_best_time_s']:.2f} s | "
            f"{r['recommended_batch_size']} ({r['recommended_lr']:.3g}) | {r['ratio']:.2f} | "
            f"{r['recommended_run']['time_to_target_s']:.2f} s ({r['recommended_run']['ratio']:.2f}x) | "
            f"{r['probe_seconds']:.1f} s / {r['sweep_seconds']:.0f} s = {r['probe_fraction']:.1%} | "
            f"{r['naive'].get('32', math.nan):.2f} | {r['naive'].get(str(MAX_FEASIBLE), math.nan):.2f} | "
            f"{_fmt(rec['gradient_noise_scale']['value'])} | "
            f"{_fmt(race.get('value'))} ({race.get('status')}) | "
            f"{rec['noise_scale_source']}, {rec['confidence']} | {_fmt(fit.get('value'))} "
            f"(rms {fit.get('rel_rms', math.nan):.2f}) | "
            f"{_scored(r, r['recommended_batch_size_bench_ladder'])} |"
        )
    lines += [
        "",
        "Ratios are oracle time at that size / oracle best time (learning rate tuned per size). B=32 and "
        "B=512 are the naive choices (a common default, and the largest size). The last column re-runs the "
        "recipe on the same noise estimates with the bench's interleaved step times instead of the probe's "
        "own throughput ladder (in brackets: its ratio), separating statistics errors from timing noise. "
        '"B_noise, oracle fit" fits S(B) = S_min(1 + B_noise/B) to the oracle\'s tuned steps to target '
        "(rms: relative residual): the value the probe's estimates should approach.",
        "",
        f"Load average (1, 5, 15 min) at the end: {meta['load_average_at_end']} on {meta['cores']} cores: "
        "other jobs shared the machine, so absolute times are inflated and timings noisy (steps to target "
        "are not affected).",
        "",
    ]
    for r in results:
        lines += [f"## {r['task']['name']}", "", r["task"]["description"] + f"; {r['sample']}.", ""]
        lines += [
            "| B | tuned lr | steps to target (per order) | step time | time to target | grid runs |",
            "|---|---|---|---|---|---|",
        ]
        for b, o in sorted(r["oracle"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {b} | {_fmt(o['best_lr'])} | {_fmt(o['best_steps'])} "
                f"({', '.join(_fmt(v) for v in o.get('best_steps_per_seed', []))}) | "
                f"{r['step_seconds'][b] * 1e3:.2f} ms | {o['time_to_target_s']:.2f} s | {len(o['runs'])} |"
            )
        rec = r["probe"]["recipe"]
        gns, race = rec["gradient_noise_scale"], rec["races"] or {}
        raced = ", ".join(
            f"B={x['batch_size']} (lr {x['learning_rate']:.3g}): {_fmt(x.get('steps_to_level'))} steps"
            for x in race.get("races", [])
            if x.get("learning_rate") is not None
        )
        spread = r["step_seconds_pass_spread"].values()
        lines += [
            "",
            f"Step time, slower pass / faster pass (median rounds): {min(spread):.2f}-{max(spread):.2f}x.",
            "",
            f"Probe ({r['probe_seconds']:.1f} s, ladder from {r['probe']['ladder_source']}): B_simple "
            f"{_fmt(gns['value'])} [{_fmt(gns['low'])}, {_fmt(gns['high'])}] from {gns.get('draws')} draws "
            f"(b_small {gns.get('b_small')}, b_big {gns.get('b_big')}, "
            f"preconditioned: {gns.get('preconditioned')}); races to loss {_fmt(race.get('level'))}: "
            f"{raced or 'none'} -> B_noise {_fmt(race.get('value'))} "
            f"({race.get('status')}, rms {_fmt(race.get('rel_rms'))}).",
            "",
            f"Recipe warnings: {'; '.join(rec['warnings']) or 'none'}",
            "",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 sizes, no lr refinement, half probe budget")
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS)
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=2, help="processes for the sweep's runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved step-timing rounds")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "convergence"))
    parser.add_argument(
        "--probe-repeats", type=int, metavar="N",
        help="only re-run the probe N times per task and score each answer against the oracle stored in "
        "--out's .json (sizes the oracle did not time are interpolated log-log between its neighbours)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_repeats:
        repeat_probes(args)
        return
    started = time.monotonic()
    results = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args.threads,)) as pool:  # fmt: skip
        for name in args.tasks.split(","):
            results.append(bench_task(name.strip(), args, pool))
    seconds = time.monotonic() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, args, out, seconds)
    print(f"\nwrote {out.with_suffix('.md')} and .json in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()

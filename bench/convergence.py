"""Generalisation suite: does the probe's recommended batch size hold on training jobs it was not tuned on?

A hundred and eight small tasks in three groups, fixed in bench/convergence_tasks.py: the TUNING half is
the one the method's constants (service/probing/horizon.py, races.py, recipe.py) were first set on; SEEN are
seventeen earlier held-out halves, each scored once and then read before the method's later changes (so no
longer held out); the HELD-OUT half (six tasks, two data sets no other task uses) is defined and swept
before it is scored, once, with the method fixed (each half's comment in convergence_tasks.py says what
changed in the method around it). Together they cover plain SGD, SGD with momentum (and Nesterov, weight
decay), Adam and AdamW with beta1 0.8 to 0.9, beta2 0.95 to 0.999 and weight decay, dropout, label noise,
imbalanced classes, MSE and Huber regression, multi-label classification (binary cross-entropy), CNNs
with and without BatchNorm, a character-level language model and a model that goes through a torch.export
archive (`.pt2`, loaded by service/probing/exported.py as an upload would be). The oracle sweeps the
committed report was scored on are stored under docs/benchmarks/convergence_sweeps/ (`--rescore` reads
them).

Each task has two depths. A reference run (batch 32, the client's learning rate) fixes them: the
SHALLOW target is its training loss at ref_steps/5 steps (ref_steps/8 in sweeps stored before the fifth
held-out half), the DEEP target its loss at ref_steps (so the deep target takes the reference 5x (8x) the
shallow one's steps). The loss is measured on a fixed
256-example subset of the training data.

ORACLE: for every size of the task's sweep, the learning rate is tuned on the grid lr_rule(B)·2^k
(linear scaling for SGD, square root for Adam-family, from the reference), walking k on while either
depth's best lr is at the walk's edge (at most MAX_GRID_RUNS runs; `--deepen-grid` walks stored sweeps
on); every run goes to the deep target and records the steps to both targets, so one grid serves both
depths (with `--orders N`, each depth's best lr is re-run with N-1 more minibatch orders and the mean
is the size's steps). Time to target = steps x step time, the step time measured after the task's
sweep in interleaved rounds (each size's fastest round); `--time-sweeps` stores step times in the sweep
files, which `--rescore` then uses, so that methods are compared on one yardstick. A recommended size
between two swept sizes (a half-octave) is scored log-log between them (marked ~); one outside the sweep
gets the nearest swept size's time (marked *, not measured) until `--extend-sweep` tunes it into the
stored sweep and `--reuse-answers` scores the same answers again.

PROBE: what the service runs, minus the memory search (maximum feasible = the sweep's largest size): the
throughput ladder (service.probing.throughput), the statistics phase (races.run_statistics: warm-up and
noise trajectory, gradient noise scale, races with a held-out part) and, per depth, the recipe for that
horizon: horizon.carry with `epochs` = the epochs the reference run needed to reach that depth (what a
client who trains at batch 32 would state), recipe.recommend(horizon=...), horizon.attach. The probe's
time budget is PROBE_SHARE of the sweep's training seconds in the same run; its cost counts the ladder
and the statistics (once per task: both depths share it). A task's probe, step timing and check runs
happen in the main process as soon as its sweep is done, while the pool sweeps the next tasks.

`--without-knee` also scores each probe's answer chosen without the step-time knee (service/probing/
horizon.py: KNEE_WEIGHT 0, the interval calibrated as it was before it), on the same probes. With
`--probe-runs N` each task is probed N times on the same sweep and yardstick, and the report says how far
the answer moves between runs; `--probe-shares` probes each run at several budgets, interleaved.

Per task and depth: the oracle's best size and time, the recommended size, ratio = oracle time at the
recommended size / best time, the stated 80 % interval for that ratio and whether it held, the probe's
cost as % of the sweep, and whether training at the recommended size with the recommended learning rate
diverges (one run to the deep target). That run also scores the recipe as a client runs it: its time to
target over the oracle's best and over the client's own run (batch 32 at its lr); `--without-fast-races`
scores it also with the lr's stability evidence as it was before `too_fast` races counted.

    .venv/bin/python bench/convergence.py                    # the suite (~40 min on 2 busy shared cores)
    .venv/bin/python bench/convergence.py --tasks digits-mlp-sgd --quick   # smoke test
    .venv/bin/python bench/convergence.py --halves held_out --sweep-only --out /tmp/sweep  # sweep only
    .venv/bin/python bench/convergence.py --rescore /tmp/a.json,/tmp/sweep.json   # probes on stored sweeps
    .venv/bin/python bench/convergence.py --rescore /tmp/sweep.json --time-sweeps --rounds 12  # step times
    .venv/bin/python bench/convergence.py --rescore /tmp/sweep.json --without-knee --probe-runs 3  # ablation
    .venv/bin/python bench/convergence.py --rescore /tmp/a.json --probe-runs 2 --probe-shares 0.04,0.08,0.16
    .venv/bin/python bench/convergence.py --rescore /tmp/sweep.json --extend-sweep NAME:8 --orders 4
    .venv/bin/python bench/convergence.py --rescore /tmp/sweep.json --reuse-answers /tmp/report.json
    .venv/bin/python bench/convergence.py --rescore /tmp/sweep.json --deepen-grid --orders 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from service.probing import horizon, races, recipe  # noqa: E402
from service.probing.memory import cpu_model_name  # noqa: E402
from service.probing.spec import SGD_DEFAULT_MOMENTUM  # noqa: E402
from service.probing.throughput import measure_throughput, throughput_ladder  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from convergence_tasks import HALVES, TASKS, Setup, Task, export_mlp  # noqa: E402

REFERENCE_BATCH = 32
# The shallow target: the reference run's loss at this fraction of its steps. 1/5, the least the deep/
# shallow ratio may be; sweeps stored before the fifth held-out half used 1/8, where the best size often
# reached the target in 3-8 steps (one step then moves a ratio by a fifth). Each stored reference run
# keeps its `target_steps`.
SHALLOW_FRACTION = 1 / 5
LADDER_SHARE = 0.4  # of the probe's budget for the throughput ladder, as engine.THROUGHPUT_TIME_SHARE
PROBE_SHARE = 0.08  # the probe's budget: this share of the sweep's training seconds in the same run
# The lr walk's runs per size. The sweeps of the halves up to the eleventh were first run with at most 4
# (k = 0, 1, -1, 2): the best lr sat at the walk's top on 524 of 756 size-depths, where doubling it had
# still cut the steps by a median 0.66x, so the oracle's best was not the best. `--deepen-grid` walked
# them on (each task's `deepened` records how).
MAX_GRID_RUNS = 10
# `--without-knee`: each probe's answer also without the step-time knee (horizon.KNEE_WEIGHT 0), with the
# interval calibration the method had before it.
PRE_KNEE_CALIBRATION = 2.06
# Minibatch orders for each depth's best lr (the mean over orders is the size's steps): `--orders N`
# (`--repeats` = 2). One by default: on 2 cores shared with other jobs the suite must fit in under an hour.
ORDERS = 1
# Step times (the oracle's and the probe's ladder) are this thread's CPU time: on a host oversubscribed
# ~10x by other jobs, wall time measures the scheduler (a 3 ms step spans ~30 ms of wall time, a 0.5 ms
# one often none), not the step. With one torch thread, CPU time is what a dedicated core would take.
CLOCK = time.thread_time


_ARCHIVES: dict[str, str] = {}


def _remove_archives() -> None:
    for archive in _ARCHIVES.values():
        Path(archive).unlink(missing_ok=True)


def _archive_path(task: Task) -> Path:
    return Path(tempfile.gettempdir()) / f"bench-convergence-{task.name}-{os.getpid()}.pt2"


def _export_archives(names: list[str]) -> None:
    """The `.pt2` upload of each exported-model task among `names` (once per process)."""
    for name in names:
        if TASKS[name].model == "exported_mlp" and name not in _ARCHIVES:
            archive = _archive_path(TASKS[name])
            export_mlp([64, *TASKS[name].hidden, 10], archive)
            _ARCHIVES[name] = str(archive)


@functools.cache
def _setup(name: str) -> Setup:
    return Setup(TASKS[name], _ARCHIVES.get(name))


def _init_worker(threads: int, archives: dict[str, str], orders: int) -> None:
    global ORDERS
    torch.set_num_threads(threads)
    _ARCHIVES.update(archives)
    ORDERS = orders


# ----------------------------------------------------------------------------------------- oracle


def _sweep_pool(args: argparse.Namespace) -> ProcessPoolExecutor:
    """The processes that run the oracle's training runs (spawned: each imports torch afresh)."""
    return ProcessPoolExecutor(
        args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
        initargs=(args.threads, dict(_ARCHIVES), args.orders),
    )  # fmt: skip


def run_to_targets(
    name: str, batch_size: int, lr: float, targets: list[float], max_steps: int, seed: int = 0
) -> dict[str, Any]:
    """Train from the initial weights until the evaluation loss reaches the last (deepest) target; the
    steps to each target are interpolated between evaluations (None when not reached)."""
    s = _setup(name)
    model = s.fresh_model()
    opt = s.make_optimizer(list(model.parameters()), lr)
    race = races.train_race(
        model, s.loss, opt, s.x, s.y, s.x[s.eval_idx], s.y[s.eval_idx],
        batch_size=batch_size, max_seconds=math.inf, stop_below=min(targets), max_steps=max_steps,
        seed=seed, eval_growth=1.06,  # dense evaluations: the oracle's steps are the yardstick
    )  # fmt: skip
    steps = [races.steps_to_level(race["curve"], t) for t in targets]
    if race["status"] == "diverged":
        steps = [None for _ in targets]
    return {
        "lr": lr, "steps": steps, "status": race["status"], "train_seconds": race["train_seconds"],
        "curve": race["curve"] if batch_size == REFERENCE_BATCH and seed == -1 else None,
    }  # fmt: skip


def reference_run(name: str) -> dict[str, Any]:
    """The reference run (batch 32, the client's lr) that fixes the two depths."""
    task = TASKS[name]
    s = _setup(name)
    model = s.fresh_model()
    opt = s.make_optimizer(list(model.parameters()), task.reference_lr)
    race = races.train_race(
        model, s.loss, opt, s.x, s.y, s.x[s.eval_idx], s.y[s.eval_idx],
        batch_size=REFERENCE_BATCH, max_seconds=math.inf, max_steps=task.ref_steps, eval_growth=1.06,
    )  # fmt: skip
    shallow_step = max(8, round(task.ref_steps * SHALLOW_FRACTION))
    shallow = races.value_at(race["curve"], shallow_step)
    deep = statistics.mean(v for _, v in race["curve"][-3:])  # smooths one lucky evaluation
    return {
        "status": race["status"], "steps": race["steps"], "targets": [shallow, deep],
        "target_steps": [shallow_step, task.ref_steps], "train_seconds": race["train_seconds"],
    }  # fmt: skip


def _rule_lr(task: Task, batch_size: int) -> float:
    return recipe.scale_learning_rate(task.reference_lr, REFERENCE_BATCH, batch_size, task.optimizer)[0]


def tune_size(
    name: str,
    batch_size: int,
    targets: list[float],
    quick: bool = False,
    stored: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Steps to each target at the best lr on the grid lr_rule(B)·2^k, walking k on while a depth's best
    lr is at the walk's edge (up to MAX_GRID_RUNS runs). `stored`: an earlier result for this size, whose
    runs are kept and whose walk goes on (`--deepen-grid`); a depth whose best lr stays keeps its orders."""
    task = TASKS[name]
    cap = task.ref_steps * (3 if batch_size < REFERENCE_BATCH else 2)
    runs: dict[int, dict[str, Any]] = {}
    for kept in stored["grid"] if stored else []:
        k = round(math.log2(kept["lr"] / _rule_lr(task, batch_size)))
        runs[k] = {**kept, "train_seconds": 0.0}  # counted in the stored sweep_seconds

    def run(k: int, depth: int = -1) -> float:
        """Steps to `depth`'s target at lr_rule·2^k; inf unless the run went on to the deepest one: an
        lr that reaches the shallow target in a few steps and then stalls or diverges trains nobody."""
        if k not in runs:
            best = min((r["steps"][-1] for r in runs.values() if r["steps"][-1]), default=None)
            limit = cap if best is None else min(cap, math.ceil(1.5 * best) + 5)
            runs[k] = run_to_targets(name, batch_size, _rule_lr(task, batch_size) * 2.0**k, targets, limit)
        steps = runs[k]["steps"]
        return steps[depth] if steps[depth] and steps[-1] else math.inf

    for k in (0, 1, -1) if not quick else (0, -1):
        run(k)
    while len(runs) < MAX_GRID_RUNS and not quick:  # on while any depth's best lr is at the walk's edge
        lower, upper = min(runs), max(runs)
        best = [min(runs, key=functools.partial(run, depth=d)) for d in range(len(targets))]
        reached = [run(k, d) < math.inf for d, k in enumerate(best)]
        if any(k == upper and ok for k, ok in zip(best, reached, strict=True)):
            run(upper + 1)
        elif any(k == lower and ok for k, ok in zip(best, reached, strict=True)) or not any(reached):
            run(lower - 1)
        else:
            break
    depths: list[dict[str, Any]] = []
    repeats: dict[int, list[dict[str, Any]]] = {}
    for d in range(len(targets)):
        depths.append({"best_lr": None, "steps": None, "steps_per_order": None})
        # the fastest lr that reaches the target in every minibatch order (one lucky order is not a
        # learning rate to recommend); the further orders of one lr are shared by the depths
        for k in sorted((k for k in runs if run(k, d) < math.inf), key=functools.partial(run, depth=d)):
            if stored and stored["depths"][d]["best_lr"] == runs[k]["lr"] and stored["depths"][d]["steps"]:
                depths[-1] = stored["depths"][d]
                break
            if k not in repeats:
                lr, more = runs[k]["lr"], range(1, ORDERS)
                repeats[k] = [run_to_targets(name, batch_size, lr, targets, cap, seed=i) for i in more]
            orders = [run(k, d)] + [again["steps"][d] for again in repeats[k]]
            if None not in orders:
                depths[-1] = {
                    "best_lr": runs[k]["lr"], "steps_per_order": orders, "steps": statistics.mean(orders),
                    "repeat_seconds": sum(again["train_seconds"] for again in repeats[k]),
                }  # fmt: skip
                break
    seconds = sum(r["train_seconds"] for r in runs.values())
    tuned = {
        "batch_size": batch_size,
        "depths": depths,
        "grid": [{"lr": r["lr"], "steps": r["steps"], "status": r["status"]} for r in runs.values()],
        "sweep_seconds": seconds,
    }
    if stored:  # the probe's budget stays a share of the sweep as first run; the further walk's cost apart
        repeated = sum(r["train_seconds"] for again in repeats.values() for r in again)
        tuned["sweep_seconds"] = stored["sweep_seconds"]
        tuned["deepen_seconds"] = stored.get("deepen_seconds", 0.0) + seconds + repeated
    return tuned


def measure_step_times(setup: Setup, sizes: list[int], rounds: int, min_seconds: float) -> dict[int, float]:
    """Seconds per training step at each size: the fastest of `rounds` interleaved rounds, each the
    median of >= 3 steps and >= `min_seconds` (a busy spell of the shared host only adds time)."""
    model = setup.fresh_model()
    opt = setup.make_optimizer(list(model.parameters()), 1e-6)
    generator = torch.Generator().manual_seed(1)
    per_size: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for b in sizes:
            times: list[float] = []
            started = CLOCK()
            for i in range(1000):
                t0 = CLOCK()
                idx = torch.randint(0, len(setup.x), (b,), generator=generator)
                opt.zero_grad(set_to_none=True)
                setup.loss(model(setup.x[idx]), setup.y[idx]).backward()
                opt.step()
                if i >= 1:
                    times.append(CLOCK() - t0)
                if len(times) >= 3 and CLOCK() - started > min_seconds:
                    break
            per_size[b].append(statistics.median(times))
    return {b: min(v) for b, v in per_size.items()}


# ------------------------------------------------------------------------------------------ probe


class _Adapter:
    """throughput.measure_throughput's `Trainable` over the task's real data."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.model = setup.fresh_model()
        self.opt = setup.make_optimizer(list(self.model.parameters()), 1e-6)
        self.generator = torch.Generator().manual_seed(2)

    def make_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.setup.x), (batch_size,), generator=self.generator)
        return self.setup.x[idx], self.setup.y[idx]

    def train_on(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.setup.loss(self.model(inputs), targets).backward()
        self.opt.step()

    def synchronize(self) -> None:
        pass


@dataclass
class _HorizonSpec:
    """The ProbeSpec fields horizon.carry/attach read."""

    reference_batch_size: int
    dataset_size: int
    epochs: float | None
    target_loss: float | None = None
    device_count: int = 1
    sgd_momentum: float | None = None  # SGD's momentum; None for the Adam family


def run_probe(setup: Setup, budget_s: float) -> dict[str, Any]:
    """The probe's measurements for this task (minus the memory search), timed."""
    task = setup.task
    started = time.monotonic()
    max_size = max(task.sizes)
    ladder_sizes = [b for b in throughput_ladder(max_size) if b >= 8]
    points = measure_throughput(
        _Adapter(setup), ladder_sizes, time_budget_s=LADDER_SHARE * budget_s, clock=CLOCK
    )
    ladder = [p for p in points if p.get("samples_per_second")]
    ladder_s = time.monotonic() - started
    stats = races.run_statistics(
        setup.fresh_model(), setup.loss, setup.make_optimizer, setup.x, setup.y,
        optimizer=task.optimizer, learning_rate=task.reference_lr, reference_batch_size=REFERENCE_BATCH,
        max_batch_size=max_size, time_budget_s=budget_s - ladder_s, measured_on="client",
        min_batch_size=max(8, min(b for b in ladder_sizes)),
    )  # fmt: skip
    seconds = time.monotonic() - started
    return {"seconds": seconds, "ladder_seconds": ladder_s, "ladder": ladder, "stats": stats}


def recommend_for(setup: Setup, probe: dict[str, Any], epochs: float) -> dict[str, Any]:
    """The recipe for a horizon of `epochs` at the reference batch, as the engine assembles it."""
    task = setup.task
    momentum = task.options.get("momentum", SGD_DEFAULT_MOMENTUM) if task.optimizer == "sgd" else None
    spec = _HorizonSpec(REFERENCE_BATCH, len(setup.x), epochs, sgd_momentum=momentum)
    stats, ladder = probe["stats"], probe["ladder"]
    carried = horizon.carry(stats, spec)
    rec = recipe.recommend(
        throughput=ladder, max_feasible_batch_size=max(task.sizes), dataset_size=len(setup.x),
        optimizer=task.optimizer, learning_rate=task.reference_lr, reference_batch_size=REFERENCE_BATCH,
        gradient_noise_scale=stats["gradient_noise_scale"], races=stats["races"],
        cut_short=stats["cut_short"], horizon=carried, sgd_momentum=momentum,
    )  # fmt: skip
    return horizon.attach(
        rec, carried, statistics=stats, spec=spec, throughput=ladder, max_micro_batch=max(task.sizes)
    )


@contextlib.contextmanager
def _knee_off() -> Iterator[None]:
    """The recipe as it chose before the step-time knee: the robust size itself, its bound calibrated
    as it was then."""
    saved = horizon.KNEE_WEIGHT, horizon.INTERVAL_CALIBRATION, horizon.MODEL_SIGMA
    horizon.KNEE_WEIGHT, horizon.INTERVAL_CALIBRATION, horizon.MODEL_SIGMA = 0.0, PRE_KNEE_CALIBRATION, 0.0
    try:
        yield
    finally:
        horizon.KNEE_WEIGHT, horizon.INTERVAL_CALIBRATION, horizon.MODEL_SIGMA = saved


# ------------------------------------------------------------------------------------------ score


def time_at(times: dict[int, float], b: int) -> tuple[float, bool]:
    """Oracle time at `b`: measured, or log-log between the nearest measured sizes (True: interpolated)."""
    if b in times:
        return times[b], False
    sizes = sorted(s for s in times if math.isfinite(times[s]))
    lo = max((s for s in sizes if s < b), default=None)
    hi = min((s for s in sizes if s > b), default=None)
    if lo is None or hi is None:
        nearest = lo if lo is not None else hi
        assert nearest is not None, "no size of the sweep reached the target"
        return times[nearest], True
    f = math.log(b / lo) / math.log(hi / lo)
    return math.exp(math.log(times[lo]) + f * (math.log(times[hi]) - math.log(times[lo]))), True


def _score_without_fast_races(
    setup: Setup, probe: dict[str, Any], depths: list[dict[str, Any]], refs: dict[str, Any],
    step_s: dict[int, float],
) -> None:
    """`--without-fast-races`: each depth's recipe also with the lr's stability evidence as it was before
    `too_fast` races counted (same probe and size; a check run where the lr differs), scored as the
    recipe is, in depth["without_fast_races"]."""
    for d, depth in enumerate(depths):
        with _fast_races_ignored():
            lr = recommend_for(setup, probe, depth["reference_epochs"])["learning_rate"]
        run = depth["recommended_lr_run"]
        if lr != depth["recommended_lr"]:
            size, cap = depth["recommended_batch_size"], setup.task.ref_steps * 3
            run = _check_run(run_to_targets(setup.task.name, size, lr, refs["targets"], cap), d)
        scored = recipe_score({**depth, "recommended_lr_run": run}, step_s, refs["target_steps"][d])
        depth["without_fast_races"] = {"recommended_lr": lr, "recommended_lr_run": run, **scored}


def _check_run(check: dict[str, Any], depth: int) -> dict[str, Any]:
    """A check run (`run_to_targets` at the recipe's size and lr) as a depth's score records it."""
    status = check["status"]
    return {"status": status, "steps": check["steps"][depth], "diverged": status == "diverged"}


@contextlib.contextmanager
def _fast_races_ignored() -> Iterator[None]:
    """The recipe's lr as it was before a race that reached the level in fewer steps than the fit can
    use (`too_fast`) counted as evidence of a stable lr."""
    counted = recipe.stable_learning_rates

    def without(gradient_noise_scale: Any, raced: Any, **kwargs: Any) -> list[dict[str, Any]]:
        counting = [r for r in (raced or {}).get("races") or [] if r["status"] != "too_fast"]
        kept = raced and {**raced, "races": counting}
        return counted(gradient_noise_scale, kept, **kwargs)

    recipe.stable_learning_rates = without  # type: ignore[assignment]  # the same call, fewer races
    try:
        yield
    finally:
        recipe.stable_learning_rates = counted


def oracle_score(
    tuned: dict[int, Any], step_s: dict[int, float], depth: int, recommended: int, high: float | None
) -> dict[str, Any]:
    """The oracle's side of one depth's score: its best size and time, and the recommended size's ratio
    to it (`time_at`; outside the sweep: the nearest size's time, flagged) against the stated bound."""
    times = {b: (t["depths"][depth]["steps"] or math.inf) * step_s[b] for b, t in tuned.items()}
    best = min(times, key=lambda b: times[b])
    t_rec, interpolated = time_at(times, recommended)
    ratio = t_rec / times[best]
    return {
        "oracle_best_batch_size": best, "oracle_best_time_s": times[best],
        "oracle_best_steps": tuned[best]["depths"][depth]["steps"],
        "oracle_best_lr": tuned[best]["depths"][depth]["best_lr"],
        "recommended_batch_size": recommended, "ratio": ratio, "ratio_interpolated": interpolated,
        "ratio_outside_sweep": not min(tuned) <= recommended <= max(tuned),
        "interval_high": high, "interval_held": None if high is None else ratio <= high,
        "oracle_times_s": {b: times[b] for b in sorted(times)},
    }  # fmt: skip


def recipe_score(depth: dict[str, Any], step_s: dict[int, float], reference_steps: float) -> dict[str, Any]:
    """The recipe as a client runs it: the recommended size at the recommended lr (the check run: one
    minibatch order, no warm-up) against the oracle's best time and against the client's own run (the
    reference: REFERENCE_BATCH at its lr, `reference_steps` to this depth), on the same step times."""
    run_steps = depth["recommended_lr_run"]["steps"]
    seconds = run_steps * time_at(step_s, depth["recommended_batch_size"])[0] if run_steps else math.inf
    return {
        "recipe_ratio": seconds / depth["oracle_best_time_s"],
        "recipe_over_client": seconds / (reference_steps * step_s[REFERENCE_BATCH]),
    }


_ABLATION_KEYS = ("recommended_batch_size", "ratio", "interval_high", "interval_held")


def bench_task(
    name: str,
    refs: dict[str, Any],
    tuned: dict[int, Any],
    args: argparse.Namespace,
    step_times: dict[int, float] | None = None,
    share: float = PROBE_SHARE,
) -> dict[str, Any]:
    setup = _setup(name)
    task = setup.task
    targets = refs["targets"]
    sweep_cost = sum(t["sweep_seconds"] for t in tuned.values())
    budget = share * sweep_cost
    probe = run_probe(setup, budget)
    n = len(setup.x)
    depths = []
    recs: list[dict[str, Any]] = []
    ablations: list[dict[str, Any]] = []
    for d, label in enumerate(("shallow", "deep")):
        # The client's horizon: the epochs the reference run (batch 32, its lr) took to reach this depth.
        epochs = refs["target_steps"][d] * REFERENCE_BATCH / n
        rec = recommend_for(setup, probe, epochs)
        recs.append(rec)
        if args.without_knee:
            with _knee_off():
                ablations.append(recommend_for(setup, probe, epochs))
        b_h = (rec.get("horizon") or {}).get("b_noise")
        print(f"  {label}: epochs {epochs:.2f} -> B={rec['recommended_batch_size']}", end=" ")
        print(f"lr={rec['learning_rate']:.3g} B_h={_fmt(b_h)}", flush=True)
    # Training at the recommended size with the recommended lr (here: the pool is busy with other tasks).
    checks = [
        run_to_targets(name, r["recommended_batch_size"], r["learning_rate"], targets, task.ref_steps * 3)
        for r in recs
    ]
    step_s = step_times or measure_step_times(setup, sorted(tuned), rounds=args.rounds, min_seconds=0.15)
    for d, label in enumerate(("shallow", "deep")):
        rec = recs[d]
        interval = (rec.get("horizon") or {}).get("interval") or {}
        depths.append({
            "depth": label, "target_loss": targets[d],
            "reference_epochs": refs["target_steps"][d] * REFERENCE_BATCH / n,
            **oracle_score(tuned, step_s, d, rec["recommended_batch_size"], interval.get("time_ratio_high")),
            "recommended_lr": rec["learning_rate"],
            "confidence": rec["confidence"],
            "recommended_lr_run": _check_run(checks[d], d),
            "b_noise_horizon": (rec.get("horizon") or {}).get("b_noise"),
            "b_noise_interval": [(rec.get("horizon") or {}).get("b_noise_low"),
                                 (rec.get("horizon") or {}).get("b_noise_high")],
            "b_noise_level": rec.get("b_noise"), "noise_source": rec.get("noise_scale_source"),
            "horizon": rec.get("horizon"), "warnings": rec["warnings"],
        })  # fmt: skip
        depths[-1].update(recipe_score(depths[-1], step_s, refs["target_steps"][d]))
        if ablations:
            other_high = ((ablations[d].get("horizon") or {}).get("interval") or {}).get("time_ratio_high")
            scored = oracle_score(tuned, step_s, d, ablations[d]["recommended_batch_size"], other_high)
            depths[-1]["without_knee"] = {k: scored[k] for k in _ABLATION_KEYS}
    if args.without_fast_races:
        _score_without_fast_races(setup, probe, depths, refs, step_s)
    deep_over_shallow = [
        (tuned[b]["depths"][1]["steps"] or math.nan) / (tuned[b]["depths"][0]["steps"] or math.nan)
        for b in tuned
    ]
    stats = probe["stats"]
    race = stats["races"] or {}
    return {
        "task": asdict(task),
        "data": setup.description,
        "reference_run": refs,
        "deep_over_shallow_steps": {b: r for b, r in zip(tuned, deep_over_shallow, strict=True)},
        "step_seconds": step_s,
        "sweep_seconds": sweep_cost,
        "probe_share": share,
        "probe_budget_s": budget,
        "probe_seconds": probe["seconds"],
        "probe_cost_fraction": probe["seconds"] / sweep_cost,
        "probe": {
            "ladder": [{k: p.get(k) for k in ("batch_size", "samples_per_second", "spread", "outlier")}
                       for p in probe["ladder"]],
            "gradient_noise_scale": {k: v for k, v in (stats["gradient_noise_scale"] or {}).items()
                                     if isinstance(v, int | float | str | bool) or v is None},
            "races": {k: race.get(k)
                      for k in ("status", "value", "level", "drop_fraction", "rel_rms", "races")},
            "cut_short": stats["cut_short"],
        },
        "depths": depths,
        "oracle": {b: {k: t[k] for k in ("depths", "grid", "sweep_seconds")}
                   for b, t in sorted(tuned.items())},
    }  # fmt: skip


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v)


def _shares(args: argparse.Namespace) -> list[float]:
    return [float(s) for s in str(args.probe_shares).split(",")]


def _ratio_summary(ratios: list[float]) -> dict[str, Any]:
    finite = [r for r in ratios if math.isfinite(r)]
    return {
        "median_ratio": statistics.median(ratios),
        "geometric_mean_ratio": math.exp(statistics.mean(math.log(r) for r in finite)) if finite else None,
        "worst_ratio": max(ratios),
        "over_1_25": sum(r > 1.25 for r in ratios),
    }


def _recipe_summary(depths: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [d for d in depths if "recipe_ratio" in d]  # reports before the check run was scored lack it
    if not scored:
        return None
    over_client = [d["recipe_over_client"] for d in scored]
    return {
        **_ratio_summary([d["recipe_ratio"] for d in scored]),
        "over_client_median": statistics.median(over_client),
        "slower_than_client": sum(r > 1 for r in over_client),
        "diverged": sum(d["recommended_lr_run"]["diverged"] for d in scored),
    }


def baselines(depths: list[dict[str, Any]]) -> dict[str, Any]:
    """What the recommended size is compared with on the same task-depths: the client's own batch size
    (REFERENCE_BATCH) everywhere, and the one size that does best over all of them in hindsight (smallest
    geometric-mean ratio, a ratio capped at 10 where a size never reached the target)."""

    def ratios(size: int) -> list[float]:
        return [time_at(d["oracle_times_s"], size)[0] / d["oracle_best_time_s"] for d in depths]

    common = set.intersection(*(set(d["oracle_times_s"]) for d in depths))
    fixed = min(sorted(common), key=lambda b: statistics.mean(math.log(min(r, 10.0)) for r in ratios(b)))
    return {
        "reference": {"batch_size": REFERENCE_BATCH, **_ratio_summary(ratios(REFERENCE_BATCH))},
        "best_fixed": {"batch_size": fixed, **_ratio_summary(ratios(fixed))},
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for half in HALVES:
        rows = [(r, d) for r in results if r["task"]["half"] == half for d in r["depths"]]
        if not rows:
            continue
        ratios = [d["ratio"] for _, d in rows]
        held = [d["interval_held"] for _, d in rows if d["interval_held"] is not None]
        out[half] = {
            "task_depths": len(rows),
            **_ratio_summary(ratios),
            "interval_held_fraction": sum(held) / len(held) if held else None,
            "max_probe_cost_fraction": max(
                r["probe_cost_fraction"] for r in results if r["task"]["half"] == half
            ),
            "recommended_lr_diverged": sum(d["recommended_lr_run"]["diverged"] for _, d in rows),
            "outside_sweep": sum(bool(d.get("ratio_outside_sweep")) for _, d in rows),
            "recipe": _recipe_summary([d for _, d in rows]),
            "baselines": baselines([d for _, d in rows]),
        }  # fmt: skip
        lr_ablated = [(d, d["without_fast_races"]) for _, d in rows if "without_fast_races" in d]
        if lr_ablated:
            out[half]["recipe_without_fast_races"] = {
                **(_recipe_summary([a for _, a in lr_ablated]) or {}),
                "lr_changed": sum(a["recommended_lr"] != d["recommended_lr"] for d, a in lr_ablated),
            }
        ablated = [d["without_knee"] for _, d in rows if "without_knee" in d]
        if ablated:
            held_without = [a["interval_held"] for a in ablated if a["interval_held"] is not None]
            out[half]["without_knee"] = {
                **_ratio_summary([a["ratio"] for a in ablated]),
                "interval_held_fraction": sum(held_without) / len(held_without) if held_without else None,
            }
    return out


def run_spread(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per half, how far one task-depth's answer moves between probe runs (same sweep, same yardstick):
    the recommended sizes' max/min ratio (median and 90th percentile over task-depths), and how many
    task-depths were over 1.25 in every run or in some runs only."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        for d in r["depths"]:
            groups.setdefault((r["task"]["half"], r["task"]["name"], d["depth"]), []).append(d)
    out: dict[str, Any] = {}
    for half in HALVES:
        runs = [ds for (h, _, _), ds in groups.items() if h == half and len(ds) > 1]
        if not runs:
            continue
        spreads = sorted(
            max(d["recommended_batch_size"] for d in ds) / min(d["recommended_batch_size"] for d in ds)
            for ds in runs
        )
        over = [[d["ratio"] > 1.25 for d in ds] for ds in runs]
        out[half] = {
            "task_depths": len(runs), "runs": min(len(ds) for ds in runs),
            "rec_spread_median": statistics.median(spreads),
            "rec_spread_p90": spreads[min(len(spreads) - 1, int(0.9 * len(spreads)))],
            "over_1_25_every_run": sum(all(o) for o in over),
            "over_1_25_some_runs": sum(any(o) and not all(o) for o in over),
        }  # fmt: skip
    return out


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path, seconds: float,
                 loads: dict[str, Any]) -> None:  # fmt: skip
    shares = sorted({r.get("probe_share", PROBE_SHARE) for r in results})
    by_share = {s: [r for r in results if r.get("probe_share", PROBE_SHARE) == s] for s in shares}
    summary = summarise(results) if len(shares) == 1 else {}
    spread = {s: run_spread(rs) for s, rs in by_share.items()}
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model_name() or platform.processor()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python bench/convergence.py " + " ".join(sys.argv[1:]),
        "minutes": seconds / 60,
        "load": loads,
        "split": {h: [t.name for t in TASKS.values() if t.half == h] for h in HALVES},
        "probe_share": shares[0] if len(shares) == 1 else shares,
        "goals_held_out": {"median_ratio": 1.10, "worst_ratio": 1.25, "interval_held_fraction": 0.75,
                           "probe_cost_fraction": 0.10, "recommended_lr_diverged": 0},
    }  # fmt: skip
    by_budget = {s: {"summary": summarise(rs), "run_spread": spread[s]} for s, rs in by_share.items()}
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "summary": summary, **({"by_budget": by_budget} if len(shares) > 1 else {}),
         "run_spread": spread[shares[0]] if len(shares) == 1 else None, "tasks": results},
        indent=1, default=str,
    ))  # fmt: skip
    lines = [
        "# Convergence benchmark: the generalisation suite",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; "
        + f"torch {meta['torch']}, Python {meta['python']}",
        f"- command: `{meta['command']}` ({meta['minutes']:.1f} min)",
        f"- host load (1/5/15 min) before: {loads.get('before')}; after: {loads.get('after')}. The host's "
        "2 cores were shared with other jobs: absolute times are inflated and step timings noisy (steps to "
        "target are not).",
        "- groups, fixed in bench/convergence_tasks.py: tuning half (the method's constants were first "
        "set on it) "
        f"{', '.join(meta['split']['tuning'])}; seen (earlier held-out halves, read before the method's "
        f"later changes, so no longer held out) {', '.join(meta['split']['seen'])}; held-out half (defined "
        "and swept before it was scored, with no change to the method since; scored once) "
        f"{', '.join(meta['split']['held_out'])}",
        *([f"- oracle sweeps merged: {loads['oracle_sweeps']}"] if len(loads.get("oracle_sweeps") or []) > 1
          else []),
        "- depths: the reference run (batch 32, the client's lr) fixes them: shallow = its training loss "
        "at 1/8 of its steps (1/5 in sweeps made since the fifth held-out half), deep = at all of them; "
        "the probe is told `epochs` = the epochs the reference needed for that depth; a size's steps are "
        "the mean over the minibatch orders its sweep ran (`steps_per_order`: 1, 2 or 4)",
        "- ratio: oracle time to target at the recommended size / the oracle's best (lr tuned per size and "
        "depth; a recommended size between two swept sizes is interpolated log-log between them, marked "
        "~; one outside the sweep gets the nearest swept size's time, marked *, and is not measured); "
        "interval: the answer's 80 % upper bound on that ratio; held: ratio <= bound",
        *(
            [
                "- the oracle's sweep (reference runs, steps to target, sweep cost) is the one of "
                + "{date} (`{command}`, load {load}); everything else was redone by this command".format(
                    **loads["oracle_sweep_from"]
                )
            ]
            if loads.get("oracle_sweep_from") and not loads.get("answers_from")
            else []
        ),
        *(
            [
                "- the answers (probes, recommendations, bounds, check runs) are those of the report of "
                "{date} (`{command}`), not recomputed: this command scored them again on the stored sweeps "
                "and their step times".format(**loads["answers_from"])
            ]
            if loads.get("answers_from")
            else []
        ),
        *(
            [
                "- the oracle's lr walk: the stored sweeps walked on (`--deepen-grid`) until no depth's best "
                "lr is at the walk's edge, counting lrs that reach the deep target in every order: "
                + "; ".join(
                    f"`{w['command']}` (last {w['date']}, {w['passes']} pass(es), up to {w['max_grid_runs']} "
                    f"runs per size, {len(w['tasks'])} tasks)"
                    for w in loads["deepened"].values()
                )
            ]
            if loads.get("deepened")
            else []
        ),
        *(
            [f"- step times (the oracle's yardstick): {_step_times_source(loads['step_times'])}"]
            if loads.get("step_times")
            else []
        ),
        f"- probe budget: {', '.join(f'{s:.0%}' for s in shares)} of the sweep's training seconds; cost = "
        "ladder + statistics seconds",
    ]
    if len(shares) > 1:
        lines += _budget_lines(by_budget, by_share)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        return
    lines += [
        "",
        "| half | task-depths | median ratio | geometric mean | worst ratio | over 1.25 | 80 % interval held "
        "| max probe cost | rec. lr diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for half, s in summary.items():
        lines.append(
            f"| {half} | {s['task_depths']} | {s['median_ratio']:.2f} | {_fmt(s['geometric_mean_ratio'])} | "
            f"{s['worst_ratio']:.2f} | {s['over_1_25']} | "
            f"{_fmt(s['interval_held_fraction'])} | {s['max_probe_cost_fraction']:.1%} | "
            f"{s['recommended_lr_diverged']} |"
        )
    outside = {half: s["outside_sweep"] for half, s in summary.items() if s.get("outside_sweep")}
    if outside:
        lines += [
            "",
            f"Recommended sizes outside the sweep (marked *; the nearest swept size's time, not "
            f"measured): {outside}. `--extend-sweep` tunes such a size into the stored sweep.",
        ]
    lines += [
        "", "Baselines on the same task-depths (oracle times, no probe):", "", *_baseline_lines(summary)
    ]
    lines += _recipe_lines(summary)
    if spread[shares[0]]:
        lines += ["", "How far the answer moves between probe runs (same sweep and yardstick):", "",
                  *_spread_lines(spread[shares[0]])]  # fmt: skip
    if any("without_knee" in h for h in summary.values()):
        lines += [
            "",
            "The same probes, the size chosen without the step-time knee (`--without-knee`: "
            f"horizon.KNEE_WEIGHT 0, interval calibration {PRE_KNEE_CALIBRATION}):",
            "",
            "| half | task-depths | median ratio | geometric mean | worst ratio | over 1.25 "
            "| 80 % interval held |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {half} | {h['task_depths']} | {w['median_ratio']:.2f} | "
                f"{_fmt(w['geometric_mean_ratio'])} | {w['worst_ratio']:.2f} | {w['over_1_25']} | "
                f"{_fmt(w['interval_held_fraction'])} |"
                for half, h in summary.items()
                for w in (h["without_knee"],)
            ),
            "",
            "| half | task | run | depth | oracle best B | rec. B: ratio (held) | without the knee |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['task']['half']} | {r['task']['name']} | {r.get('probe_run', 1)} | {d['depth']} | "
                f"{d['oracle_best_batch_size']} | {d['recommended_batch_size']}: {d['ratio']:.2f} "
                f"({d['interval_held']}) | {d['without_knee']['recommended_batch_size']}: "
                f"{d['without_knee']['ratio']:.2f} ({d['without_knee']['interval_held']}) |"
                for r in results
                for d in r["depths"]
            ),
        ]
    lines += [
        "",
        "| half | task | depth | target | oracle best B (time) | rec. B (lr) | ratio | 80 % bound | held | "
        "confidence | B_noise at horizon [80 %] | probe cost | rec. lr run | recipe / best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for d in r["depths"]:
            lo, hi = d["b_noise_interval"]
            lines.append(
                f"| {r['task']['half']} | {r['task']['name']} | {d['depth']} | {d['target_loss']:.4g} | "
                f"{d['oracle_best_batch_size']} ({d['oracle_best_time_s']:.2f} s) | "
                f"{d['recommended_batch_size']} "
                f"({d['recommended_lr']:.3g}) | {_ratio_mark(d)}{d['ratio']:.2f} | "
                f"{_fmt(d['interval_high'])} | {d['interval_held']} | {d['confidence']} | "
                f"{_fmt(d['b_noise_horizon'])} [{_fmt(lo)}, {_fmt(hi)}] | "
                f"{r['probe_cost_fraction']:.1%} | "
                f"{d['recommended_lr_run']['status']} | {_fmt(d.get('recipe_ratio'))} |"
            )
    for r in results:
        race = r["probe"]["races"]
        lines += [
            "",
            f"## {r['task']['name']} ({r['task']['half']})",
            "",
            f"{r['task']['description']}; {r['data']}. Reference run: targets "
            f"{[round(t, 4) for t in r['reference_run']['targets']]} "
            f"at steps {r['reference_run']['target_steps']}. Deep/shallow oracle steps per size: "
            + ", ".join(f"{b}: {_fmt(v)}" for b, v in r["deep_over_shallow_steps"].items())
            + ".",
            "",
            f"Probe {r['probe_seconds']:.1f} s ({r['probe_cost_fraction']:.1%} of a "
            f"{r['sweep_seconds']:.0f} s sweep): "
            f"B_simple {_fmt(r['probe']['gradient_noise_scale'].get('value'))}; races {race.get('status')} "
            f"B_noise {_fmt(race.get('value'))} at loss {_fmt(race.get('level'))} "
            f"(drop {_fmt(race.get('drop_fraction'))}).",
            "",
            "| B | " + " | ".join(f"{d['depth']} steps (lr)" for d in r["depths"]) + " | step time | "
            + " | ".join(f"{d['depth']} time" for d in r["depths"]) + " |",
            "|---|" + "---|" * (2 * len(r["depths"]) + 1),
        ]  # fmt: skip
        for b, t in r["oracle"].items():
            cells = [f"{_fmt(dd['steps'])} ({_fmt(dd['best_lr'])})" for dd in t["depths"]]
            times = [_fmt(d["oracle_times_s"].get(b)) for d in r["depths"]]
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {r['step_seconds'][b] * 1e3:.2f} ms | "
                         + " | ".join(times) + " |")  # fmt: skip
        warns = sorted({w for d in r["depths"] for w in d["warnings"]})
        lines += ["", "Warnings: " + ("; ".join(warns) if warns else "none")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _ratio_mark(depth: dict[str, Any]) -> str:
    if depth.get("ratio_outside_sweep"):
        return "*"
    return "~" if depth["ratio_interpolated"] else ""


def _recipe_lines(summary: dict[str, Any]) -> list[str]:
    rows = [(half, s["recipe"]) for half, s in summary.items() if s.get("recipe")]
    rows += [
        (f"{half}, too_fast races not counted (lr changed on {s['recipe_without_fast_races']['lr_changed']})",
         s["recipe_without_fast_races"])
        for half, s in summary.items() if s.get("recipe_without_fast_races")
    ]  # fmt: skip
    if not rows:
        return []
    lines = [
        "",
        "The recipe as a client runs it: the recommended size at the recommended lr (one run, one minibatch "
        "order, no warm-up), its time to target over the oracle's best (lr tuned per size) and over the "
        "client's own run (batch 32 at the client's lr), on the same step times:",
        "",
        "| half | median / best | geometric mean | worst | over 1.25 | median / client's own run | slower "
        "than the client's own run | lr diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for half, r in rows:
        lines.append(
            f"| {half} | {r['median_ratio']:.2f} | {_fmt(r['geometric_mean_ratio'])} | "
            f"{r['worst_ratio']:.2f} | {r['over_1_25']} | {r['over_client_median']:.2f} | "
            f"{r['slower_than_client']} | {r.get('diverged', '-')} |"
        )
    return lines


def _baseline_lines(summary: dict[str, Any]) -> list[str]:
    return [
        "| half | size | median ratio | geometric mean | worst ratio | over 1.25 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {half} | {name} {b['batch_size']} | {b['median_ratio']:.2f} | "
            f"{_fmt(b['geometric_mean_ratio'])} | {b['worst_ratio']:.2f} | {b['over_1_25']} |"
            for half, s in summary.items()
            for name, b in (("client's own", s["baselines"]["reference"]),
                            ("best fixed in hindsight", s["baselines"]["best_fixed"]))
        ),
    ]  # fmt: skip


def _spread_lines(spread: dict[str, Any], share: float | None = None) -> list[str]:
    head = "| budget " if share is not None else ""
    cell = f"| {share:.0%} " if share is not None else ""
    return [
        f"{head}| half | task-depths x runs | rec. size max/min over runs: median | 90th pct | over 1.25 in "
        "every run | in some runs only |",
        "|---" * (6 + (share is not None)) + "|",
        *(
            f"{cell}| {half} | {s['task_depths']} x {s['runs']} | {s['rec_spread_median']:.2f} | "
            f"{s['rec_spread_p90']:.2f} | {s['over_1_25_every_run']} | {s['over_1_25_some_runs']} |"
            for half, s in spread.items()
        ),
    ]


def _budget_lines(by_budget: dict[float, Any], by_share: dict[float, list[dict[str, Any]]]) -> list[str]:
    """The report of a run with several probe budgets: per budget and half, the scores and how far the
    answer moves between runs; then each task-depth's answers per budget."""
    lines = [
        "",
        "| budget | half | task-depths | median ratio | geometric mean | worst ratio | over 1.25 "
        "| 80 % interval held | max probe cost | rec. lr diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for share, b in by_budget.items():
        for half, s in b["summary"].items():
            lines.append(
                f"| {share:.0%} | {half} | {s['task_depths']} | {s['median_ratio']:.2f} | "
                f"{_fmt(s['geometric_mean_ratio'])} | {s['worst_ratio']:.2f} | {s['over_1_25']} | "
                f"{_fmt(s['interval_held_fraction'])} | {s['max_probe_cost_fraction']:.1%} | "
                f"{s['recommended_lr_diverged']} |"
            )
    first = next(iter(by_budget.values()))["summary"]
    lines += ["", "Baselines on the same task-depths (oracle times, no probe):", "", *_baseline_lines(first)]
    lines += ["", "How far the answer moves between probe runs (same sweep and yardstick):", ""]
    for i, (share, b) in enumerate(by_budget.items()):
        lines += _spread_lines(b["run_spread"], share)[2 * (i > 0) :]
    shares = list(by_share)
    lines += [
        "",
        "Per task-depth: the oracle's best size, then per budget each run's recommended size: ratio.",
        "",
        "| half | task | depth | oracle best B | " + " | ".join(f"{s:.0%} budget" for s in shares) + " |",
        "|---|---|---|---|" + "---|" * len(shares),
    ]
    for r in by_share[shares[0]]:
        if r.get("probe_run", 1) != 1:  # one row per task: its runs are the cells
            continue
        for d in r["depths"]:
            cells = []
            for s in shares:
                runs = [dd for rr in by_share[s] if rr["task"]["name"] == r["task"]["name"]
                        for dd in rr["depths"] if dd["depth"] == d["depth"]]  # fmt: skip
                cells.append(", ".join(f"{dd['recommended_batch_size']}: {dd['ratio']:.2f}" for dd in runs))
            lines.append(f"| {r['task']['half']} | {r['task']['name']} | {d['depth']} | "
                         f"{d['oracle_best_batch_size']} | " + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _step_times_source(sources: dict[str, Any]) -> str:
    """One line per command that stored step times: its rounds, first and last date, task count."""
    by_command: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for v in sources.values():
        if v != "this command":
            by_command.setdefault((v.get("command", "?"), v.get("rounds")), []).append(v)
    parts = [
        f"stored with the sweeps by `{command}` ({rounds} interleaved rounds, {len(vs)} tasks, "
        f"{min(v.get('date', '?') for v in vs)} to {max(v.get('date', '?') for v in vs)})"
        for (command, rounds), vs in sorted(by_command.items(), key=lambda kv: str(kv[0]))
    ]
    redone = sorted(n for n, v in sources.items() if v == "this command")
    if redone:
        parts.append(f"measured by this command for {', '.join(redone)}")
    return "; ".join(parts)


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()
    except OSError:
        return "unknown"


def time_sweeps(args: argparse.Namespace, names: list[str]) -> None:
    """Measure each stored task's step times (`--rounds` interleaved rounds) and write them into its
    sweep file, so that every later `--rescore` scores on the same yardstick."""
    for path in args.rescore.split(","):
        sweep = json.loads(Path(path).read_text())
        for t in sweep["tasks"]:
            name = t["task"]["name"]
            if name not in names:
                continue
            _export_archives([name])
            sizes = sorted(int(b) for b in t["oracle"])
            t["step_seconds"] = measure_step_times(_setup(name), sizes, rounds=args.rounds, min_seconds=0.3)
            t["step_times_measured"] = {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "rounds": args.rounds,
                "load": _uptime(), "command": "python bench/convergence.py " + " ".join(sys.argv[1:]),
            }  # fmt: skip
            print(f"{name}: {t['step_seconds']}", flush=True)
            Path(path).write_text(json.dumps(sweep, indent=1, default=str))
    _remove_archives()


def _stored_sweeps(paths: str, loads: dict[str, Any]) -> dict[str, Any]:
    """The stored sweeps' tasks by name (comma-separated files of different task subsets merge); each
    file's date, command and load are noted in `loads`."""
    stored: dict[str, Any] = {}
    for path in paths.split(","):
        previous = json.loads(Path(path).read_text())
        sweep = {k: previous.get(k) for k in ("date", "command", "load")}
        loads.setdefault("oracle_sweep_from", sweep)
        loads.setdefault("oracle_sweeps", []).append(sweep)
        stored.update({t["task"]["name"]: t for t in previous["tasks"]})
        for t in previous["tasks"]:
            for walk in t.get("deepened", []):
                noted = loads.setdefault("deepened", {}).setdefault(walk["command"], {**walk, "tasks": []})
                if t["task"]["name"] not in noted["tasks"]:
                    noted["tasks"].append(t["task"]["name"])
                noted["passes"] = max(noted.get("passes", 0), len(t["deepened"]))
                noted["date"] = max(noted["date"], walk["date"])
    return stored


def extend_sweep(args: argparse.Namespace) -> None:
    """Tune further sizes (`--extend-sweep NAME:SIZE,...`, e.g. a recommended size outside the sweep)
    into the stored sweep file that holds the task; `--time-sweeps` then times every size again, side by
    side, so the added one shares the others' yardstick."""
    global ORDERS
    ORDERS = args.orders
    wanted: dict[str, list[int]] = {}
    for item in args.extend_sweep.split(","):
        name, size = item.split(":")
        wanted.setdefault(name, []).append(int(size))
    for path in args.rescore.split(","):
        sweep = json.loads(Path(path).read_text())
        for t in sweep["tasks"]:
            name = t["task"]["name"]
            for size in wanted.pop(name, []):
                t["oracle"][str(size)] = tune_size(name, size, t["reference_run"]["targets"])
                t.setdefault("extended", []).append({
                    "batch_size": size, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "orders": ORDERS, "command": "python bench/convergence.py " + " ".join(sys.argv[1:]),
                })  # fmt: skip
                t.pop("step_seconds", None)  # stale: the sizes must be timed again together
                print(f"{name}: {size} -> steps {[d['steps'] for d in t['oracle'][str(size)]['depths']]}")
        Path(path).write_text(json.dumps(sweep, indent=1, default=str))
    if wanted:
        raise SystemExit(f"not in the stored sweeps: {sorted(wanted)}")


def deepen_grid(args: argparse.Namespace, names: list[str]) -> None:
    """Walk every stored size's lr grid on (`--deepen-grid`, up to MAX_GRID_RUNS runs) where its best lr
    sat at the walk's edge, and write the deeper grid back into the stored sweep files: the sizes and
    their step times stay, a depth whose best lr moved gets its `--orders` again."""
    for path in args.rescore.split(","):
        sweep = json.loads(Path(path).read_text())
        tasks = [t for t in sweep["tasks"] if t["task"]["name"] in names]
        _export_archives([t["task"]["name"] for t in tasks])
        with _sweep_pool(args) as pool:
            futures = {
                (t["task"]["name"], b): pool.submit(
                    tune_size, t["task"]["name"], int(b), t["reference_run"]["targets"], stored=tuned)
                for t in tasks for b, tuned in t["oracle"].items()
            }  # fmt: skip
            for t in tasks:
                name = t["task"]["name"]
                for b in list(t["oracle"]):
                    before = [d["best_lr"] for d in t["oracle"][b]["depths"]]
                    t["oracle"][b] = futures[(name, b)].result()
                    after = [d["best_lr"] for d in t["oracle"][b]["depths"]]
                    print(f"{name} {b}: best lr {before} -> {after}", flush=True)
                t.setdefault("deepened", []).append({
                    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "orders": args.orders,
                    "max_grid_runs": MAX_GRID_RUNS,
                    "command": "python bench/convergence.py " + " ".join(sys.argv[1:]),
                })  # fmt: skip
                Path(path).write_text(json.dumps(sweep, indent=1, default=str))
    _remove_archives()


def reuse_answers(args: argparse.Namespace, names: list[str], loads: dict[str, Any]) -> None:
    """Score the answers of a previous report (`--reuse-answers JSON`) again on the stored sweeps and
    their step times, without probing again: the same answers on an extended or re-timed oracle."""
    report = json.loads(Path(args.reuse_answers).read_text())
    loads["answers_from"] = {k: report.get(k) for k in ("date", "command")}
    stored = _stored_sweeps(args.rescore, loads)
    results = []
    for result in (r for r in report["tasks"] if r["task"]["name"] in names):
        t = stored[result["task"]["name"]]
        if not t.get("step_seconds"):
            raise SystemExit(f"{result['task']['name']}: the stored sweep has no step times (--time-sweeps)")
        tuned = {int(b): v for b, v in t["oracle"].items()}
        step_s = {int(b): v for b, v in t["step_seconds"].items()}
        loads.setdefault("step_times", {})[result["task"]["name"]] = t.get("step_times_measured")
        depths = []
        for d, depth in enumerate(result["depths"]):
            scored = oracle_score(tuned, step_s, d, depth["recommended_batch_size"], depth["interval_high"])
            depths.append({**depth, **scored})
            depths[-1].update(recipe_score(depths[-1], step_s, result["reference_run"]["target_steps"][d]))
            if "without_knee" in depth:
                other = depth["without_knee"]
                size, high = other["recommended_batch_size"], other["interval_high"]
                again = oracle_score(tuned, step_s, d, size, high)
                depths[-1]["without_knee"] = {k: again[k] for k in _ABLATION_KEYS}
        results.append({**result, "depths": depths, "step_seconds": step_s, "oracle": tuned})
    loads["after"] = _uptime()
    write_report(results, args, Path(args.out), 0.0, loads)


def rescore(args: argparse.Namespace, names: list[str], loads: dict[str, Any]) -> None:
    """Everything but the sweep again, on the sweep stored in `args.rescore` (steps to target do not
    depend on timing); step times stored with the sweep (`--time-sweeps`) are used unless `--retime`."""
    stored = _stored_sweeps(args.rescore, loads)
    _export_archives([n for n in names if n in stored])
    started = time.monotonic()
    out = Path(args.out)
    results = []
    for name in (n for n in names if n in stored):
        t = stored[name]
        tuned = {int(b): v for b, v in t["oracle"].items()}
        stored_times = None if args.retime else t.get("step_seconds")
        times = {int(b): v for b, v in stored_times.items()} if stored_times else None
        loads.setdefault("step_times", {})[name] = t.get("step_times_measured") if times else "this command"
        for run in range(1, args.probe_runs + 1):  # each run probes again; the sweep and yardstick stay
            for share in _shares(args):  # budgets interleaved, so the host's load falls on each alike
                print(f"== {name} (rescored, probe run {run}, budget {share:.0%})", flush=True)
                result = bench_task(name, t["reference_run"], tuned, args, times, share)
                results.append({**result, "probe_run": run})
        loads["after"] = _uptime()
        write_report(results, args, out, time.monotonic() - started, loads)
    _remove_archives()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-point lr grid: a smoke test")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of the tasks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=3, help="processes for the sweep's runs")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved step-timing rounds")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "convergence"))
    parser.add_argument(
        "--rescore", metavar="JSON",
        help="keep the oracle's sweep (reference runs, steps to target, sweep cost) from previous result "
        "files (comma-separated, merged) and redo everything else: step times, probes, recommendations, "
        "check runs",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-only", action="store_true",
        help="run the oracle's sweep only and write it to --out's .json, for a later --rescore (no probe)",
    )  # fmt: skip
    parser.add_argument("--halves", help="comma-separated halves: their tasks instead of --tasks")
    parser.add_argument(
        "--time-sweeps", action="store_true",
        help="with --rescore: measure each task's step times and store them in its sweep file, nothing else",
    )  # fmt: skip
    parser.add_argument("--retime", action="store_true", help="with --rescore: measure step times again")
    parser.add_argument(
        "--orders", type=int, default=1,
        help="minibatch orders for each depth's best lr (the size's steps: their mean)",
    )  # fmt: skip
    parser.add_argument("--repeats", action="store_const", const=2, dest="orders", help="--orders 2")
    parser.add_argument(
        "--without-knee", action="store_true",
        help="also score each probe's answer chosen without the step-time knee (an ablation, same probes)",
    )  # fmt: skip
    parser.add_argument(
        "--without-fast-races", action="store_true",
        help="also score each recipe with the lr as it was before too_fast races counted as stable (an "
        "ablation: same probes and sizes, a check run where the lr differs)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-runs", type=int, default=1, help="with --rescore: probe and score each task this many times"
    )  # fmt: skip
    parser.add_argument(
        "--probe-shares", default=str(PROBE_SHARE),
        help="with --rescore: comma-separated probe budgets (shares of the sweep), each probed and scored",
    )  # fmt: skip
    parser.add_argument(
        "--extend-sweep", metavar="NAME:SIZE,...",
        help="with --rescore: tune these sizes into the stored sweep files (then --time-sweeps)",
    )  # fmt: skip
    parser.add_argument(
        "--deepen-grid", action="store_true",
        help="with --rescore: walk each stored size's lr grid on where its best lr is at the walk's edge "
        "(up to MAX_GRID_RUNS runs) and store it (--orders for a depth whose best lr moves)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse-answers", metavar="JSON",
        help="with --rescore: score this report's answers again on the stored sweeps, without probing",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.tasks.split(",")]
    if args.halves:
        halves = args.halves.split(",")
        names = [n for n, t in TASKS.items() if t.half in halves]
    loads: dict[str, Any] = {"before": _uptime()}
    if args.rescore and args.extend_sweep:
        extend_sweep(args)
        return
    if args.rescore and args.deepen_grid:
        deepen_grid(args, names)
        return
    if args.rescore and args.time_sweeps:
        time_sweeps(args, names)
        return
    if args.rescore and args.reuse_answers:
        reuse_answers(args, names, loads)
        return
    if args.rescore:
        rescore(args, names, loads)
        return
    _export_archives(names)
    started = time.monotonic()
    results = []
    with _sweep_pool(args) as pool:
        ref_futures = {n: pool.submit(reference_run, n) for n in names}
        refs = {n: f.result() for n, f in ref_futures.items()}
        for n in names:
            print(f"{n}: targets {refs[n]['targets']}", flush=True)
        grid = {
            (n, b): pool.submit(tune_size, n, b, refs[n]["targets"], args.quick)
            for n in names for b in TASKS[n].sizes
        }  # fmt: skip
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for n in names:  # each task as soon as its sweep is done, while the pool sweeps the next ones
            tuned = {b: grid[(n, b)].result() for b in TASKS[n].sizes}
            print(f"== {n} (sweep done at {(time.monotonic() - started) / 60:.1f} min)", flush=True)
            if args.sweep_only:  # the sweep alone, for a later --rescore: no probe, nothing scored
                results.append({"task": asdict(TASKS[n]), "reference_run": refs[n], "oracle": tuned})
                loads["after"] = _uptime()
                out.with_suffix(".json").write_text(json.dumps({
                    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "command": "python bench/convergence.py " + " ".join(sys.argv[1:]),
                    "load": loads, "tasks": results}, indent=1, default=str))  # fmt: skip
                continue
            results.append(bench_task(n, refs[n], tuned, args))
            loads["after"] = _uptime()
            write_report(results, args, out, time.monotonic() - started, loads)  # partial results survive
    if args.sweep_only:
        return
    print(json.dumps(summarise(results), indent=1))
    _remove_archives()


if __name__ == "__main__":
    main()

"""Lightning's loop vs the plain PyTorch loop: peak memory of one step, and the memory limit in each.

For each case (a zoo model, optimizer and CPU memory budget) it measures, with the engine's CPU live-bytes
tracker (service.probing.memory.CPUMemoryBudget) around every run, so all numbers count the same bytes:

    step peaks      at one batch size: the engine's step in the plain PyTorch convention (`loop="pytorch"`:
                    zero_grad(set_to_none=True) after optimizer.step()), in Lightning's convention
                    (`loop="lightning"`: the previous gradients alive through the forward, zeroed before
                    backward), and a real Lightning `fit` (automatic optimisation, a DataLoader over a
                    TensorDataset, 3 steps; the peak of the steps after the first). The difference
                    Lightning - PyTorch is given in bytes and in copies of the gradients. Also the peak
                    of the second micro-step of a plain loop accumulating gradients over two
                    micro-batches (its forward runs with the first micro-step's gradients alive, and
                    backward adds into them): what `gradient_accumulation_steps > 1` costs in any loop.
    limits          max_feasible_batch_size of the engine's probe (run_probe, objective max_feasible) in
                    each convention under the budget, and whether a real Lightning `fit` at that size stays
                    within the budget (its measured peak <= the budget), and at that size + 1.

The DataLoader has a length, so Lightning's fetcher prefetches nothing (without a length it holds one batch
ahead: `training.prefetch_batches=1`). CPU only: CUDA numbers (max_memory_allocated) are owed.

    .venv/bin/python bench/lightning_loop.py              # writes docs/benchmarks/lightning_loop.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models import get_model, make_config  # noqa: E402
from service.probing.engine import run_probe  # noqa: E402
from service.probing.memory import CPUMemoryBudget, measure_step  # noqa: E402
from service.probing.spec import ProbeSpec  # noqa: E402
from service.probing.step import TrainingStep, build_optimizer  # noqa: E402

LEARNING_RATES = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}  # memory does not depend on them
DATASET = 2048
MiB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: dict[str, Any]
    optimizer: str
    budget_mib: float
    step_batch: int  # the batch size the step peaks are compared at


CASES = [
    Case("mlp-512x128x4-adam", "mlp", {"input_dim": 512, "hidden_dims": [128] * 4}, "adam", 3, 256),
    Case("mlp-1024x64x4-adam", "mlp", {"input_dim": 1024, "hidden_dims": [64] * 4}, "adam", 3, 256),
    Case("resnet18w4-sgd", "resnet", {"depth": 18, "width": 4, "image_size": 16}, "sgd", 16, 64),
    Case(
        "gpt-2x32-adamw",
        "gpt",
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 64},
        "adamw",
        32,
        32,
    ),
]


def lightning() -> Any:
    pl: Any
    try:
        pl = importlib.import_module("pytorch_lightning")
    except ImportError:
        pl = importlib.import_module("lightning.pytorch")
    for name in (pl.__name__, "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers).*")
    return pl


def lightning_fit_peak(case: Case, batch_size: int, steps: int = 3) -> int:
    """Peak live bytes of the steps after the first of a real Lightning fit (steady state)."""
    pl = lightning()
    spec = get_model(case.model)
    config = make_config(spec, case.config)
    lightning_module: Any = pl.LightningModule  # a base chosen at run time: typed as Any
    callback: Any = pl.Callback

    class Module(lightning_module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = spec.build(config, False)
            generator = torch.Generator().manual_seed(0)
            batch = spec.make_batch(config, DATASET, torch.device("cpu"), generator)
            self.data = torch.utils.data.TensorDataset(*batch)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            inputs, targets = batch
            return spec.loss(self.model(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return build_optimizer(case.optimizer, self.parameters(), LEARNING_RATES[case.optimizer])

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.data, batch_size=batch_size, shuffle=True)

    peaks: list[int] = []

    class Peaks(callback):
        tracker: CPUMemoryBudget

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.tracker = CPUMemoryBudget(None, roots=[pl_module, trainer.optimizers])
            self.tracker.__enter__()

        def on_train_batch_start(self, *_args: Any) -> None:
            self.tracker.reset_peak()

        def on_train_batch_end(self, *_args: Any) -> None:
            peaks.append(self.tracker.peak_bytes)

        def on_train_end(self, *_args: Any) -> None:
            self.tracker.__exit__(None, None, None)

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Peaks()],
    )
    trainer.fit(Module())
    return max(peaks[1:])


def engine_step(case: Case, batch_size: int, loop: str) -> tuple[int, int]:
    """(peak bytes of the engine's step after its warm-up, bytes of one copy of the gradients)."""
    spec = get_model(case.model)
    step = TrainingStep(
        spec,
        make_config(spec, case.config),
        optimizer=case.optimizer,
        learning_rate=LEARNING_RATES[case.optimizer],
        loop=loop,
    )
    step.warm_up(2)
    trials = [
        measure_step(step.run, batch_size, 2**40, step.device, roots=step.memory_roots()) for _ in range(2)
    ]
    return max(t.peak_bytes or 0 for t in trials), step.state_bytes()["gradients"]


def accumulation_peak(case: Case, batch_size: int) -> int:
    """Peak of the second micro-step of a plain loop accumulating over two micro-batches (forward and
    backward; optimizer state present)."""
    spec = get_model(case.model)
    config = make_config(spec, case.config)
    torch.manual_seed(0)
    model = spec.build(config, False).train()
    optimizer = build_optimizer(case.optimizer, model.parameters(), LEARNING_RATES[case.optimizer])
    generator = torch.Generator().manual_seed(0)

    def micro_step() -> None:
        inputs, targets = spec.make_batch(config, batch_size, torch.device("cpu"), generator)
        spec.loss(model(inputs), targets).backward()

    micro_step()
    optimizer.step()  # creates the optimizer state
    optimizer.zero_grad(set_to_none=True)
    micro_step()
    with CPUMemoryBudget(None, roots=[model, optimizer]) as tracker:
        micro_step()
        return tracker.peak_bytes


def probe_limit(case: Case, loop: str) -> dict[str, Any]:
    spec = ProbeSpec(
        case.model,
        case.config,
        optimizer=case.optimizer,  # type: ignore[arg-type]
        learning_rate=LEARNING_RATES[case.optimizer],
        memory_budget_bytes=int(case.budget_mib * MiB),
        objective="max_feasible",
        time_budget_s=120,
        dataset_size=DATASET,
        loop=loop,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    result = run_probe(spec, lambda _event: None)
    return {
        "max": result["max_feasible_batch_size"],
        "lower_bound": result["max_feasible_is_lower_bound"],
        "trials": result["search"]["trials"],
        "seconds": time.perf_counter() - started,
    }


def run_case(case: Case) -> dict[str, Any]:
    budget = int(case.budget_mib * MiB)
    pytorch_peak, gradients = engine_step(case, case.step_batch, "pytorch")
    lightning_peak, _ = engine_step(case, case.step_batch, "lightning")
    fit_peak = lightning_fit_peak(case, case.step_batch)
    accumulating = accumulation_peak(case, case.step_batch)
    limits = {loop: probe_limit(case, loop) for loop in ("pytorch", "lightning")}
    for found in limits.values():
        found["fit_peak"] = lightning_fit_peak(case, found["max"])
        found["fit_peak_next"] = lightning_fit_peak(case, found["max"] + 1)
    return {
        "case": case,
        "budget": budget,
        "gradients": gradients,
        "pytorch_peak": pytorch_peak,
        "lightning_peak": lightning_peak,
        "fit_peak": fit_peak,
        "accumulating": accumulating,
        "limits": limits,
    }


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(rows: list[dict[str, Any]], started: str, load_before: str, load_after: str, command: str) -> str:
    pl = lightning()
    lines = [
        "# Lightning's loop vs the plain PyTorch loop: step peaks and memory limits",
        "",
        "Generated by `bench/lightning_loop.py` (its docstring describes the method). Do not edit by hand.",
        "",
        f"- machine: {_cpu_name()}, {os.cpu_count()} cores",
        f"- torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}",
        f"- date: {started}; load average at start / end: {load_before} / {load_after} (a shared host: "
        "byte counts do not depend on load, seconds do)",
        f"- command: `{command}`",
        "- device cpu; every peak counted by service.probing.memory.CPUMemoryBudget (live tensor bytes)",
        "- **CUDA numbers are owed**: not measured on a GPU yet (there the peak is max_memory_allocated, and "
        "a batch prefetched on the host is not device memory).",
        "",
        "## Step peaks at one batch size",
        "",
        "| case | batch | gradients | PyTorch loop (engine) | Lightning loop (engine) | Lightning fit | "
        "fit - PyTorch | in gradient copies | engine Lightning - fit | accumulating, 2nd micro-step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        diff = r["fit_peak"] - r["pytorch_peak"]
        lines.append(
            f"| {r['case'].name} | {r['case'].step_batch} | {r['gradients']} | {r['pytorch_peak']} | "
            f"{r['lightning_peak']} | {r['fit_peak']} | {diff} | {diff / r['gradients']:.2f} | "
            f"{r['lightning_peak'] - r['fit_peak']} | {r['accumulating']} |"
        )
    lines += [
        "",
        "## Memory limits under the budget",
        "",
        "| case | budget | loop | max feasible | trials | probe s | Lightning fit peak at max | fits | "
        "at max + 1 | fits |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        for loop, found in r["limits"].items():
            bound = " (lower bound)" if found["lower_bound"] else ""
            lines.append(
                f"| {r['case'].name} | {r['budget']} | {loop} | {found['max']}{bound} | {found['trials']} | "
                f"{found['seconds']:.1f} | {found['fit_peak']} | {_yes(found['fit_peak'] <= r['budget'])} | "
                f"{found['fit_peak_next']} | {_yes(found['fit_peak_next'] <= r['budget'])} |"
            )
    lines += [
        "",
        "## Reading it",
        "",
        "- Lightning's automatic optimisation runs training_step, then zero_grad, then backward: the "
        "previous step's gradients are alive through the forward. The plain loop frees them after "
        "optimizer.step(), but its own backward allocates the new gradients while activations are still "
        "alive. What Lightning costs more at the peak is therefore between 0 and about one copy of the "
        "gradients, depending on the model (when the gradients appear during backward, and whether the "
        "optimizer step is the peak): see the column in gradient copies. A fixed one-copy headroom is a "
        'prediction that can be too much or too little; `training.loop="lightning"` measures it.',
        "- accumulating, 2nd micro-step: neither single-step convention covers it. A loop that accumulates "
        "gradients (plain, or Lightning with accumulate_grad_batches > 1) runs its later micro-steps with "
        "the gradients alive through the forward and adds the new ones into them in backward; where this "
        "column is above both engine columns, a recipe with gradient_accumulation_steps > 1 needs more "
        "than either measured at its micro-batch. So the engine measures such a recipe's micro-batch in "
        "this convention too and lowers it until it fits (`search.accumulation_checked`).",
        "- engine Lightning - fit: how far the engine's Lightning convention is from the real fit at the "
        "same size (a few bytes: Lightning's loss clone, optimizer step counters).",
        "- fits: the Lightning fit's measured peak is within the budget at the probe's answer. With "
        '`loop="lightning"` it should be yes at max and no at max + 1 (an exact answer) or yes (the '
        "search stopped within its tolerance below the limit).",
        "",
    ]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lightning_loop.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (memory does not depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lightning()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = load()
    rows = []
    for case in CASES:
        began = time.perf_counter()
        rows.append(run_case(case))
        print(_summary(rows[-1], time.perf_counter() - began), flush=True)
    command = shlex.join([".venv/bin/python", "bench/lightning_loop.py", *(argv or sys.argv[1:])])
    args.out.write_text(report(rows, started, load_before, load(), command))
    print(f"wrote {args.out}")


def _summary(row: dict[str, Any], seconds: float) -> str:
    limits = row["limits"]
    return (
        f"{row['case'].name}: step peaks pytorch {row['pytorch_peak']} lightning {row['lightning_peak']} "
        f"fit {row['fit_peak']} (gradients {row['gradients']}); max feasible pytorch "
        f"{limits['pytorch']['max']} (fit peak {limits['pytorch']['fit_peak']}) lightning "
        f"{limits['lightning']['max']} (fit peak {limits['lightning']['fit_peak']}), budget {row['budget']} "
        f"[{seconds:.0f} s]"
    )


if __name__ == "__main__":
    main()

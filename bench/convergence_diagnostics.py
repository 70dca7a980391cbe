"""Where the convergence suite's answers go wrong: each B_noise estimate against the oracle's own.

Reads a report of bench/convergence.py (its probes' measurements and answers) and the oracle sweeps it
was scored on (the `--rescore` files its command names), and prints, per optimizer family (plain SGD,
SGD with momentum, Adam/AdamW):

- the oracle's B_noise: S(B) = S_min(1 + B_noise/B) fitted (least squares in ln S, B_noise on a log grid)
  to the steps the oracle needed at each swept size with the lr tuned per size;
- the ratio of the probe's estimates to it: B_simple, the races' fit, and the B_noise the batch was
  chosen for at the client's horizon;
- the model-form floor: the size that S(B) with the oracle's own B_noise and the oracle's step times
  chooses, scored like the recommendation (how often even that is over 1.25x the best time);
- the oracle's best lr at batch 32 over the client's lr, and how the best lr grows with B (the slope of
  ln lr against ln B over the swept sizes);
- the oracle against itself: where a depth's steps were averaged over four or more minibatch orders, the
  size the mean of half of them picks, scored on the mean of the other half (same step times). How often
  that is over 1.25x bounds the yardstick's own noise from above (a half is noisier than the whole).

No training: everything comes from the stored files. Writes a Markdown copy next to `--out`.

    python bench/convergence_diagnostics.py [--report docs/benchmarks/convergence.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.probing.memory import cpu_model_name  # noqa: E402

FAMILIES = ("plain SGD", "SGD momentum", "Adam/AdamW")
NOISE_GRID = np.exp(np.linspace(0.0, math.log(1e5), 400))  # B_noise candidates for the oracle's fit


def family(task: dict[str, Any]) -> str:
    if task["optimizer"] != "sgd":
        return "Adam/AdamW"
    return "plain SGD" if task["options"].get("momentum", 0.9) == 0 else "SGD momentum"


def oracle_noise_scale(steps: dict[int, float]) -> float:
    """B_noise of S(B) = S_min(1 + B_noise/B) fitted to the oracle's steps (least squares in ln S)."""
    sizes = np.array(sorted(steps), dtype=float)
    log_steps = np.log([steps[int(b)] for b in sizes])
    factors = np.log1p(NOISE_GRID[:, None] / sizes[None, :])
    residual = log_steps[None, :] - factors
    residual -= residual.mean(axis=1, keepdims=True)  # ln S_min: the best one per candidate
    return float(NOISE_GRID[int(np.argmin((residual**2).sum(axis=1)))])


def split_half_ratios(
    per_order: dict[int, list[float]], step_seconds: dict[int, float], orders: int = 4
) -> list[float]:
    """The oracle against itself at one depth, on its first `orders` minibatch orders: for each half of
    them that holds the first (the one the lr was chosen on), the size whose mean steps over that half is
    fastest, its time over the best time by the mean of the other half. [] unless every size has that
    many orders."""
    if orders < 4 or orders % 2 or min((len(v) for v in per_order.values()), default=0) < orders:
        return []
    ratios = []
    for others in itertools.combinations(range(1, orders), orders // 2 - 1):
        pick_half = (0, *others)
        score_half = [i for i in range(orders) if i not in pick_half]
        picked = {b: statistics.mean(v[i] for i in pick_half) * step_seconds[b] for b, v in per_order.items()}
        scored = {
            b: statistics.mean(v[i] for i in score_half) * step_seconds[b] for b, v in per_order.items()
        }
        choice = min(picked, key=lambda b: picked[b])
        ratios.append(scored[choice] / min(scored.values()))
    return ratios


def sweep_files(report: dict[str, Any]) -> list[Path]:
    """The `--rescore` files the report's command names."""
    words = shlex.split(report["command"])
    files = words[words.index("--rescore") + 1].split(",")
    return [ROOT / f for f in files]


def load_sweeps(paths: list[Path]) -> dict[str, dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    for path in paths:
        for task in json.loads(path.read_text())["tasks"]:
            tasks[task["task"]["name"]] = task
    return tasks


def _ratio_line(values: list[float]) -> str:
    if not values:
        return "-"
    logs = sorted(math.log(v) for v in values)
    q1, q3 = np.percentile(logs, [25, 75])
    median = math.exp(statistics.median(logs))
    return f"x{median:.2f} (IQR x{math.exp(q1):.2f}-x{math.exp(q3):.2f}, n {len(values)})"


def analyse(report: dict[str, Any], sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    estimates: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    floor: dict[str, list[float]] = defaultdict(list)
    lr_gap: dict[str, list[float]] = defaultdict(list)
    lr_slope: dict[str, list[float]] = defaultdict(list)
    self_agreement: dict[str, list[float]] = defaultdict(list)
    for result in report["tasks"]:
        task = result["task"]
        sweep = sweeps[task["name"]]
        fam = family(task)
        step_s = {int(b): v for b, v in sweep["step_seconds"].items()}
        probe = result["probe"]
        gns = (probe.get("gradient_noise_scale") or {}).get("value")
        races = probe.get("races") or {}
        race_value = races.get("value") if races.get("status") == "ok" else None
        for d, depth in enumerate(result["depths"]):
            oracle = sweep["oracle"]
            steps = {int(b): v["depths"][d]["steps"] for b, v in oracle.items()}
            steps = {b: s for b, s in steps.items() if s}
            per_order = {int(b): v["depths"][d].get("steps_per_order") or [] for b, v in oracle.items()}
            if all(per_order.values()) and all(s is not None for v in per_order.values() for s in v):
                halves_of_two = split_half_ratios(per_order, step_s, 4)
                self_agreement[fam].extend(halves_of_two)
                eight = split_half_ratios(per_order, step_s, 8)
                if eight:  # the same depths with halves of two orders, for comparison
                    self_agreement["eight: halves of four"].extend(eight)
                    self_agreement["eight: halves of two"].extend(halves_of_two)
            if len(steps) < 3:
                continue
            own = oracle_noise_scale(steps)
            horizon = depth.get("b_noise_horizon")
            for name, value in (("B_simple", gns), ("races", race_value), ("at the horizon", horizon)):
                if value is not None and math.isfinite(value) and value > 0:
                    estimates[fam][name].append(value / own)
            times = {b: steps[b] * step_s[b] for b in steps}
            pick = min(steps, key=lambda b: (1 + own / b) * step_s[b])
            floor[fam].append(times[pick] / min(times.values()))
            best_lr = [(int(b), v["depths"][d].get("best_lr")) for b, v in sweep["oracle"].items()]
            best_lr = [(b, lr) for b, lr in best_lr if lr]
            at_32 = dict(best_lr).get(32)
            if at_32:
                lr_gap[fam].append(at_32 / task["reference_lr"])
            if len(best_lr) > 2:
                slope = np.polyfit(np.log([b for b, _ in best_lr]), np.log([lr for _, lr in best_lr]), 1)[0]
                lr_slope[fam].append(float(slope))
    return {
        "estimates": estimates, "floor": floor, "lr_gap": lr_gap, "lr_slope": lr_slope,
        "self_agreement": self_agreement,
    }  # fmt: skip


def render(found: dict[str, Any], header: list[str]) -> str:
    lines = ["# Convergence suite: the B_noise estimates against the oracle's own", "", *header, ""]
    lines += [
        "Each estimate over the oracle's B_noise (S(B) fitted to its steps, lr tuned per size): median "
        "ratio and interquartile range, per task-depth.",
        "",
        "| optimizer | B_simple | races' fit | at the horizon (the batch's) |",
        "|---|---|---|---|",
    ]
    for fam in FAMILIES:
        est = found["estimates"].get(fam, {})
        cells = [_ratio_line(est.get(k, [])) for k in ("B_simple", "races", "at the horizon")]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The model-form floor (the size S(B) with the oracle's own B_noise and step times chooses) and the "
        "oracle's learning rates:",
        "",
        "| optimizer | task-depths | floor: median ratio | floor: over 1.25 | best lr at 32 / client's lr "
        "| slope of ln best lr on ln B |",
        "|---|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        floor, gap, slope = (found[k].get(fam, []) for k in ("floor", "lr_gap", "lr_slope"))
        if not floor:
            continue
        lines.append(
            f"| {fam} | {len(floor)} | {statistics.median(floor):.2f} | {sum(r > 1.25 for r in floor)} | "
            f"{statistics.median(gap):.1f} | {statistics.median(slope):.2f} |"
        )
    lines += [
        "",
        "The oracle against itself: half of a depth's first four minibatch orders pick the size, the "
        "other half score it (each half that holds the first order, the one its lr was chosen on; every "
        "pairing is a split). A half is noisier than the whole oracle, so these rates overstate the whole "
        "oracle's own; they show how finely a scored answer can be told apart from the best at all. The "
        "last two rows: the depths whose sweep ran eight orders, with halves of two and of four.",
        "",
        "| orders per half | optimizer | task-depth-splits | median ratio | over 1.10 | over 1.25 | worst |",
        "|---|---|---|---|---|---|---|",
    ]
    agreement = found["self_agreement"]
    pooled = [r for fam in FAMILIES for r in agreement.get(fam, [])]
    rows = [("2", f, agreement.get(f, [])) for f in FAMILIES] + [("2", "all", pooled)]
    rows.append(("2", "all, depths with eight orders", agreement.get("eight: halves of two", [])))
    rows.append(("4", "all, depths with eight orders", agreement.get("eight: halves of four", [])))
    for half, fam, ratios in rows:
        if ratios:
            lines.append(
                f"| {half} | {fam} | {len(ratios)} | {statistics.median(ratios):.2f} | "
                f"{sum(r > 1.10 for r in ratios) / len(ratios):.0%} | "
                f"{sum(r > 1.25 for r in ratios) / len(ratios):.0%} | {max(ratios):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default=str(ROOT / "docs" / "benchmarks" / "convergence.json"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "convergence_diagnostics.md"))
    args = parser.parse_args()
    report = json.loads(Path(args.report).read_text())
    found = analyse(report, load_sweeps(sweep_files(report)))
    command = "python bench/convergence_diagnostics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = Path(args.report).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    machine = cpu_model_name() or platform.processor()
    header = [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {machine}, {os.cpu_count()} cores "
        "(no training: read from stored files)",
        f"- command: `{command.strip()}`",
        f"- report: `{shown}` ({report.get('date')}); its sweeps: the `--rescore` files of its command",
    ]
    text = render(found, header)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

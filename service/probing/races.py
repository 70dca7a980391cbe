"""Short training races: measure B_noise from steps-to-loss instead of trusting the gradient noise scale.

B_simple (noise.py) is a proxy: it grows as training proceeds and overstates B_noise when per-example
gradients are noisy for reasons that do not slow training (noisy labels). The quantity that governs
steps to a target is B_noise in S(B) = S_min·(1 + B_noise/B) (McCandlish et al. 2018, eq. 2.11). So:
race the same initial weights at 2-3 batch sizes (each with the learning rate the recipe's rule gives
it), record the loss on a fixed evaluation subset on a geometric schedule of steps, take a loss level
every race reached, read off the (interpolated) steps each needed, and fit S = S_min + S_min·B_noise/B
by least squares in 1/B, weighting each point by 1/S² so every size counts by its relative error.

The time budget is shared between the races: the first race runs its share and sets the loss level;
later races stop as soon as they reach it. Everything that went wrong is in the result, not hidden: a
race that diverged, a level not reached, a fit that only bounds B_noise.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from service.probing import noise, recipe

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
# Evaluate at steps 1, 2, ..., 10, then every ~10 % of steps; the crossing is interpolated between
# evaluations, so steps to a level come out well inside that spacing. An evaluation (512 examples) costs
# 1-3 training steps: at every ~4 %, short races spent more time evaluating than training.
EVAL_GROWTH = 1.1
DIVERGED_FACTOR = 3.0  # a loss above 3x the initial loss counts as divergence
FIT_REACH = 2.0  # a fitted B_noise further than this factor outside the sizes raced is only a bound
FIRST_RACE_SHARE = 0.25  # of the races' budget: the first race sets the loss level the others must reach


def race_sizes(prediction: float, *, max_size: int, min_size: int = 1, count: int = 3) -> list[int]:
    """`count` sizes spaced x4 (x2 when the range is too narrow) around `prediction`, inside the bounds.

    Centred on the power of two nearest the prediction, shifted down or up to fit [min_size, max_size];
    fewer sizes when the range cannot hold `count` distinct ones.
    """
    lo, hi = max(1, min_size), max(1, min_size, max_size)
    centre = 2 ** round(math.log2(min(max(prediction, lo), hi)))
    best: list[int] = [lo]
    for factor in (4, 2):
        top_start = 2 ** math.floor(math.log2(max(1, hi / factor ** (count - 1))))
        first = max(min(centre / factor ** (count // 2), top_start), lo)
        sizes = sorted({int(min(hi, max(lo, first * factor**i))) for i in range(count)})
        if len(sizes) == count:
            return sizes
        best = max(best, sizes, key=len)
    return best


def _eval_loss(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
) -> float:
    """Mean loss over (x, y) without gradients.

    Models with BatchNorm are evaluated in training mode (batch statistics: early in training the
    running averages are far off, so eval mode would measure the averages, not the weights), and their
    running statistics are restored afterwards. Other models run in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was = model.training
    model.train(bool(norms))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            total += float(loss_fn(model(x[i : i + chunk]), y[i : i + chunk])) * len(x[i : i + chunk])
    for m, state in zip(norms, saved, strict=True):
        m.load_state_dict(state)
    model.train(was)
    return total / len(x)


def train_race(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    *,
    batch_size: int,
    max_seconds: float,
    stop_below: float | None = None,
    max_steps: int = 1_000_000,
    seed: int = 0,
    eval_growth: float = EVAL_GROWTH,
) -> dict[str, Any]:
    """Train from the model's current weights; the curve is [(step, evaluation loss)] at geometric steps.

    Stops after `max_seconds` of training and evaluation, when the evaluation loss falls to `stop_below`,
    at `max_steps`, or when the loss diverges (non-finite or > 3x the initial loss). Evaluations come at
    steps growing by `eval_growth`.
    """
    generator = torch.Generator().manual_seed(seed)
    initial = _eval_loss(model, loss_fn, eval_x, eval_y)
    curve: list[tuple[int, float]] = [(0, initial)]
    status, step, train_s, eval_s, next_eval = "time_budget", 0, 0.0, 0.0, 1
    model.train()
    while step < max_steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (batch_size,), generator=generator).to(x.device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        step += 1
        train_s += time.perf_counter() - t0
        if not math.isfinite(float(loss.detach())):
            curve.append((step, math.inf))
            status = "diverged"
            break
        if step >= next_eval or train_s + eval_s >= max_seconds or step >= max_steps:
            t1 = time.perf_counter()
            value = _eval_loss(model, loss_fn, eval_x, eval_y)
            eval_s += time.perf_counter() - t1
            curve.append((step, value if math.isfinite(value) else math.inf))
            next_eval = max(step + 1, math.ceil(step * eval_growth))
            if not math.isfinite(value) or value > DIVERGED_FACTOR * initial:
                status = "diverged"
                break
            if stop_below is not None and value <= stop_below:
                status = "reached"
                break
            if train_s + eval_s >= max_seconds:
                break
    else:
        status = "max_steps"
    optimizer.zero_grad(set_to_none=True)
    finite = [v for _, v in curve if math.isfinite(v)]
    return {
        "batch_size": batch_size,
        "status": status,
        "steps": step,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "initial_loss": initial,
        "best_loss": min(finite),
        "curve": curve,
    }


def steps_to_level(curve: Sequence[tuple[int, float]], level: float) -> float | None:
    """First step at which the loss reaches `level`, interpolated between evaluations.

    Log-log between evaluations after the first step: loss curves are close to power laws there, and a
    straight line between two points of a convex curve would put every crossing late, the more so the
    sparser the evaluations (the long, small-batch races), which would inflate B_noise.
    """
    prev_step, prev_loss = curve[0]
    if prev_loss <= level:
        return 0.0
    for step, loss in curve[1:]:
        if loss <= level:
            if prev_loss <= loss:
                return float(step)
            if prev_step >= 1 and loss > 0:
                frac = math.log(prev_loss / level) / math.log(prev_loss / loss)
                return prev_step * (step / prev_step) ** frac
            return prev_step + (prev_loss - level) / (prev_loss - loss) * (step - prev_step)
        prev_step, prev_loss = step, loss
    return None


def fit_steps(sizes: Sequence[float], steps: Sequence[float]) -> dict[str, Any]:
    """Weighted least squares of S = a + b/B (weights 1/S²); B_noise = b/a, S_min = a.

    status "ok"; "above_range" when a <= 0 (steps fell at least as fast as 1/B: B_noise is above the
    sizes raced, value = the largest size as a lower bound) or the fit puts B_noise more than FIT_REACH
    times above the largest size (steps then still fall almost as 1/B across the sizes raced, so S_min,
    and with it B_noise, is poorly determined); "below_range" when b <= 0 (bigger batches did not need
    fewer steps) or B_noise is more than FIT_REACH times below the smallest size (value = the smallest
    size as an upper bound).
    `rel_rms` is the weighted relative residual (0 with two points: the fit is then exact, not checked).
    """
    if len(sizes) < 2 or len(set(sizes)) < 2:
        return {"status": "insufficient", "value": None, "points": len(sizes)}
    w = [1.0 / s**2 for s in steps]
    u = [1.0 / b for b in sizes]
    sw = sum(w)
    mu = sum(wi * ui for wi, ui in zip(w, u, strict=True)) / sw
    ms = sum(wi * si for wi, si in zip(w, steps, strict=True)) / sw
    var = sum(wi * (ui - mu) ** 2 for wi, ui in zip(w, u, strict=True))
    b = sum(wi * (ui - mu) * (si - ms) for wi, ui, si in zip(w, u, steps, strict=True)) / var
    a = ms - b * mu
    residuals = [(si - (a + b * ui)) / si for ui, si in zip(u, steps, strict=True)]
    rel_rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    out: dict[str, Any] = {"points": len(sizes), "s_min": a, "slope": b, "rel_rms": rel_rms}
    if b <= 0 or (a > 0 and b / a < min(sizes) / FIT_REACH):
        return {**out, "status": "below_range", "value": float(min(sizes)), "bound": "upper"}
    if a <= 0 or b / a > FIT_REACH * max(sizes):
        return {**out, "status": "above_range", "value": float(max(sizes)), "bound": "lower"}
    return {**out, "status": "ok", "value": b / a, "bound": None}


def run_races(
    model: nn.Module,
    loss_fn: LossFn,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sizes: Sequence[int],
    lr_for_size: Callable[[int], float],
    time_budget_s: float,
    eval_size: int = 512,
    holdout: bool = False,
    max_steps: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Race `sizes` from the model's current weights (restored afterwards) and fit B_noise.

    `make_optimizer(params, lr)` builds a fresh optimizer per race. The loss is measured on a fixed
    (seeded) subset of `eval_size` examples: training loss, as McCandlish et al. measure steps to a
    training loss; with `holdout=True` those examples are kept out of training instead. The middle
    size races first and sets the loss level; the others, largest first, stop when they reach it.
    Returns the fit (`value`, `status`, `rel_rms`, `level`) and per-race summaries.
    """
    start = time.monotonic()
    sizes = sorted(set(int(s) for s in sizes))
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    n_eval = min(eval_size, len(x) // 4 if holdout else len(x))
    eval_idx, train_idx = perm[:n_eval], (perm[n_eval:] if holdout else perm)
    ex, ey, tx, ty = x[eval_idx], y[eval_idx], x[train_idx], y[train_idx]
    initial_state = copy.deepcopy(model.state_dict())
    # The middle size first (it sets the level), then the others largest first: big batches reach the
    # level in few steps and hand their unused time to the small ones, which need the most steps.
    middle = sizes[len(sizes) // 2]
    order = [middle] + sorted((s for s in sizes if s != middle), reverse=True)
    races: dict[int, dict[str, Any]] = {}
    level: float | None = None
    try:
        for i, size in enumerate(order):
            # The first race sets the level with FIRST_RACE_SHARE of the budget; the others split the rest
            # (0.9: the first evaluation and the optimizer's set-up run outside a race's own clock) and
            # usually stop early, on reaching the level.
            model.load_state_dict(initial_state)
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr_for_size(size))
            remaining = time_budget_s - (time.monotonic() - start)  # after a first optimizer's imports
            share = FIRST_RACE_SHARE * remaining if i == 0 else remaining / (len(order) - i)
            if share <= 0:
                races[size] = {"batch_size": size, "status": "skipped", "curve": []}
                continue
            race = train_race(
                model, loss_fn, optimizer, tx, ty, ex, ey,
                batch_size=size, max_seconds=0.9 * share, stop_below=level,
                max_steps=max_steps, seed=seed + 1,
            )  # fmt: skip
            race["learning_rate"] = lr_for_size(size)
            races[size] = race
            if level is None and race["status"] != "diverged":
                level = _level_from(race)
    finally:
        model.load_state_dict(initial_state)
    return _summarise(races, time.monotonic() - start)


def _level_from(race: dict[str, Any]) -> float:
    """The loss the first race got to: mean of its last two evaluations (smooths one lucky dip)."""
    tail = [v for _, v in race["curve"][-2:]]
    return max(sum(tail) / len(tail), race["best_loss"])


_PROBLEMS = {
    "diverged": "diverged",
    "skipped": "skipped: the time budget ran out",
    "no_progress": "made no progress (its loss never fell below the start)",
}


def _summarise(races: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Pick the loss level all usable races reached, read steps to it, and fit S(B)."""
    for r in races.values():  # e.g. a fresh Adam's first steps raise the loss, and the share ran out
        if r["status"] not in ("diverged", "skipped") and r["best_loss"] >= r["initial_loss"]:
            r["status"] = "no_progress"
    usable = {b: r for b, r in races.items() if r["status"] not in ("diverged", "skipped", "no_progress")}
    warnings = [
        f"race at batch size {b} {_PROBLEMS[r['status']]}"
        + (
            f" (lr {r['learning_rate']:.3g}, {r['steps']} steps)"
            if r.get("learning_rate") is not None
            else ""
        )
        for b, r in races.items()
        if r["status"] in _PROBLEMS
    ]
    summary: dict[str, Any] = {
        "races": [
            {
                k: r.get(k)
                for k in ("batch_size", "learning_rate", "status", "steps", "best_loss", "train_seconds")
            }
            for r in races.values()
        ],
        "seconds": seconds,
        "warnings": warnings,
    }
    if len(usable) < 2:
        return {**summary, "status": "insufficient", "value": None, "level": None}
    level = max(r["best_loss"] for r in usable.values())
    if level >= min(r["initial_loss"] for r in usable.values()):
        return {**summary, "status": "no_progress", "value": None, "level": level}
    steps = {b: steps_to_level(r["curve"], level) for b, r in usable.items()}
    points = {b: s for b, s in steps.items() if s is not None and s > 0}
    for row in summary["races"]:
        row["steps_to_level"] = steps.get(row["batch_size"])
    fit = fit_steps(list(points), list(points.values()))
    return {**summary, **fit, "level": level, "method": "races"}


def run_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: str,
    learning_rate: float,
    reference_batch_size: int,
    max_batch_size: int,
    time_budget_s: float,
    measured_on: str = "client",
    noise_share: float = 0.4,
    warmup_steps: int = 200,
    race_count: int = 3,
    min_batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The statistics phase: warm-up + gradient noise scale, then races around it, in one time budget.

    `model` must be freshly initialised (it is trained in place by the warm-up; the races start from the
    warmed-up weights, which are restored after them). `make_optimizer(params, lr)` builds the client's
    optimizer; `optimizer` is its name ("sgd", "adam", "adamw") for the learning-rate rule. Races use
    sizes in [min_batch_size, min(max_batch_size, len(x) // 2)]: tiny batches are slow per sample and
    only cost time (pass the throughput ladder's smallest size).
    Returns {"gradient_noise_scale", "races" (None when skipped), "cut_short": [messages]}: the
    arguments `recipe.recommend` takes.
    """
    start = time.monotonic()
    cut_short: list[str] = []
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], learning_rate)
    gns = noise.measure_noise_scale(
        model, loss_fn, opt, x, y,
        warmup_batch_size=min(reference_batch_size, len(x)), warmup_steps=warmup_steps,
        time_budget_s=noise_share * time_budget_s, measured_on=measured_on, seed=seed,
    )  # fmt: skip
    if gns.get("warmup_steps", 0) < warmup_steps and gns["status"] != "non_finite_loss":
        cut_short.append(f"warm-up cut to {gns['warmup_steps']} of {warmup_steps} steps by the time budget")
    if "cut_short" in gns:
        cut_short.append(f"gradient noise scale: {gns['cut_short']}")
    if gns["status"] == "non_finite_loss":
        cut_short.append(f"statistics stopped: {gns['error']} (reference learning rate {learning_rate:g})")
        return {"gradient_noise_scale": gns, "races": None, "cut_short": cut_short}
    prediction = gns["value"] if gns["status"] == "ok" else gns["b_big"]
    remaining = time_budget_s - (time.monotonic() - start)
    upper = max(1, min(max_batch_size, len(x) // 2))
    if remaining < 0.1 * time_budget_s:
        cut_short.append("training races skipped: no time left in the budget")
        return {"gradient_noise_scale": gns, "races": None, "cut_short": cut_short}
    sizes = race_sizes(prediction, max_size=upper, min_size=min(min_batch_size, upper), count=race_count)

    def lr_for_size(size: int) -> float:
        return recipe.scale_learning_rate(learning_rate, reference_batch_size, size, optimizer, prediction)[0]

    race = run_races(
        model, loss_fn, make_optimizer, x, y,
        sizes=sizes, lr_for_size=lr_for_size, time_budget_s=remaining, seed=seed,
    )  # fmt: skip
    cut_short.extend(race["warnings"])  # diverged races are reported, never dropped silently
    return {"gradient_noise_scale": gns, "races": race, "cut_short": cut_short}

"""Short training races: measure B_noise from steps-to-loss instead of trusting the gradient noise scale.

B_simple (noise.py) is a proxy: it grows as training proceeds and overstates B_noise when per-example
gradients are noisy for reasons that do not slow training (noisy labels). The quantity that governs
steps to a target is B_noise in S(B) = S_min·(1 + B_noise/B) (McCandlish et al. 2018, eq. 2.11). So:
race the same initial weights at 2-3 batch sizes (each with the learning rate the recipe's rule gives
it), record the loss on a fixed evaluation subset on a geometric schedule of steps, take a loss level
every race reached, read off the (interpolated) steps each needed, and fit S = S_min + S_min·B_noise/B
by least squares in 1/B, weighting each point by 1/S² so every size counts by its relative error.

The time budget is shared between the races: the first race runs its share and sets the loss level;
later races stop as soon as they reach it. A fit counts only at a real depth: a level at least
MIN_DROP_FRACTION below the start, reached in at least MIN_LEVEL_STEPS steps by every race it uses. Each
race restarts its optimizer, and SGD's momentum buffer then takes a number of steps to fill (`momentum_lag`):
the fit counts steps after that lag, which would otherwise weigh most on the large sizes' short races. A
race that stalls (diverges, or never gets STALL_DROP below its start) is retried once at LR_BACKOFF times
its lr, and each race reports `stable_learning_rate`, the largest lr it trained stably at. A held-out part
of the sample (split_heldout) is kept out of all training and evaluated alongside, so the held-out loss
at equal training loss can be compared across sizes. The first race also records B_simple along its
trajectory (noise.split_step), which horizon.py carries to the client's horizon. Everything that went
wrong is in the result, not hidden: a race that diverged or stalled, a level too shallow or not
reached, a fit that only bounds B_noise.
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
from service.probing.inputs import Batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
# Evaluate at steps 1, 2, ..., 10, then every ~10 % of steps; the crossing is interpolated between
# evaluations, so steps to a level come out well inside that spacing. An evaluation (512 examples) costs
# 1-3 training steps: at every ~4 %, short races spent more time evaluating than training.
EVAL_GROWTH = 1.1
DIVERGED_FACTOR = 3.0  # a loss above 3x the initial loss counts as divergence
# ... after the first SPIKE_GRACE_STEPS steps (before them only a non-finite loss does): a race starts
# from warmed-up weights, whose loss is low, with a fresh optimizer at a new lr and no lr warm-up, and a
# transient spike there (Adam's first steps with empty moments, SGD's jump to a larger lr) is not yet
# divergence. Stopping it backed the race's lr off 4x, which made larger sizes look slow (B_noise low).
SPIKE_GRACE_STEPS = 10
SPIKE_CEILING_FACTOR = 30.0  # ... but a loss this far above the start is a runaway even in the grace
FIT_REACH = 2.0  # a fitted B_noise further than this factor outside the sizes raced is only a bound
FIRST_RACE_SHARE = 0.25  # of the races' budget: the first race sets the loss level the others must reach
# A race counts only at a real depth: its level at least MIN_DROP_FRACTION below the races' starting loss,
# reached in at least MIN_LEVEL_STEPS steps (a level passed after 1-2 steps says nothing about S(B)).
MIN_DROP_FRACTION = 0.1
MIN_LEVEL_STEPS = 8
# A race stalls when it diverges or its loss never gets STALL_DROP below its start: it is run once more
# with its learning rate times LR_BACKOFF (a reference lr tuned for another optimizer, or too high).
STALL_DROP = 0.02
LR_BACKOFF = 0.25
NOISE_PRECONDITION_EVERY = 10  # steps between refreshes of Adam's preconditioner for the noise track
HOLDOUT_FRACTION = 0.2  # of the sample kept out of all training, for held-out losses
HOLDOUT_MAX = 512
HOLDOUT_MIN_SAMPLE = 100  # smaller samples are not split


def momentum_lag(optimizer: torch.optim.Optimizer) -> float:
    """Steps a fresh SGD optimizer with momentum β falls behind one already at speed: β/(1-β) for heavy
    ball, β²/(1-β) for Nesterov (the sums of the missing update fractions β^k and β^(k+1) while the buffer
    fills on a steady gradient); 0 for plain SGD and for Adam, whose bias correction removes its lag."""
    group = optimizer.param_groups[0]
    beta = float(group.get("momentum") or 0.0)
    if not 0.0 < beta < 1.0:
        return 0.0
    return (beta * beta if group.get("nesterov") else beta) / (1.0 - beta)


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


def _eval_loss(model: nn.Module, loss_fn: LossFn, x: Batch, y: torch.Tensor, chunk: int = 1024) -> float:
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
    x: Batch,
    y: torch.Tensor,
    eval_x: Batch,
    eval_y: torch.Tensor,
    *,
    batch_size: int,
    max_seconds: float,
    stop_below: float | None = None,
    max_steps: int = 1_000_000,
    seed: int = 0,
    eval_growth: float = EVAL_GROWTH,
    heldout: tuple[Batch, torch.Tensor] | None = None,
    track_noise: bool = False,
) -> dict[str, Any]:
    """Train from the model's current weights; the curve is [(step, evaluation loss)] at geometric steps.

    Stops after `max_seconds` of training and evaluation, when the evaluation loss falls to `stop_below`,
    at `max_steps`, or when the loss diverges (non-finite, or > 3x the initial loss; within the first
    SPIKE_GRACE_STEPS steps > 30x). Evaluations come at
    steps growing by `eval_growth`. With `heldout` (x, y) the held-out loss is measured at the same
    steps ("heldout_curve"). With `track_noise` (and an even batch size) each step's gradient is built
    from its two halves, which gives the two-batch-size estimate of B_simple along the way at almost no
    cost: "noise" holds one entry per evaluation window (the mean |G_half|², |G_full|² of its steps).
    """
    generator = torch.Generator().manual_seed(seed)
    initial = _eval_loss(model, loss_fn, eval_x, eval_y)
    curve: list[tuple[int, float]] = [(0, initial)]
    hold_curve: list[tuple[int, float]] = []
    if heldout is not None:
        hold_curve.append((0, _eval_loss(model, loss_fn, *heldout)))
    split = track_noise and batch_size >= 2 and batch_size % 2 == 0
    params = [p for p in model.parameters() if p.requires_grad]
    window = [0.0, 0.0, 0]  # sums of |G_half|², |G_full|², steps since the last evaluation
    noise_points: list[dict[str, Any]] = []
    preconditioner: torch.Tensor | None = None
    status, step, train_s, eval_s, next_eval = "time_budget", 0, 0.0, 0.0, 1
    model.train()
    while step < max_steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (batch_size,), generator=generator).to(x.device)
        optimizer.zero_grad(set_to_none=True)
        if split:
            if step % NOISE_PRECONDITION_EVERY == 1:  # Adam: the preconditioned gradient's noise
                preconditioner = noise.adam_preconditioner(optimizer, params)
            loss = noise.split_step(model, loss_fn, x[idx], y[idx], params, preconditioner, window)
        else:
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
            if heldout is not None:
                hold_curve.append((step, _eval_loss(model, loss_fn, *heldout)))
            eval_s += time.perf_counter() - t1
            curve.append((step, value if math.isfinite(value) else math.inf))
            if split and window[2]:
                noise_points.append(
                    {"step": step, "loss": value, "small_sq": window[0] / window[2],
                     "big_sq": window[1] / window[2], "steps": window[2],
                     "b_small": batch_size // 2, "b_big": batch_size}
                )  # fmt: skip
                window[:] = [0.0, 0.0, 0]
            next_eval = max(step + 1, math.ceil(step * eval_growth))
            limit = DIVERGED_FACTOR if step > SPIKE_GRACE_STEPS else SPIKE_CEILING_FACTOR
            if not math.isfinite(value) or value > limit * initial:
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
    result = {
        "batch_size": batch_size,
        "status": status,
        "steps": step,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "initial_loss": initial,
        "best_loss": min(finite),
        "curve": curve,
    }
    if heldout is not None:
        result["heldout_curve"] = hold_curve
    if split:
        result["noise"] = {"b_small": batch_size // 2, "b_big": batch_size, "windows": noise_points}
    return result


def value_at(curve: Sequence[tuple[int, float]], step: float) -> float | None:
    """The curve's value at `step` (linear in log step between evaluations; None outside the curve)."""
    if not curve or step > curve[-1][0]:
        return None
    prev_step, prev_value = curve[0]
    for s, v in curve[1:]:
        if s >= step:
            if prev_step >= 1 and step > 0:
                frac = math.log(step / prev_step) / math.log(s / prev_step) if s > prev_step else 1.0
            else:
                frac = (step - prev_step) / (s - prev_step) if s > prev_step else 1.0
            return prev_value + frac * (v - prev_value)
        prev_step, prev_value = s, v
    return prev_value


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
                crossing = prev_step * (step / prev_step) ** frac
            else:
                crossing = prev_step + (prev_loss - level) / (prev_loss - loss) * (step - prev_step)
            # Inside the two evaluations: rounding must not put a crossing at the last one past the curve.
            return min(float(step), max(float(prev_step), crossing))
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
    x: Batch,
    y: torch.Tensor,
    *,
    sizes: Sequence[int],
    lr_for_size: Callable[[int], float],
    time_budget_s: float,
    eval_size: int = 512,
    heldout: tuple[Batch, torch.Tensor] | None = None,
    track_noise: bool = True,
    max_steps: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Race `sizes` from the model's current weights (restored afterwards) and fit B_noise.

    `make_optimizer(params, lr)` builds a fresh optimizer per race. The level is a training loss,
    measured on a fixed (seeded) subset of `eval_size` training examples, as McCandlish et al. measure
    steps to a training loss; `heldout` (x, y), kept out of `x`, is evaluated at the same steps. The
    middle size races first, sets the loss level and (`track_noise`) records B_simple along its
    trajectory; the others, largest first, stop when they reach the level. A race that stalls (diverged,
    or its loss never fell STALL_DROP below its start) is run once more at LR_BACKOFF times its lr; each
    race reports `stable_learning_rate`, the largest lr it trained stably at (None when none did).
    Returns the fit (`value`, `status`, `rel_rms`, `level`), per-race summaries and the trajectory.
    """
    start = time.monotonic()
    sizes = sorted(set(int(s) for s in sizes))
    generator = torch.Generator().manual_seed(seed)
    eval_idx = torch.randperm(len(x), generator=generator)[: min(eval_size, len(x))].to(x.device)
    ex, ey = x[eval_idx], y[eval_idx]
    initial_state = copy.deepcopy(model.state_dict())
    # The middle size first (it sets the level), then the others largest first: big batches reach the
    # level in few steps and hand their unused time to the small ones, which need the most steps.
    middle = sizes[len(sizes) // 2]
    order = [middle, *sorted((s for s in sizes if s != middle), reverse=True)]
    races: dict[int, dict[str, Any]] = {}
    level: float | None = None
    trajectory: dict[str, Any] | None = None
    try:
        for i, size in enumerate(order):
            lr, attempts = lr_for_size(size), []
            race: dict[str, Any] = {"batch_size": size, "status": "skipped", "curve": []}
            for _ in range(2):  # one retry at a backed-off lr when the race stalls
                # The first race sets the level with FIRST_RACE_SHARE of the budget; the others split the
                # rest (0.9: the first evaluation and the optimizer's set-up run outside a race's own
                # clock) and usually stop early, on reaching the level.
                model.load_state_dict(initial_state)
                optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
                remaining = time_budget_s - (time.monotonic() - start)  # after a first optimizer's imports
                share = FIRST_RACE_SHARE * remaining if i == 0 else remaining / (len(order) - i)
                if share <= 0:
                    break
                race = train_race(
                    model, loss_fn, optimizer, x, y, ex, ey,
                    batch_size=size, max_seconds=0.9 * share, stop_below=level,
                    max_steps=max_steps, seed=seed + 1, heldout=heldout, track_noise=track_noise and i == 0,
                )  # fmt: skip
                race["learning_rate"] = lr
                race["lag_steps"] = momentum_lag(optimizer)
                attempts.append({"learning_rate": lr, "status": race["status"], "steps": race["steps"]})
                if not _stalled(race):
                    break
                lr *= LR_BACKOFF
            race["attempts"] = attempts
            race["stable_learning_rate"] = race["learning_rate"] if attempts and not _stalled(race) else None
            races[size] = race
            if level is None and race["stable_learning_rate"] is not None:
                level = _level_from(race)
                trajectory = race.get("noise")
    finally:
        model.load_state_dict(initial_state)
    summary = _summarise(races, time.monotonic() - start)
    summary["trajectory"] = _trajectory(trajectory, races.get(middle))
    return summary


def _stalled(race: dict[str, Any]) -> bool:
    """Diverged, or its loss never got STALL_DROP below where it started."""
    if race["status"] == "diverged":
        return True
    start = race["initial_loss"]
    return race["status"] != "reached" and race["best_loss"] > start - STALL_DROP * abs(start)


def _trajectory(noise_track: dict[str, Any] | None, race: dict[str, Any] | None) -> dict[str, Any] | None:
    """The first race's B_simple windows with its curves (horizon.py reads them)."""
    if not noise_track or race is None:
        return None
    return {
        **noise_track,
        "batch_size": race["batch_size"],
        "learning_rate": race.get("learning_rate"),
        "curve": race["curve"],
        "heldout_curve": race.get("heldout_curve"),
    }


def _level_from(race: dict[str, Any]) -> float:
    """The loss the first race got to: mean of its last two evaluations (smooths one lucky dip)."""
    tail = [v for _, v in race["curve"][-2:]]
    return max(sum(tail) / len(tail), race["best_loss"])


_PROBLEMS = {
    "diverged": "diverged",
    "skipped": "skipped: the time budget ran out",
    "no_progress": "made no progress (its loss never fell below the start)",
    "too_fast": f"reached the level in fewer than {MIN_LEVEL_STEPS} steps after its momentum's lag: too "
    "shallow to count",
}
_ROW_KEYS = (
    "batch_size", "learning_rate", "stable_learning_rate", "status", "steps", "best_loss", "train_seconds",
    "attempts", "lag_steps",
)  # fmt: skip


def _summarise(races: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Pick the loss level all usable races reached, read steps to it, and fit S(B) if it is deep enough."""
    for r in races.values():  # e.g. a fresh Adam's first steps raise the loss, and the share ran out
        if r["status"] not in ("diverged", "skipped") and r["best_loss"] >= r["initial_loss"]:
            r["status"] = "no_progress"
    usable = {b: r for b, r in races.items() if r["status"] not in ("diverged", "skipped", "no_progress")}
    summary: dict[str, Any] = {
        "races": [{k: r.get(k) for k in _ROW_KEYS} for r in races.values()],
        "seconds": seconds,
        "warnings": [],
    }
    if len(usable) >= 2:
        level = max(r["best_loss"] for r in usable.values())
        start = min(r["initial_loss"] for r in usable.values())
        steps = {b: steps_to_level(r["curve"], level) for b, r in usable.items()}
        # Steps at speed: after the momentum buffer's fill-up, which every race pays once (steps_to_level
        # stays as measured).
        at_speed = {b: s - usable[b].get("lag_steps", 0.0) for b, s in steps.items() if s is not None}
        for b, s in at_speed.items():
            if s < MIN_LEVEL_STEPS:
                races[b]["status"] = "too_fast"
        for row in summary["races"]:
            race = races[row["batch_size"]]
            row["status"] = race["status"]
            s = steps.get(row["batch_size"])
            row["steps_to_level"] = s
            if s is not None:
                row["train_loss_at_level"] = level
                if race.get("heldout_curve"):
                    row["heldout_loss_at_level"] = value_at(race["heldout_curve"], s)
        points = {b: s for b, s in at_speed.items() if s >= MIN_LEVEL_STEPS}
        drop = (start - level) / abs(start) if start else 0.0
        summary.update(level=level, start_loss=start, drop_fraction=drop)
    summary["warnings"] = _race_warnings(races)
    if len(usable) < 2:
        return {**summary, "status": "insufficient", "value": None, "level": None}
    if level >= start:
        return {**summary, "status": "no_progress", "value": None}
    if drop < MIN_DROP_FRACTION:
        summary["warnings"].append(
            f"races reached only loss {level:.4g}, {drop:.1%} below their start {start:.4g} (< "
            f"{MIN_DROP_FRACTION:.0%}): too shallow to fit B_noise"
        )
        return {**summary, "status": "shallow", "value": None}
    if len(points) < 2:
        return {**summary, "status": "shallow", "value": None}
    fit = fit_steps(list(points), list(points.values()))
    return {**summary, **fit, "method": "races"}


def _race_warnings(races: dict[int, dict[str, Any]]) -> list[str]:
    warnings = []
    for b, r in races.items():
        if len(r.get("attempts") or ()) > 1:
            first = r["attempts"][0]
            warnings.append(
                f"race at batch size {b} stalled at lr {first['learning_rate']:.3g} ({first['status']}, "
                f"{first['steps']} steps); retried at lr {r['attempts'][-1]['learning_rate']:.3g}"
            )
        if r["status"] in _PROBLEMS:
            lr = r.get("learning_rate")
            warnings.append(
                f"race at batch size {b} {_PROBLEMS[r['status']]}"
                + (f" (lr {lr:.3g}, {r.get('steps')} steps)" if lr is not None else "")
            )
    return warnings


def split_heldout(
    x: Batch, y: torch.Tensor, seed: int = 0
) -> tuple[Batch, torch.Tensor, tuple[Batch, torch.Tensor] | None]:
    """(train x, train y, held-out (x, y) or None): HOLDOUT_FRACTION of the sample, at most HOLDOUT_MAX
    examples, kept out of all training; samples under HOLDOUT_MIN_SAMPLE are not split."""
    n = len(x)
    if n < HOLDOUT_MIN_SAMPLE:
        return x, y, None
    k = min(HOLDOUT_MAX, int(HOLDOUT_FRACTION * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).to(x.device)
    return x[perm[k:]], y[perm[k:]], (x[perm[:k]], y[perm[:k]])


def run_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    make_optimizer: OptimizerFactory,
    x: Batch,
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
    A held-out part of the sample (split_heldout) is kept out of the warm-up, the noise scale and the
    races, which evaluate it. Returns {"gradient_noise_scale", "races" (None when skipped), "cut_short":
    [messages]}: the arguments `recipe.recommend` takes.
    """
    start = time.monotonic()
    cut_short: list[str] = []
    x, y, heldout = split_heldout(x, y, seed)
    warmup_batch = min(reference_batch_size, len(x))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], learning_rate)
    gns = noise.measure_noise_scale(
        model, loss_fn, opt, x, y,
        warmup_batch_size=warmup_batch, warmup_steps=warmup_steps,
        time_budget_s=noise_share * time_budget_s, measured_on=measured_on, seed=seed, track=True,
    )  # fmt: skip
    warmup_windows = gns.pop("trajectory", [])
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
        sizes=sizes, lr_for_size=lr_for_size, time_budget_s=remaining, seed=seed, heldout=heldout,
    )  # fmt: skip
    race["heldout_size"] = 0 if heldout is None else len(heldout[0])
    if race.get("trajectory"):  # the races start after the warm-up: horizon.py counts its steps too
        race["trajectory"]["warmup"] = {"steps": gns.get("warmup_steps", 0), "batch_size": warmup_batch}
        race["trajectory"]["windows"] = warmup_windows + race["trajectory"]["windows"]
    cut_short.extend(race["warnings"])  # diverged races are reported, never dropped silently
    return {"gradient_noise_scale": gns, "races": race, "cut_short": cut_short}

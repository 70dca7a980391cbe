"""The training horizon: B_noise where the client's training ends, steps and epochs to get there, and
how sure the answer is.

The noise scale grows as the loss falls (McCandlish et al. 2018), so a B_noise measured at the shallow
loss a probe reaches is not the one that governs a full training run. Three steps:

1. **Trend.** The warm-up and the first race record B_simple along their trajectory (noise.split_step:
   each step's gradient built from its two halves): pooled by loss and fitted as
   ln B_simple = a + slope·ln L, shrunk towards a prior slope by precision (fit_trend).
2. **Calibration and carry.** The races fit B_noise at their level L_r (the value the recipe already
   chose there). Carried to the horizon's loss L_h along the trend: B_h = B(L_r)·(L_h/L_r)^slope, with
   ln-space spread from the level's estimate, the slope's error times |ln(L_h/L_r)|, and a term growing
   with the extrapolation distance.
3. **The horizon's loss.** `target_loss` (a held-out loss) is mapped to training loss with the first
   race's latest held-out - training gap; for `epochs` the probe's training-loss curve (warm-up, then the
   first race) is expressed in steps at the reference batch size (S(B) = S_min(1 + B_noise/B)); the
   loss at epochs·N/B_ref steps is read off it when the probe trained that far, else a power law
   L(s) = c + a·s^-p fitted to its tail (past the initial plateau) extrapolates it. With neither,
   the horizon is the races' level and the answer says so.

Then, for the recommended size and the reference: steps S(B) = S_min(1 + B_h/B), epochs
E(B) = S(B)·B/N = E_min(1 + B/B_h), predicted wall time S(B)·step time(B); held-out loss at equal
training loss from the races (a warning when the recommended size generalises worse); and an interval
for the recommended size's time ratio to the best size, by Monte Carlo over the measured uncertainties
(B_h's spread, each ladder size's timing spread) and the model's (MODEL_SIGMA; for SGD, FACTOR_SIGMA per
unit of its stability factor's ln). `confidence` summarises that interval.

Plain numbers and dicts, numpy only: imported by the probe engine and the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ln-space spread (1 sigma) of B_noise at the races' level, by how it was obtained. Set on the
# benchmark's tuning half (bench/convergence.py), not on its held-out half.
LEVEL_SIGMA = {"races": 0.35, "combined": 0.5, "gradient_noise_scale": 0.7}
LEVEL_SIGMA_DEFAULT = 0.8
EXTRAPOLATION_SIGMA = 0.25  # extra ln-spread per unit of |ln(L_h / L_r)|
SLOPE_BOUNDS = (-3.0, 0.5)  # a trend outside these is clipped
# Prior on the trend's slope (ln B_simple per ln loss): B_simple grows as the loss falls. Set on the
# tuning half: a 1200-step plain-SGD digits trajectory measured -0.44 ± 0.10, but the oracle's own B_noise
# (S(B) fitted to steps at an lr tuned per size) moved between its two depths by slopes -0.03 to -0.56,
# mean -0.28: B_noise grows more slowly than B_simple, and -0.5 carried deep horizons too far.
PRIOR_SLOPE = -0.3
PRIOR_SLOPE_SD = 0.5
TREND_GROUPS = 6  # bins pooled into this many groups before the fit
MIN_GROUPS = 3
TREND_RESIDUAL_FLOOR = 0.15  # ln-spread assumed at least, so 3 groups on a line do not look exact
EARLY_LOSS_FRACTION = 0.9  # bins above this fraction of the initial loss are the initial transient
MIN_BIN_STEPS = 20  # steps per loss bin of the trajectory
TIME_SIGMA_FLOOR = 0.05  # ln-spread of every step time beyond its own measured spread (drift)
GNS_RESOLVABLE = 64  # B_simple above this many times the larger batch it was measured with is noise
INTERVAL_PROBABILITY = 0.8
# The interval's B_noise spread adds MODEL_SIGMA to the measured one (in quadrature): the model's own
# error (S(B) = S_min(1 + B_noise/B) with the races' lr rule, against an lr tuned per size), which a longer
# probe does not shrink. Without it the interval narrowed with the probe's budget while the errors did
# not: on the benchmark's probe-budget comparison (bench/convergence.py --probe-shares 0.04,0.08,0.16, two
# runs, its 48 tasks, 576 task-depth-probes) it held on 81 / 76 / 71 % at 4 / 8 / 16 % of the sweep's cost
# (the quantile then raised to the power 1.06); with 0.8 (set there: the smallest term that brings the
# pooled rate to 80 %) and no power on 83 / 77 / 79 %. Set again by the same rule once the benchmark's
# oracle tuned each size's lr further (its walk had stopped at a grid edge): on 432 task-depth-probes of its
# 72 tuning and seen tasks the bound held on 75 / 78 / 81 / 84 % with 0.8 / 1.0 / 1.2 / 1.4 (median bound
# 1.26 / 1.29 / 1.32 / 1.34). The stated bound is the Monte Carlo quantile raised to INTERVAL_CALIBRATION
# (1: none; the benchmark's knee ablation restores the method before the knee).
MODEL_SIGMA = 1.2
INTERVAL_CALIBRATION = 1.0
# SGD's stability factor (recipe.stability_factor) is a model of where the lr stops scaling, not a measurement
# of it: the interval's B_noise spread adds FACTOR_SIGMA per unit of ln(1/factor) (in quadrature; the batch
# choice's spread does not). Set by MODEL_SIGMA's rule on stored probes of the benchmark's 72 tuning and seen
# tasks (three draws, the 84 plain-SGD task-depths, factor 0.1): the bound held on 60 of 84 (71 %) without it,
# 64 / 67 / 72 with 0.3 / 0.5 / 0.8 (median bound 1.17 / 1.19 / 1.23 / 1.31); Adam and momentum 0.9 (factor 1)
# held on 89 % and 79 % without any.
FACTOR_SIGMA = 0.5
DRAWS = 2000
# The step-time knee: the largest measured size whose step takes at most STEP_TIME_KNEE times the
# smallest measured size's. Below it a bigger batch costs (almost) nothing per step, and with an lr tuned per
# size steps to target do not rise with B, so the best size is rarely far below it. The recommended size is
# the time model's choice moved KNEE_WEIGHT of the way (in ln B) to the knee: a short probe measures
# B_noise to ~3x (its error against the benchmark oracle's own B_noise), the knee to a few per cent.
# Both set on the benchmark's seen task-depths (bench/convergence.py); docs/benchmarks/convergence_knee.md
# scores the same probes with and without it.
STEP_TIME_KNEE = 1.25
KNEE_WEIGHT = 0.5
CONFIDENCE_BOUNDS = (("high", 1.10), ("medium", 1.25))  # interval upper end -> coarse label
GENERALISATION_TOLERANCE = 0.02  # relative held-out loss excess that triggers a warning
# An extrapolated horizon's loss is fitted to the curve's tail: points below EARLY_LOSS_FRACTION of its
# start, from this fraction of its last step on. Set on the tuning half (the loss predicted at the
# reference run's own steps: mean |ln error| 0.80 fitting from 1/20 of the steps, 0.51 with this).
LOSS_TAIL_FRACTION = 0.25
POWER_GRID = tuple(0.05 * k for k in range(1, 41))  # exponents p tried for L(s) = c + a·s^-p


# ----------------------------------------------------------------------------------- the trend


def trajectory_points(trajectory: Mapping[str, Any] | None) -> list[dict[str, float]]:
    """B_simple per loss bin from the trajectory's windows (the warm-up's, then the first race's): the
    windows are pooled, in order, into bins of MIN_BIN_STEPS steps of one pair of batch sizes (a bin cut
    short by a change of sizes or the end counts from half that); bins whose |G|² or tr(Σ) estimate is
    not positive are dropped."""
    if not trajectory or not trajectory.get("windows"):
        return []
    points: list[dict[str, float]] = []
    acc: dict[str, float] = {}

    def flush(min_steps: int = 1) -> None:
        if not acc or acc["steps"] < min_steps:
            acc.clear()
            return
        b_small, b_big, n = acc["b_small"], acc["b_big"], acc["steps"]
        small, big, loss = acc["small"] / n, acc["big"] / n, acc["loss"] / n
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        if g2 > 0 and trace > 0 and loss > 0:
            points.append({"loss": loss, "b_simple": trace / g2, "steps": n, "grad_sq": g2, "trace": trace})
        acc.clear()

    for w in trajectory["windows"]:
        sizes = (w.get("b_small", trajectory.get("b_small")), w.get("b_big", trajectory.get("b_big")))
        if acc and (acc["b_small"], acc["b_big"]) != sizes:
            flush(MIN_BIN_STEPS // 2)
        if not acc:
            acc.update(b_small=sizes[0], b_big=sizes[1], small=0.0, big=0.0, loss=0.0, steps=0)
        n = w["steps"]
        acc["small"] += w["small_sq"] * n
        acc["big"] += w["big_sq"] * n
        acc["loss"] += w["loss"] * n
        acc["steps"] += n
        if acc["steps"] >= MIN_BIN_STEPS:
            flush()
    flush(MIN_BIN_STEPS // 2)  # the deepest windows count too when they are half a bin
    return points


def fit_trend(points: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """ln B_simple = a + slope·ln L over the trajectory, shrunk towards a prior slope.

    Per-bin ratios are noisy (a ratio of noisy means), so the bins are pooled into up to TREND_GROUPS
    groups of consecutive bins, each estimated as mean tr(Σ) / mean |G|²; bins still near the initial
    loss (above EARLY_LOSS_FRACTION of the first bin's) are left out: at initialisation the noise scale
    is a transient. The fitted slope (weighted by steps) is combined with PRIOR_SLOPE ± PRIOR_SLOPE_SD by
    precision, so a short or noisy trajectory leans on the prior and a long, clean one on itself.
    """
    prior = {"slope": PRIOR_SLOPE, "slope_se": PRIOR_SLOPE_SD, "bins": len(points), "groups": 0}
    if not points:
        return {**prior, "status": "prior_only"}
    start = points[0]["loss"]
    kept = [p for p in points if p["loss"] <= EARLY_LOSS_FRACTION * start] or list(points)
    k = min(TREND_GROUPS, len(kept))
    if k < MIN_GROUPS:
        return {**prior, "status": "prior_only"}
    groups = []
    for i in range(k):
        part = kept[i * len(kept) // k : (i + 1) * len(kept) // k]
        n = sum(p["steps"] for p in part)
        g2 = sum(p["grad_sq"] * p["steps"] for p in part) / n
        trace = sum(p["trace"] * p["steps"] for p in part) / n
        loss = sum(p["loss"] * p["steps"] for p in part) / n
        if g2 > 0 and trace > 0:
            groups.append((loss, trace / g2, n))
    if len(groups) < MIN_GROUPS or len({round(g[0], 12) for g in groups}) < 2:
        return {**prior, "status": "prior_only"}
    u = np.log([g[0] for g in groups])
    v = np.log([g[1] for g in groups])
    w = np.array([g[2] for g in groups], dtype=float)
    mu, mv = np.average(u, weights=w), np.average(v, weights=w)
    var_u = float(np.sum(w * (u - mu) ** 2))
    if var_u <= 0:
        return {**prior, "status": "prior_only"}
    slope = float(np.sum(w * (u - mu) * (v - mv)) / var_u)
    resid = v - (mv + slope * (u - mu))
    dof = max(1, len(groups) - 2)
    sigma2 = max(float(np.sum(w * resid**2) / np.sum(w)) * len(groups) / dof, TREND_RESIDUAL_FLOOR**2)
    se = math.sqrt(sigma2 * float(np.sum(w)) / len(groups) / var_u)
    precision = 1 / se**2 + 1 / PRIOR_SLOPE_SD**2
    combined = (slope / se**2 + PRIOR_SLOPE / PRIOR_SLOPE_SD**2) / precision
    clipped = min(max(combined, SLOPE_BOUNDS[0]), SLOPE_BOUNDS[1])
    return {
        "slope": clipped,
        "slope_se": math.sqrt(1 / precision),
        "measured_slope": slope,
        "measured_slope_se": se,
        "status": "ok" if clipped == combined else "clipped",
        "bins": len(points),
        "groups": len(groups),
        "loss_range": [float(np.exp(u.min())), float(np.exp(u.max()))],
    }


# ---------------------------------------------------------------------------- the horizon's loss


def fit_loss_curve(curve: Sequence[tuple[float, float]]) -> dict[str, Any] | None:
    """L(s) = c + a·s^-p (c >= 0, a > 0) over the curve's points with s >= 1, p from POWER_GRID; the
    exponents whose fit is within a factor (1 + 2/dof) of the best SSE give the range of predictions."""
    pts = [(float(s), float(v)) for s, v in curve if s >= 1 and math.isfinite(v)]
    if pts:  # the tail decides an extrapolation: leave out the initial plateau, then the early steps
        pts = _kept(pts, [(s, v) for s, v in pts if v <= EARLY_LOSS_FRACTION * pts[0][1]])
        pts = _kept(pts, [(s, v) for s, v in pts if s >= max(pts)[0] * LOSS_TAIL_FRACTION])
    if len(pts) < 4:
        return None
    s = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts])
    fits = []
    for p in POWER_GRID:
        x = s**-p
        design = np.stack([np.ones_like(x), x], axis=1)
        (c, a), *_ = np.linalg.lstsq(design, v, rcond=None)
        if c < 0:  # a loss has no negative floor: refit through c = 0
            c, a = 0.0, float(np.dot(x, v) / np.dot(x, x))
        if a <= 0:
            continue
        sse = float(np.sum((c + a * x - v) ** 2))
        fits.append({"p": p, "c": float(c), "a": float(a), "sse": sse})
    if not fits:
        return None
    best = min(fits, key=lambda f: f["sse"])
    dof = max(1, len(pts) - 3)
    plausible = [f for f in fits if f["sse"] <= best["sse"] * (1 + 2 / dof) + 1e-15]
    return {**best, "plausible": plausible}


def _kept(points: list[tuple[float, float]], subset: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`subset` when it still has 4 points to fit, else `points`."""
    return subset if len(subset) >= 4 else points


def measured_loss_at(curve: Sequence[tuple[float, float]], steps: float) -> float | None:
    """The measured curve's loss at `steps` when inside its span (log-linear between points of its
    running minimum, which smooths one noisy window without a fitted shape), else None."""
    pts = sorted((float(s), float(v)) for s, v in curve if s >= 1 and math.isfinite(v))
    if len(pts) < 2 or not pts[0][0] <= steps <= pts[-1][0]:
        return None
    lows = np.minimum.accumulate([v for _, v in pts])
    return float(np.interp(math.log(steps), np.log([s for s, _ in pts]), lows))


def _loss_at(fit: Mapping[str, Any], steps: float) -> float:
    return fit["c"] + fit["a"] * steps ** -fit["p"]


def _steps_to(fit: Mapping[str, Any], loss: float) -> float | None:
    """Steps at which the fitted curve reaches `loss` (None when it never does)."""
    if loss <= fit["c"]:
        return None
    return ((loss - fit["c"]) / fit["a"]) ** (-1 / fit["p"])


def _equivalent_steps(steps: float, from_batch: float, to_batch: float, b_noise: float) -> float:
    """Steps at `from_batch` as steps at `to_batch` that reach the same loss (S(B) = S_min(1 + B_n/B))."""
    return steps * (1 + b_noise / to_batch) / (1 + b_noise / from_batch)


# ------------------------------------------------------------------------------------ the plan


def carry_to_horizon(
    *,
    races: Mapping[str, Any] | None,
    b_noise_level: float | None,
    source: str | None,
    reference_batch_size: int,
    dataset_size: int,
    epochs: float | None = None,
    target_loss: float | None = None,
) -> dict[str, Any]:
    """B_noise at the horizon with its ln-spread, and what the horizon is (see the module docstring).

    `b_noise_level` is the B_noise the recipe chose at the races' level (`source`: where it came from).
    Returns {"value", "low", "high", "sigma", "horizon": {...}, "trend": {...}, "s_min", "warnings"};
    value None when there is no B_noise to carry.
    """
    warnings: list[str] = []
    race = races or {}
    level = race.get("level")
    trajectory = race.get("trajectory")
    kind = "epochs" if epochs is not None else "target_loss" if target_loss is not None else "probe_depth"
    out: dict[str, Any] = {
        "value": None, "low": None, "high": None, "sigma": None, "s_min": None, "warnings": warnings,
        "horizon": {"kind": kind, "epochs": epochs, "target_loss": target_loss, "train_loss": level},
    }  # fmt: skip
    if b_noise_level is None or not math.isfinite(b_noise_level) or b_noise_level <= 0:
        warnings.append("no B_noise to carry to the horizon")
        return out
    trend = fit_trend(trajectory_points(trajectory))
    out["trend"] = trend
    sigma_level = LEVEL_SIGMA.get(source or "", LEVEL_SIGMA_DEFAULT)
    if level is None or not trajectory:
        # No races: the horizon cannot be placed; B_noise stays where it was measured.
        out.update(value=b_noise_level, sigma=sigma_level)
        out["horizon"]["note"] = "no race reached a loss level: B_noise as measured, not carried"
        if kind != "probe_depth":
            warnings.append(
                f"the {kind} horizon could not be placed (no race trajectory); B_noise is not carried"
            )
        # Epochs still fix the steps (at the reference size), so S_min follows from B_noise as measured.
        out["s_min"] = _s_min(kind, out, None, race, epochs, dataset_size, reference_batch_size)
        return _with_bounds(out)
    reference = reference_batch_size
    curve = reference_curve(trajectory, reference, b_noise_level)
    loss_fit = fit_loss_curve(curve)
    horizon_loss, spread_losses = level, [level]
    if kind == "target_loss" and target_loss is not None:
        gap = _heldout_gap(trajectory)
        horizon_loss = target_loss - gap
        out["horizon"]["heldout_minus_train_gap"] = gap
        spread_losses = [horizon_loss]
        if horizon_loss <= 0:
            warnings.append(
                f"target_loss {target_loss:g} is below what the held-out gap ({gap:.3g}) allows a training "
                "loss to reach: carried to a tenth of the races' level instead"
            )
            horizon_loss = spread_losses[0] = 0.1 * level
    elif kind == "epochs" and epochs is not None:
        steps_ref = epochs * dataset_size / reference
        out["horizon"]["reference_steps"] = steps_ref
        measured = measured_loss_at(curve, steps_ref)
        if measured is not None:  # inside what the probe trained: read, not extrapolated
            horizon_loss = spread_losses[0] = measured
            out["horizon"]["loss_from"] = "measured"
        elif loss_fit is None:
            warnings.append(
                "the probe's loss curve is too short to place the epochs: kept at the races' level"
            )
        else:
            horizon_loss = _loss_at(loss_fit, steps_ref)
            spread_losses = [_loss_at(f, steps_ref) for f in loss_fit["plausible"]]
            out["horizon"]["loss_from"] = "extrapolated"
    out["horizon"]["train_loss"] = horizon_loss
    value = _carry(b_noise_level, level, horizon_loss, trend["slope"])
    distance = abs(math.log(horizon_loss / level)) if horizon_loss > 0 else 0.0
    spread_b = [_carry(b_noise_level, level, max(h, 1e-12), trend["slope"]) for h in spread_losses]
    sigma = math.sqrt(
        sigma_level**2
        + (trend["slope_se"] * distance) ** 2
        + (EXTRAPOLATION_SIGMA * distance) ** 2
        + (0.5 * math.log(max(spread_b) / min(spread_b))) ** 2
    )
    out.update(value=value, sigma=sigma)
    if kind == "probe_depth":
        out["horizon"]["note"] = (
            f"no epochs or target_loss given: the answer is for the depth the probe reached (training loss "
            f"{level:.4g}); training further moves B_noise (trend: ln B = {trend['slope']:.2f} ln L + c)"
        )
    out["s_min"] = _s_min(kind, out, loss_fit, race, epochs, dataset_size, reference_batch_size)
    return _with_bounds(out)


def _carry(b_level: float, level: float, loss: float, slope: float) -> float:
    return b_level * (loss / level) ** slope


def _with_bounds(out: dict[str, Any]) -> dict[str, Any]:
    z = 1.2816  # the 80 % central interval
    out["low"] = out["value"] * math.exp(-z * out["sigma"])
    out["high"] = out["value"] * math.exp(z * out["sigma"])
    return out


def reference_curve(
    trajectory: Mapping[str, Any], reference_batch_size: int, b_noise: float
) -> list[tuple[float, float]]:
    """The probe's training-loss curve in steps at the reference batch size: the warm-up's windows
    (mean batch loss, at the warm-up's batch) then the first race's evaluations after them, each
    converted with S(B) = S_min(1 + B_noise/B)."""
    warm = trajectory.get("warmup") or {}
    warm_batch = float(warm.get("batch_size") or reference_batch_size)
    points = [
        (_equivalent_steps(w["step"], warm_batch, reference_batch_size, b_noise), w["loss"])
        for w in trajectory.get("windows") or []
        if w.get("phase") == "warmup"
    ]
    offset = _equivalent_steps(float(warm.get("steps") or 0), warm_batch, reference_batch_size, b_noise)
    batch = float(trajectory["batch_size"])
    points += [
        (offset + _equivalent_steps(st, batch, reference_batch_size, b_noise), v)
        for st, v in trajectory["curve"]
        if st > 0
    ]
    return points


def _heldout_gap(trajectory: Mapping[str, Any]) -> float:
    """Held-out minus training loss at the first race's last evaluation (0 without a held-out part)."""
    hold = trajectory.get("heldout_curve")
    if not hold:
        return 0.0
    return float(hold[-1][1] - trajectory["curve"][-1][1])


def _s_min(
    kind: str,
    out: Mapping[str, Any],
    loss_fit: Mapping[str, Any] | None,
    race: Mapping[str, Any],
    epochs: float | None,
    dataset_size: int,
    reference_batch_size: int,
) -> float | None:
    """S_min (the fewest steps any batch size needs) to the horizon's loss, or None when unknown."""
    b_h = out["value"]
    if kind == "epochs" and epochs is not None:
        return epochs * dataset_size / reference_batch_size / (1 + b_h / reference_batch_size)
    if loss_fit is not None:
        steps = _steps_to(loss_fit, out["horizon"]["train_loss"])  # at the reference batch size
        if steps is not None:
            return steps / (1 + b_h / reference_batch_size)
    if kind == "probe_depth" and race.get("status") == "ok" and race.get("s_min"):
        return float(race["s_min"])
    return None


# ---------------------------------------------------------------------------------- the report


def step_time_table(throughput: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, median step times, ln-spread per size) of the measured ladder, step times made
    non-decreasing in the batch size (pool-adjacent-violators)."""
    rows = sorted(
        (float(p["batch_size"]), float(p["batch_size"]) / float(p["samples_per_second"]), p.get("spread"))
        for p in throughput
        if p.get("samples_per_second")
    )
    sizes = np.array([r[0] for r in rows])
    times = [r[1] for r in rows]
    blocks: list[list[float]] = []
    for t in times:
        blocks.append([t, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    fitted = np.array([m for m, n in blocks for _ in range(int(n))])
    # MAD/median -> a normal sigma (x1.4826), as a relative (≈ ln) spread of one step's time.
    spread = np.array([math.sqrt((1.4826 * (r[2] or 0.0)) ** 2 + TIME_SIGMA_FLOOR**2) for r in rows])
    return sizes, fitted, spread


def _interpolate(sizes: np.ndarray, times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Step times at `at` (rows of `times`: draws): log-log between measured sizes; outside them
    proportional to B (no per-sample gain or loss assumed past the measured ends)."""
    lx = np.log(sizes)
    la = np.log(np.clip(at, sizes[0], sizes[-1]))
    out = np.empty((times.shape[0], len(at)))
    for j, x in enumerate(la):
        i = int(np.clip(np.searchsorted(lx, x), 1, len(lx) - 1)) if len(lx) > 1 else 0
        if len(lx) == 1:
            out[:, j] = times[:, 0]
            continue
        f = (x - lx[i - 1]) / (lx[i] - lx[i - 1])
        out[:, j] = np.exp(np.log(times[:, i - 1]) + f * (np.log(times[:, i]) - np.log(times[:, i - 1])))
    below = at < sizes[0]
    out[:, below] = out[:, below] * (at[below] / sizes[0])
    above = at > sizes[-1]
    out[:, above] = out[:, above] * (at[above] / sizes[-1])  # no per-sample gain assumed beyond
    return out


def time_ratio_draws(
    *,
    throughput: Sequence[Mapping[str, Any]],
    micro_batches: Sequence[int],
    b_noise: float,
    sigma: float,
    devices: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Monte Carlo over B_noise (log-normal, `sigma`) and each ladder size's step time (log-normal, its
    spread): array (DRAWS, len(micro_batches)) of each micro-batch's time to the horizon over the best
    one's in that draw (global batch = micro-batch x devices, no accumulation)."""
    sizes, times, spread = step_time_table(throughput)
    rng = np.random.default_rng(seed)
    draws = np.exp(np.log(times)[None, :] + rng.standard_normal((DRAWS, len(sizes))) * spread[None, :])
    draws = np.maximum.accumulate(draws, axis=1)  # still non-decreasing in the batch size
    micro = np.array([float(m) for m in micro_batches])
    global_batch = micro * devices
    step = _interpolate(sizes, draws, micro)
    noise = b_noise * np.exp(rng.standard_normal(DRAWS) * sigma)
    cost = (global_batch[None, :] + noise[:, None]) * step / global_batch[None, :]
    return np.asarray(cost / cost.min(axis=1, keepdims=True))


def robust_micro_batch(
    *,
    throughput: Sequence[Mapping[str, Any]],
    candidates: Sequence[int],
    b_noise: float,
    sigma: float,
    devices: int = 1,
) -> int:
    """The candidate whose time ratio to the best candidate is smallest at INTERVAL_PROBABILITY (the
    quantile the answer's interval states), over `time_ratio_draws`. Where the time-to-target curve is
    lopsided (flat on one side of the point estimate's optimum, steep on the other) this moves the
    choice towards the flat side, so an error in B_noise costs less."""
    micro = sorted({int(c) for c in candidates})
    ratio = time_ratio_draws(
        throughput=throughput, micro_batches=micro, b_noise=b_noise, sigma=sigma, devices=devices
    )
    upper = np.quantile(ratio, INTERVAL_PROBABILITY, axis=0)
    return micro[int(np.argmin(upper))]


def step_time_knee(
    throughput: Sequence[Mapping[str, Any]], max_micro_batch: int, factor: float | None = None
) -> int:
    """The largest measured size <= max_micro_batch whose step time is at most `factor` (default
    STEP_TIME_KNEE) times the smallest measured size's (as measured: smoothing the ladder first moved
    the knee by noise)."""
    factor = STEP_TIME_KNEE if factor is None else factor
    ladder = sorted(
        (int(p["batch_size"]), float(p["batch_size"]) / float(p["samples_per_second"]))
        for p in throughput
        if p.get("samples_per_second")
    )
    within = [b for b, t in ladder if t <= factor * ladder[0][1] and b <= max_micro_batch]
    return max(within) if within else min(ladder[0][0], max_micro_batch)


def toward_knee(choice: int, knee: int, candidates: Sequence[int], weight: float | None = None) -> int:
    """The candidate nearest (in ln B; the smaller on a tie) to `choice` moved `weight` (default
    KNEE_WEIGHT) of the way to `knee` in ln B."""
    weight = KNEE_WEIGHT if weight is None else weight
    target = (1 - weight) * math.log(choice) + weight * math.log(knee)
    return min(sorted({int(c) for c in candidates}), key=lambda c: (abs(math.log(c) - target), c))


def time_ratio_interval(
    *,
    throughput: Sequence[Mapping[str, Any]],
    candidates: Sequence[int],
    recommended: int,
    b_noise: float,
    sigma: float,
    devices: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """The recommended size's time to the horizon over the best candidate's (`time_ratio_draws`, B_noise's
    spread `sigma` widened by MODEL_SIGMA): the INTERVAL_PROBABILITY quantile raised to the power
    INTERVAL_CALIBRATION ("within that of the best with 80 % probability"), the median, and how often the
    recommended size was the best."""
    micro = sorted({int(c) for c in candidates} | {int(recommended)})
    draws = time_ratio_draws(
        throughput=throughput, micro_batches=micro, b_noise=b_noise, sigma=math.hypot(sigma, MODEL_SIGMA),
        devices=devices, seed=seed,
    )  # fmt: skip
    ratio = draws[:, micro.index(int(recommended))]
    upper = float(np.quantile(ratio, INTERVAL_PROBABILITY)) ** INTERVAL_CALIBRATION
    level = next((name for name, bound in CONFIDENCE_BOUNDS if upper <= bound), "low")
    return {
        "probability": INTERVAL_PROBABILITY,
        "time_ratio_high": upper,
        "time_ratio_median": float(np.median(ratio)),
        "best_probability": float(np.mean(ratio <= 1.0 + 1e-9)),
        "confidence": level,
        "statement": f"within {upper:.2f}x of the best batch size's time with "
        f"{INTERVAL_PROBABILITY:.0%} probability",
    }


def micro_step_time(throughput: Sequence[Mapping[str, Any]], micro_batch: int) -> float:
    """Seconds per step of `micro_batch` on the measured ladder (monotone, log-log between sizes)."""
    sizes, times, _ = step_time_table(throughput)
    return float(_interpolate(sizes, times[None, :], np.array([float(micro_batch)]))[0, 0])


def _recommended_schedule(
    block: Mapping[str, Any],
    recommendation: Mapping[str, Any],
    throughput: Sequence[Mapping[str, Any]],
    dataset_size: int,
) -> dict[str, Any]:
    accumulation = int(recommendation.get("gradient_accumulation_steps", 1))
    return schedule(
        int(recommendation["recommended_batch_size"]), s_min=block.get("s_min"), b_noise=block["b_noise"],
        dataset_size=dataset_size,
        step_time_s=micro_step_time(throughput, int(recommendation["micro_batch_size"])) * accumulation,
    )  # fmt: skip


def reschedule(
    recommendation: Mapping[str, Any], throughput: Sequence[Mapping[str, Any]], dataset_size: int
) -> None:
    """Recompute the horizon block's "recommended" steps, epochs and time after the layout changed
    (the engine's accumulation check lowers the micro-batch and may round the global batch up)."""
    block = recommendation.get("horizon")
    if not block or block.get("b_noise") is None or "recommended" not in block or not throughput:
        return
    block["recommended"] = _recommended_schedule(block, recommendation, throughput, dataset_size)


def schedule(
    batch_size: int, *, s_min: float | None, b_noise: float, dataset_size: int, step_time_s: float | None
) -> dict[str, Any]:
    """Steps, epochs and predicted wall time to the horizon at `batch_size`."""
    if s_min is None:
        return {"batch_size": batch_size, "steps": None, "epochs": None, "predicted_seconds": None}
    steps = s_min * (1 + b_noise / batch_size)
    return {
        "batch_size": batch_size,
        "steps": math.ceil(steps),
        "epochs": steps * batch_size / dataset_size,
        "predicted_seconds": steps * step_time_s if step_time_s else None,
    }


def generalisation(
    races: Mapping[str, Any] | None, recommended: int, reference: int
) -> dict[str, Any] | None:
    """Held-out loss at the races' level (equal training loss) per raced size, read at the recommended
    and the reference size (linear in log2 B between raced sizes, the nearest end outside them), and a
    warning when the recommended size's is worse by more than GENERALISATION_TOLERANCE."""
    rows = sorted(
        (r["batch_size"], r["heldout_loss_at_level"])
        for r in (races or {}).get("races") or []
        if r.get("heldout_loss_at_level") is not None and r.get("steps_to_level")
    )
    if len(rows) < 2:
        return None
    lb = np.log2([b for b, _ in rows])
    hv = np.array([h for _, h in rows])

    def at(b: int) -> float:
        return float(np.interp(math.log2(b), lb, hv))

    rec, ref = at(recommended), at(reference)
    out: dict[str, Any] = {
        "train_loss": (races or {}).get("level"),
        "heldout_loss_at_level": {int(b): float(h) for b, h in rows},
        "recommended": rec,
        "reference": ref,
        "measured_between": [int(rows[0][0]), int(rows[-1][0])],
        "warning": None,
    }
    if rec > ref * (1 + GENERALISATION_TOLERANCE) and ref > 0:
        out["warning"] = (
            f"at equal training loss ({out['train_loss']:.4g}) the recommended size {recommended} reaches a "
            f"held-out loss {rec:.4g}, {rec / ref - 1:.1%} worse than the reference size {reference} "
            f"({ref:.4g}; read from races at {rows[0][0]}-{rows[-1][0]})"
        )
    return out


def report(
    carried: Mapping[str, Any],
    *,
    recommendation: Mapping[str, Any],
    throughput: Sequence[Mapping[str, Any]],
    candidates: Sequence[int],
    races: Mapping[str, Any] | None,
    dataset_size: int,
    reference_batch_size: int,
    devices: int = 1,
) -> dict[str, Any]:
    """The result's "horizon" block: B_noise there, steps/epochs/time for the recommended size and the
    reference, held-out losses, and the time-ratio interval with its coarse confidence."""
    b_h = carried.get("value")
    rec_global = int(recommendation["recommended_batch_size"])
    rec_micro = int(recommendation["micro_batch_size"])
    warnings = list(carried.get("warnings") or [])
    block: dict[str, Any] = {
        **{k: carried.get(k) for k in ("horizon", "trend")},
        "b_noise": b_h,
        "b_noise_low": carried.get("low"),
        "b_noise_high": carried.get("high"),
        "s_min": carried.get("s_min"),
    }
    if b_h is None or not throughput:
        return {**block, "interval": None, "warnings": warnings}
    per_size = {
        "recommended": _recommended_schedule(block, recommendation, throughput, dataset_size),
        "reference": schedule(
            reference_batch_size, s_min=carried.get("s_min"), b_noise=b_h, dataset_size=dataset_size,
            step_time_s=micro_step_time(throughput, max(1, reference_batch_size // max(1, devices))),
        ),
    }  # fmt: skip
    interval = time_ratio_interval(
        throughput=throughput, candidates=candidates, recommended=rec_micro, b_noise=b_h,
        sigma=carried.get("interval_sigma") or carried.get("sigma") or LEVEL_SIGMA_DEFAULT, devices=devices,
    )  # fmt: skip
    gen = generalisation(races, rec_global, reference_batch_size)
    if gen and gen["warning"]:
        warnings.append(gen["warning"])
    return {**block, **per_size, "interval": interval, "generalisation": gen, "warnings": warnings}


# ------------------------------------------------------------------------------ the engine's hooks


def carry(statistics: Mapping[str, Any], spec: Any) -> dict[str, Any]:
    """`carry_to_horizon` for a probe: the B_noise the recipe would choose at the races' level, carried
    to `spec`'s horizon (a ProbeSpec: epochs, target_loss, reference_batch_size, dataset_size), with
    "interval_sigma": the spread the time-ratio interval uses (`factor_spread`)."""
    from service.probing.recipe import choose_noise_scale

    choice = choose_noise_scale(_resolved(statistics), statistics.get("races"), spec.sgd_momentum)
    carried = carry_to_horizon(
        races=statistics.get("races"), b_noise_level=choice["value"], source=choice["source"],
        reference_batch_size=spec.reference_batch_size, dataset_size=spec.dataset_size,
        epochs=spec.epochs, target_loss=spec.target_loss,
    )  # fmt: skip
    if carried.get("sigma") is not None:
        carried["interval_sigma"] = math.hypot(carried["sigma"], factor_spread(choice["stability_factor"]))
    return carried


def factor_spread(stability_factor: float) -> float:
    """The ln-spread SGD's stability factor adds to the interval: FACTOR_SIGMA·ln(1/factor) (0 at 1)."""
    return FACTOR_SIGMA * math.log(1 / stability_factor) if 0 < stability_factor < 1 else 0.0


def _resolved(statistics: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The gradient noise scale, or None when the races fitted B_noise and B_simple was not resolved:
    an interval open above, or a value more than GNS_RESOLVABLE times b_big (the two-batch estimate's
    |G|² was noise there, so its geometric mean with the races would only pull a sound fit away)."""
    gns = statistics.get("gradient_noise_scale")
    races = statistics.get("races") or {}
    if not gns or races.get("status") != "ok":
        return gns
    high, value, b_big = gns.get("high"), gns.get("value"), gns.get("b_big") or 0
    if high is None or not math.isfinite(high) or (value is not None and value > GNS_RESOLVABLE * b_big):
        return None
    return gns


def attach(
    recommendation: dict[str, Any],
    carried: Mapping[str, Any],
    *,
    statistics: Mapping[str, Any],
    spec: Any,
    throughput: Sequence[Mapping[str, Any]],
    max_micro_batch: int,
) -> dict[str, Any]:
    """Add the "horizon" block to a recipe.recommend result, with its warnings, and make `confidence`
    the interval's coarse summary (never higher than the recipe's own label)."""
    from service.probing.recipe import micro_candidates

    block = report(
        carried, recommendation=recommendation, throughput=throughput,
        candidates=micro_candidates(throughput, max_micro_batch),
        races=statistics.get("races"), dataset_size=spec.dataset_size,
        reference_batch_size=spec.reference_batch_size, devices=spec.device_count,
    )  # fmt: skip
    recommendation["horizon"] = block
    if hasattr(spec, "optimizer_options"):  # the optimizer the probe trained, as the client stated it
        recommendation["optimizer_settings"] = {"optimizer": spec.optimizer, **spec.optimizer_options()}
    recommendation["warnings"] = list(recommendation.get("warnings", [])) + block["warnings"]
    interval = block.get("interval")
    if interval:
        order = ["low", "medium", "high"]
        own = recommendation.get("confidence", "low")
        recommendation["confidence"] = order[min(order.index(own), order.index(interval["confidence"]))]
        recommendation.setdefault("confidence_reasons", []).append(interval["statement"])
    return recommendation

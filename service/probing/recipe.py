"""The recommendation: which global batch size reaches a target loss fastest here, and how to train with it.

Steps to a target loss follow S(B) = S_min·(1 + B_noise/B) (McCandlish et al. 2018), and one step of a
global batch B costs B/throughput(B) seconds, so wall time to target is proportional to

    (B + B_noise) / throughput(B)

with step time modelled as overhead + per-sample cost fitted to the measured throughput ladder (or
interpolated log-log between its points when that shape does not fit). Objectives: "time_to_target" (the
default: minimise the above), "throughput" (the knee of the measured curve: the smallest size within
KNEE_TOLERANCE of the best samples/s) and "max_feasible" (the largest micro-batch that fits). A global
batch is per-device micro-batch x devices x gradient accumulation steps, the micro-batch never above the
largest that fits.

The learning rate is scaled from the client's reference (linear for SGD, square root for Adam-family,
saturating at B_noise) and then capped by what the probe saw train: never above the largest learning
rate observed to train stably (its warm-up at the reference, the training races), scaled down to the
recommended size when that size is smaller. Without any observation the reference itself is the cap.

Pure functions on plain numbers and dicts: no torch, so the rules are easy to test and to read.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from service.probing import horizon
from service.probing.horizon import robust_micro_batch, step_time_knee, toward_knee

OBJECTIVES = ("time_to_target", "throughput", "max_feasible")
ADAM_FAMILY = ("adam", "adamw")
# Linear warm-up from the reference learning rate: this many steps per doubling of the ratio to it.
WARMUP_STEPS_PER_DOUBLING = 50
KNEE_TOLERANCE = 0.05  # "throughput": the smallest size within 5 % of the best measured samples/s
# A noise scale above the dataset or this many times the largest size the statistics measured is
# reported as a lower bound, not a value: the estimator cannot resolve it from those sizes.
NOISE_BOUND_FACTOR = 10
# Races that stopped on time (not on reaching the level) count as stable only after this many steps.
MIN_STABLE_STEPS = 10
MAX_ACCUMULATION = 1024
RACES_AGREE_FACTOR = 3.0  # races and gradient noise scale "agree" within this factor
CURVE_SPAN = 8  # the time-to-target curve covers best/8 .. best*8
AFFINE_MAX_RMS = 0.25  # use the fitted step-time model when it is within 25 % (rms) of the ladder
# SGD's stable step is bounded by the curvature (lr < 2/λ_max without momentum); heavy-ball momentum β
# raises the stable effective step lr/(1-β) by (1+β)/(1-β). Once the best lr for a batch reaches that
# bound a larger batch saves no more steps (the noisy quadratic model, Zhang et al. 2019: momentum and
# preconditioning extend perfect batch scaling), so the B_noise that sets SGD's time to target is the
# measured one times min(1, STABILITY_KAPPA·(1+β)/(1-β)): 0.1 for plain SGD, 1 from β ≈ 0.82 up; Adam's
# is left as measured. On the benchmark's 72 tuning and seen tasks (bench/convergence.py), against its
# oracle's steps with the lr tuned per size, B_simple was 10x the implied B_noise for plain SGD (84
# task-depth-probes; races 5.7x) and 0.91x for momentum 0.9 (132); the oracle's best lr grew as
# B^0.14-0.23 with plain SGD and B^0.56-0.72 with momentum. Set on those plain-SGD probes (0.1 / 0.2 /
# 0.3: 15 / 22 / 24 of 84 ratios over 1.25; 29 without the factor). On the two held-out halves scored
# after it, it moved seven tasks' answers, three for the better and three for the worse (docs/design.md).
STABILITY_KAPPA = 0.1


# ------------------------------------------------------------------------------------ throughput


def _ladder(throughput: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
    """(batch size, samples/s) sorted, with step times made non-decreasing in the batch size.

    A larger batch cannot take less time per step than a smaller one; when a noisy measurement says it
    does (CPU timings vary 1.2-2x between passes), the offending neighbours are pooled to their mean
    step time (isotonic regression, pool-adjacent-violators). Sizes that failed (no samples/s) are skipped.
    """
    points = sorted(
        (float(p["batch_size"]), float(p["samples_per_second"]))
        for p in throughput
        if p.get("samples_per_second") and p["samples_per_second"] > 0 and p["batch_size"] > 0
    )
    if not points:
        raise ValueError("the throughput ladder has no positive measurement")
    blocks: list[list[float]] = []  # [mean step time, count]
    for b, t in points:
        blocks.append([b / t, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    step_times = [m for m, n in blocks for _ in range(int(n))]
    return [(b, b / s) for (b, _), s in zip(points, step_times, strict=True)]


def interpolate_throughput(throughput: Sequence[Mapping[str, float]], batch_size: float) -> float:
    """Samples/s at `batch_size`: piecewise linear in log-log between measured sizes.

    Beyond the largest measured size: flat (no gain assumed). Below the smallest: proportional to the
    batch size (a step cannot get cheaper than the smallest one measured; pessimistic for small sizes).
    """
    points = _ladder(throughput)
    sizes = [b for b, _ in points]
    if batch_size >= sizes[-1]:
        return points[-1][1]
    if batch_size <= sizes[0]:
        return points[0][1] * batch_size / sizes[0]
    i = bisect.bisect_right(sizes, batch_size)
    (b0, t0), (b1, t1) = points[i - 1], points[i]
    frac = (math.log(batch_size) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))


def throughput_peak(throughput: Sequence[Mapping[str, float]], max_size: int) -> int:
    """The measured size with the highest samples/s among those <= max_size (the smallest on ties)."""
    return throughput_knee(throughput, max_size, tolerance=0.0)


def throughput_knee(
    throughput: Sequence[Mapping[str, float]], max_size: int, tolerance: float = KNEE_TOLERANCE
) -> int:
    """The smallest measured size <= max_size whose samples/s is within `tolerance` of the best.

    On a saturating curve the last few sizes differ by noise only; the cap is not the answer just because
    its timing came out 1 % higher. A smaller batch with the same throughput leaves memory free and
    takes more optimizer steps per epoch.
    """
    points = [(b, t) for b, t in _ladder(throughput) if b <= max_size] or [_ladder(throughput)[0]]
    best = max(t for _, t in points)
    return int(min(b for b, t in points if t >= (1 - tolerance) * best))


# -------------------------------------------------------------------------------- batch layout


def split_batch(global_batch: int, max_micro_batch: int, devices: int = 1) -> tuple[int, int, int]:
    """(micro_batch, accumulation_steps, global_batch) with micro <= max and micro x devices x acc = global.

    The returned global batch may be slightly larger than asked (rounded up so the split is exact).
    """
    if max_micro_batch < 1 or devices < 1:
        raise ValueError("max_micro_batch and devices must be >= 1")
    per_device = max(1, math.ceil(global_batch / devices))
    accumulation = math.ceil(per_device / max_micro_batch)
    micro = math.ceil(per_device / accumulation)
    return micro, accumulation, micro * accumulation * devices


def fit_step_time(throughput: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Step time = overhead_s + per_sample_s·B, least squares in relative error over the ladder.

    The roofline shape of a training step: a fixed cost (kernel launches, the optimizer update, Python)
    plus a per-sample cost; throughput B/(overhead + per_sample·B) rises and saturates at 1/per_sample.
    Two parameters fitted to every measured size are far less sensitive to one noisy timing than
    interpolating between points. `rel_rms` says how well the shape fits.
    """
    points = [(b, b / t) for b, t in _ladder(throughput)]
    if len({b for b, _ in points}) < 2:
        return {"overhead_s": 0.0, "per_sample_s": points[0][1] / points[0][0], "rel_rms": math.inf}
    w = [1.0 / t**2 for _, t in points]
    sw, sb = sum(w), sum(wi * b for wi, (b, _) in zip(w, points, strict=True))
    sbb = sum(wi * b * b for wi, (b, _) in zip(w, points, strict=True))
    st = sum(wi * t for wi, (_, t) in zip(w, points, strict=True))
    sbt = sum(wi * b * t for wi, (b, t) in zip(w, points, strict=True))
    per_sample = (sw * sbt - sb * st) / (sw * sbb - sb * sb)
    overhead = (st - per_sample * sb) / sw
    if overhead < 0:  # no fixed cost: fit through the origin
        overhead, per_sample = 0.0, sbt / sbb
    if per_sample < 0:  # step time does not grow with the batch: pure overhead
        overhead, per_sample = st / sw, 0.0
    rel = [(overhead + per_sample * b - t) / t for b, t in points]
    return {
        "overhead_s": overhead,
        "per_sample_s": per_sample,
        "rel_rms": math.sqrt(sum(r * r for r in rel) / len(rel)),
    }


def throughput_model(throughput: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The step-time model the recommendation uses: "affine" (fit_step_time) when the ladder has >= 3
    sizes and the fit is within AFFINE_MAX_RMS, else "interpolated" (log-log between measured points)."""
    fit = fit_step_time(throughput)
    kind = "affine" if len(_ladder(throughput)) >= 3 and fit["rel_rms"] <= AFFINE_MAX_RMS else "interpolated"
    return {"kind": kind, **fit}


def step_time(model: Mapping[str, Any], throughput: Sequence[Mapping[str, float]], batch_size: int) -> float:
    """Seconds per step of `batch_size` under `model` (from `throughput_model`).

    Beyond the largest measured size throughput is flat (as in `interpolate_throughput`): a fit whose
    per-sample cost came out near zero on a noisy ladder would otherwise promise ever larger batches
    for free.
    """
    if model["kind"] == "affine":
        top = max(float(p["batch_size"]) for p in throughput if p.get("samples_per_second"))
        at = min(float(batch_size), top)
        return (model["overhead_s"] + model["per_sample_s"] * at) * batch_size / at
    return batch_size / interpolate_throughput(throughput, batch_size)


def time_per_sample(
    micro_batch: int,
    accumulation: int,
    devices: int,
    throughput: Sequence[Mapping[str, float]],
    step_overhead_s: float = 0.0,
    model: Mapping[str, Any] | None = None,
) -> float:
    """Seconds per training sample for one layout.

    The ladder measures whole steps (forward, backward, optimizer step) of one micro-batch; with
    accumulation the `step_overhead_s` paid once per optimizer step (the update itself, gradient
    synchronisation) is amortised over the accumulated micro-batches. Devices scale throughput linearly
    (communication is not modelled). `model` defaults to interpolation between measured points.
    """
    micro_step = step_time(model or {"kind": "interpolated"}, throughput, micro_batch)
    step = accumulation * micro_step - (accumulation - 1) * min(step_overhead_s, micro_step)
    return step / (micro_batch * accumulation * devices)


def relative_time_to_target(global_batch: int, b_noise: float, seconds_per_sample: float) -> float:
    """Wall time to target up to a constant: S(B)·step_time = S_min·(B + B_noise)·seconds_per_sample."""
    return (global_batch + b_noise) * seconds_per_sample


def candidate_layouts(
    throughput: Sequence[Mapping[str, float]],
    max_micro_batch: int,
    devices: int = 1,
    max_global_batch: int | None = None,
    max_accumulation: int = MAX_ACCUMULATION,
) -> list[tuple[int, int, int]]:
    """(micro, accumulation, global) layouts to choose from.

    Micro-batches: powers of two, the half-octaves between them from 24 up (3·2^k: multiples of 8, so
    still friendly to vector units; they halve the distance to an optimum that falls between powers of
    two), measured sizes and the maximum itself, from the smallest measured size (or 1) up to
    `max_micro_batch`; accumulation: powers of two up to `max_accumulation`, only at
    micro-batches that are the maximum or a measured size. Global batches above `max_global_batch` (the
    dataset size) are dropped, keeping at least the smallest layout.
    """
    measured = [int(b) for b, _ in _ladder(throughput) if b <= max_micro_batch]
    micros = set(micro_candidates(throughput, max_micro_batch))
    accumulations = [2**k for k in range(31) if 2**k <= max_accumulation]
    layouts = {(m, 1, m * devices) for m in micros}
    for m in {max_micro_batch, *measured}:
        layouts |= {(m, a, m * a * devices) for a in accumulations[1:]}
    layouts_list = sorted(layouts, key=lambda t: (t[2], t[1]))
    if max_global_batch is not None:
        kept = [t for t in layouts_list if t[2] <= max_global_batch]
        layouts_list = kept or layouts_list[:1]
    return layouts_list


def micro_candidates(throughput: Sequence[Mapping[str, float]], max_micro_batch: int) -> list[int]:
    """The micro-batches a recipe picks from: the grid's sizes from the smallest measured one (below
    it nothing says how step time behaves), the measured sizes and the maximum."""
    measured = [int(b) for b, _ in _ladder(throughput) if b <= max_micro_batch]
    lo = min(measured) if measured else 1
    grid = [m for m in micro_batch_grid(max_micro_batch) if m >= lo]
    return sorted({max_micro_batch, *measured, *grid})


def micro_batch_grid(upper: int) -> list[int]:
    """The sizes a recipe picks micro-batches from, up to `upper`: powers of two and the half-octaves
    between them from 24 up (3·2^k: multiples of 8)."""
    grid = {2**k for k in range(31)} | {3 * 2**k for k in range(3, 30)}
    return sorted(b for b in grid if b <= upper)


# ----------------------------------------------------------------------------------- learning rate


def scale_learning_rate(
    reference_lr: float,
    reference_batch_size: int,
    batch_size: int,
    optimizer: str,
    b_noise: float | None = None,
) -> tuple[float, str]:
    """The learning rate for `batch_size`, scaled from the client's reference, and the rule's name.

    SGD: linear (Goyal et al. 2017); Adam-family: square root (Malladi et al. 2022). With a known
    B_noise the rule saturates as the batch passes it, following the optimal step size
    ε(B) = ε_max/(1 + B_noise/B) of McCandlish et al.: lr ∝ B/(B + B_noise) for SGD, its square root for
    Adam. Far below B_noise this is the plain rule; far above it, linear scaling would overshoot.
    """
    ratio = batch_size / reference_batch_size
    if b_noise is not None and math.isfinite(b_noise) and b_noise > 0:
        ratio = (1 + b_noise / reference_batch_size) / (1 + b_noise / batch_size)
        suffix = f", saturating at B_noise={b_noise:.4g}: lr ∝ B/(B + B_noise)"
    else:
        suffix = ""
    if optimizer in ADAM_FAMILY:
        return reference_lr * math.sqrt(ratio), "sqrt" + suffix
    return reference_lr * ratio, "linear" + suffix


def suggest_warmup(scale_factor: float) -> tuple[int, str]:
    """Linear warm-up steps from the reference learning rate to `scale_factor` x it, and why.

    WARMUP_STEPS_PER_DOUBLING steps per doubling of the ratio (after Goyal et al. 2017, who ramp
    from the reference over the first steps): none at or below the reference.
    """
    if scale_factor <= 1.0:
        return 0, f"none: the learning rate is {scale_factor:.3g}x the reference (not above it)"
    steps = math.ceil(WARMUP_STEPS_PER_DOUBLING * math.log2(scale_factor))
    return steps, (
        f"linear warm-up from the reference learning rate: the lr is {scale_factor:.3g}x the reference, "
        f"{WARMUP_STEPS_PER_DOUBLING} steps per doubling (after Goyal et al. 2017)"
    )


def stable_learning_rates(
    gradient_noise_scale: Mapping[str, Any] | None,
    races: Mapping[str, Any] | None,
    *,
    reference_learning_rate: float,
    reference_batch_size: int,
) -> list[dict[str, Any]]:
    """[{"batch_size", "learning_rate", "source"}] the probe saw train stably on real data.

    The noise-scale warm-up trains at the reference learning rate and batch size (stable when it ran
    at least MIN_STABLE_STEPS steps with a finite loss); each training race at its own size and learning
    rate (stable when it reached the loss level, also in fewer steps than the B_noise fit can use
    ("too_fast"), or ran MIN_STABLE_STEPS steps without diverging and made progress).
    """
    seen: list[dict[str, Any]] = []
    gns = gradient_noise_scale or {}
    warmed_up = (gns.get("warmup_steps") or 0) >= MIN_STABLE_STEPS
    if gns.get("status") not in (None, "non_finite_loss") and warmed_up:
        seen.append(
            {"batch_size": reference_batch_size, "learning_rate": reference_learning_rate, "source": "warmup"}
        )
    for race in (races or {}).get("races") or []:
        lr, size, status = race.get("learning_rate"), race.get("batch_size"), race.get("status")
        if not lr or not size:
            continue
        if status in ("reached", "too_fast") or (
            status in ("time_budget", "max_steps") and (race.get("steps") or 0) >= MIN_STABLE_STEPS
        ):
            seen.append({"batch_size": int(size), "learning_rate": float(lr), "source": "race"})
    return seen


def cap_learning_rate(
    learning_rate: float,
    batch_size: int,
    optimizer: str,
    observed: Sequence[Mapping[str, Any]],
    *,
    reference_learning_rate: float,
    reference_batch_size: int,
    b_noise: float | None,
) -> tuple[float, dict[str, Any]]:
    """`learning_rate` capped by the largest learning rate observed to train stably.

    Each observation (b, lr) allows lr at sizes >= b (never more: no extrapolation above what trained)
    and lr scaled down by the rule at sizes < b. Without observations the client's reference stands in,
    unverified. Returns the learning rate and {"value", "batch_size", "learning_rate", "source", "capped"}.
    """
    anchors = list(observed) or [
        {"batch_size": reference_batch_size, "learning_rate": reference_learning_rate, "source": "reference"}
    ]

    def allowed(anchor: Mapping[str, Any]) -> float:
        down, _ = scale_learning_rate(1.0, int(anchor["batch_size"]), batch_size, optimizer, b_noise)
        return float(anchor["learning_rate"]) * min(1.0, down)

    best = max(anchors, key=allowed)
    ceiling = allowed(best)
    return min(learning_rate, ceiling), {
        "value": ceiling,
        "batch_size": int(best["batch_size"]),
        "learning_rate": float(best["learning_rate"]),
        "source": best["source"],
        "capped": learning_rate > ceiling,
    }


# ---------------------------------------------------------------------------------- noise estimate


def stability_factor(sgd_momentum: float | None) -> float:
    """The factor SGD's measured B_noise is multiplied by (see STABILITY_KAPPA); 1 for Adam (None)."""
    if sgd_momentum is None:
        return 1.0
    beta = min(max(float(sgd_momentum), 0.0), 0.999)
    return min(1.0, STABILITY_KAPPA * (1 + beta) / (1 - beta))


def choose_noise_scale(
    gradient_noise_scale: Mapping[str, Any] | None,
    races: Mapping[str, Any] | None,
    sgd_momentum: float | None = None,
) -> dict:
    """Which B_noise drives the recommendation: the races' fit when it worked, else B_simple.

    When both exist and differ by more than RACES_AGREE_FACTOR, or the races only bound B_noise and
    B_simple lies outside that bound, their geometric mean ("combined"). For SGD (`sgd_momentum`, None
    for Adam) the value is then multiplied by `stability_factor`.
    Returns {"value", "source", "agreement", "warnings", "bound", "stability_factor"}; value None when
    neither is usable. `agreement` is races/B_simple when both exist (None otherwise); `bound` is "lower"
    when the value only bounds B_noise from below (B_simple unresolved at b_big, races whose steps did not
    bend).
    """
    choice = _choose_noise_scale(gradient_noise_scale, races)
    gns_unresolved = (gradient_noise_scale or {}).get("status") == "unresolved"
    races_above = (races or {}).get("status") == "above_range"
    lower = (choice["source"] == "gradient_noise_scale" and gns_unresolved) or (
        choice["source"] == "races" and races_above
    )
    factor = stability_factor(sgd_momentum)
    if choice["value"] is not None:
        choice["value"] *= factor
    return {**choice, "bound": "lower" if lower else None, "stability_factor": factor}


def unresolved_lower_bound(gradient_noise_scale: Mapping[str, Any]) -> float | None:
    """B_noise's lower bound when the two-batch estimate did not resolve B_simple (|G|² not above its
    noise at b_big): the bootstrap's lower quantile, which says how far above b_big B_simple must lie,
    between b_big and NOISE_BOUND_FACTOR x b_big (beyond that the sizes measured say nothing). b_big
    alone, the weakest bound, made the recipe choose too small a batch on every such task of the
    convergence suite."""
    b_big = float(gradient_noise_scale.get("b_big") or 0)
    if b_big <= 0:
        return None
    low = gradient_noise_scale.get("low")
    if low is None:  # no bootstrap: only b_big is known
        return b_big
    return max(b_big, min(float(low), NOISE_BOUND_FACTOR * b_big))  # low is clamped at 1e30, or inf


def _choose_noise_scale(
    gradient_noise_scale: Mapping[str, Any] | None, races: Mapping[str, Any] | None
) -> dict:
    warnings: list[str] = []
    gns = gradient_noise_scale or {}
    gns_value = gns.get("value")
    gns_ok = gns_value is not None and math.isfinite(gns_value) and gns_value > 0
    if gns and gns.get("status") == "unresolved":
        gns_value = unresolved_lower_bound(gns)
        gns_ok = gns_value is not None
        if gns_value is not None:
            warnings.append(
                f"gradient noise scale not resolved at b_big={gns.get('b_big')}: B_simple is above it; "
                f"using {gns_value:.3g} (its bootstrap's lower quantile, at most {NOISE_BOUND_FACTOR}x "
                "b_big) as a lower bound"
            )
    race = races or {}
    race_value = race.get("value")
    status = race.get("status")
    agreement = race_value / gns_value if gns_ok and race_value else None
    if status == "ok":
        if agreement is not None and not 1 / RACES_AGREE_FACTOR <= agreement <= RACES_AGREE_FACTOR:
            # Each estimate fails in its own way: B_simple overstates B_noise under label noise, races
            # overstate it when the reference lr is too low for the small sizes (and short races are
            # noisy). Far apart, neither is trusted over the other: the geometric mean is within
            # sqrt(disagreement) of whichever was right, and the batch moves only as its square root.
            assert gns_value is not None  # agreement is set only when gns_ok
            combined = math.sqrt(race_value * gns_value)
            warnings.append(
                f"races fit B_noise={race_value:.3g}, {agreement:.2g}x the gradient noise scale "
                f"B_simple={gns_value:.3g}; using their geometric mean {combined:.3g}"
            )
            return {"value": combined, "source": "combined", "agreement": agreement, "warnings": warnings}
        return {"value": race_value, "source": "races", "agreement": agreement, "warnings": warnings}
    if status in ("above_range", "below_range") and race_value:
        lower = status == "above_range"
        consistent = gns_ok and (gns_value >= race_value if lower else gns_value <= race_value)
        kind = "at least" if lower else "at most"
        warnings.append(
            f"races only bound B_noise: {kind} {race_value:.3g} (steps did not bend within the sizes)"
        )
        if consistent:
            return {
                "value": gns_value,
                "source": "gradient_noise_scale",
                "agreement": agreement,
                "warnings": warnings,
            }
        if gns_ok:  # the bound and B_simple contradict each other: as for a fit far from B_simple
            assert gns_value is not None  # agreement is set only when gns_ok
            combined = math.sqrt(race_value * gns_value)
            warnings.append(
                f"the gradient noise scale B_simple={gns_value:.3g} is outside that bound; using their "
                f"geometric mean {combined:.3g}"
            )
            return {"value": combined, "source": "combined", "agreement": agreement, "warnings": warnings}
        return {"value": race_value, "source": "races", "agreement": agreement, "warnings": warnings}
    if races is not None and status not in (None, "ok"):
        warnings.append(f"races gave no fit ({status}); using the gradient noise scale")
    if gns_ok:
        return {"value": gns_value, "source": "gradient_noise_scale", "agreement": None, "warnings": warnings}
    warnings.append("no noise-scale estimate: time to target cannot be modelled, falling back to throughput")
    return {"value": None, "source": None, "agreement": None, "warnings": warnings}


def confidence(
    measured_on: str | None,
    gradient_noise_scale: Mapping[str, Any] | None,
    noise_choice: Mapping[str, Any],
    races: Mapping[str, Any] | None,
) -> tuple[str, list[str]]:
    """ "high" / "medium" / "low" and the reasons that lowered it.

    high: client data, races fitted (points close to the curve) and agree with B_simple within 3x, and
    B_simple's interval spans < 3x. Built-in data or no noise estimate: low. Anything else: medium.
    """
    reasons: list[str] = []
    if noise_choice.get("value") is None:
        return "low", ["no noise-scale estimate"]
    if measured_on is None or str(measured_on).startswith("builtin"):
        reasons.append("statistics measured on a built-in sample, not the client's data")
        return "low", reasons
    level = "high"
    gns = gradient_noise_scale or {}
    low, high = gns.get("low"), gns.get("high")
    if not (low and high and math.isfinite(high) and high / low < 3):
        reasons.append("the gradient noise scale's interval is wide")
        level = "medium"
    race = races or {}
    if race.get("status") != "ok":
        reasons.append("training races did not fit B_noise")
        level = "medium"
    elif (race.get("rel_rms") or 0) > 0.15:
        reasons.append(f"steps-to-loss fit S(B) loosely (relative rms {race['rel_rms']:.2f})")
        level = "medium"
    agreement = noise_choice.get("agreement")
    if agreement is not None and not 1 / RACES_AGREE_FACTOR <= agreement <= RACES_AGREE_FACTOR:
        reasons.append("races and gradient noise scale disagree by more than 3x")
        level = "medium"
    return level, reasons


# ------------------------------------------------------------------------------- recommendation


def choose_batch(
    *,
    throughput: Sequence[Mapping[str, float]],
    max_feasible_batch_size: int,
    b_noise: float | None,
    objective: str = "time_to_target",
    devices: int = 1,
    dataset_size: int | None = None,
    step_overhead_s: float = 0.0,
    b_noise_sigma: float | None = None,
) -> dict[str, Any]:
    """The chosen (micro, accumulation, global) layout and the time-to-target curve around it.

    Step times come from `throughput_model` (reported): with the affine model and no accumulation the
    optimum is near B* = sqrt(B_noise·overhead_s/per_sample_s), so a 2x error in B_noise moves it by
    only sqrt(2). Without a B_noise, "time_to_target" falls back to the throughput knee (reported in
    "objective_used"). With `b_noise_sigma` (B_noise's ln-spread) and a layout without accumulation,
    the micro-batch is `horizon.robust_micro_batch`'s (the smallest time ratio to the best at the
    interval's quantile over B_noise's and the step times' spread) moved KNEE_WEIGHT of the way to the
    step-time knee (`horizon.step_time_knee`), reported in "batch_choice"; the curve stays the point
    estimate's, relative to the chosen size, so a neighbour can sit below 1.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    layouts = candidate_layouts(throughput, max_feasible_batch_size, devices, dataset_size)
    used = objective if (objective != "time_to_target" or b_noise is not None) else "throughput"
    noise = b_noise if b_noise is not None else 0.0
    model = throughput_model(throughput)

    def cost(layout: tuple[int, int, int]) -> float:
        m, a, g = layout
        per_sample = time_per_sample(m, a, devices, throughput, step_overhead_s, model)
        return relative_time_to_target(g, noise, per_sample)

    choice = "point estimate"
    if used == "time_to_target":
        chosen = min(layouts, key=lambda t: (cost(t), t[2]))
        singles = {t[0]: t for t in layouts if t[1] == 1}
        if b_noise_sigma is not None and b_noise is not None and chosen[1] == 1 and len(singles) > 1:
            micro = robust_micro_batch(
                throughput=throughput, candidates=sorted(singles), b_noise=b_noise, sigma=b_noise_sigma,
                devices=devices,
            )  # fmt: skip
            knee = step_time_knee(throughput, max(singles))
            chosen = singles[toward_knee(micro, knee, sorted(singles))]
            choice = (
                f"robust: smallest 80 % bound of the time ratio ({micro * devices}), moved "
                f"{horizon.KNEE_WEIGHT:.0%} of the way (in ln B) to the step-time knee ({knee * devices})"
            )
    elif used == "throughput":
        m = throughput_knee(throughput, max_feasible_batch_size)
        chosen = next((t for t in layouts if t[0] == m and t[1] == 1), layouts[0])
    else:
        chosen = max((t for t in layouts if t[1] == 1), key=lambda t: t[0])
    best = cost(chosen)
    # The curve: the best layout for each global batch within CURVE_SPAN of the chosen one.
    by_global: dict[int, float] = {}
    for t in layouts:
        if chosen[2] / CURVE_SPAN <= t[2] <= chosen[2] * CURVE_SPAN:
            by_global[t[2]] = min(by_global.get(t[2], math.inf), cost(t))
    curve = [
        {"batch_size": g, "relative_time": round(c / best, 4)}
        for g, c in sorted(by_global.items())
        if g == chosen[2] or _is_power_of_two(g // devices)
    ]
    return {
        "micro_batch_size": chosen[0],
        "gradient_accumulation_steps": chosen[1],
        "recommended_batch_size": chosen[2],
        "objective_used": used,
        "batch_choice": choice,
        "time_to_target_curve": curve if b_noise is not None else [],
        "throughput_model": {k: _finite(v) for k, v in model.items()},
    }


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def recommend(
    *,
    throughput: Sequence[Mapping[str, float]],
    max_feasible_batch_size: int,
    dataset_size: int,
    optimizer: str,
    learning_rate: float,
    reference_batch_size: int,
    objective: str = "time_to_target",
    devices: int = 1,
    gradient_noise_scale: Mapping[str, Any] | None = None,
    races: Mapping[str, Any] | None = None,
    step_overhead_s: float = 0.0,
    cut_short: Sequence[str] = (),
    noise_independent: str | None = None,
    horizon: Mapping[str, Any] | None = None,
    sgd_momentum: float | None = None,
) -> dict[str, Any]:
    """The full training recipe (the result fields of docs/design.md plus the estimates behind them).

    `throughput`: [{"batch_size", "samples_per_second"}] per device, measured; `max_feasible_batch_size`:
    the largest micro-batch that fits; `gradient_noise_scale`: noise.measure_noise_scale's result (its
    "measured_on" says whose data); `races`: races.run_races' result; `learning_rate` at
    `reference_batch_size` is the client's reference; `cut_short`: phases the time budget truncated;
    `noise_independent`: why the time-to-target choice is the same for any B_noise (the statistics were
    skipped on purpose): without a noise estimate it is then still answered as time_to_target.
    `horizon`: horizon.carry's result (the batch is then chosen for B_noise at the client's horizon).
    `sgd_momentum`: SGD's momentum (None for Adam): the batch is chosen for B_noise times its
    `stability_factor` (horizon.carry applies it to the horizon's B_noise); the lr rule keeps the measured
    B_noise, because the client's lr is scaled from where it is, usually well below the stability bound
    (scaling it with the reduced B_noise left plain SGD's recipe slower than the client's own run on 12
    of the benchmark's 42 plain-SGD task-depths, against 0 of 34 before the factor).
    """
    if max_feasible_batch_size < 1:
        raise ValueError("max_feasible_batch_size must be >= 1")
    if devices < 1:
        raise ValueError("devices must be >= 1")
    warnings: list[str] = list(cut_short)
    choice = choose_noise_scale(gradient_noise_scale, races)
    factor = stability_factor(sgd_momentum)
    settled = noise_independent is not None and choice["value"] is None and objective == "time_to_target"
    if settled:
        warnings.append(f"gradient noise scale {noise_independent}")
    elif objective == "time_to_target" or choice["value"] is not None:  # other objectives need none
        warnings += choice["warnings"]
    choice = _bound_implausible_noise_scale(choice, gradient_noise_scale, races, dataset_size, warnings)
    b_noise = choice["value"]
    # horizon.carry's B_noise at the client's horizon, when given, is what the batch is chosen for.
    horizon_noise = (horizon or {}).get("value")
    picked = choose_batch(
        throughput=throughput,
        max_feasible_batch_size=max_feasible_batch_size,
        b_noise=1.0 if settled else horizon_noise if horizon_noise is not None else _times(b_noise, factor),
        objective=objective,
        devices=devices,
        dataset_size=dataset_size,
        step_overhead_s=step_overhead_s,
        b_noise_sigma=(horizon or {}).get("sigma") if horizon_noise is not None and not settled else None,
    )
    global_batch = picked["recommended_batch_size"]
    scaled, rule = scale_learning_rate(learning_rate, reference_batch_size, global_batch, optimizer, b_noise)
    observed = stable_learning_rates(
        gradient_noise_scale,
        races,
        reference_learning_rate=learning_rate,
        reference_batch_size=reference_batch_size,
    )
    lr, ceiling = cap_learning_rate(
        scaled,
        global_batch,
        optimizer,
        observed,
        reference_learning_rate=learning_rate,
        reference_batch_size=reference_batch_size,
        b_noise=b_noise,
    )
    warnings += _learning_rate_warnings(scaled, lr, ceiling, b_noise, gradient_noise_scale)
    if ceiling["capped"]:
        rule += f", capped at the largest learning rate seen training stably ({ceiling['source']})"
    steps_per_epoch = math.ceil(dataset_size / global_batch)
    warmup_steps, warmup_rule = suggest_warmup(lr / learning_rate)
    level, reasons = confidence(
        (gradient_noise_scale or {}).get("measured_on"), gradient_noise_scale, choice, races
    )
    if choice.get("bound") and level != "low":
        level, reasons = "low", [*reasons, "B_noise is only bounded from below"]
    if settled:
        level, reasons = "medium", ["B_noise not measured: the batch choice does not depend on it"]
        picked["time_to_target_curve"] = []
    warnings += _layout_warnings(picked, throughput, max_feasible_batch_size, b_noise, devices, dataset_size)
    gns = gradient_noise_scale or {}
    reported = {k: _finite(gns.get(k)) for k in ("value", "low", "high")}  # JSON has no Infinity
    if choice.get("implausible"):
        reported = {**reported, "value": None, "lower_bound": b_noise, "estimate": _finite(gns.get("value"))}
    return {
        **picked,
        "objective": objective,
        "devices": devices,
        "learning_rate": lr,
        "learning_rate_rule": rule,
        "learning_rate_scaled": scaled,
        "learning_rate_ceiling": ceiling,
        "reference_learning_rate": learning_rate,
        "reference_batch_size": reference_batch_size,
        "warmup_steps": warmup_steps,
        "warmup_rule": warmup_rule,
        "steps_per_epoch": steps_per_epoch,
        "b_noise": b_noise,
        "b_noise_bound": choice.get("bound"),
        "noise_scale_source": choice["source"],
        "noise_scale_stability_factor": factor,
        "gradient_noise_scale": {
            **reported,
            "measured_on": gns.get("measured_on"),
            **{
                k: gns[k]
                for k in ("status", "method", "draws", "b_small", "b_big", "preconditioned", "warmup_steps")
                if k in gns
            },
            **({"plain": {k: _finite(v) for k, v in gns["plain"].items()}} if "plain" in gns else {}),
        },
        "races": _races_summary(races),
        "confidence": level,
        "confidence_reasons": reasons,
        "warnings": warnings,
    }


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _statistics_sizes(gradient_noise_scale: Mapping[str, Any] | None, races: Mapping[str, Any] | None) -> int:
    """The largest batch size the statistics measured at (b_big, race sizes); 0 when none."""
    sizes = [int((gradient_noise_scale or {}).get("b_big") or 0)]
    sizes += [int(r.get("batch_size") or 0) for r in (races or {}).get("races") or []]
    return max(sizes)


def _bound_implausible_noise_scale(
    choice: dict[str, Any],
    gradient_noise_scale: Mapping[str, Any] | None,
    races: Mapping[str, Any] | None,
    dataset_size: int,
    warnings: list[str],
) -> dict[str, Any]:
    """A B_noise above the dataset, or NOISE_BOUND_FACTOR x the largest size measured, becomes a lower
    bound at that limit. The time-to-target optimum grows with B_noise, so the batch chosen for the
    bound is the smallest the true value could call for, and the learning-rate rule stays conservative."""
    value = choice["value"]
    largest = _statistics_sizes(gradient_noise_scale, races)
    limits = [dataset_size] + ([NOISE_BOUND_FACTOR * largest] if largest else [])
    limit = min(limits)
    if value is None or value <= limit:
        return choice
    what = "the dataset size" if limit == dataset_size else f"{NOISE_BOUND_FACTOR}x the largest size measured"
    warnings.append(f"B_noise estimate {value:.3g} is above {what}: reported as a lower bound of {limit:g}")
    return {**choice, "value": float(limit), "bound": "lower", "implausible": True}


def _learning_rate_warnings(
    scaled: float,
    lr: float,
    ceiling: Mapping[str, Any],
    b_noise: float | None,
    gradient_noise_scale: Mapping[str, Any] | None,
) -> list[str]:
    warnings = []
    if ceiling["capped"]:
        where = {
            "race": "in a training race",
            "warmup": "in the noise-scale warm-up",
            "reference": "the client's reference, not verified by the probe",
        }[ceiling["source"]]
        warnings.append(
            f"learning rate capped at {lr:.4g} (the rule gives {scaled:.4g}): the largest learning rate seen "
            f"training stably was {ceiling['learning_rate']:.4g} at batch {ceiling['batch_size']} ({where})"
        )
    if b_noise is None:
        warnings.append(
            "B_noise unknown: the learning rate is not scaled beyond the largest one observed to train"
        )
    if (gradient_noise_scale or {}).get("status") == "non_finite_loss":
        warnings.append(
            "the reference learning rate diverged in the probe's warm-up: lower it before training"
        )
    return warnings


def _finite(value: Any) -> Any:
    """None for inf/nan (an unresolved estimate), the value otherwise."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _races_summary(races: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if races is None:
        return None
    keys = ("status", "value", "bound", "rel_rms", "level", "points", "races", "seconds")
    return {k: races.get(k) for k in keys if k in races}


def _layout_warnings(
    picked: Mapping[str, Any],
    throughput: Sequence[Mapping[str, float]],
    max_micro: int,
    b_noise: float | None,
    devices: int,
    dataset_size: int,
) -> list[str]:
    warnings = []
    points = _ladder(throughput)
    if len(points) == 1:
        warnings.append("throughput was measured at one batch size only: the curve is flat by assumption")
    if points[-1][0] < max_micro:
        warnings.append(
            f"throughput measured up to {int(points[-1][0])}, not the maximum {max_micro}: "
            "assumed flat beyond"
        )
    if b_noise is not None and b_noise > 4 * max_micro * devices:
        warnings.append(
            f"B_noise ({b_noise:.3g}) is far above the largest batch that fits ({max_micro * devices}): "
            "larger batches would still pay off statistically; more devices or memory would help"
        )
    if picked["gradient_accumulation_steps"] > 1:
        warnings.append("gradient accumulation: BatchNorm statistics still see only the micro-batch")
    if devices > 1:
        warnings.append("multi-device throughput assumed linear in devices (communication not measured)")
    if picked["recommended_batch_size"] > dataset_size / 4:
        warnings.append("the recommended batch is more than a quarter of the dataset: few steps per epoch")
    return warnings

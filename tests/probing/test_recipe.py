"""The recommendation and training recipe (service/probing/recipe.py): pure functions."""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest.mock import ANY

import pytest

from service.probing import horizon, recipe


def ladder(points):
    return [{"batch_size": b, "samples_per_second": t} for b, t in points]


# Throughput that grows linearly until 256 and is flat after: step time = overhead + B / peak.
def saturating(sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), overhead=0.01, peak=10_000.0):
    return ladder([(b, b / (overhead + b / peak)) for b in sizes])


GNS_CLIENT = {"value": 100.0, "low": 80.0, "high": 130.0, "measured_on": "client", "status": "ok"}


def _raced(sizes=(32, 128, 512), b_noise=90.0, optimizer="sgd", lr=0.1, status="reached"):
    """Race rows as races.run_races reports them, each at the recipe rule's learning rate."""
    return [
        {
            "batch_size": b,
            "learning_rate": recipe.scale_learning_rate(lr, 32, b, optimizer, b_noise)[0],
            "status": status,
            "steps": 100,
        }
        for b in sizes
    ]


RACES_OK = {"status": "ok", "value": 90.0, "rel_rms": 0.03, "bound": None, "races": _raced()}


def _recommend(**overrides):
    args = dict(
        throughput=saturating(),
        max_feasible_batch_size=1024,
        dataset_size=50_000,
        optimizer="sgd",
        learning_rate=0.1,
        reference_batch_size=32,
        gradient_noise_scale=GNS_CLIENT,
        races=RACES_OK,
    )
    return recipe.recommend(**{**args, **overrides})


# ------------------------------------------------------------------------------------- throughput


def test_interpolation_is_log_log():
    lad = ladder([(8, 100.0), (32, 400.0), (128, 800.0)])
    assert recipe.interpolate_throughput(lad, 32) == pytest.approx(400)
    assert recipe.interpolate_throughput(lad, 16) == pytest.approx(200)  # power law between points
    assert recipe.interpolate_throughput(lad, 64) == pytest.approx(400 * math.sqrt(2))
    assert recipe.interpolate_throughput(lad, 1024) == pytest.approx(800)  # flat beyond the ladder
    assert recipe.interpolate_throughput(lad, 4) == pytest.approx(50)  # constant step time below


def test_one_point_and_failed_points():
    lad = [{"batch_size": 64, "samples_per_second": 1000.0}, {"batch_size": 128, "samples_per_second": None}]
    assert recipe.interpolate_throughput(lad, 64) == 1000
    assert recipe.interpolate_throughput(lad, 128) == 1000
    with pytest.raises(ValueError, match="no positive"):
        recipe.interpolate_throughput([{"batch_size": 8, "samples_per_second": None}], 8)


def test_noisy_step_times_are_made_monotone():
    # 256 "faster per step" than 128: a timing glitch, pooled with its neighbour.
    lad = ladder([(64, 32_000.0), (128, 16_000.0), (256, 64_000.0)])
    smooth = recipe._ladder(lad)
    step_times = [b / t for b, t in smooth]
    assert step_times == sorted(step_times)
    assert step_times[1] == pytest.approx(step_times[2]) == pytest.approx((0.008 + 0.004) / 2)


def test_throughput_peak():
    lad = ladder([(8, 100.0), (32, 900.0), (64, 1000.0), (128, 1000.0)])
    assert recipe.throughput_peak(lad, 1024) == 64  # the smallest size on ties
    assert recipe.throughput_peak(lad, 32) == 32


# ---------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    ("global_batch", "max_micro", "devices", "expected"),
    [
        (256, 512, 1, (256, 1, 256)),
        (1024, 256, 1, (256, 4, 1024)),
        (1000, 256, 1, (250, 4, 1000)),
        (1030, 256, 1, (206, 5, 1030)),
        (512, 64, 4, (64, 2, 512)),
        (3, 1, 1, (1, 3, 3)),
        (2, 8, 4, (1, 1, 4)),  # at least one sample per device
    ],
)
def test_split_batch(global_batch, max_micro, devices, expected):
    micro, acc, total = recipe.split_batch(global_batch, max_micro, devices)
    assert (micro, acc, total) == expected
    assert micro <= max_micro and micro * acc * devices == total >= global_batch


# ---------------------------------------------------------------------------------- learning rate


def test_learning_rate_rules():
    assert recipe.scale_learning_rate(0.1, 32, 128, "sgd") == (pytest.approx(0.4), "linear")
    assert recipe.scale_learning_rate(1e-3, 32, 128, "adamw") == (pytest.approx(2e-3), "sqrt")
    assert recipe.scale_learning_rate(1e-3, 32, 8, "adam")[0] == pytest.approx(5e-4)
    assert recipe.scale_learning_rate(0.1, 32, 32, "sgd", b_noise=100)[0] == pytest.approx(0.1)


def test_learning_rate_saturates_past_b_noise():
    lr_small, rule = recipe.scale_learning_rate(0.1, 32, 64, "sgd", b_noise=10_000)
    assert lr_small == pytest.approx(0.2, rel=0.01) and "saturating" in rule  # ~linear far below B_noise
    lr_big, _ = recipe.scale_learning_rate(0.1, 32, 100_000, "sgd", b_noise=100)
    assert lr_big == pytest.approx(0.1 * (1 + 100 / 32) / (1 + 100 / 100_000))  # capped near lr_max


def test_warmup_follows_the_ratio_to_the_reference():
    assert recipe.suggest_warmup(1.0)[0] == 0
    assert recipe.suggest_warmup(0.25)[0] == 0
    steps, why = recipe.suggest_warmup(8.0)
    assert steps == 3 * recipe.WARMUP_STEPS_PER_DOUBLING and "Goyal" in why
    assert recipe.suggest_warmup(2.0)[0] == recipe.WARMUP_STEPS_PER_DOUBLING
    assert recipe.suggest_warmup(64.0)[0] == 2 * recipe.suggest_warmup(8.0)[0]


# ----------------------------------------------------------------------------- the batch choice


def _brute_force_best(lad, b_noise, sizes):
    # saturating() is exactly affine in step time, so the fitted model is the true curve between points.
    model = recipe.throughput_model(lad)
    return min(sizes, key=lambda b: (b + b_noise) * recipe.step_time(model, lad, b) / b)


@pytest.mark.parametrize("b_noise", [1.0, 30.0, 200.0, 5000.0])
def test_time_to_target_minimises_b_plus_noise_over_throughput(b_noise):
    lad = saturating()
    picked = recipe.choose_batch(throughput=lad, max_feasible_batch_size=1024, b_noise=b_noise)
    sizes = sorted({2**k for k in range(11)} | {3 * 2**k for k in range(3, 9)})  # + half-octaves 24..768
    assert picked["recommended_batch_size"] == _brute_force_best(lad, b_noise, sizes)
    assert picked["gradient_accumulation_steps"] == 1
    curve = {p["batch_size"]: p["relative_time"] for p in picked["time_to_target_curve"]}
    assert curve[picked["recommended_batch_size"]] == 1.0 and min(curve.values()) == 1.0


def test_with_a_spread_the_choice_is_the_robust_one_and_says_so():
    lad = saturating(sizes=(8, 16, 32, 64, 128, 256, 512))
    point = recipe.choose_batch(throughput=lad, max_feasible_batch_size=512, b_noise=100.0)
    robust = recipe.choose_batch(
        throughput=lad, max_feasible_batch_size=512, b_noise=100.0, b_noise_sigma=1.0
    )
    assert point["batch_choice"] == "point estimate" and robust["batch_choice"].startswith("robust")
    candidates = recipe.micro_candidates(lad, 512)
    assert min(candidates) == 8  # nothing below the smallest measured size
    # The robust size, moved halfway (in ln B) to the step-time knee.
    robust_size = horizon.robust_micro_batch(throughput=lad, candidates=candidates, b_noise=100.0, sigma=1.0)
    knee = horizon.step_time_knee(lad, 512)
    assert robust["recommended_batch_size"] == horizon.toward_knee(robust_size, knee, candidates)
    assert knee < robust["recommended_batch_size"] < robust_size  # here the knee (32) moves 96 to 64
    assert f"({robust_size})" in robust["batch_choice"] and f"knee ({knee})" in robust["batch_choice"]
    # recommend() chooses robustly for B_noise at the horizon, with the horizon's spread.
    carried = {"value": 100.0, "sigma": 1.0}
    r = _recommend(horizon=carried)
    assert r["batch_choice"].startswith("robust")


def test_tiny_and_huge_noise_scales():
    lad = saturating()
    tiny = recipe.choose_batch(throughput=lad, max_feasible_batch_size=1024, b_noise=1e-6)
    huge = recipe.choose_batch(throughput=lad, max_feasible_batch_size=1024, b_noise=1e9)
    assert tiny["recommended_batch_size"] < 8  # the fixed per-step overhead still favours a few samples
    assert huge["recommended_batch_size"] == 1024  # statistics say "bigger": as big as fits


def test_other_objectives():
    lad = ladder([(8, 100.0), (32, 900.0), (64, 1000.0), (128, 950.0)])
    thr = recipe.choose_batch(
        throughput=lad, max_feasible_batch_size=200, b_noise=10.0, objective="throughput"
    )
    mx = recipe.choose_batch(
        throughput=lad, max_feasible_batch_size=200, b_noise=10.0, objective="max_feasible"
    )
    assert thr["recommended_batch_size"] == 64 and mx["recommended_batch_size"] == 200
    with pytest.raises(ValueError, match="objective"):
        recipe.choose_batch(throughput=lad, max_feasible_batch_size=200, b_noise=1.0, objective="fastest")


def test_max_feasible_one():
    r = _recommend(throughput=ladder([(1, 50.0)]), max_feasible_batch_size=1)
    assert (r["recommended_batch_size"], r["micro_batch_size"], r["gradient_accumulation_steps"]) == (1, 1, 1)
    assert any("one batch size" in w for w in r["warnings"])


def test_devices_multiply_the_global_batch():
    r = _recommend(devices=4)
    one = _recommend(devices=1)
    assert r["recommended_batch_size"] == r["micro_batch_size"] * 4
    assert r["devices"] == 4 and any("devices" in w for w in r["warnings"])
    # With 4x the throughput for the same global batch, the best micro-batch is no larger than with one.
    assert r["micro_batch_size"] <= one["micro_batch_size"]
    assert r["learning_rate"] == pytest.approx(
        recipe.scale_learning_rate(0.1, 32, r["recommended_batch_size"], "sgd", 90.0)[0]
    )


def test_accumulation_when_the_best_global_batch_does_not_fit():
    # Memory caps the micro-batch at 64 while throughput still rises; with a large per-step overhead
    # (optimizer update, gradient sync) and a huge B_noise, accumulating is faster than stepping.
    lad = saturating(sizes=(8, 16, 32, 64), overhead=0.01)
    r = recipe.choose_batch(throughput=lad, max_feasible_batch_size=64, b_noise=1e5, step_overhead_s=0.009)
    assert r["micro_batch_size"] == 64 and r["gradient_accumulation_steps"] > 1
    assert r["recommended_batch_size"] == 64 * r["gradient_accumulation_steps"]
    # Without per-step overhead, accumulation only adds samples per step: never chosen.
    plain = recipe.choose_batch(throughput=lad, max_feasible_batch_size=64, b_noise=1e5)
    assert plain["gradient_accumulation_steps"] == 1


def test_global_batch_never_exceeds_the_dataset():
    r = _recommend(dataset_size=100, races={"status": "ok", "value": 1e6, "rel_rms": 0.0})
    assert r["recommended_batch_size"] <= 100 and r["steps_per_epoch"] >= 1


# ------------------------------------------------------------------------------ noise estimates


def test_races_are_preferred_when_they_agree_with_the_noise_scale():
    choice = recipe.choose_noise_scale(GNS_CLIENT, {"status": "ok", "value": 250.0})
    assert choice["source"] == "races" and choice["value"] == 250
    assert choice["agreement"] == pytest.approx(2.5)
    assert choice["warnings"] == []


@pytest.mark.parametrize("races_value", [900.0, 100.0 / 9])
def test_far_apart_estimates_are_combined_and_flagged(races_value):
    choice = recipe.choose_noise_scale(GNS_CLIENT, {"status": "ok", "value": races_value})
    assert choice["source"] == "combined"
    assert choice["value"] == pytest.approx((races_value * 100) ** 0.5)  # 300 or 33.3
    assert any("geometric mean" in w for w in choice["warnings"])


def test_race_bounds():
    lower = {"status": "above_range", "value": 64.0}
    assert recipe.choose_noise_scale(GNS_CLIENT, lower)["source"] == "gradient_noise_scale"  # 100 >= 64
    # B_simple outside the races' bound: the two contradict each other, so their geometric mean.
    contradicted = recipe.choose_noise_scale({**GNS_CLIENT, "value": 20.0}, lower)
    assert contradicted["source"] == "combined" and contradicted["value"] == pytest.approx((20 * 64) ** 0.5)
    upper = {"status": "below_range", "value": 16.0}
    assert recipe.choose_noise_scale(GNS_CLIENT, upper)["value"] == pytest.approx(40)  # sqrt(100 * 16)
    assert recipe.choose_noise_scale({**GNS_CLIENT, "value": 10.0}, upper)["value"] == 10  # consistent
    assert recipe.choose_noise_scale(None, upper) == {
        "value": 16.0, "source": "races", "agreement": None, "warnings": [ANY], "bound": None,
        "stability_factor": 1.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("momentum", "factor"),
    [(None, 1.0), (0.0, recipe.STABILITY_KAPPA), (0.5, 3 * recipe.STABILITY_KAPPA), (0.9, 1.0), (0.99, 1.0)],
)
def test_sgd_b_noise_is_scaled_by_its_momentums_stability_factor(momentum, factor):
    assert recipe.stability_factor(momentum) == pytest.approx(factor)
    choice = recipe.choose_noise_scale(GNS_CLIENT, {"status": "ok", "value": 250.0}, momentum)
    assert choice["value"] == pytest.approx(250 * factor)
    assert choice["stability_factor"] == pytest.approx(factor)


def test_plain_sgd_is_recommended_a_smaller_batch_than_the_same_statistics_with_momentum():
    plain = _recommend(optimizer="sgd", sgd_momentum=0.0)
    heavy = _recommend(optimizer="sgd", sgd_momentum=0.9)
    assert heavy["noise_scale_stability_factor"] == 1.0
    assert plain["noise_scale_stability_factor"] == pytest.approx(recipe.STABILITY_KAPPA)
    assert plain["recommended_batch_size"] < heavy["recommended_batch_size"]
    # The lr rule keeps the measured B_noise: the same rule at the chosen size.
    assert plain["b_noise"] == heavy["b_noise"] == pytest.approx(90)
    rule = recipe.scale_learning_rate(0.1, 32, plain["recommended_batch_size"], "sgd", 90.0)[0]
    assert plain["learning_rate_scaled"] == pytest.approx(rule)


HORIZON_SPEC = {"reference_batch_size": 32, "dataset_size": 50_000, "epochs": None, "target_loss": None}


def test_the_horizons_b_noise_carries_the_stability_factor():
    stats = {"gradient_noise_scale": GNS_CLIENT, "races": RACES_OK}
    plain = horizon.carry(stats, SimpleNamespace(**HORIZON_SPEC, sgd_momentum=0.0))
    adam = horizon.carry(stats, SimpleNamespace(**HORIZON_SPEC, sgd_momentum=None))
    assert plain["value"] == pytest.approx(adam["value"] * recipe.STABILITY_KAPPA)


def test_failed_races_fall_back_to_the_gradient_noise_scale():
    choice = recipe.choose_noise_scale(GNS_CLIENT, {"status": "insufficient", "value": None})
    assert choice["source"] == "gradient_noise_scale" and choice["value"] == 100
    assert any("no fit" in w for w in choice["warnings"])


def test_unresolved_noise_scale_is_a_lower_bound():
    gns = {"value": math.inf, "status": "unresolved", "b_big": 512, "measured_on": "client"}
    choice = recipe.choose_noise_scale(gns, None)
    assert choice["value"] == 512 and any("lower bound" in w for w in choice["warnings"])


@pytest.mark.parametrize(
    ("low", "bound"),
    [
        (100.0, 100.0),
        (5000.0, recipe.NOISE_BOUND_FACTOR * 32),
        (1e30, recipe.NOISE_BOUND_FACTOR * 32),
        (8.0, 32),
    ],
)
def test_an_unresolved_noise_scale_is_bounded_by_its_bootstraps_lower_quantile(low, bound):
    # |G|² not resolved at b_big=32: the bootstrap's 5 % quantile says how far above b_big B_simple lies,
    # up to NOISE_BOUND_FACTOR x b_big; never below b_big itself.
    gns = {"value": math.inf, "low": low, "high": math.inf, "status": "unresolved", "b_big": 32,
           "measured_on": "client"}  # fmt: skip
    choice = recipe.choose_noise_scale(gns, None)
    assert choice["value"] == pytest.approx(bound) and choice["bound"] == "lower"
    assert any(f"using {bound:.3g}" in w for w in choice["warnings"])


def test_no_estimate_falls_back_to_throughput():
    r = _recommend(gradient_noise_scale=None, races=None)
    assert r["noise_scale_source"] is None and r["objective_used"] == "throughput"
    assert r["confidence"] == "low" and r["time_to_target_curve"] == []


# ------------------------------------------------------------------------------------ confidence


def test_confidence_levels():
    assert _recommend()["confidence"] == "high"
    builtin = _recommend(gradient_noise_scale={**GNS_CLIENT, "measured_on": "builtin:digits"})
    assert builtin["confidence"] == "low" and "built-in" in builtin["confidence_reasons"][0]
    wide = _recommend(gradient_noise_scale={**GNS_CLIENT, "low": 10.0, "high": 1000.0})
    assert wide["confidence"] == "medium"
    assert _recommend(races=None)["confidence"] == "medium"
    assert _recommend(races={"status": "ok", "value": 1000.0, "rel_rms": 0.0})["confidence"] == "medium"


# --------------------------------------------------------------------------------- full recipe


def test_recipe_has_every_contract_field():
    r = _recommend(cut_short=["training races cut short"])
    for key in (
        "recommended_batch_size", "micro_batch_size", "gradient_accumulation_steps", "devices",
        "learning_rate", "learning_rate_rule", "warmup_steps", "steps_per_epoch", "gradient_noise_scale",
        "confidence", "warnings", "time_to_target_curve", "noise_scale_source", "b_noise", "races",
    ):  # fmt: skip
        assert key in r, key
    assert set(r["gradient_noise_scale"]) >= {"value", "low", "high", "measured_on"}
    assert r["noise_scale_source"] == "races" and r["b_noise"] == 90
    assert r["steps_per_epoch"] == math.ceil(50_000 / r["recommended_batch_size"])
    assert "training races cut short" in r["warnings"]
    assert all(p["relative_time"] >= 1.0 for p in r["time_to_target_curve"])


def test_large_scale_factor_gets_a_warmup():
    races = {"status": "ok", "value": 1e9, "rel_rms": 0.0, "races": _raced(b_noise=1e9, lr=0.01)}
    r = _recommend(races=races, learning_rate=0.01, reference_batch_size=32)
    ratio = r["learning_rate"] / 0.01
    assert ratio > 4 and r["warmup_steps"] == math.ceil(recipe.WARMUP_STEPS_PER_DOUBLING * math.log2(ratio))


def test_adam_uses_the_square_root_rule():
    races = {**RACES_OK, "races": _raced(optimizer="adamw", lr=1e-3)}
    r = _recommend(optimizer="adamw", learning_rate=1e-3, races=races)
    assert r["learning_rate_rule"].startswith("sqrt")
    expected = 1e-3 * math.sqrt((1 + 90 / 32) / (1 + 90 / r["recommended_batch_size"]))
    assert r["learning_rate"] == pytest.approx(expected)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="max_feasible_batch_size must be >= 1"):
        _recommend(max_feasible_batch_size=0)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        _recommend(devices=0)


# ------------------------------------------------------------------------------ step-time model


def test_affine_step_time_fit_recovers_overhead_and_per_sample_cost():
    fit = recipe.fit_step_time(saturating(overhead=0.01, peak=10_000.0))
    assert fit["overhead_s"] == pytest.approx(0.01) and fit["per_sample_s"] == pytest.approx(1e-4)
    assert fit["rel_rms"] < 1e-9
    assert recipe.throughput_model(saturating())["kind"] == "affine"


def test_optimum_follows_sqrt_of_b_noise_times_saturation_size():
    # overhead/per_sample = 100: B* = sqrt(B_noise * 100) = 200 for B_noise = 400.
    picked = recipe.choose_batch(throughput=saturating(), max_feasible_batch_size=1024, b_noise=400.0)
    assert picked["recommended_batch_size"] == 192  # the candidate nearest B* = 200 (half-octave grid)
    assert picked["throughput_model"]["kind"] == "affine"


def test_one_noisy_timing_does_not_move_the_choice():
    clean = saturating()
    noisy = [dict(p) for p in clean]
    for p in noisy:
        if p["batch_size"] == 512:
            p["samples_per_second"] *= 1.6  # a lucky pass at 512
    pick = {  # B_noise 655: B* = sqrt(655 * 100) = 256, a candidate
        name: recipe.choose_batch(throughput=lad, max_feasible_batch_size=1024, b_noise=655.0)[
            "recommended_batch_size"
        ]
        for name, lad in (("clean", clean), ("noisy", noisy))
    }
    assert pick["clean"] == pick["noisy"]


def test_a_ladder_the_affine_shape_does_not_fit_is_interpolated():
    # Throughput that collapses past 64 (e.g. falling out of cache): not a roofline shape.
    lad = ladder([(8, 800.0), (16, 1600.0), (32, 3200.0), (64, 6400.0), (128, 1000.0), (256, 900.0)])
    model = recipe.throughput_model(lad)
    assert model["kind"] == "interpolated" and model["rel_rms"] > recipe.AFFINE_MAX_RMS
    picked = recipe.choose_batch(throughput=lad, max_feasible_batch_size=256, b_noise=50.0)
    assert picked["recommended_batch_size"] == 64


def test_the_recipe_is_strict_json_even_when_estimates_are_unresolved():
    import json

    gns = {"value": math.inf, "low": 50.0, "high": math.inf, "status": "unresolved", "b_big": 512,
           "measured_on": "client", "plain": {"value": math.inf, "low": 1.0, "high": math.inf}}  # fmt: skip
    r = _recommend(gradient_noise_scale=gns, races=None)
    json.dumps(r, allow_nan=False)
    assert r["gradient_noise_scale"]["value"] is None and r["b_noise"] == 512


# ----------------------------------------------------------- answers that cannot harm a training run


def test_without_a_noise_scale_the_learning_rate_is_never_scaled_up():
    # The reported case: no time for the noise scale, the fallback picked the cap and scaled lr 0.1
    # linearly to 156. Now: the knee of the curve, and no learning rate above what was observed.
    r = _recommend(gradient_noise_scale=None, races=None, max_feasible_batch_size=50_000)
    assert r["objective_used"] == "throughput" and r["confidence"] == "low"
    assert r["recommended_batch_size"] < 50_000
    assert r["learning_rate"] <= 0.1 and r["learning_rate_ceiling"]["source"] == "reference"
    assert r["warmup_steps"] == 0
    assert any("B_noise unknown" in w for w in r["warnings"])


def test_the_learning_rate_never_exceeds_the_largest_seen_training_stably():
    # Races trained at most lr 0.2 at batch 64; the rule asks for far more at a large batch.
    races = {"status": "ok", "value": 1e5, "rel_rms": 0.0, "races": _raced(sizes=(16, 64), b_noise=None)}
    races["races"].append({"batch_size": 256, "learning_rate": 0.8, "status": "diverged", "steps": 3})
    r = _recommend(races=races, gradient_noise_scale={**GNS_CLIENT, "value": 1e5, "high": 2e5})
    assert r["learning_rate_scaled"] > 0.2
    assert r["learning_rate"] == pytest.approx(0.2)
    assert r["learning_rate_ceiling"] == {
        "value": pytest.approx(0.2), "batch_size": 64, "learning_rate": pytest.approx(0.2),
        "source": "race", "capped": True,
    }  # fmt: skip
    assert any("capped" in w for w in r["warnings"]) and "capped" in r["learning_rate_rule"]


def test_a_smaller_batch_than_observed_scales_the_ceiling_down():
    observed = [{"batch_size": 256, "learning_rate": 0.8, "source": "race"}]
    lr, ceiling = recipe.cap_learning_rate(
        1.0, 64, "sgd", observed, reference_learning_rate=0.1, reference_batch_size=32, b_noise=None
    )
    assert lr == pytest.approx(0.2) and ceiling["capped"]
    lr, _ = recipe.cap_learning_rate(
        1.0, 64, "adam", observed, reference_learning_rate=0.1, reference_batch_size=32, b_noise=None
    )
    assert lr == pytest.approx(0.4)  # sqrt(64 / 256) * 0.8


def test_stable_observations():
    gns = {"status": "ok", "warmup_steps": 200}
    races = {
        "races": [
            {"batch_size": 8, "learning_rate": 0.05, "status": "time_budget", "steps": 500},
            {"batch_size": 32, "learning_rate": 0.1, "status": "reached", "steps": 4},
            {"batch_size": 64, "learning_rate": 0.2, "status": "time_budget", "steps": 3},  # too short
            {"batch_size": 128, "learning_rate": 0.4, "status": "diverged", "steps": 50},
            {"batch_size": 256, "learning_rate": 0.8, "status": "no_progress", "steps": 50},
            # reached the races' level in fewer steps than the fit can use: still trained stably there
            {"batch_size": 512, "learning_rate": 1.6, "status": "too_fast", "steps": 5},
        ]
    }
    seen = recipe.stable_learning_rates(gns, races, reference_learning_rate=0.1, reference_batch_size=32)
    expected = [(32, "warmup"), (8, "race"), (32, "race"), (512, "race")]
    assert [(o["batch_size"], o["source"]) for o in seen] == expected
    diverged = {"status": "non_finite_loss", "warmup_steps": 3}
    none = recipe.stable_learning_rates(diverged, None, reference_learning_rate=1, reference_batch_size=1)
    assert none == []


def test_throughput_objective_is_the_knee_not_the_cap():
    # Flat within 2 % from 256 up (noise): the knee is 256, not the cap 1024.
    lad = ladder([(32, 1000.0), (64, 1800.0), (128, 2600.0), (256, 3000.0), (512, 3030.0), (1024, 3060.0)])
    assert recipe.throughput_knee(lad, 1024) == 256
    assert recipe.throughput_peak(lad, 1024) == 1024
    r = _recommend(throughput=lad, objective="throughput")
    assert r["recommended_batch_size"] == 256 and r["objective_used"] == "throughput"


@pytest.mark.parametrize(
    ("value", "dataset", "expected_bound"),
    [(8.4e4, 1797, 1797), (2e4, 50_000, 10 * 512)],  # above the dataset; 10x above b_big = 512
)
def test_an_implausible_noise_scale_is_reported_as_a_bound(value, dataset, expected_bound):
    gns = {**GNS_CLIENT, "value": value, "low": value / 2, "high": value * 2, "b_big": 512}
    r = _recommend(gradient_noise_scale=gns, races=None, dataset_size=dataset)
    assert r["gradient_noise_scale"]["value"] is None
    assert r["gradient_noise_scale"]["lower_bound"] == expected_bound
    assert r["gradient_noise_scale"]["estimate"] == value
    assert r["b_noise"] == expected_bound and r["b_noise_bound"] == "lower"
    assert r["confidence"] == "low" and any("lower bound" in w for w in r["warnings"])
    plausible = _recommend(gradient_noise_scale={**GNS_CLIENT, "b_big": 512}, races=None)
    assert plausible["gradient_noise_scale"]["value"] == 100 and plausible["b_noise_bound"] is None


def test_a_choice_that_does_not_depend_on_b_noise_is_still_time_to_target():
    lad = ladder([(b, 100.0 * b) for b in (2, 4, 8, 16)])  # step time flat: the largest batch always wins
    r = _recommend(
        throughput=lad, max_feasible_batch_size=16, gradient_noise_scale=None, races=None,
        noise_independent="skipped: batch 16 is best for any B_noise",
    )  # fmt: skip
    assert r["objective_used"] == "time_to_target" and r["recommended_batch_size"] == 16
    assert r["confidence"] == "medium" and r["b_noise"] is None
    assert not any("falling back" in w for w in r["warnings"])
    assert r["learning_rate"] == pytest.approx(0.1 * 16 / 32)  # the reference, scaled down

"""B_noise carried to the client's horizon, steps/epochs there, held-out losses and the time-ratio
interval (service/probing/horizon.py), on synthetic numbers with known answers."""

from __future__ import annotations

import math

import pytest

from service.probing import horizon


def _window(loss: float, b_simple: float, b_small: int = 16, b_big: int = 32, steps: int = 10) -> dict:
    g2 = 1.0
    trace = b_simple * g2  # E|G_B|² = |G|² + tr(Σ)/B
    return {
        "loss": loss, "steps": steps, "b_small": b_small, "b_big": b_big,
        "small_sq": g2 + trace / b_small, "big_sq": g2 + trace / b_big,
    }  # fmt: skip


def _trajectory(slope: float = -0.5, b_at_1: float = 50.0) -> dict:
    losses = [2.0 * 0.8**k for k in range(12)]
    return {
        "windows": [_window(L, b_at_1 * L**slope) for L in losses],
        "batch_size": 32,
        "curve": [(s, 0.2 + 2.0 * s**-0.5) for s in (1, 2, 4, 8, 16, 32, 64, 128)],
        "heldout_curve": [(s, 0.25 + 2.0 * s**-0.5) for s in (1, 2, 4, 8, 16, 32, 64, 128)],
        "warmup": {"steps": 0, "batch_size": 32},
    }


def _races(level: float = 0.4, trajectory: dict | None = None) -> dict:
    return {
        "status": "ok",
        "value": 80.0,
        "level": level,
        "s_min": 50.0,
        "trajectory": trajectory or _trajectory(),
    }


def test_the_trend_is_recovered_from_noise_free_windows() -> None:
    points = horizon.trajectory_points(_trajectory(slope=-1.0))
    assert len(points) == 6  # 12 windows of 10 steps, pooled in twos (MIN_BIN_STEPS)
    assert points[0]["b_simple"] == pytest.approx(50.0 * points[0]["loss"] ** -1.0, rel=0.05)
    trend = horizon.fit_trend(points)
    assert trend["status"] == "ok" and trend["measured_slope"] == pytest.approx(-1.0, abs=0.05)
    # Shrunk towards the prior by precision: between the two, near the measurement.
    assert -1.0 < trend["slope"] < horizon.PRIOR_SLOPE and trend["slope"] < -0.8
    assert trend["slope_se"] < horizon.PRIOR_SLOPE_SD


def test_windows_of_different_batch_pairs_are_not_pooled() -> None:
    windows = [_window(1.0, 40, 16, 32), _window(0.9, 40, 32, 64), _window(0.8, 40, 32, 64)]
    points = horizon.trajectory_points({"windows": windows})
    assert [p["steps"] for p in points] == [10, 20]  # a half bin at the switch, then a full one
    assert points[1]["b_simple"] == pytest.approx(40)


def test_a_short_trajectory_leans_on_the_prior() -> None:
    trend = horizon.fit_trend([{"loss": 1.0, "b_simple": 10.0, "steps": 20, "grad_sq": 1.0, "trace": 10.0}])
    assert trend["status"] == "prior_only" and trend["slope"] == horizon.PRIOR_SLOPE


def test_loss_curve_fit_and_inverse() -> None:
    curve = [(s, 0.3 + 1.5 * s**-0.4) for s in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    fit = horizon.fit_loss_curve(curve)
    assert fit["p"] == pytest.approx(0.4) and fit["c"] == pytest.approx(0.3, abs=1e-6)
    assert horizon._steps_to(fit, 0.3 + 1.5 * 1000**-0.4) == pytest.approx(1000, rel=1e-3)
    assert horizon._steps_to(fit, 0.29) is None  # below the floor: never reached


def test_probe_depth_keeps_the_level_value_and_says_so() -> None:
    carried = horizon.carry_to_horizon(
        races=_races(), b_noise_level=80.0, source="races", reference_batch_size=32, dataset_size=10_000
    )
    assert carried["value"] == pytest.approx(80.0)
    assert (
        carried["horizon"]["kind"] == "probe_depth"
        and "depth the probe reached" in carried["horizon"]["note"]
    )
    assert carried["low"] < 80 < carried["high"]
    assert carried["sigma"] == pytest.approx(horizon.LEVEL_SIGMA["races"])


def test_a_deeper_target_raises_b_noise_along_the_trend_with_a_wider_interval() -> None:
    shallow = horizon.carry_to_horizon(
        races=_races(), b_noise_level=80.0, source="races", reference_batch_size=32, dataset_size=10_000
    )
    deep = horizon.carry_to_horizon(
        races=_races(), b_noise_level=80.0, source="races", reference_batch_size=32, dataset_size=10_000,
        target_loss=0.15,
    )  # fmt: skip
    gap = 0.05  # held-out minus training at the race's last evaluation
    assert deep["horizon"]["train_loss"] == pytest.approx(0.15 - gap)
    slope = deep["trend"]["slope"]
    assert deep["value"] == pytest.approx(80.0 * (0.10 / 0.4) ** slope)
    assert deep["value"] > 80.0
    assert deep["sigma"] > shallow["sigma"]


def test_epochs_become_a_loss_through_the_race_curve() -> None:
    carried = horizon.carry_to_horizon(
        races=_races(), b_noise_level=80.0, source="races", reference_batch_size=32, dataset_size=3200,
        epochs=10,
    )  # fmt: skip
    assert carried["horizon"]["reference_steps"] == pytest.approx(1000)
    assert 0.2 < carried["horizon"]["train_loss"] < 0.4  # further along 0.2 + 2 s^-0.5 than the level
    # S_min from the epochs: the reference's 1000 steps are S_min (1 + B_noise/32).
    assert carried["s_min"] == pytest.approx(1000 / (1 + carried["value"] / 32))


def test_epochs_inside_the_probes_curve_are_read_off_it_not_fitted() -> None:
    # The race's curve spans 128 steps at the reference batch (warm-up 0): 64 steps is inside it.
    carried = horizon.carry_to_horizon(
        races=_races(), b_noise_level=80.0, source="races", reference_batch_size=32, dataset_size=3200,
        epochs=0.64,
    )  # fmt: skip
    assert carried["horizon"]["loss_from"] == "measured"
    assert carried["horizon"]["train_loss"] == pytest.approx(0.2 + 2.0 * 64**-0.5)
    assert horizon.measured_loss_at([(1, 2.0), (10, 1.0)], 100) is None  # beyond the curve: not measured


def test_the_extrapolation_ignores_the_initial_plateau() -> None:
    # A plateau near the initial loss, then L = 0.1 + 3 s^-0.6: fitting through the plateau bends the
    # power law flat; the tail alone recovers the loss far beyond the curve.
    def truth(s: float) -> float:
        return 0.1 + 3.0 * s**-0.6

    curve = [(s, 2.3) for s in (1, 2, 3, 4, 5, 6, 7, 8)] + [(s, truth(s)) for s in (12, 20, 35, 60, 100, 160)]
    fit = horizon.fit_loss_curve(curve)
    assert horizon._loss_at(fit, 1000) == pytest.approx(truth(1000), rel=0.05)


def test_no_b_noise_no_horizon() -> None:
    carried = horizon.carry_to_horizon(
        races=None, b_noise_level=None, source=None, reference_batch_size=32, dataset_size=100, epochs=3
    )
    assert carried["value"] is None and carried["warnings"]


def test_epochs_without_a_race_still_give_the_steps() -> None:
    """No race ran (a short budget): B_noise is not carried, but the client's epochs fix S_min."""
    carried = horizon.carry_to_horizon(
        races=None, b_noise_level=64.0, source="gradient_noise_scale", reference_batch_size=32,
        dataset_size=3200, epochs=2,
    )  # fmt: skip
    assert carried["value"] == 64.0 and carried["warnings"]
    assert carried["s_min"] == pytest.approx(2 * 3200 / 32 / (1 + 64 / 32))


def test_schedule_links_steps_and_epochs() -> None:
    n, b_noise, s_min = 50_000, 400.0, 1000.0
    small = horizon.schedule(32, s_min=s_min, b_noise=b_noise, dataset_size=n, step_time_s=0.01)
    large = horizon.schedule(512, s_min=s_min, b_noise=b_noise, dataset_size=n, step_time_s=0.05)
    e_min = s_min * b_noise / n
    for row in (small, large):
        b = row["batch_size"]
        assert row["steps"] == math.ceil(s_min * (1 + b_noise / b))
        assert row["epochs"] == pytest.approx(e_min * (1 + b / b_noise))
    assert large["steps"] < small["steps"] and large["epochs"] > small["epochs"]
    assert small["predicted_seconds"] == pytest.approx(s_min * (1 + b_noise / 32) * 0.01)


THROUGHPUT = [
    {"batch_size": b, "samples_per_second": b / (0.002 + 1e-5 * b), "spread": 0.01}
    for b in (8, 16, 32, 64, 128, 256, 512)
]
CANDIDATES = [8, 16, 32, 64, 128, 256, 512]


def test_the_interval_is_tight_for_the_optimum_and_wide_for_a_poor_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Time to target ∝ (B + B_noise)(0.002 + 1e-5 B)/B: the optimum is sqrt(B_noise·200) = 200 for 200.
    monkeypatch.setattr(horizon, "MODEL_SIGMA", 0.0)  # the measured spreads alone
    good = horizon.time_ratio_interval(
        throughput=THROUGHPUT, candidates=CANDIDATES, recommended=256, b_noise=200.0, sigma=0.05
    )
    poor = horizon.time_ratio_interval(
        throughput=THROUGHPUT, candidates=CANDIDATES, recommended=8, b_noise=200.0, sigma=0.05
    )
    assert good["time_ratio_high"] < 1.1 and good["confidence"] == "high"
    assert poor["time_ratio_high"] > 3 and poor["confidence"] == "low"
    unsure = horizon.time_ratio_interval(
        throughput=THROUGHPUT, candidates=CANDIDATES, recommended=256, b_noise=200.0, sigma=1.5
    )
    assert unsure["time_ratio_high"] > good["time_ratio_high"]
    assert "80%" in good["statement"]


# Step time nearly flat to 128, then per sample from 256 on (a device that is saturated).
LOPSIDED = [
    {"batch_size": b, "samples_per_second": b / t, "spread": 0.01}
    for b, t in (
        (8, 0.002),
        (16, 0.002),
        (32, 0.002),
        (64, 0.0021),
        (128, 0.0023),
        (256, 0.0046),
        (512, 0.0092),
    )
]
GRID = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]


def test_a_sure_robust_choice_is_the_optimum_of_the_measured_step_times() -> None:
    # (B + 30)·t(B)/B on the ladder: 64 -> 94·0.0021/64 = 0.00308, 128 -> 158·0.0023/128 = 0.00284,
    # 192 -> 222·0.00345/192 = 0.00399 (t log-log between 128 and 256).
    assert horizon.robust_micro_batch(throughput=LOPSIDED, candidates=GRID, b_noise=30.0, sigma=0.01) == 128


@pytest.mark.parametrize("b_noise", [30.0, 200.0])
def test_the_robust_choice_has_the_smallest_stated_bound(b_noise: float) -> None:
    chosen = horizon.robust_micro_batch(throughput=LOPSIDED, candidates=GRID, b_noise=b_noise, sigma=1.0)
    bounds = {
        b: horizon.time_ratio_interval(
            throughput=LOPSIDED, candidates=GRID, recommended=b, b_noise=b_noise, sigma=1.0
        )["time_ratio_high"]
        for b in GRID
    }
    assert bounds[chosen] == min(bounds.values())
    assert bounds[chosen] < bounds[8] and bounds[chosen] < bounds[512]


def test_the_step_time_knee_is_the_largest_measured_size_within_the_factor() -> None:
    # LOPSIDED: 0.0023 s at 128 is within 1.25x of 0.002 s at 8; 0.0046 s at 256 is not.
    assert horizon.step_time_knee(LOPSIDED, 512) == 128
    assert horizon.step_time_knee(LOPSIDED, 100) == 64  # never above the largest micro-batch allowed
    assert horizon.step_time_knee(LOPSIDED, 512, factor=3.0) == 256
    per_sample = [{"batch_size": b, "samples_per_second": 1000.0} for b in (8, 16, 32)]  # step time ∝ B
    assert horizon.step_time_knee(per_sample, 512) == 8


def test_toward_the_knee_moves_the_choice_halfway_in_ln_b() -> None:
    assert horizon.toward_knee(512, 128, GRID) == 256
    assert horizon.toward_knee(32, 128, GRID) == 64
    assert horizon.toward_knee(128, 128, GRID) == 128
    assert horizon.toward_knee(256, 128, GRID) == 192  # sqrt(256·128) = 181: 192 is nearer than 128
    assert horizon.toward_knee(512, 128, GRID, weight=0.0) == 512


def _stated_bound(sigma: float) -> float:
    return horizon.time_ratio_interval(
        throughput=THROUGHPUT, candidates=CANDIDATES, recommended=64, b_noise=200.0, sigma=sigma
    )["time_ratio_high"]


def test_the_stated_bound_is_the_calibrated_quantile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(horizon, "INTERVAL_CALIBRATION", 1.0)
    raw = _stated_bound(0.5)
    monkeypatch.setattr(horizon, "INTERVAL_CALIBRATION", 1.5)
    assert raw > 1.0 and _stated_bound(0.5) == pytest.approx(raw**1.5)


def test_the_bound_keeps_the_model_error_when_the_measured_spread_vanishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A longer probe narrows B_noise's measured spread, not the model's error: the bound stays wide,
    and the two spreads add in quadrature."""
    model = horizon.MODEL_SIGMA
    assert model > 0
    measured_nothing, measured = _stated_bound(0.0), _stated_bound(0.5)
    assert measured > measured_nothing
    monkeypatch.setattr(horizon, "MODEL_SIGMA", 0.0)
    assert _stated_bound(0.0) < measured_nothing  # only the step times' spread left
    assert _stated_bound(math.hypot(0.5, model)) == pytest.approx(measured)


def test_reschedule_follows_a_changed_layout() -> None:
    untouched: dict = {"recommended_batch_size": 64, "micro_batch_size": 64}
    horizon.reschedule(untouched, THROUGHPUT, 10_000)  # no horizon block: nothing to do
    assert "horizon" not in untouched
    rec = {
        "recommended_batch_size": 96, "micro_batch_size": 32, "gradient_accumulation_steps": 3,
        "horizon": {"b_noise": 100.0, "s_min": 50.0, "recommended": {"batch_size": 128, "steps": 90}},
    }  # fmt: skip
    horizon.reschedule(rec, THROUGHPUT, 10_000)
    row = rec["horizon"]["recommended"]
    steps = 50.0 * (1 + 100.0 / 96)
    assert row["batch_size"] == 96 and row["steps"] == math.ceil(steps)
    assert row["epochs"] == pytest.approx(steps * 96 / 10_000)
    assert row["predicted_seconds"] == pytest.approx(steps * 3 * (0.002 + 1e-5 * 32), rel=1e-6)


def test_generalisation_warns_when_the_recommended_size_is_worse() -> None:
    races = {
        "level": 0.5,
        "races": [
            {"batch_size": 16, "steps_to_level": 100, "heldout_loss_at_level": 0.60},
            {"batch_size": 64, "steps_to_level": 40, "heldout_loss_at_level": 0.62},
            {"batch_size": 256, "steps_to_level": 20, "heldout_loss_at_level": 0.70},
        ],
    }
    gen = horizon.generalisation(races, recommended=256, reference=32)
    assert gen["reference"] == pytest.approx(0.61)  # halfway between 16 and 64 in log2
    assert gen["recommended"] == pytest.approx(0.70)
    assert "worse than the reference" in gen["warning"]
    assert horizon.generalisation(races, recommended=32, reference=32)["warning"] is None
    assert horizon.generalisation({"races": races["races"][:1]}, 256, 32) is None


def test_attach_adds_the_block_and_never_raises_confidence() -> None:
    class Spec:
        reference_batch_size, dataset_size, device_count, epochs, target_loss = 32, 10_000, 1, None, None

    statistics = {"races": _races(), "gradient_noise_scale": None}
    carried = horizon.carry_to_horizon(
        races=statistics["races"], b_noise_level=200.0, source="races", reference_batch_size=32,
        dataset_size=10_000,
    )  # fmt: skip
    rec = {"recommended_batch_size": 256, "micro_batch_size": 256, "gradient_accumulation_steps": 1,
           "confidence": "medium", "warnings": []}  # fmt: skip
    horizon.attach(
        rec, carried, statistics=statistics, spec=Spec(), throughput=THROUGHPUT, max_micro_batch=512
    )
    block = rec["horizon"]
    assert block["recommended"]["batch_size"] == 256 and block["reference"]["batch_size"] == 32
    assert block["interval"]["probability"] == 0.8
    assert rec["confidence"] in ("low", "medium")
    assert rec["confidence_reasons"][-1] == block["interval"]["statement"]


class _HorizonSpec:
    reference_batch_size, dataset_size, device_count, epochs, target_loss = 32, 10_000, 1, 4.0, None

    def __init__(self, sgd_momentum: float | None) -> None:
        self.sgd_momentum = sgd_momentum


def test_the_stability_factor_widens_the_interval_not_the_batch_choices_spread() -> None:
    statistics = {"races": _races(), "gradient_noise_scale": None}
    adam = horizon.carry(statistics, _HorizonSpec(None))
    plain = horizon.carry(statistics, _HorizonSpec(0.0))  # factor 0.1
    assert adam["interval_sigma"] == pytest.approx(adam["sigma"])
    assert plain["sigma"] == pytest.approx(adam["sigma"])  # the choice's spread is B_noise's own
    assert plain["interval_sigma"] == pytest.approx(
        math.hypot(plain["sigma"], horizon.FACTOR_SIGMA * math.log(10))
    )
    assert horizon.factor_spread(1.0) == 0.0
    assert horizon.factor_spread(0.3) == pytest.approx(horizon.FACTOR_SIGMA * math.log(1 / 0.3))


def test_the_interval_uses_the_interval_spread() -> None:
    carried = horizon.carry_to_horizon(
        races=_races(), b_noise_level=200.0, source="races", reference_batch_size=32, dataset_size=10_000,
        epochs=4.0,
    )  # fmt: skip
    rec = {"recommended_batch_size": 128, "micro_batch_size": 128, "gradient_accumulation_steps": 1}

    def bound(block: dict) -> float:
        return horizon.report(
            block, recommendation=rec, throughput=THROUGHPUT, candidates=[16, 32, 64, 128, 256, 512],
            races=None, dataset_size=10_000, reference_batch_size=32,
        )["interval"]["time_ratio_high"]  # fmt: skip

    assert bound({**carried, "interval_sigma": carried["sigma"] + 1.5}) > bound(carried)


def test_a_probe_answers_for_the_clients_horizon_and_echoes_its_optimizer() -> None:
    import json

    from service.probing import engine
    from service.probing.spec import ProbeSpec

    spec = ProbeSpec(
        model_name="mlp", model_config={"hidden_dims": [32]}, optimizer="sgd", momentum=0.0,
        learning_rate=0.1,
        memory_budget_bytes=64 * 2**20, time_budget_s=8.0, dataset_size=1797, epochs=20,
    )  # fmt: skip
    result = engine.run_probe(spec, lambda event: None)
    json.dumps(result, allow_nan=False)  # stored as JSON: no numpy scalars, no inf/nan
    assert result["optimizer_settings"] == {
        "optimizer": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0
    }  # fmt: skip
    block = result["horizon"]
    assert block["horizon"]["kind"] == "epochs" and block["horizon"]["epochs"] == 20
    if block["b_noise"] is not None:  # the statistics phase had the time to run
        assert block["recommended"]["batch_size"] == result["recommended_batch_size"]
        assert block["reference"]["epochs"] == pytest.approx(20, rel=0.01)
        assert block["interval"]["probability"] == 0.8
        assert any("probability" in r for r in result["confidence_reasons"])


def test_an_unresolved_gradient_noise_scale_does_not_pull_a_race_fit_away() -> None:
    races = {"status": "ok", "value": 24.0}
    wild = {"value": 8.9e9, "low": 5.4e7, "high": math.inf, "b_big": 16, "status": "ok"}
    assert horizon._resolved({"gradient_noise_scale": wild, "races": races}) is None
    sound = {"value": 60.0, "low": 40.0, "high": 90.0, "b_big": 16, "status": "ok"}
    assert horizon._resolved({"gradient_noise_scale": sound, "races": races}) is sound
    # Without a race fit the noise scale is all there is: kept.
    assert horizon._resolved({"gradient_noise_scale": wild, "races": {"status": "shallow"}}) is wild

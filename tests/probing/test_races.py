"""Training races and the S(B) fit (service/probing/races.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.probing import data, races

LOSS = nn.functional.cross_entropy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread (tiny models; shared CPUs), and a first optimizer built outside any time budget: it
    imports torch._dynamo, seconds on a slow machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    s = data.builtin_sample([64], "float32", 10)
    return s.x, s.y


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


# ------------------------------------------------------------------------------------------- fit


def test_fit_recovers_b_noise_exactly():
    sizes = [16, 64, 256]
    steps = [100 * (1 + 50 / b) for b in sizes]
    fit = races.fit_steps(sizes, steps)
    assert fit["status"] == "ok" and fit["value"] == pytest.approx(50)
    assert fit["s_min"] == pytest.approx(100) and fit["rel_rms"] < 1e-9


def test_fit_tolerates_a_few_percent_of_noise():
    sizes = [8, 32, 128]
    steps = [s * f for s, f in zip([400 * (1 + 64 / b) for b in sizes], [1.04, 0.97, 1.03], strict=True)]
    fit = races.fit_steps(sizes, steps)
    assert fit["status"] == "ok" and 40 < fit["value"] < 100 and fit["rel_rms"] < 0.1


@pytest.mark.parametrize(
    ("b_noise", "status", "value"),
    [(3 * 256, "above_range", 256), (256 * races.FIT_REACH * 0.9, "ok", None), (16 / 3, "below_range", 16)],
)
def test_a_fit_far_outside_the_sizes_raced_is_only_a_bound(b_noise, status, value):
    # Even an exact curve says little about B_noise far outside the sizes: S(B) barely bends there.
    sizes = [16, 64, 256]
    fit = races.fit_steps(sizes, [100 * (1 + b_noise / b) for b in sizes])
    assert fit["status"] == status
    assert fit["value"] == pytest.approx(value if value is not None else b_noise)


def test_perfect_scaling_only_bounds_b_noise_from_below():
    fit = races.fit_steps([16, 64, 256], [1600, 400, 100])  # S ∝ 1/B: B_noise far above 256
    assert fit["status"] == "above_range" and fit["bound"] == "lower" and fit["value"] == 256


def test_no_gain_from_bigger_batches_bounds_b_noise_from_above():
    fit = races.fit_steps([16, 64, 256], [100, 105, 110])
    assert fit["status"] == "below_range" and fit["bound"] == "upper" and fit["value"] == 16


def test_one_size_is_not_a_fit():
    assert races.fit_steps([64], [100])["status"] == "insufficient"
    assert races.fit_steps([64, 64], [100, 90])["status"] == "insufficient"


def test_steps_to_level_interpolates_between_evaluations():
    curve = [(0, 2.0), (10, 1.0), (20, 0.5)]
    assert races.steps_to_level(curve, 0.75) == pytest.approx(40 / 3)  # log-log: loss = 10/step there
    assert races.steps_to_level(curve, 1.5) == pytest.approx(5)  # from step 0: linear
    assert races.steps_to_level(curve, 2.5) == 0
    assert races.steps_to_level(curve, 0.1) is None


def test_sparse_evaluations_of_a_power_law_still_give_the_exact_crossing():
    # A straight line between sparse points of a convex curve would report the crossing late.
    curve = [(0, 5.0)] + [(step, 3.0 * step**-0.5) for step in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert races.steps_to_level(curve, 3.0 * 50**-0.5) == pytest.approx(50)


@pytest.mark.parametrize(
    ("prediction", "lo", "hi", "expected"),
    [
        (64, 1, 4096, [16, 64, 256]),
        (60, 8, 512, [16, 64, 256]),
        (3, 8, 512, [8, 32, 128]),  # below the range: start at the smallest
        (10_000, 8, 512, [32, 128, 512]),  # above: end at the largest
        (64, 8, 16, [8, 16]),  # narrow range: x2 spacing
        (5, 1, 1, [1]),
    ],
)
def test_race_sizes(prediction, lo, hi, expected):
    assert races.race_sizes(prediction, min_size=lo, max_size=hi) == expected


# ----------------------------------------------------------------------------------------- races


def test_races_restore_weights_and_fit(digits):
    x, y = digits
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    result = races.run_races(
        model, LOSS, _sgd, x, y, sizes=[16, 64, 256], lr_for_size=lambda b: 0.02 * (b / 16) ** 0.5,
        time_budget_s=3.0,
    )  # fmt: skip
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert result["status"] in ("ok", "above_range", "below_range")
    assert result["level"] is not None and len(result["races"]) == 3
    reached = {r["batch_size"]: r["steps_to_level"] for r in result["races"]}
    assert reached[16] > reached[256] > 0  # bigger batches need fewer steps to the same loss
    assert result["seconds"] < 3.0 * 1.5 + 1


def test_a_diverging_race_is_reported(digits):
    x, y = digits
    result = races.run_races(
        _mlp(), LOSS, _sgd, x, y, sizes=[16, 64, 256], lr_for_size=lambda b: 1e4 if b == 256 else 0.05,
        time_budget_s=1.5,
    )  # fmt: skip
    statuses = {r["batch_size"]: r["status"] for r in result["races"]}
    assert statuses[256] == "diverged"
    assert any("256 diverged" in w for w in result["warnings"])
    # The two others still trained stably at their own lr (how deep they got, and whether that is deep
    # enough to fit, depends on how many steps the loaded host allowed in 1.5 s).
    rows = {r["batch_size"]: r for r in result["races"]}
    assert rows[16]["stable_learning_rate"] == rows[64]["stable_learning_rate"] == 0.05


class _Scalar(nn.Module):
    """Predicts its one weight for every example: the loss against zero targets is the weight squared."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x))


class _Scripted(torch.optim.Optimizer):
    """Sets the weight to the next value of a script at each step: a loss curve chosen by the test."""

    def __init__(self, params, script: list[float]) -> None:
        super().__init__(params, {})
        self.script = list(script)

    def step(self, closure=None):
        value = self.script.pop(0) if self.script else 0.1
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(value)


def _scripted_race(script: list[float]) -> dict:
    model = _Scalar()
    x, y = torch.zeros(64, 1), torch.zeros(64)
    return races.train_race(
        model, lambda out, t: ((out - t) ** 2).mean(), _Scripted(model.parameters(), script), x, y, x, y,
        batch_size=8, max_seconds=math.inf, max_steps=30,
    )  # fmt: skip


def test_a_spike_in_the_first_steps_is_not_divergence_but_a_runaway_is():
    # Loss 1 at the start; 2.5² = 6.25 (> 3x) at step 1, then it trains: a transient, not divergence.
    assert _scripted_race([2.5, 1.0, 0.5])["status"] == "max_steps"
    # Above 3x after the grace steps: divergence.
    assert _scripted_race([0.5] * races.SPIKE_GRACE_STEPS + [2.0])["status"] == "diverged"
    # A runaway (10² = 100x the start) is divergence at once.
    race = _scripted_race([10.0])
    assert race["status"] == "diverged" and race["steps"] == 1


def test_everything_diverging_is_insufficient(digits):
    x, y = digits
    result = races.run_races(
        _mlp(), LOSS, _sgd, x, y, sizes=[16, 64], lr_for_size=lambda b: 1e5, time_budget_s=1.0
    )
    assert result["status"] == "insufficient" and result["value"] is None
    # Each race stalled, was retried once at a backed-off lr, diverged again: both reported, no stable lr.
    for b in (16, 64):
        assert sum(f"batch size {b} " in w for w in result["warnings"]) == 2
    for row in result["races"]:
        assert row["stable_learning_rate"] is None
        assert [a["learning_rate"] for a in row["attempts"]] == [1e5, 1e5 * races.LR_BACKOFF]


def test_run_statistics_end_to_end(digits):
    x, y = digits
    stats = races.run_statistics(
        _mlp(), LOSS, _sgd, x, y, optimizer="sgd", learning_rate=0.05, reference_batch_size=32,
        max_batch_size=512, time_budget_s=4.0, measured_on="builtin:digits",
    )  # fmt: skip
    gns = stats["gradient_noise_scale"]
    assert gns["status"] == "ok" and gns["measured_on"] == "builtin:digits" and math.isfinite(gns["value"])
    assert stats["races"] is not None and len(stats["races"]["races"]) == 3
    assert all(r["batch_size"] >= 8 for r in stats["races"]["races"])
    assert isinstance(stats["cut_short"], list)


def test_run_statistics_reports_a_diverging_reference_lr(digits):
    x, y = digits
    stats = races.run_statistics(
        _mlp(), LOSS, _sgd, x, y, optimizer="sgd", learning_rate=1e12, reference_batch_size=32,
        max_batch_size=512, time_budget_s=2.0,
    )  # fmt: skip
    assert stats["gradient_noise_scale"]["status"] == "non_finite_loss"
    assert stats["races"] is None
    assert any("reference learning rate" in m for m in stats["cut_short"])


def _race(b, curve, status="time_budget"):
    return {
        "batch_size": b, "status": status, "steps": curve[-1][0], "learning_rate": 0.1, "train_seconds": 1.0,
        "initial_loss": curve[0][1], "best_loss": min(v for _, v in curve), "curve": curve,
    }  # fmt: skip


def test_a_race_without_progress_is_dropped_and_reported():
    races_ = {
        16: _race(16, [(0, 2.0), (50, 1.5), (100, 1.0)]),
        64: _race(64, [(0, 2.0), (20, 1.5), (40, 1.0)]),
        256: _race(256, [(0, 2.0), (1, 2.1), (2, 2.05)]),  # a fresh Adam's first steps: loss went up
    }
    result = races._summarise(races_, 1.0)
    assert result["status"] in ("ok", "above_range", "below_range")
    assert result["level"] == 1.0
    assert {r["batch_size"]: r["status"] for r in result["races"]}[256] == "no_progress"
    assert any("256 made no progress" in w for w in result["warnings"])


def test_a_stalled_race_backs_its_lr_off_once_and_reports_the_stable_lr(digits):
    x, y = digits
    # 8.0 diverges with momentum SGD on this MLP at batch 64; 8.0 x LR_BACKOFF = 2.0 trains.
    result = races.run_races(
        _mlp(), LOSS, _sgd, x, y, sizes=[16, 64], lr_for_size=lambda b: 8.0 if b == 64 else 0.05,
        time_budget_s=2.0,
    )  # fmt: skip
    rows = {r["batch_size"]: r for r in result["races"]}
    assert [a["learning_rate"] for a in rows[64]["attempts"]] == [8.0, 8.0 * races.LR_BACKOFF]
    assert rows[64]["attempts"][0]["status"] == "diverged"
    assert rows[64]["stable_learning_rate"] == 8.0 * races.LR_BACKOFF
    assert rows[16]["stable_learning_rate"] == 0.05 and len(rows[16]["attempts"]) == 1
    assert any("64 stalled" in w for w in result["warnings"])


def test_races_that_reach_their_level_in_a_few_steps_do_not_count():
    curve16 = [(0, 2.0), (1, 1.95), (2, 1.9), (3, 1.85), (4, 1.8)]  # 4 steps to the level
    curve64 = [(0, 2.0), (1, 1.85), (2, 1.8)]
    result = races._summarise({16: _race(16, curve16), 64: _race(64, curve64)}, 1.0)
    assert result["status"] == "shallow" and result["value"] is None
    assert {r["status"] for r in result["races"]} == {"too_fast"}


@pytest.mark.parametrize(
    ("make", "lag"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 9.0),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), 8.1),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 0.0),
        (lambda ps: torch.optim.Adam(ps, lr=1e-3), 0.0),
    ],
)
def test_momentum_lag(make, lag):
    assert races.momentum_lag(make(nn.Linear(2, 1).parameters())) == pytest.approx(lag)


def test_momentum_lag_matches_a_fresh_buffer_on_a_steady_gradient():
    # Heavy ball on a constant gradient: after n steps it has moved lr * (n - lag) / (1 - beta).
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.01, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        w.grad = torch.ones(1)
        opt.step()
    steps_at_speed = -w.item() * (1 - 0.9) / 0.01
    assert steps_at_speed == pytest.approx(200 - races.momentum_lag(opt), rel=1e-3)


def test_the_fit_counts_steps_after_the_momentum_lag():
    curves = {16: [(0, 2.0), (100, 1.0)], 64: [(0, 2.0), (40, 1.0)], 256: [(0, 2.0), (25, 1.0)]}
    plain = races._summarise({b: _race(b, c) for b, c in curves.items()}, 1.0)
    lagged = races._summarise({b: {**_race(b, c), "lag_steps": 9.0} for b, c in curves.items()}, 1.0)
    assert [r["steps_to_level"] for r in lagged["races"]] == [r["steps_to_level"] for r in plain["races"]]
    # The fixed lag weighs most on the shortest race: without it the steps fall further with B.
    assert lagged["value"] > plain["value"]
    expected = races.fit_steps([16, 64, 256], [100 - 9.0, 40 - 9.0, 25 - 9.0])["value"]
    assert lagged["value"] == pytest.approx(expected)


def test_a_race_shorter_than_its_momentum_lag_does_not_count():
    curves = {16: [(0, 2.0), (100, 1.0)], 64: [(0, 2.0), (40, 1.0)], 256: [(0, 2.0), (12, 1.0)]}
    result = races._summarise({b: {**_race(b, c), "lag_steps": 9.0} for b, c in curves.items()}, 1.0)
    assert {r["batch_size"]: r["status"] for r in result["races"]}[256] == "too_fast"
    assert result["points"] == 2


def test_a_level_barely_below_the_start_is_too_shallow():
    curve16 = [(0, 2.0), (40, 1.95), (80, 1.9)]  # 5 % below the start
    curve64 = [(0, 2.0), (20, 1.95), (30, 1.9)]
    result = races._summarise({16: _race(16, curve16), 64: _race(64, curve64)}, 1.0)
    assert result["status"] == "shallow" and result["value"] is None
    assert any("too shallow" in w for w in result["warnings"])


def test_races_report_held_out_loss_at_the_level_and_a_noise_trajectory(digits):
    x, y, heldout = races.split_heldout(*digits)
    assert (
        len(heldout[0]) == int(races.HOLDOUT_FRACTION * len(digits[0])) and len(x) + len(heldout[0]) == 1797
    )
    result = races.run_races(
        _mlp(), LOSS, _sgd, x, y, sizes=[16, 64, 256], lr_for_size=lambda b: 0.02 * (b / 16) ** 0.5,
        time_budget_s=3.0, heldout=heldout,
    )  # fmt: skip
    counted = [r for r in result["races"] if r.get("steps_to_level")]
    assert counted and all(r["heldout_loss_at_level"] > 0 for r in counted)
    trajectory = result["trajectory"]
    assert trajectory["batch_size"] == 64 and trajectory["b_small"] == 32
    windows = trajectory["windows"]
    assert len(windows) >= 5
    assert all(w["small_sq"] > w["big_sq"] > 0 for w in windows[:3])  # halves are noisier than the whole


def test_a_crossing_at_the_last_evaluation_stays_on_the_curve():
    """Log-log interpolation to a level reached exactly at the last point must not round past it."""
    for first, last in [(3, 7), (5, 11), (13, 101), (17, 190)]:
        curve = [(0, 3.0), (first, 2.0), (last, 0.7137)]
        crossing = races.steps_to_level(curve, 0.7137)
        assert first <= crossing <= last
        assert races.value_at(curve, crossing) is not None

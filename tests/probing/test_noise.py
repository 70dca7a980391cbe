"""Gradient noise scale (service/probing/noise.py), checked against per-example gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.probing import data, noise

LOSS = nn.functional.cross_entropy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and far faster on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # imports torch._dynamo outside any time budget
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    s = data.builtin_sample([64], "float32", 10)
    return s.x[:256], s.y[:256]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _warmed(digits, optimizer: str):
    x, y = digits
    model = _mlp()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=3e-3)
    )
    noise.warm_up(model, LOSS, opt, x, y, steps=30, batch_size=32, generator=torch.Generator().manual_seed(0))
    return model, opt


def test_two_batch_estimate_matches_per_example_gradients(digits):
    x, y = digits
    model, _ = _warmed(digits, "sgd")
    exact = noise.exact_noise_scale(model, LOSS, x, y)["value"]
    est = noise.gradient_noise_scale(
        model, LOSS, x, y, b_small=8, b_big=64, draws=64, generator=torch.Generator().manual_seed(1)
    )
    assert est["draws"] == 64 and not est["preconditioned"]
    assert abs(est["value"] / exact - 1) < 0.2
    assert 0.9 * est["low"] <= exact <= 1.1 * est["high"]
    assert est["low"] <= est["value"] <= est["high"]


def test_preconditioned_estimate_for_adam(digits):
    x, y = digits
    model, opt = _warmed(digits, "adam")
    pre = noise.adam_preconditioner(opt, noise.trainable(model))
    assert pre is not None and pre.numel() == sum(p.numel() for p in model.parameters())
    exact = noise.exact_noise_scale(model, LOSS, x, y, preconditioner=pre)["value"]
    exact_plain = noise.exact_noise_scale(model, LOSS, x, y)["value"]
    est = noise.gradient_noise_scale(
        model, LOSS, x, y, b_small=16, b_big=128, draws=50, preconditioner=pre,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert est["preconditioned"]
    assert abs(est["value"] / exact - 1) < 0.5
    assert 0.9 * est["low"] <= exact <= 1.1 * est["high"]
    assert abs(est["plain"]["value"] / exact_plain - 1) < 0.3  # the plain estimate comes along


def test_sgd_has_no_preconditioner(digits):
    model, opt = _warmed(digits, "sgd")
    assert noise.adam_preconditioner(opt, noise.trainable(model)) is None


def test_estimate_leaves_weights_and_grads_alone(digits):
    x, y = digits
    model, _ = _warmed(digits, "sgd")
    before = [p.detach().clone() for p in model.parameters()]
    noise.gradient_noise_scale(model, LOSS, x, y, b_small=4, b_big=16, draws=3)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_estimator_algebra_on_noise_free_draws():
    """E|G_B|² = |G|² + tr(Σ)/B exactly: the estimator must return tr(Σ)/|G|²."""
    g2, trace, bs, bb = 2.0, 300.0, 10, 100
    small = torch.full((50,), g2 + trace / bs, dtype=torch.float64)
    big = torch.full((50,), g2 + trace / bb, dtype=torch.float64)
    est = noise.estimate_from_draws(small, big, bs, bb)
    assert est["value"] == pytest.approx(150.0)
    assert est["grad_sq"] == pytest.approx(g2) and est["trace_sigma"] == pytest.approx(trace)
    assert est["low"] == pytest.approx(150.0) and est["high"] == pytest.approx(150.0)


def test_unresolved_signal_is_infinite_not_negative():
    small = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64)
    big = torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64)  # B_big|G_big|² < B_small|G_small|²
    est = noise.estimate_from_draws(small, big, 8, 64)
    assert math.isinf(est["value"]) and math.isinf(est["high"])


def test_bad_batch_sizes_are_rejected(digits):
    x, y = digits
    with pytest.raises(ValueError, match="multiple"):
        noise.gradient_noise_scale(_mlp(), LOSS, x, y, b_small=8, b_big=12)
    with pytest.raises(ValueError, match="need 1 <= b_small < b_big"):
        noise.gradient_noise_scale(_mlp(), LOSS, x, y, b_small=8, b_big=8)


def test_measure_noise_scale_end_to_end(digits):
    x, y = digits
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = noise.measure_noise_scale(
        model,
        LOSS,
        opt,
        x,
        y,
        warmup_batch_size=32,
        warmup_steps=20,
        b_big=64,
        draws=50,
        measured_on="client",
    )
    assert r["status"] == "ok" and r["measured_on"] == "client" and r["method"] == "two_batch_size"
    assert r["draws"] == 50 and r["warmup_steps"] == 20 and "cut_short" not in r
    assert 0 < r["low"] <= r["value"] <= r["high"] < math.inf


def test_time_budget_cuts_draws_and_says_so(digits):
    x, y = digits
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = noise.measure_noise_scale(
        model,
        LOSS,
        opt,
        x,
        y,
        warmup_batch_size=32,
        warmup_steps=5,
        b_big=256,
        draws=10_000,
        time_budget_s=0.5,
    )
    assert 2 <= r["draws"] < 10_000 and "cut_short" in r


def test_b_big_is_planned_from_the_budget(digits):
    x, y = digits
    r = noise.measure_noise_scale(
        _mlp(), LOSS, torch.optim.SGD(_mlp().parameters(), lr=0.1), x, y,
        warmup_batch_size=32, warmup_steps=5, draws=5, time_budget_s=0.05,
    )  # fmt: skip
    assert r["b_big"] % r["b_small"] == 0 and 2 * r["b_small"] <= r["b_big"] <= 512


def _nan_after(calls: int):
    """A loss that turns NaN after `calls` calls, like a diverging run."""
    count = {"n": 0}

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        count["n"] += 1
        value = LOSS(out, target)
        return value * math.nan if count["n"] > calls else value

    return loss


@pytest.mark.parametrize(
    ("calls", "where"), [(3, "warm-up step 4"), (12, "measuring the gradient noise scale")]
)
def test_non_finite_loss_is_reported_not_raised(digits, calls, where):
    x, y = digits
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = noise.measure_noise_scale(
        model, _nan_after(calls), opt, x, y, warmup_batch_size=32, warmup_steps=10, b_big=16, draws=5
    )
    assert r["status"] == "non_finite_loss" and r["value"] is None
    assert where in r["error"]


def test_the_split_step_estimate_matches_the_exact_noise_scale(digits):
    """Averaged over many steps at fixed weights, the half-batch estimator targets B_simple."""
    x, y = digits
    model = _mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    window = [0.0, 0.0, 0]
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        noise.split_step(model, LOSS, x[idx], y[idx], params, None, window)
        for p in params:
            p.grad = None
    small, big = window[0] / window[2], window[1] / window[2]
    g2 = (64 * big - 32 * small) / 32
    trace = (small - big) / (1 / 32 - 1 / 64)
    exact = noise.exact_noise_scale(model, LOSS, x, y)["value"]
    assert trace / g2 == pytest.approx(exact, rel=0.25)


def test_a_tracked_warm_up_records_the_noise_trajectory(digits):
    x, y = digits
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    track: list = []
    losses = noise.warm_up(model, LOSS, opt, x, y, steps=40, batch_size=32, track=track)
    assert len(losses) == 40 and len(track) == 40 // noise.TRACK_WINDOW
    assert [w["step"] for w in track] == [10, 20, 30, 40]
    assert all(w["b_small"] == 16 and w["b_big"] == 32 and w["small_sq"] > w["big_sq"] > 0 for w in track)
    assert track[0]["loss"] > track[-1]["loss"]  # it trained

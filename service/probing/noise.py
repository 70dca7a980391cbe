"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A).

G is the true (full-data) gradient and Σ the per-example gradient covariance. Both come from the
two-batch-size unbiased estimators: for a mean gradient over B examples drawn with replacement,
E|G_B|² = |G|² + tr(Σ)/B, so with a small and a big batch

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each draw takes B_big examples with replacement, splits them into B_big/B_small chunks (the small
batches; their mean is the big batch), and gives one estimate of each. Numerator and denominator are
averaged over K draws before the ratio; the spread comes from a bootstrap over the draws.

For Adam-family optimizers the step is the gradient divided by sqrt(v̂)+eps, so the noise that matters
is that of the preconditioned gradient (as AdaptDL does): every gradient is divided by the optimizer's
current sqrt(v̂)+eps before the norms are taken.

`exact_noise_scale` computes the same quantity from every per-example gradient (torch.func) for small
models: the tests use it as ground truth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.probing.inputs import Batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIN_DRAWS = 50
TRACK_WINDOW = 10  # warm-up steps per window of the noise trajectory


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that receive gradients (weight-tied ones once)."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """All `.grad`s as one float32 vector (zeros for parameters the loss did not reach)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    )


def batch_gradient(
    model: nn.Module, loss_fn: LossFn, x: Batch, y: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The mean gradient over the batch (flat) and the batch loss; leaves `.grad` cleared."""
    params = trainable(model)
    for p in params:
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    g = flat_grad(params)
    for p in params:
        p.grad = None
    return g, float(loss.detach())


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.Tensor | None:
    """Flat sqrt(v̂)+eps from an Adam/AdamW state, or None when the optimizer keeps no second moment."""
    parts, found = [], False
    for p in params:
        state = optimizer.state.get(p, {})
        group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
        if "exp_avg_sq" in state and group is not None and "betas" in group:
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].float() / (1.0 - group["betas"][1] ** step)
            parts.append((v_hat.sqrt() + group["eps"]).reshape(-1))
            found = True
        else:  # no state yet: leave this parameter's gradient as it is
            parts.append(torch.ones(p.numel(), device=p.device))
    return torch.cat(parts) if found else None


def estimate_from_draws(
    g_small_sq: torch.Tensor,
    g_big_sq: torch.Tensor,
    b_small: int,
    b_big: int,
    *,
    bootstrap: int = 2000,
    quantiles: tuple[float, float] = (0.05, 0.95),
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """B_simple with a bootstrap interval from per-draw |G_small|² and |G_big|² (1-D float64 tensors)."""
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    tr = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)

    def ratio(tr_mean: torch.Tensor, g2_mean: torch.Tensor) -> torch.Tensor:
        return torch.where(g2_mean > 0, tr_mean / g2_mean, torch.full_like(g2_mean, math.inf))

    value = float(ratio(tr.mean(), g2.mean()))
    k = len(g2)
    idx = torch.randint(0, k, (bootstrap, k), generator=generator)
    boot = ratio(tr[idx].mean(1), g2[idx].mean(1))
    low, high = torch.quantile(boot.clamp(max=1e30), torch.tensor(quantiles, dtype=boot.dtype)).tolist()
    return {
        "value": value,
        "low": low,
        "high": high if high < 1e30 else math.inf,
        "grad_sq": float(g2.mean()),
        "trace_sigma": float(tr.mean()),
    }


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    x: Batch,
    y: torch.Tensor,
    *,
    b_small: int,
    b_big: int,
    draws: int = 64,
    preconditioner: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """The two-batch-size estimate of B_simple at the model's current weights.

    `b_big` must be a multiple of `b_small`. Stops early at `deadline` (time.monotonic()), keeping at
    least 2 draws. Returns value/low/high (preconditioned when `preconditioner` is given), the plain
    (unpreconditioned) estimate under "plain", and the draw count.
    """
    if b_small < 1 or b_big <= b_small or b_big % b_small:
        raise ValueError(
            f"need 1 <= b_small < b_big with b_big a multiple of b_small, got {b_small}, {b_big}"
        )
    chunks = b_big // b_small
    n = len(x)
    rows: list[list[float]] = []  # per draw: plain small, plain big, precond small, precond big
    was_training = model.training
    model.train()
    try:
        for _ in range(draws):
            if deadline is not None and len(rows) >= 2 and time.monotonic() > deadline:
                break
            idx = torch.randint(0, n, (b_big,), generator=generator, device="cpu").to(x.device)
            small_sq = small_sq_p = 0.0
            total = total_p = torch.zeros(())  # 0-d: broadcasts to the first chunk's gradient
            for c in range(chunks):
                part = idx[c * b_small : (c + 1) * b_small]
                g, loss = batch_gradient(model, loss_fn, x[part], y[part])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} while measuring the gradient noise scale")
                total = total + g
                small_sq += float(g.double().square().sum())
                if preconditioner is not None:
                    gp = g / preconditioner
                    total_p = total_p + gp
                    small_sq_p += float(gp.double().square().sum())
            row = [small_sq / chunks, float((total / chunks).double().square().sum())]
            if preconditioner is not None:
                row += [small_sq_p / chunks, float((total_p / chunks).double().square().sum())]
            rows.append(row)
    finally:
        model.train(was_training)
    table = torch.tensor(rows, dtype=torch.float64)
    plain = estimate_from_draws(table[:, 0], table[:, 1], b_small, b_big, generator=generator)
    result: dict[str, Any] = dict(plain)
    if preconditioner is not None:
        result = estimate_from_draws(table[:, 2], table[:, 3], b_small, b_big, generator=generator)
    result.update(
        draws=len(rows),
        b_small=b_small,
        b_big=b_big,
        preconditioned=preconditioner is not None,
        plain={k: plain[k] for k in ("value", "low", "high")},
    )
    return result


def exact_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    x: Batch,
    y: torch.Tensor,
    *,
    preconditioner: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> dict[str, float]:
    """tr(Σ)/|G|² over the whole sample from per-example gradients (torch.func.vmap(grad)).

    Σ is the population covariance of per-example gradients over the sample, which is exactly what the
    with-replacement estimator targets. Needs a model without batch-coupled layers (no BatchNorm).
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    # Flatten in `model.parameters()` order so a preconditioner from `adam_preconditioner` lines up.
    order = [name for name, p in model.named_parameters() if p.requires_grad]
    total: torch.Tensor | None = None
    total_sq = 0.0
    for start in range(0, len(x), chunk_size):
        grads = per_example(params, x[start : start + chunk_size], y[start : start + chunk_size])
        flat = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in order], dim=1).double()
        if preconditioner is not None:
            flat = flat / preconditioner.double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq += float(flat.square().sum())
    if total is None:
        raise ValueError("the sample is empty")
    n = len(x)
    mean = total / n
    grad_sq = float(mean.square().sum())
    trace_sigma = total_sq / n - grad_sq
    return {"value": trace_sigma / grad_sq, "grad_sq": grad_sq, "trace_sigma": trace_sigma}


def split_step(
    model: nn.Module,
    loss_fn: LossFn,
    xb: torch.Tensor,
    yb: torch.Tensor,
    params: list[nn.Parameter],
    preconditioner: torch.Tensor | None,
    window: list[float],
) -> torch.Tensor:
    """Backward the batch as two halves (same mean gradient as one pass) and add |G_half|² (mean of
    the two halves) and |G_full|² to `window` ([sum small, sum big, count]): the two-batch-size
    estimator with b_small = B/2, b_big = B, from a step that trains anyway (McCandlish et al. note the
    same trick for data-parallel workers). Returns the batch's mean loss (detached)."""
    half = len(xb) // 2
    first = loss_fn(model(xb[:half]), yb[:half])
    (0.5 * first).backward()
    g_first = flat_grad(params)
    second = loss_fn(model(xb[half:]), yb[half:])
    (0.5 * second).backward()
    g_full = flat_grad(params)
    g_second = g_full - g_first
    if preconditioner is not None:
        g_first, g_second, g_full = (
            g_first / preconditioner,
            g_second / preconditioner,
            g_full / preconditioner,
        )
    # g_first = ∇L1/2, g_second = ∇L2/2: the halves' own mean gradients are twice these.
    window[0] += 2.0 * (float(g_first.double().square().sum()) + float(g_second.double().square().sum()))
    window[1] += float(g_full.double().square().sum())
    window[2] += 1
    return (0.5 * (first + second)).detach()


def warm_up(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    x: Batch,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
    track: list[dict[str, Any]] | None = None,
) -> list[float]:
    """Plain training steps on random (with replacement) batches; returns the losses.

    With `track` (a list) and an even batch size, each step is built from its two halves (split_step)
    and one window of the noise trajectory is appended every TRACK_WINDOW steps: the mean training
    loss, |G_half|² and |G_full|² of its steps. Raises FloatingPointError on a NaN/inf loss.
    """
    losses: list[float] = []
    split = track is not None and batch_size >= 2 and batch_size % 2 == 0
    params = trainable(model)
    window = [0.0, 0.0, 0]
    preconditioner = None
    model.train()
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            break
        idx = torch.randint(0, len(x), (batch_size,), generator=generator).to(x.device)
        optimizer.zero_grad(set_to_none=True)
        if split:
            if step % TRACK_WINDOW == 1:
                preconditioner = adam_preconditioner(optimizer, params)
            loss = split_step(model, loss_fn, x[idx], y[idx], params, preconditioner, window)
        else:
            loss = loss_fn(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss.detach())} at warm-up step {step + 1}")
        if not split:
            loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if split and window[2] >= TRACK_WINDOW and track is not None:
            n = int(window[2])
            track.append(
                {"step": step + 1, "loss": sum(losses[-n:]) / n, "small_sq": window[0] / n,
                 "big_sq": window[1] / n, "steps": n, "b_small": batch_size // 2, "b_big": batch_size,
                 "phase": "warmup"}
            )  # fmt: skip
            window[:] = [0.0, 0.0, 0]
    optimizer.zero_grad(set_to_none=True)
    return losses


def _plan_b_big(
    b_small: int, n: int, draws: int, budget_s: float | None, samples: int, seconds: float
) -> int:
    """The largest b_small·2^k (<= min(512, n)) whose draws fit in 60 % of the budget at warm-up speed."""
    cap = max(2 * b_small, min(512, n))
    if budget_s is None or samples == 0 or seconds <= 0:
        return (cap // b_small) * b_small
    affordable = 0.6 * budget_s * (samples / seconds) / draws
    b_big = 2 * b_small
    while b_big * 2 <= min(cap, affordable):
        b_big *= 2
    return b_big


def _diverged(base: dict[str, Any], exc: FloatingPointError) -> dict[str, Any]:
    """The result when the loss went NaN/inf: reported to the client, never raised."""
    return {**base, "status": "non_finite_loss", "value": None, "low": None, "high": None, "error": str(exc)}


def measure_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    x: Batch,
    y: torch.Tensor,
    *,
    warmup_batch_size: int,
    warmup_steps: int = 100,
    b_small: int | None = None,
    b_big: int | None = None,
    draws: int = 64,
    time_budget_s: float | None = None,
    measured_on: str = "client",
    seed: int = 0,
    track: bool = False,
) -> dict[str, Any]:
    """Warm up `model` (trained in place) with `optimizer`, then estimate B_simple.

    With `track` the warm-up records the noise trajectory (warm_up's `track`) under "trajectory".

    Defaults: b_small = 8; b_big = the largest power-of-two multiple of b_small that lets `draws` draws
    fit in 60 % of the time budget at the warm-up's speed (without a budget: 512), within
    [2·b_small, min(512, len(x))]; for
    optimizers with a second-moment state (Adam, AdamW) the preconditioned gradient is measured. The
    warm-up gets at most 40 % of `time_budget_s`, the draws the rest. Never raises for a diverging loss:
    returns `{"status": "non_finite_loss", ...}` instead. Otherwise status is "ok", or "unresolved" when
    the mean-gradient signal was not resolved at b_big (value inf: B_simple is above what was measured).
    """
    start = time.monotonic()
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    b_small = b_small or min(8, max(1, n // 4))
    base: dict[str, Any] = {"measured_on": measured_on, "method": "two_batch_size", "warmup_steps": 0}
    warm_deadline = None if time_budget_s is None else start + 0.4 * time_budget_s
    windows: list[dict[str, Any]] | None = [] if track else None
    try:
        losses = warm_up(
            model, loss_fn, optimizer, x, y,
            steps=warmup_steps, batch_size=warmup_batch_size, generator=generator, deadline=warm_deadline,
            track=windows,
        )  # fmt: skip
    except FloatingPointError as exc:
        return _diverged(base, exc)
    if windows is not None:
        base["trajectory"] = windows
    base.update(warmup_steps=len(losses), warmup_final_loss=sum(losses[-10:]) / max(1, len(losses[-10:])))
    if b_big is None:
        b_big = _plan_b_big(
            b_small, n, draws, time_budget_s, len(losses) * warmup_batch_size, time.monotonic() - start
        )
    preconditioner = adam_preconditioner(optimizer, trainable(model))
    deadline = None if time_budget_s is None else start + time_budget_s
    try:
        result = gradient_noise_scale(
            model, loss_fn, x, y,
            b_small=b_small, b_big=b_big, draws=draws, preconditioner=preconditioner,
            generator=generator, deadline=deadline,
        )  # fmt: skip
    except FloatingPointError as exc:
        return _diverged(base, exc)
    status = "ok" if math.isfinite(result["value"]) else "unresolved"
    result.update(base, status=status, seconds=time.monotonic() - start)
    if result["draws"] < MIN_DRAWS:
        result["cut_short"] = f"{result['draws']} draws (< {MIN_DRAWS}) fitted in the time budget"
    return result

"""The recipe's helpers for plain PyTorch, Hugging Face and memory headroom."""

from __future__ import annotations

import pytest
import torch

from batchsize_client import Recipe
from tests.ui import seed


def recipe(**overrides: object) -> Recipe:
    return Recipe.from_result(
        {**seed.result(), "reference_learning_rate": 0.1, **overrides}, recommendation_id="r"
    )


def test_scheduler_warms_up_linearly_from_the_reference_rate_then_holds() -> None:
    r = recipe(learning_rate=0.4, warmup_steps=4)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = r.scheduler(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LinearLR)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.175, 0.25, 0.325, 0.4, 0.4])


def test_scheduler_without_warmup_keeps_the_rate() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe(learning_rate=0.4, warmup_steps=0).scheduler(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)


def test_dataloader_and_training_arguments() -> None:
    r = recipe(micro_batch_size=64, gradient_accumulation_steps=2, recommended_batch_size=128)
    loader = torch.utils.data.DataLoader(range(1000), **r.dataloader_kwargs())
    assert loader.batch_size == 64 and loader.drop_last
    transformers = pytest.importorskip("transformers")
    args = r.to_training_arguments(
        transformers.TrainingArguments("out", num_train_epochs=3, report_to="none")
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (64, 2)
    assert (args.learning_rate, args.warmup_steps, args.num_train_epochs) == (0.4, 100, 3)


def test_extra_memory_lowers_the_micro_batch_and_keeps_the_global_batch() -> None:
    # budget 256 MiB, fixed 18 MB, 120 kB per sample: 2087 fit; with 100 MB more kept free, 1253.
    r = recipe(micro_batch_size=2040, recommended_batch_size=2040, max_feasible_batch_size=2043)
    lowered = r.with_extra_memory(100_000_000)
    assert lowered.micro_batch_size <= 1253 and lowered.gradient_accumulation_steps == 2
    assert lowered.recommended_batch_size == 2040 and "lowered" in lowered.warnings[-1]
    assert r.with_extra_memory(1000) is r  # room enough: unchanged

"""The contract every zoo model follows: a config dataclass, a module, a synthetic batch and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything the probe engine needs to train one zoo architecture.

    `build(config, gradient_checkpointing)` returns a randomly initialised module.
    `make_batch(config, batch_size, device, generator)` returns `(inputs, targets)` on `device`.
    `loss(outputs, targets)` returns a scalar loss.
    `input_shape(config)` is the per-sample input shape, `input_dtype` its dtype
    ("float32" for images/features, "int64" for token ids), `num_classes(config)` the label range.
    """

    name: str
    description: str
    config_type: type
    build: Callable[[Any, bool], nn.Module]
    make_batch: Callable[[Any, int, torch.device, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    input_shape: Callable[[Any], list[int]]
    input_dtype: str
    num_classes: Callable[[Any], int]
    supports_gradient_checkpointing: bool


def _source_device(device: torch.device | str, generator: torch.Generator | None) -> torch.device:
    """Sample where the generator lives, so one CPU seed gives the same batch on every device."""
    return generator.device if generator is not None else torch.device(device)


def randn(
    shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard-normal float32 tensor on `device`; a no-op copy when the generator is already there."""
    source = _source_device(device, generator)
    return torch.randn(shape, generator=generator, device=source).to(device)


def randint(
    high: int, shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform int64 tensor in [0, high) on `device` (labels, token ids)."""
    source = _source_device(device, generator)
    return torch.randint(high, shape, generator=generator, device=source).to(device)

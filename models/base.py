"""The contract every zoo model follows: a config dataclass, a module, a synthetic batch and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
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
    `parameter_count(config)` counts the module's parameters arithmetically, without building it
    (None where the architecture is not known in advance, as for uploaded programs).
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
    parameter_count: Callable[[Any], int] | None = None


def bounded(default: Any, **limits: float) -> Any:
    """A config field with limits in JSON Schema's words (minimum, maximum, exclusiveMaximum, maxItems).

    The config's `__post_init__` enforces them with `check_bounds`, and the zoo's JSON schema shows them,
    so the limits a client reads are the ones applied. For a tuple field they apply to every item.
    """
    return field(default=default, metadata={"limits": limits})


def field_limits(config_type: type) -> dict[str, dict[str, float]]:
    """The limits of each bounded field of a config dataclass (see `bounded`)."""
    return {f.name: dict(f.metadata["limits"]) for f in fields(config_type) if "limits" in f.metadata}


def check_bounds(config: Any) -> None:
    """Raise ValueError naming the first field of `config` outside its limits."""
    for name, limits in field_limits(type(config)).items():
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        every = " all" if isinstance(value, tuple) else ""
        if "maxItems" in limits and len(items) > limits["maxItems"]:
            raise ValueError(f"{name} may list at most {limits['maxItems']} values, got {len(items)}")
        low, high = limits.get("minimum"), limits.get("maximum")
        below_exclusive = limits.get("exclusiveMaximum")
        for item in items:
            if below_exclusive is not None and not low <= item < below_exclusive:
                raise ValueError(f"{name} must{every} be in [{low:g}, {below_exclusive:g})")
            if low is not None and item < low:
                bound = "> 0" if low == 1 else f">= {low}"
                raise ValueError(f"{name} must{every} be {bound}")
            if high is not None and item > high:
                raise ValueError(f"{name} must{every} be <= {high} (got {item})")


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

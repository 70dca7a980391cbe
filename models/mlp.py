"""A multi-layer perceptron classifier: the smallest zoo model, sized for sklearn's `digits` by default.

Small models are where batch-size search is least intuitive: the peak memory sits in the optimizer
step rather than in activations, so this model keeps the probe engine honest about that case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelSpec, bounded, check_bounds, randint, randn


@dataclass(frozen=True)
class MLPConfig:
    # Limits are generous for real use (wider than any published MLP) and keep sizes far from overflow;
    # the registry also caps the total parameter count.
    input_dim: int = bounded(64, minimum=1, maximum=2**24)  # digits: 8x8 pixels
    # empty = multinomial logistic regression
    hidden_dims: tuple[int, ...] = bounded((256, 256), minimum=1, maximum=2**20, maxItems=64)
    num_classes: int = bounded(10, minimum=1, maximum=2**24)
    dropout: float = bounded(0.0, minimum=0.0, exclusiveMaximum=1.0)

    def __post_init__(self) -> None:
        # Accept a list for convenience but store a tuple, so configs stay hashable.
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        check_bounds(self)


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout for each hidden layer, then a linear classifier head."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def parameter_count(config: MLPConfig) -> int:
    """Weights and biases of every Linear layer, counted without building the module."""
    widths = [config.input_dim, *config.hidden_dims, config.num_classes]
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(widths))


def build(config: MLPConfig, gradient_checkpointing: bool = False) -> MLP:
    if gradient_checkpointing:
        # Nothing worth recomputing: an MLP's activations are tiny next to its weights.
        raise ValueError("mlp does not support gradient checkpointing")
    return MLP(config)


def make_batch(
    config: MLPConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = randn((batch_size, config.input_dim), device, generator)
    targets = randint(config.num_classes, (batch_size,), device, generator)
    return inputs, targets


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


SPEC = ModelSpec(
    name="mlp",
    description="Multi-layer perceptron classifier on flat float features (defaults fit sklearn digits).",
    config_type=MLPConfig,
    build=build,
    make_batch=make_batch,
    loss=loss,
    input_shape=lambda config: [config.input_dim],
    input_dtype="float32",
    num_classes=lambda config: config.num_classes,
    supports_gradient_checkpointing=False,
    parameter_count=parameter_count,
)

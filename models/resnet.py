"""ResNet (He et al., 2015) laid out like torchvision's, so parameter counts and memory compare.

Module names follow torchvision (conv1, bn1, layer1..layer4, fc, downsample) and so does the
in-place ReLU, which matters here: it is part of the activation memory the probes measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from models.base import ModelSpec, bounded, check_bounds, randint, randn

# depth -> (block type, blocks per stage)
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
STEMS = ("cifar", "imagenet")


@dataclass(frozen=True)
class ResNetConfig:
    # Limits lie beyond real use (wide ResNets reach width 640) and keep sizes far from overflow; the
    # registry also caps the total parameter count.
    depth: Literal[18, 34, 50] = 18
    num_classes: int = bounded(10, minimum=1, maximum=2**24)
    image_size: int = bounded(32, minimum=1, maximum=4096)
    in_channels: int = bounded(3, minimum=1, maximum=1024)
    stem: Literal["cifar", "imagenet"] = "cifar"  # cifar: 3x3 conv, no maxpool; imagenet: 7x7/2 + maxpool
    # channels of the first stage; the stages use width x 1, 2, 4, 8
    width: int = bounded(64, minimum=1, maximum=4096)

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(LAYOUTS)}")
        check_bounds(self)
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}")


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """1x1 projection on the shortcut when the block changes resolution or width, identity otherwise."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "v1.5"), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    layer1: nn.Sequential  # set in __init__ by name (setattr), declared here for the type checker
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, config: ResNetConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        kind, blocks_per_stage = LAYOUTS[config.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        width = config.width
        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(config.in_channels, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:  # small images: keep full resolution into the first stage
            self.conv1 = nn.Conv2d(config.in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        in_planes = width
        for i, num_blocks in enumerate(blocks_per_stage):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = []
            for j in range(num_blocks):
                stage.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(in_planes, config.num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Keep only each stage's input; recompute its activations in backward. Side effect:
                # BatchNorm running statistics are updated twice per step (harmless for probing).
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def parameter_count(config: ResNetConfig) -> int:
    """Parameters of `ResNet(config)` (convolutions, BatchNorm scales and shifts, the head), counted
    without building it: the same walk over stages and blocks as the constructor."""

    def conv_bn(in_planes: int, out_planes: int, kernel: int) -> int:
        return in_planes * out_planes * kernel * kernel + 2 * out_planes

    kind, blocks_per_stage = LAYOUTS[config.depth]
    expansion = 1 if kind == "basic" else Bottleneck.expansion
    width = config.width
    total = conv_bn(config.in_channels, width, 7 if config.stem == "imagenet" else 3)
    in_planes = width
    for i, num_blocks in enumerate(blocks_per_stage):
        planes = width * 2**i
        for j in range(num_blocks):
            stride = 1 if i == 0 or j > 0 else 2
            if kind == "basic":
                total += conv_bn(in_planes, planes, 3) + conv_bn(planes, planes, 3)
            else:
                total += conv_bn(in_planes, planes, 1) + conv_bn(planes, planes, 3)
                total += conv_bn(planes, planes * expansion, 1)
            if stride != 1 or in_planes != planes * expansion:
                total += conv_bn(in_planes, planes * expansion, 1)
            in_planes = planes * expansion
    return total + in_planes * config.num_classes + config.num_classes


def build(config: ResNetConfig, gradient_checkpointing: bool = False) -> ResNet:
    return ResNet(config, gradient_checkpointing)


def make_batch(
    config: ResNetConfig,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    return randn(shape, device, generator), randint(config.num_classes, (batch_size,), device, generator)


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


SPEC = ModelSpec(
    name="resnet",
    description="ResNet-18/34/50 image classifier (torchvision layout) with a CIFAR or ImageNet stem.",
    config_type=ResNetConfig,
    build=build,
    make_batch=make_batch,
    loss=loss,
    input_shape=lambda config: [config.in_channels, config.image_size, config.image_size],
    input_dtype="float32",
    num_classes=lambda config: config.num_classes,
    supports_gradient_checkpointing=True,
    parameter_count=parameter_count,
)

"""The networks: He et al. 2016's CIFAR ResNets (6n+2), torchvision's ResNet-18 with a CIFAR
stem, or the user's own by import path (``factory.py``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sweep.study.model_ref import is_import_path
from sweep.study.specs import TrainSpec
from sweep.training.factory import build_custom


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        # Projection shortcut (option B) where the shape changes; identity elsewhere.
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of ``blocks`` basic blocks with 16/32/64 x ``width`` channels (depth 6n+2)."""

    def __init__(self, blocks: int, width: int = 1, num_classes: int = 10):
        super().__init__()
        channels = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        layers, in_ch = [], channels[0]
        for stage, out_ch in enumerate(channels):
            for b in range(blocks):
                layers.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and b == 0 else 1))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool (32x32 inputs)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def memory_format(channels_last: bool = True) -> torch.memory_format:
    """The layout models and batches train in: channels_last (1.3-1.4x faster on this CPU,
    FACTS.md, and what CUDA tensor cores want), except in float64 (a run under
    ``torch.set_default_dtype(torch.float64)``: the equivalence tests), where the CPU has no
    channels_last convolution kernel and NCHW was 4.5x faster (resnet8, batch 32, measured),
    and with ``channels_last=False`` (``train.channels_last``: a module that cannot take it)."""
    if not channels_last or torch.get_default_dtype() == torch.float64:
        return torch.contiguous_format
    return torch.channels_last


def build_model(name: str, width: int = 1, num_classes: int = 10,
                args: Mapping[str, Any] | None = None) -> nn.Module:
    """``resnet{6n+2}`` (resnet8, resnet20, resnet56, ...), ``resnet18``, or a factory by import
    path ``MODULE:FACTORY`` called with ``args`` and ``num_classes`` (``sweep.training.factory``;
    raises ``ModelError``). The caller seeds torch first: the weights are drawn here."""
    if is_import_path(name):
        return build_custom(name, args or {}, num_classes)
    if name == "resnet18":
        return resnet18_cifar(num_classes)
    depth = int(name.removeprefix("resnet"))
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"unknown model {name!r}: CIFAR ResNets have depth 6n+2")
    return CifarResNet((depth - 2) // 6, width, num_classes)


def trial_model(train: TrainSpec, num_classes: int) -> nn.Module:
    """The network of ``train`` (``model``, ``width``, ``model_args``) for ``num_classes``."""
    return build_model(train.model, train.width, num_classes, train.model_args)

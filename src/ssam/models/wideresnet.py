"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation basic blocks, three stages of
width 16k, 32k, 64k, depth = 6n + 4. WRN-28-10 on CIFAR-10 has 36,479,194 parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import _init_weights


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # When the shape changes the projection must see the normalised input, otherwise the
        # residual path would carry un-normalised activations of the previous stage forward.
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + residual


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        in_planes = widths[0]
        for stage, width in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(WideBasic(in_planes, width, stride, dropout))
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wideresnet28x10(num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels, dropout)


def wideresnet34x10(num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    return WideResNet(34, 10, num_classes, in_channels, dropout)

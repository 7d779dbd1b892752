"""Small networks for the bundled 8x8 digits set: they train in seconds on a CPU and keep
BatchNorm, so the interaction of SAM's second forward pass with BN statistics is exercised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, CifarResNet, _init_weights


def resnet8(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Stem conv + three single-BasicBlock stages (16, 32, 64 wide) + linear: 8 weight layers,
    about 78k parameters."""
    return CifarResNet(BasicBlock, (1, 1, 1), num_classes, in_channels, widths=(16, 32, 64))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (16, 32, 64 channels; the last two stride 2) and a linear
    head, about 24k parameters."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def cnn_small(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels)

"""A convolutional network with BatchNorm that memorizes on a CPU: the CNN of the memorization regime.

Two strided conv-BN-ReLU blocks (W and 2W channels; 5x5 then 3x3 kernels, each halving the image) and a wide
ReLU head (16W units). At the default W = 16 on 28x28 Fashion-MNIST: 0.42M parameters, about 0.7M multiply-adds a
forward, most of the parameters in the head. ``cnn_small`` (24k parameters, global pooling) under-fits the noisy
labels; this one fits them within tens of epochs without augmentation, as the MLP does, while keeping BatchNorm and
convolutions (the layers the channel and N:M masks and SAM's second-pass BN statistics are about).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_CNN_WIDTH = 16


class CNNBN(nn.Module):
    """conv5x5/2(W) -> BN -> ReLU -> conv3x3/2(2W) -> BN -> ReLU -> flatten -> Linear(16W) -> ReLU -> Linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = DEFAULT_CNN_WIDTH) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"cnn_bn width: got {width!r}; allowed: an integer >= 1")
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        side = _halved(_halved(image_size))
        self.fc1 = nn.Linear(2 * width * side * side, 16 * width)
        self.fc2 = nn.Linear(16 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _halved(size: int) -> int:
    """The output side of a stride-2 convolution whose padding keeps 'same' geometry (k = 2p + 1)."""
    return (size + 1) // 2


def cnn_bn(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = DEFAULT_CNN_WIDTH) -> nn.Module:
    return CNNBN(num_classes, in_channels, image_size, width)

"""A two-hidden-layer ReLU perceptron: the model of the memorization recipe.

It has no BatchNorm, no convolution and no augmentation-friendly inductive bias, so under label noise it fits the
wrong labels within tens of epochs on a CPU: the regime in which SAM's flatter minima pay (docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_WIDTH = 512


class MLP(nn.Module):
    """flatten -> Linear(in, width) -> ReLU -> Linear(width, width) -> ReLU -> Linear(width, classes).

    ``in`` = in_channels * image_size**2. PyTorch's default Linear initialisation.
    """

    def __init__(self, num_classes: int, in_features: int, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"mlp width: got {width!r}; allowed: an integer >= 1")
        self.width = width
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


def mlp(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = DEFAULT_WIDTH) -> nn.Module:
    return MLP(num_classes, in_channels * image_size * image_size, width)

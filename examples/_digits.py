"""The data every example trains on: scikit-learn's 8x8 digits (ships with it, nothing downloads), as tensors."""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(batch_size: int = 64, limit: int = 512):
    """(model, train dataset, loader) for a few quick epochs on 1-channel 8x8 images."""
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:limit], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y[:limit])
    dataset = TensorDataset(x, y)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return model, dataset, DataLoader(dataset, batch_size=batch_size, shuffle=True)

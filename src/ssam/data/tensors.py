"""An image data set held as one tensor, augmented per sample on the CPU (or in batches by GPULoader).

Used by the small grey data sets (digits, MNIST, Fashion-MNIST): their images fit in memory many times
over, so decoding per sample (PIL) would only cost time.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .transforms import Normalize, RandomShift


class TensorImages(Dataset):
    """Index -> (normalised (C, H, W) float tensor, int label).

    ``data`` is (N, C, H, W), uint8 (scaled by 1/255, like ToTensor) or float already in [0, 1].
    Augmentation: zero-pad by ``padding`` and crop back at a random offset, then (``flip``) mirror
    left-right with probability 1/2, then normalise. ``data`` / ``targets`` / ``mean`` / ``std`` /
    ``augmentation`` are public so GPULoader can replay the same augmentation on the device.
    """

    data_layout = "NCHW"

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        *,
        mean,
        std,
        num_classes: int,
        padding: int = 0,
        flip: bool = False,
    ):
        if data.ndim != 4 or len(data) != len(targets):
            raise ValueError(
                f"data: got shape {tuple(data.shape)} for {len(targets)} labels; "
                f"allowed: (N, C, H, W) with one label per image"
            )
        self.data = data
        self.targets = targets
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.num_classes = num_classes
        self.padding = int(padding)
        self.flip = bool(flip)
        self.augmentation = {"padding": self.padding, "flip": self.flip, "cutout": 0} if padding or flip else None
        self.shift = RandomShift(self.padding)
        self.normalize = Normalize(self.mean, self.std)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index]
        img = img.float().div(255) if img.dtype == torch.uint8 else img
        img = self.shift(img)
        # torch's global RNG: DataLoader seeds it per worker, unlike Python's `random`.
        if self.flip and torch.rand(()).item() < 0.5:
            img = img.flip(-1)
        return self.normalize(img), int(self.targets[index])

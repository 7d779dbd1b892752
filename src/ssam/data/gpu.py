"""A data loader that keeps a whole small image data set on the device.

For CIFAR-sized data the per-sample PIL pipeline on a few CPU workers is the bottleneck on a
modern GPU; doing crop / flip / cutout on whole batches where the data already lives removes it.
The augmentations reproduce the per-sample ones in ``transforms`` (same padding fill, same
cutout box), only the random streams differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import UsageError


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence decorrelates nearby (seed, epoch) pairs, which seed*K + epoch would not.
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2)
    return int(words[0]) << 31 | int(words[1]) >> 1


class GPULoader:
    """Yields ``(images, labels)`` batches, augmented and normalised on ``device``.

    images: (N, C, H, W) uint8 (scaled by 1/255, like ToTensor) or float already in [0, 1].
    padding: zero-pad then randomly crop back to H x W; flip: horizontal flip with p = 0.5;
    cutout: side of the square zeroed after normalisation with probability ``cutout_p``.
    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``. Each ``__iter__``
    uses the epoch given by ``set_epoch``, or the one after the previous pass if it was not
    called, so a plain ``for epoch ...: for x, y in loader`` still reshuffles.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        *,
        mean,
        std,
        device=None,
        shuffle: bool = True,
        drop_last: bool = False,
        padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
        cutout_p: float = 0.5,
        seed: int = 0,
    ):
        self.with_index = False  # True: yield (images, labels, indices)
        if batch_size <= 0:
            raise UsageError(f"batch size must be positive, got {batch_size}")
        device = torch.device(device if device is not None else "cpu")
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.ndim != 4:
            raise ValueError(f"GPULoader wants (N, C, H, W) images, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
        self.device = device
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device)
        self.dataset = TensorDataset(self.images, self.labels)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.padding = int(padding)
        self.flip = bool(flip)
        self.cutout = int(cutout)
        self.cutout_p = float(cutout_p)
        self.seed = int(seed)
        self.epoch = 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @classmethod
    def from_dataset(
        cls,
        dataset,
        batch_size: int,
        *,
        device=None,
        augment: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> GPULoader:
        """From an in-memory data set made by ``build_datasets`` (CIFAR, digits, MNIST, Fashion-MNIST).
        ``augment=True`` replays that data set's own augmentation (none for a test set or an ``augment=False``
        build)."""
        needed = ("data", "targets", "mean", "std", "augmentation", "data_layout")
        if not all(hasattr(dataset, a) for a in needed):
            raise UsageError(
                f"the on-device loader needs an in-memory data set (CIFAR*, digits, MNIST, "
                f"FashionMNIST), not {type(dataset).__name__}; use the standard DataLoader"
            )
        images = torch.as_tensor(dataset.data)
        if dataset.data_layout == "NHWC":
            images = images.permute(0, 3, 1, 2)
        aug = (dataset.augmentation or {}) if augment else {}
        return cls(
            images,
            dataset.targets,
            batch_size,
            mean=dataset.mean,
            std=dataset.std,
            device=device,
            shuffle=shuffle,
            drop_last=drop_last,
            padding=aug.get("padding", 0),
            flip=aug.get("flip", False),
            cutout=aug.get("cutout", 0),
            cutout_p=aug.get("cutout_p", 0.5),
            seed=seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        epoch = self.epoch
        self.epoch = epoch + 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_epoch_seed(self.seed, epoch))
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.with_index:  # the examples' positions in the data set (SAF looks its logits up by them)
                yield self._augment(self.images[idx], gen), self.labels[idx], idx
            else:
                yield self._augment(self.images[idx], gen), self.labels[idx]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        n, c, h, w = x.shape
        dev = x.device
        if self.padding:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(2 * p + 1, (n,), generator=gen, device=dev)
            dx = torch.randint(2 * p + 1, (n,), generator=gen, device=dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            x = padded[
                torch.arange(n, device=dev)[:, None, None, None],
                torch.arange(c, device=dev)[None, :, None, None],
                rows,
                cols,
            ]
        if self.flip:
            flip = torch.rand(n, generator=gen, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = (x - self.mean) / self.std
        if self.cutout:
            s = self.cutout
            cy = torch.randint(h, (n,), generator=gen, device=dev)
            cx = torch.randint(w, (n,), generator=gen, device=dev)
            apply = torch.rand(n, generator=gen, device=dev) < self.cutout_p
            ys = torch.arange(h, device=dev)[None, :]
            xs = torch.arange(w, device=dev)[None, :]
            # Same box as transforms.cutout_box: start at centre - s//2, s wide, clipped.
            in_y = (ys >= (cy - s // 2)[:, None]) & (ys < (cy - s // 2 + s)[:, None])
            in_x = (xs >= (cx - s // 2)[:, None]) & (xs < (cx - s // 2 + s)[:, None])
            box = in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]
            x = x.masked_fill(box[:, None], 0.0)
        return x

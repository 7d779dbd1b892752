"""Per-sample transforms: Cutout and the CIFAR / ImageNet / digits pipelines.

Everything here is a module-level class or a torchvision transform, so a dataset holding these
pipelines pickles cleanly into DataLoader worker processes.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cutout_box(cy: int, cx: int, size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of a size x size square centred at (cy, cx), clipped
    to the image. The square spans cy - size//2 .. cy + size - size//2 - 1, so an even size has
    exactly `size` rows when it does not touch a border."""
    y0 = max(cy - size // 2, 0)
    y1 = min(cy - size // 2 + size, height)
    x0 = max(cx - size // 2, 0)
    x1 = min(cx - size // 2 + size, width)
    return y0, y1, x0, x1


def cutout(img: torch.Tensor, cy: int, cx: int, size: int) -> torch.Tensor:
    """A copy of a (C, H, W) tensor with the clipped square around (cy, cx) set to zero."""
    out = img.clone()
    y0, y1, x0, x1 = cutout_box(cy, cx, size, img.shape[-2], img.shape[-1])
    out[..., y0:y1, x0:x1] = 0
    return out


class Cutout:
    """DeVries & Taylor (2017) Cutout on a normalised (C, H, W) tensor.

    With probability ``p`` a ``size`` x ``size`` square, whose centre is uniform over the whole
    image (so it may be partly outside and is then clipped), is set to zero. Applied after
    normalisation, zero means "the data-set mean colour", not black.
    """

    def __init__(self, size: int = 16, p: float = 0.5):
        if size <= 0:
            raise ValueError(f"cutout size must be positive, got {size}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"cutout probability must be in [0, 1], got {p}")
        self.size = size
        self.p = p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        # torch's global RNG: DataLoader seeds it per worker, unlike Python's `random`.
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return img
        h, w = img.shape[-2], img.shape[-1]
        cy = int(torch.randint(h, ()).item())
        cx = int(torch.randint(w, ()).item())
        return cutout(img, cy, cx, self.size)

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, p={self.p})"


class RandomShift:
    """Zero-pad by ``padding`` then randomly crop back to the original size, on a tensor
    (torchvision's RandomCrop wants PIL or a known output size; this keeps the input size)."""

    def __init__(self, padding: int):
        self.padding = padding

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p == 0:
            return img
        h, w = img.shape[-2], img.shape[-1]
        padded = torch.nn.functional.pad(img, (p, p, p, p))
        dy = int(torch.randint(2 * p + 1, ()).item())
        dx = int(torch.randint(2 * p + 1, ()).item())
        return padded[..., dy : dy + h, dx : dx + w]

    def __repr__(self) -> str:
        return f"RandomShift(padding={self.padding})"


class Normalize:
    """Channel-wise (x - mean) / std on a tensor; picklable and cheap for tiny images."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def cifar_train_transform(cutout_size: int = 0, cutout_p: float = 0.5):
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if cutout_size:
        steps.append(Cutout(cutout_size, cutout_p))
    return T.Compose(steps)


def cifar_test_transform():
    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def imagenet_train_transform():
    return T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def imagenet_test_transform():
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

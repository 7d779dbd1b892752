"""The 8x8 handwritten digits that ship inside scikit-learn (1797 images, 10 classes).

Split: stratified and fixed, independent of any seed or library RNG. Within each class, taking
the images in their original order, every fifth one (positions 4, 9, 14, ...) goes to the test
set. That gives 1442 train / 355 test images with each class about 20% in test, and the same
split on every machine and numpy version.
"""

from __future__ import annotations

import numpy as np
import torch

from .tensors import TensorImages

TEST_EVERY = 5
SHIFT = 1


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), both sorted."""
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(members[TEST_EVERY - 1 :: TEST_EVERY])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): float32 (N, 1, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = split_indices(labels)
    targets = torch.from_numpy(labels)
    train_idx_t, test_idx_t = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (
        images[train_idx_t].contiguous(),
        targets[train_idx_t].contiguous(),
        images[test_idx_t].contiguous(),
        targets[test_idx_t].contiguous(),
    )


class DigitsDataset(TensorImages):
    """Index -> (normalised (1, 8, 8) tensor, int label), all held as tensors.

    ``data`` is float in [0, 1], NCHW; ``mean``/``std`` come from the training images so the
    test set is normalised with statistics it did not contribute to.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, *, mean, std, augment: bool):
        # No flips: a mirrored 2, 3 or 7 is no longer the same digit.
        super().__init__(data, targets, mean=mean, std=std, num_classes=10, padding=SHIFT if augment else 0, flip=False)


def build_digits(augment: bool = True) -> tuple[DigitsDataset, DigitsDataset, tuple, tuple]:
    train_x, train_y, test_x, test_y = load_digits_split()
    mean = (float(train_x.mean()),)
    std = (float(train_x.std()),)
    train = DigitsDataset(train_x, train_y, mean=mean, std=std, augment=augment)
    test = DigitsDataset(test_x, test_y, mean=mean, std=std, augment=False)
    return train, test, mean, std

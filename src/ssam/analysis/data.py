"""The data every analysis looks at: a fixed, un-augmented subset of the training set, in fixed batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset


def subset_batches(train: Dataset, num_samples: int, batch_size: int, seed: int = 0) -> list[tuple]:
    """The first ``num_samples`` examples of a permutation seeded by ``seed``, as ``(inputs, targets)`` batches.

    Build ``train`` with ``augment=False``: the same examples must look the same every time they are measured.
    """
    n = min(num_samples, len(train))  # type: ignore[arg-type]
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]  # type: ignore[arg-type]
    return list(DataLoader(Subset(train, chosen.tolist()), batch_size=batch_size, shuffle=False, num_workers=0))

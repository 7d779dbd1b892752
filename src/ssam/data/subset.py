"""The training examples a run uses: a fixed subset, its label noise, and a validation split held out of it.

Order, so that runs compare like with like: draw the subset (``--train_subset``) from the full training set, corrupt
labels inside the subset (``--label_noise``), then hold out the validation examples (``--val_split``), noisy labels
included. Each draw has its own random stream of the seed (independent of the noise's and of each other), so for
one seed every optimizer trains on the same examples with the same wrong labels, and changing the validation size
changes neither the subset nor which of its labels are wrong.
"""

from __future__ import annotations

import numpy as np
import torch

# Mixed into the seed so that each draw has a stream of its own (the noise uses another constant).
_SUBSET_STREAM = 0x5B5E7
_VAL_STREAM = 0x7A1D

__all__ = ["subset_indices", "val_indices", "select_examples"]


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream])))


def _check_count(what: str, n: int, total: int, low: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not low <= n <= total:
        raise ValueError(f"{what}: got {n!r}; allowed: an integer in [{low}, {total}]")
    return int(n)


def subset_indices(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` of ``range(total)`` drawn uniformly without replacement, sorted; a function of (total, n, seed)."""
    n = _check_count("train_subset", n, total)
    return np.sort(_rng(seed, _SUBSET_STREAM).permutation(total)[:n])


def val_indices(total: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept for training, held out for validation): ``n`` of ``range(total)`` held out, both sorted."""
    n = _check_count("val_split", n, total - 1, low=0)  # at least one example stays to train on
    order = _rng(seed, _VAL_STREAM).permutation(total)
    return np.sort(order[n:]), np.sort(order[:n])


def _take(values, idx: np.ndarray):
    if isinstance(values, torch.Tensor):
        return values[torch.from_numpy(idx)]
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[i] for i in idx]


def select_examples(dataset, idx: np.ndarray):
    """Keep only the examples ``idx`` (in that order) of ``dataset``, in place; returns it.

    Works on every data set of ``build_datasets``: the in-memory ones (``data`` and ``targets``) and torchvision's
    ImageFolder (``samples``/``imgs``/``targets``). Label-noise bookkeeping (``clean_targets``, ``noisy_indices``)
    follows the examples, renumbered to their new positions.
    """
    idx = np.asarray(idx, dtype=np.int64)
    touched = False
    for attr in ("data", "targets", "samples", "imgs", "clean_targets"):
        values = getattr(dataset, attr, None)
        if values is not None and not isinstance(values, (str, bytes)) and hasattr(values, "__len__"):
            setattr(dataset, attr, _take(values, idx))
            touched = True
    if not touched:
        raise ValueError(
            f"dataset: {type(dataset).__name__} has neither data/targets nor samples; allowed: a data set of "
            f"build_datasets"
        )
    noisy = getattr(dataset, "noisy_indices", None)
    if noisy is not None:
        where = np.full(int(max(idx.max(initial=-1), noisy.max(initial=-1))) + 1, -1, dtype=np.int64)
        where[idx] = np.arange(len(idx))
        moved = where[noisy]
        dataset.noisy_indices = np.sort(moved[moved >= 0])
    return dataset

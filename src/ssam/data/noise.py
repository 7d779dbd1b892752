"""Symmetric label noise: a fixed share of the training labels replaced by a uniformly random OTHER class.

The SAM paper's largest gains are under this kind of noise (Foret et al. 2021, CIFAR-10 with noisy labels).

Rules, so that runs compare like with like:
- Exactly ``noise_count(p, n)`` labels change: p * n rounded half up, with p taken as the decimal it is
  written as (0.15 of 10 is 1.5, so 2, although the float 0.15 is a hair below 0.15), never a random
  number of them, and each changed label really is wrong (a draw of the same class is not possible).
- Which examples change and what they become depend only on ``seed`` and the labels, drawn from a private
  generator (the global RNGs are untouched): every optimizer trained with the same seed sees the same
  corrupted set. The examples are the first ``k`` of one seeded permutation and each example's new class
  is drawn once for all examples, so for one seed the set at p = 0.2 is contained in the set at p = 0.4
  and a label changed at both rates gets the same wrong class.
- Only the training set is ever passed here; the test set stays clean.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# Mixed into the seed so that the noise does not share its stream with anything else seeded by the same number.
_STREAM = 0x1AB3_15E


def noise_count(p: float, n: int) -> int:
    """How many of ``n`` labels a noise rate ``p`` changes: p * n rounded half up, computed exactly."""
    # repr gives the shortest decimal that reads back as this float: the number the user typed.
    return math.floor(Fraction(repr(float(p))) * n + Fraction(1, 2))


def _check_rate(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p < 1:
        raise ValueError(f"label noise p: got {p!r}; allowed: a number in [0, 1)")
    return float(p)


def noisy_labels(labels, num_classes: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(new int64 labels, sorted indices that changed) for integer ``labels`` in [0, num_classes)."""
    p = _check_rate(p)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes!r}; allowed: an integer >= 2 (noise needs another class)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: got values in [{labels.min()}, {labels.max()}]; allowed: 0..{num_classes - 1}")
    n = labels.size
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _STREAM])))
    order = rng.permutation(n)
    # An offset in 1..C-1 added modulo C is uniform over the C-1 other classes.
    offsets = rng.integers(1, num_classes, size=n)
    changed = np.sort(order[: noise_count(p, n)])
    out = labels.copy()
    out[changed] = (labels[changed] + offsets[changed]) % num_classes
    return out, changed


def _num_classes(dataset) -> int:
    if getattr(dataset, "num_classes", None) is not None:
        return int(dataset.num_classes)
    if getattr(dataset, "classes", None) is not None:  # torchvision ImageFolder and its kin
        return len(dataset.classes)
    raise ValueError(
        f"dataset: {type(dataset).__name__} has neither num_classes nor classes; "
        f"allowed: a data set that says how many classes it has"
    )


def apply_label_noise(dataset, p: float, seed: int):
    """Replace ``noise_count(p, len(dataset))`` training labels of ``dataset`` in place; returns it.

    Works on every data set of ``build_datasets`` (CIFAR, ImageFolder, digits, MNIST, Fashion-MNIST):
    anything with a ``targets`` sequence and ``num_classes`` or ``classes``; an ImageFolder's
    ``samples`` / ``imgs`` are rewritten too, since that is what it reads labels from. The original
    labels stay in ``dataset.clean_targets`` and the changed indices in ``dataset.noisy_indices``
    (to measure how much of the noise a model memorised). ``p = 0`` changes nothing.
    """
    p = _check_rate(p)
    if not hasattr(dataset, "targets"):
        raise ValueError(
            f"dataset: {type(dataset).__name__} has no targets; allowed: a data set with a "
            f"targets sequence (every data set of build_datasets has one)"
        )
    if getattr(dataset, "noisy_indices", None) is not None:
        raise ValueError("dataset: its labels already carry noise; allowed: a data set with its original labels")
    old = dataset.targets
    clean = old.numpy() if isinstance(old, torch.Tensor) else np.asarray(old)
    new, changed = noisy_labels(clean, _num_classes(dataset), p, seed)
    # Same container type as before: a fresh tensor / array / list, never a write into the caller's storage.
    if isinstance(old, torch.Tensor):
        dataset.targets = torch.from_numpy(new).to(dtype=old.dtype, device=old.device)
    elif isinstance(old, np.ndarray):
        dataset.targets = new.astype(old.dtype)
    else:
        dataset.targets = [int(v) for v in new]
    for attr in ("samples", "imgs"):
        pairs = getattr(dataset, attr, None)
        if isinstance(pairs, list) and len(pairs) == len(new):
            setattr(dataset, attr, [(path, int(label)) for (path, _), label in zip(pairs, new)])
    dataset.clean_targets = clean.astype(np.int64, copy=True)
    dataset.noisy_indices = changed
    dataset.label_noise = {"p": p, "seed": int(seed), "count": int(len(changed))}
    return dataset

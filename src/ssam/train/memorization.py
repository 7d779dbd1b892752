"""How much of the label noise a model has memorized: its predictions on the training examples (eval mode, no
augmentation) against their noisy and their true labels.

- ``noisy_memorized``: share of the corrupted examples predicted as their (wrong) training label;
- ``noisy_true``: share of the corrupted examples predicted as their true label (the model resisted the noise);
- ``clean_train_acc``: accuracy on the examples whose label was not changed (in percent, like every accuracy).
The two noisy shares are fractions in [0, 1]; their sum is at most 1 (the rest went to a third class).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["memorization", "KEYS"]

KEYS = ("noisy_memorized", "noisy_true", "clean_train_acc")


def memorization(predictions, noisy_labels, clean_labels, noisy_indices) -> dict[str, float]:
    """The three measures from predicted classes and the labels of the same examples, in the same order."""
    pred = torch.as_tensor(predictions).cpu().numpy().astype(np.int64).reshape(-1)
    noisy = torch.as_tensor(noisy_labels).cpu().numpy().astype(np.int64).reshape(-1)
    clean = np.asarray(clean_labels, dtype=np.int64).reshape(-1)
    idx = np.asarray(noisy_indices, dtype=np.int64).reshape(-1)
    if not len(pred) == len(noisy) == len(clean):
        raise ValueError(
            f"predictions/labels: got {len(pred)} predictions for {len(noisy)} noisy and {len(clean)} clean labels; "
            "allowed: one of each per example"
        )
    is_noisy = np.zeros(len(pred), dtype=bool)
    is_noisy[idx] = True
    n_noisy, n_clean = int(is_noisy.sum()), int((~is_noisy).sum())
    nan = float("nan")
    return {
        "noisy_memorized": float((pred[is_noisy] == noisy[is_noisy]).sum() / n_noisy) if n_noisy else nan,
        "noisy_true": float((pred[is_noisy] == clean[is_noisy]).sum() / n_noisy) if n_noisy else nan,
        "clean_train_acc": 100.0 * float((pred[~is_noisy] == clean[~is_noisy]).sum() / n_clean) if n_clean else nan,
    }

"""Exact top-k selection as a boolean mask, without a host round trip (the path for accelerators).

Measured on an H200 over the 11.2 M entries of a ResNet-18 (k = n/2): ``torch.topk(sorted=False)`` 0.30 ms,
``torch.kthvalue`` 43 ms (it sorts), a hand-written 4-pass radix select 9.5 ms. So the threshold comes from topk;
the mask is then rebuilt from the threshold so that ties are broken by position, the same way as on the CPU path, and
a mask does not depend on the device it was computed on. Every count stays a device tensor: nothing synchronises.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["device_top_k_mask"]


def device_top_k_mask(score: Tensor, k: int) -> Tensor:
    """Boolean mask with exactly ``k`` True entries at the largest scores of a 1-D tensor (ties: first positions).

    ``-0.0`` and ``+0.0`` are equal here, as they are to ``>=``; NaN ranks lowest, tied with ``-inf``.
    """
    n = score.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    score = score.reshape(-1)
    if score.is_floating_point():
        # topk ranks NaN highest and a NaN threshold would keep nothing: NaN ranks lowest, tied with -inf.
        score = torch.nan_to_num(score, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    top = torch.topk(score, k, sorted=False).values
    threshold = top.min()
    # topk kept every entry above the threshold and as many tied ones as fit: count those among its k values, not
    # among all n entries.
    need = (top == threshold).sum()
    at = score == threshold
    rank = torch.cumsum(at, 0, dtype=torch.int32 if n < 2**31 else torch.int64)
    return (score > threshold).logical_or_(at.logical_and_(rank <= need))

"""Exact top-k selection as a mask, on the device, in a few passes over the data and no host round trip.

``torch.kthvalue`` and ``torch.topk`` sort on CUDA: for the ~11M entries of a ResNet-18 they take tens of
milliseconds, many SGD steps. A radix select needs four histogram passes over 8-bit digits of an order-preserving
integer key, each a scatter-add into 256 bins, with every decision kept in device tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["radix_top_k_mask"]


def _ordered_key(score: Tensor) -> Tensor:
    """Map float32 to int64 in [0, 2^32) so that integer order is float order (-inf lowest)."""
    # + 0.0 turns -0.0 into +0.0: the two compare equal as floats, so they must tie here too (as on the CPU path).
    bits = (score.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order backwards as integers: flipping their 31 low bits puts them right.
    flipped = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return flipped + 2**31


def radix_top_k_mask(score: Tensor, k: int) -> Tensor:
    """Boolean mask with exactly ``k`` True entries at the largest scores (ties at the threshold by position)."""
    n = score.numel()
    device = score.device
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=device)
    key = _ordered_key(score.reshape(-1))
    candidate = torch.ones(n, dtype=torch.int64, device=device)  # 1 where the key still matches the prefix
    need = torch.tensor(k, dtype=torch.int64, device=device)     # how many of the candidates must be kept
    prefix = torch.zeros((), dtype=torch.int64, device=device)
    for shift in (24, 16, 8, 0):
        digit = (key >> shift) & 255
        counts = torch.zeros(256, dtype=torch.int64, device=device).scatter_add_(0, digit, candidate)
        from_top = counts.flip(0).cumsum(0)                      # candidates with digit >= 255 - j
        j = (from_top < need).sum()                              # first bucket (from the top) reaching `need`
        d = 255 - j
        above = from_top.gather(0, j.reshape(1)).squeeze(0) - counts.gather(0, d.reshape(1)).squeeze(0)
        need = need - above
        prefix = prefix | (d << shift)
        candidate = candidate * (digit == d)
    greater = key > prefix
    equal = key == prefix
    return greater | (equal & (torch.cumsum(equal, 0) <= need))

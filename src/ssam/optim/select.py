"""Exact top-k selection as a boolean mask: the one home of the rule every mask in ssam is built by.

The rule: exactly ``k`` entries are kept (``min(k, |among|)`` when only the members of ``among`` compete), those with
the largest scores; ties at the threshold are broken by position (first entries win); NaN ranks lowest, tied with
``-inf``; ``-0.0`` equals ``+0.0``. The rule defines the mask uniquely, so a mask does not depend on the device or the
path that computed it. Two execution paths:

- CPU: a k-th value threshold from numpy's partition (linear-time selection; ``torch.kthvalue`` sorts indices along
  and is much slower), then comparisons.
- accelerators: the threshold from ``torch.topk(sorted=False)`` (a sort or a hand-written radix select is much
  slower there), the mask rebuilt from the threshold with the same tie rule. Every count stays a device tensor, so
  nothing waits for the host.

``random_subset`` (SSAM-D's random drop/growth on a CPU) lives here too: a uniformly random exact-size subset.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["top_k_mask", "device_top_k_mask", "random_subset"]

_NUMPY_DTYPES = (
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)


def top_k_mask(score: Tensor, k: int, among: Tensor | None = None) -> Tensor:
    """Boolean mask with exactly ``k`` True entries at the ``k`` largest scores of a 1-D tensor.

    With ``among`` (a bool tensor like ``score``), only its members compete and at most ``|among|`` are kept; the
    other entries' scores are ignored. Ties by position, NaN lowest (see the module docstring).
    """
    n = score.numel()
    if score.device.type != "cpu":
        return device_top_k_mask(score, k, among)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    values = score.detach().reshape(-1)
    if values.dtype not in _NUMPY_DTYPES:  # bfloat16: float32 holds every value exactly
        values = values.float()
    keep = None if among is None else among.reshape(-1).numpy()
    if keep is None and k >= n:
        return torch.ones(n, dtype=torch.bool)
    return torch.from_numpy(_numpy_top_k(values.numpy(), k, keep))


def _numpy_top_k(values: np.ndarray, k: int, among: np.ndarray | None) -> np.ndarray:
    pool = values if among is None else values[among]
    if k >= pool.size:
        return np.ones(values.size, dtype=bool) if among is None else among.copy()
    thr = np.partition(pool, pool.size - k)[pool.size - k]
    # Without ties at the threshold, the k largest are exactly those >= it (numpy sorts NaN highest, so a NaN among
    # the k largest makes this count fall short and takes the slower path below).
    kept = values >= thr
    if among is not None:
        kept &= among
    if np.count_nonzero(kept) == k:
        return kept
    if np.issubdtype(values.dtype, np.floating) and np.isnan(pool).any():
        # NaN ranks lowest, tied with -inf: the same as on the device path.
        return _numpy_top_k(np.nan_to_num(values, nan=-np.inf, posinf=np.inf, neginf=-np.inf), k, among)
    above = values > thr
    at = values == thr
    if among is not None:
        above &= among
        at &= among
    need = k - int(np.count_nonzero(above))
    return above | (at & (np.cumsum(at) <= need))


def device_top_k_mask(score: Tensor, k: int, among: Tensor | None = None) -> Tensor:
    """``top_k_mask`` without a host round trip (any device). With ``among``, ``k`` must not exceed ``|among|``
    unless the whole of ``among`` is wanted (checking would need the host)."""
    n = score.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device) if among is None else among.reshape(-1).clone()
    score = score.reshape(-1)
    if score.is_floating_point():
        # topk ranks NaN highest and a NaN threshold would keep nothing: NaN ranks lowest, tied with -inf.
        score = torch.nan_to_num(score, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if among is not None:
        among = among.reshape(-1)
        low = -math.inf if score.is_floating_point() else torch.iinfo(score.dtype).min
        score = score.masked_fill(~among, low)
    top = torch.topk(score, k, sorted=False).values
    threshold = top.min()
    # topk kept every entry above the threshold and as many tied ones as fit: count those among its k values, not
    # among all n entries.
    need = (top == threshold).sum()
    at = score == threshold
    if among is not None:  # outsiders can only tie at the lowest value; they never count
        at.logical_and_(among)
    rank = torch.cumsum(at, 0, dtype=torch.int32 if n < 2**31 else torch.int64)
    return (score > threshold).logical_or_(at.logical_and_(rank <= need))


def random_subset(among: Tensor, m: int, seed: int) -> Tensor:
    """A uniformly random ``m``-subset of the True entries of a CPU bool tensor (all of them if fewer).

    Each member is kept with probability about m / |among| (16 random bits apiece, not a float), then members are
    added or dropped uniformly at random to make the count exact. Given its size, a Bernoulli subset is uniform, and
    so is a uniform trim or fill of it.
    """
    rng = np.random.default_rng(seed)
    pool = among.numpy()
    size = int(np.count_nonzero(pool))
    if m >= size:
        return among.clone()
    words = (pool.size + 3) // 4
    bits = rng.bit_generator.random_raw(words).view(np.uint16)[: pool.size]
    chosen = (bits < min(65535, round(65536 * m / size))) & pool
    have = int(np.count_nonzero(chosen))
    if have > m:
        idx = np.flatnonzero(chosen)
        chosen[idx[rng.choice(idx.size, have - m, replace=False)]] = False
    elif have < m:
        idx = np.flatnonzero(pool & ~chosen)
        chosen[idx[rng.choice(idx.size, m - have, replace=False)]] = True
    return torch.from_numpy(chosen)

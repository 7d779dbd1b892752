"""SSAM-D's drop and grow at every granularity: which live entries (elements, channels, whole tensors, N:M slots)
die and which dead ones grow back, and its random initial mask. The groups themselves, and the masks SSAM-F takes
from its scores, are ``ssam.optim.groups``'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .groups import (
    Granularity,
    _flat_group_means,
    _nm_blocks,
    _per_group,
    _rank_desc,
    best_first_fit,
    expand_groups,
    fit_groups,
    group_owner,
    group_sizes,
    nm_mask,
)

__all__ = ["group_drop_grow", "nm_drop_grow", "random_mask", "drop_and_grow"]


def group_drop_grow(
    live: Tensor,
    shapes: Sequence[Sequence[int]],
    kind: str,
    drop: np.ndarray | Tensor,
    grow: np.ndarray | Tensor,
    budget: int,
    death_rate: float,
    grow_from: int = 0,
) -> Tensor:
    """SSAM-D's update with whole groups: of the L live groups, the ``L - int(L * (1 - death_rate))`` with the
    lowest mean ``drop`` score die (no more than there are dead groups to regrow); then groups dead before the update
    are grown best-first-fit by ``grow`` into the budget the survivors leave (only groups of tensors ``grow_from``
    on: the cost-aware cut). ``live`` is flat over the entries; ``drop`` and ``grow`` are either flat over the
    entries (averaged per group) or one key per group (numpy: random draws, which averaging would squeeze towards
    0.5 in big groups). Ties: first position; NaN lowest.
    Returns the new flat mask."""
    sizes = group_sizes(shapes, kind)
    was_live = _flat_group_means(live, sizes) > 0.5
    drop_key = np.nan_to_num(_per_group(drop, sizes), nan=-np.inf)
    grow_key = _per_group(grow, sizes)
    n_live = int(was_live.sum())
    n_die = min(n_live - int(n_live * (1 - death_rate)), int((~was_live).sum()))
    live_idx = np.flatnonzero(was_live)
    survive = was_live.copy()
    survive[live_idx[np.argsort(drop_key[live_idx], kind="stable")[:n_die]]] = False
    may_grow = ~was_live & (group_owner(shapes, kind) >= grow_from)
    grown = best_first_fit(grow_key, sizes, budget - int(sizes[survive].sum()), among=may_grow)
    return expand_groups(survive | grown, sizes, live.device)


def nm_drop_grow(
    live: Tensor, shapes: Sequence[Sequence[int]], n: int, m: int, drop: Tensor, grow: Tensor, death_rate: float
) -> Tensor:
    """SSAM-D's update that keeps the N:M pattern. All arguments flat in flat order. Of the L live entries of the
    weights that have blocks, ``L - int(L * (1 - death_rate))`` die: the lowest ``drop`` scores, at most
    min(live, dead) per block so that each can be replaced; each block then regrows as many entries as died in it,
    among its entries dead before the update, by highest ``grow`` score. 1-D tensors stay fully live. Ties: first
    position. Returns the new flat mask."""
    out = live.clone()
    views, candidates, values = [], [], []
    offset = 0
    for shape in shapes:
        numel = math.prod(shape)
        blocks = _nm_blocks(shape, n, m)
        if blocks is not None:
            b, size, keep = blocks
            sl = slice(offset, offset + numel)
            lv = live[sl].reshape(b, size)
            cap = min(keep, size - keep)
            # rank among the live by ascending drop score: dead entries rank after every live one
            rank = _rank_desc(torch.where(lv, -drop[sl].reshape(b, size).float(), -math.inf))
            eligible = lv & (rank < cap)
            views.append((sl, b, size, lv))
            candidates.append(eligible.reshape(-1).nonzero().squeeze(1) + offset)
            values.append(drop[sl][eligible.reshape(-1)].float())
        offset += numel
    if not views:
        return out
    n_live = sum(int(lv.sum()) for _, _, _, lv in views)
    n_die = n_live - int(n_live * (1 - death_rate))
    cand, vals = torch.cat(candidates), torch.nan_to_num(torch.cat(values), nan=-math.inf)
    dying = cand[torch.sort(vals, stable=True).indices[:n_die]]
    died = torch.zeros_like(live)
    died[dying] = True
    for sl, b, size, lv in views:
        per_block = died[sl].reshape(b, size).sum(1, keepdim=True)
        rank = _rank_desc(torch.where(lv, -math.inf, grow[sl].reshape(b, size).float()))
        grown = ~lv & (rank < per_block)
        out[sl] = ((lv & ~died[sl].reshape(b, size)) | grown).reshape(-1)
    return out


def random_mask(
    shapes: Sequence[Sequence[int]], gran: Granularity, budget: int, cost_aware: bool, generator: torch.Generator
) -> tuple[Tensor, int]:
    """SSAM-D's initial flat mask for channel, tensor or N:M granularity, drawn from ``generator``, and the
    cost-aware cut (0 without it): random group keys for groups (one draw per group, whatever its size), random
    entry scores for N:M."""
    device = generator.device
    if gran.kind == "nm":
        numels = [math.prod(s) for s in shapes]
        draws = torch.rand(sum(numels), generator=generator, device=device).split(numels)
        return nm_mask([d.view(s) for d, s in zip(draws, shapes)], gran.n, gran.m), 0
    keys = torch.rand(group_sizes(shapes, gran.kind).size, generator=generator, device=device).double().cpu().numpy()
    return fit_groups(keys, shapes, gran.kind, budget, cost_aware, device)


def drop_and_grow(
    live: Tensor,
    shapes: Sequence[Sequence[int]],
    gran: Granularity,
    drop: np.ndarray | Tensor,
    grow: np.ndarray | Tensor,
    budget: int,
    death_rate: float,
    grow_from: int = 0,
) -> Tensor:
    """SSAM-D's update for channel, tensor (``group_drop_grow``) or N:M (``nm_drop_grow``) granularity."""
    if gran.kind == "nm":
        assert isinstance(drop, Tensor) and isinstance(grow, Tensor)  # N:M scores entries, never groups
        return nm_drop_grow(live, shapes, gran.n, gran.m, drop, grow, death_rate)
    return group_drop_grow(live, shapes, gran.kind, drop, grow, budget, death_rate, grow_from)

"""Mask granularity for sparse SAM: which entries live and die together. Pure functions over tensors.

Granularities (``parse_granularity``):

- ``element``: every entry on its own (the paper's rule; handled by ``ssam.optim.select``).
- ``channel``: a group is one index along dim 0 of a parameter: an output channel (a row) of a weight, and one
  entry of a 1-D parameter (a bias or normalisation entry is scored on its own). Pairing a bias or BN entry with
  "its" output channel needs the module graph (which BN follows which conv), which an optimizer does not see; a
  1-entry group costs one place of the budget and competes on its own score, as it does with ``element``.
- ``tensor``: a group is a whole parameter tensor (the journal code's structured mask).
- ``N:M``: in each run of M consecutive weights along the reduction dimension (in_features of a linear row;
  in_channels x kh x kw of a conv output channel) the N best-scored are live; see ``nm_mask``.

Flat order (as ``SSAMF``/``SSAMD`` lay out their masks): parameters concatenated in param-group order, each flattened
in its logical row-major order, whatever its memory layout. Channel and tensor groups are contiguous runs of that
order, so a granularity is just a list of run lengths (``group_sizes``).

Group score = the MEAN of its entries' scores. The budget counts entries, so a group's price is its size and its
worth is the sum of its scores; going best-first by sum / size (the mean) is the greedy value-per-weight rule for a
knapsack. A sum would rank a big group first because it is big and let it eat the budget; the mean is also the
journal's rule for tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .select import device_top_k_mask

__all__ = [
    "Granularity",
    "GRANULARITY_WORDS",
    "parse_granularity",
    "group_sizes",
    "group_owner",
    "group_means",
    "cost_aware_cut",
    "best_first_fit",
    "expand_groups",
    "fit_groups",
    "structured_mask",
    "nm_mask",
    "resolve",
    "mask_from_scores",
]

GRANULARITY_WORDS = ("element", "channel", "tensor")
_NM_FORM = re.compile(r"(\d+):(\d+)")
_ALLOWED = "'element', 'channel', 'tensor', or 'N:M' with integers 1 <= N < M (e.g. '2:4')"


@dataclass(frozen=True)
class Granularity:
    """``kind`` is one of GRANULARITY_WORDS or "nm" (then ``n`` of every ``m`` are live)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def grouped(self) -> bool:
        """Whether whole groups live and die together (channel, tensor)."""
        return self.kind in ("channel", "tensor")

    @property
    def implied_sparsity(self) -> float | None:
        """1 - N/M for N:M (the fraction of the weights not perturbed), else None."""
        return 1 - self.n / self.m if self.kind == "nm" else None


def parse_granularity(value: object) -> Granularity:
    """'element' | 'channel' | 'tensor' | 'N:M' (1 <= N < M; 'M:M' would perturb everything) -> Granularity."""
    if isinstance(value, Granularity):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in GRANULARITY_WORDS:
            return Granularity(text)
        form = _NM_FORM.fullmatch(text)
        if form is not None and 1 <= int(form[1]) < int(form[2]):
            return Granularity("nm", int(form[1]), int(form[2]))
    raise ValueError(f"granularity: got {value!r}; allowed: {_ALLOWED}")


# ------------------------------------------------------------------ channel and tensor groups
def _rows(shape: Sequence[int], kind: str) -> int:
    """Number of groups a tensor of this shape splits into."""
    if math.prod(shape) == 0:
        return 0
    return 1 if kind == "tensor" or len(shape) == 0 else int(shape[0])


def group_sizes(shapes: Sequence[Sequence[int]], kind: str) -> np.ndarray:
    """Entries per group, groups in flat order (int64). Empty tensors have no group."""
    parts = [np.full(_rows(s, kind), math.prod(s) // max(1, _rows(s, kind)), dtype=np.int64) for s in shapes]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def group_owner(shapes: Sequence[Sequence[int]], kind: str) -> np.ndarray:
    """Index of the tensor each group belongs to (int64, groups in flat order)."""
    parts = [np.full(_rows(s, kind), i, dtype=np.int64) for i, s in enumerate(shapes)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def group_means(scores: Sequence[Tensor], kind: str) -> np.ndarray:
    """Mean score of every group (float64, flat order; one host transfer). Scores are read in logical order."""
    parts = [s.detach().reshape(_rows(s.shape, kind), -1).float().mean(1) for s in scores if s.numel() > 0]
    if not parts:
        return np.zeros(0)
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts]).cpu().double().numpy()


def best_first_fit(keys: np.ndarray, sizes: np.ndarray, budget: int, among: np.ndarray | None = None) -> np.ndarray:
    """Groups chosen best-first (highest key; ties: first position; NaN lowest), each taken if it still fits in
    what is left of ``budget`` entries: a group too big is skipped and smaller ones after it may still fit.
    With ``among`` only those groups compete. Returns a bool array over the groups.

    Same result as the one-by-one loop, in rounds: the budget left only shrinks, so a group bigger than it now can
    never fit later and is dropped at once; of the rest, the longest prefix whose sizes add up within the budget is
    taken in one step, and the group after that prefix is the one that does not fit.
    """
    keys = np.nan_to_num(np.asarray(keys, dtype=np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(-keys, kind="stable")
    if among is not None:
        order = order[np.asarray(among, dtype=bool)[order]]
    chosen = np.zeros(keys.size, dtype=bool)
    left = int(budget)
    while order.size and left > 0:
        order = order[sizes[order] <= left]
        if not order.size:
            break
        total = np.cumsum(sizes[order])
        fit = int(np.searchsorted(total, left, side="right"))  # >= 1: the first group is no bigger than left
        chosen[order[:fit]] = True
        left -= int(total[fit - 1])
        order = order[fit + 1 :]
    return chosen


def expand_groups(chosen: np.ndarray, sizes: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """Flat bool mask over the entries: every entry of a chosen group True."""
    # numpy's repeat rather than torch.repeat_interleave: on a CPU the latter is about 70x slower for 11 M entries
    return torch.from_numpy(np.repeat(np.asarray(chosen, dtype=bool), np.asarray(sizes, dtype=np.int64))).to(device)


def cost_aware_cut(keys: np.ndarray, sizes: np.ndarray, owner: np.ndarray, budget: int) -> int:
    """The first tensor (in the order given, taken as forward order) that ``cost_aware`` lets be live: the deepest
    cut c such that the best-first fit among the groups of tensors c, c+1, ... still fills half the budget (or, when
    the unrestricted fit keeps less, as much as it). The backward of the first pass must run from the head down to
    the earliest live tensor, so a later cut is less work; within the suffix the scores choose, as by default.

    Why a constraint and not a score-per-work rate: on ResNet-18 (CIFAR shape, 64 examples) the mean Fisher per entry
    falls about 10,000-fold from the stem (4e0) to the last convolutions (2e-4), while the backward work per layer is
    about flat; a rate such as mean score / layers crossed still picks the stem at every sparsity (measured), so the
    backward still runs to the input. Holding the density to at least half of what was asked bounds what the cut
    can give away; the density reached is reported by mask_density()/mask_stats().
    """
    full = int(sizes[best_first_fit(keys, sizes, budget)].sum())
    target = min(full, (int(budget) + 1) // 2)
    for cut in range(int(owner.max()) if owner.size else 0, 0, -1):
        if int(sizes[best_first_fit(keys, sizes, budget, among=owner >= cut)].sum()) >= target:
            return cut
    return 0


def fit_groups(
    keys: np.ndarray,
    shapes: Sequence[Sequence[int]],
    kind: str,
    budget: int,
    cost_aware: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, int]:
    """Flat bool mask of the groups chosen best-first-fit by ``keys`` (one per group), at most ``budget`` entries,
    and the first tensor allowed to be live (``cost_aware_cut`` with ``cost_aware``, else 0)."""
    sizes = group_sizes(shapes, kind)
    cut = cost_aware_cut(keys, sizes, group_owner(shapes, kind), budget) if cost_aware else 0
    among = group_owner(shapes, kind) >= cut if cut else None
    return expand_groups(best_first_fit(keys, sizes, budget, among), sizes, device), cut


def structured_mask(scores: Sequence[Tensor], kind: str, budget: int, cost_aware: bool = False) -> Tensor:
    """Flat bool mask (on the scores' device) of the channel or tensor groups chosen best-first-fit by mean score,
    at most ``budget`` entries live; with ``cost_aware`` only among the tensors from ``cost_aware_cut`` on."""
    shapes = [tuple(s.shape) for s in scores]
    return fit_groups(group_means(scores, kind), shapes, kind, budget, cost_aware, scores[0].device)[0]


def _per_group(score: np.ndarray | Tensor, sizes: np.ndarray) -> np.ndarray:
    return np.asarray(score, dtype=np.float64) if isinstance(score, np.ndarray) else _flat_group_means(score, sizes)


def _flat_group_means(flat: Tensor, sizes: np.ndarray) -> np.ndarray:
    """Mean of a flat tensor over consecutive runs of ``sizes`` entries (float64 numpy)."""
    flat = flat.detach().reshape(-1).float()
    ids = torch.repeat_interleave(torch.arange(sizes.size, device=flat.device), torch.from_numpy(sizes).to(flat.device))
    sums = torch.zeros(sizes.size, dtype=torch.float64, device=flat.device).index_add_(0, ids, flat.double())
    return (sums.cpu() / torch.from_numpy(sizes).double()).numpy()


# ------------------------------------------------------------------ N:M
def _nm_blocks(shape: Sequence[int], n: int, m: int) -> tuple[int, int, int] | None:
    """How a tensor splits for N:M: (blocks, block size, live per block); None for a fully live tensor (dim < 2).
    A weight whose reduction size R is a multiple of M splits into runs of M along each row; any other weight is one
    block of all its entries with int(numel * N / M) live (the element-wise rule at density N/M)."""
    if len(shape) < 2 or math.prod(shape) == 0:
        return None
    numel = math.prod(shape)
    reduction = numel // shape[0]
    if reduction % m == 0:
        return numel // m, m, n
    return 1, numel, numel * n // m


def _rank_desc(score: Tensor) -> Tensor:
    """Per row of a 2-D score, each entry's rank from the highest (0); NaN lowest; ties: first position."""
    key = torch.nan_to_num(score.float(), nan=-math.inf)
    order = torch.sort(-key, dim=1, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))


def nm_mask(scores: Sequence[Tensor], n: int, m: int) -> Tensor:
    """Flat bool mask: in every run of M consecutive weights along a weight's reduction dimension, the N with the
    highest scores are live (ties: first position; NaN lowest). 1-D tensors are fully live; a weight whose reduction
    size is not a multiple of M keeps its int(numel * N / M) best entries. Scores are read in their logical shape
    (out, in, kh, kw) whatever their memory layout (channels_last included), so the pattern follows the scores."""
    pieces = []
    for s in scores:
        blocks = _nm_blocks(tuple(s.shape), n, m)
        if blocks is None:
            pieces.append(torch.ones(s.numel(), dtype=torch.bool, device=s.device))
        elif blocks[0] == 1:
            flat = torch.nan_to_num(s.detach().reshape(-1).float(), nan=-math.inf)
            pieces.append(device_top_k_mask(flat, blocks[2]))
        else:
            pieces.append((_rank_desc(s.detach().reshape(blocks[0], blocks[1])) < blocks[2]).reshape(-1))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)


# ------------------------------------------------------------------ what SSAMF and SSAMD call
def resolve(
    granularity: object, sparsity: float | None, cost_aware: object, default_sparsity: float = 0.5
) -> tuple[Granularity, float | int]:
    """Check the granularity keywords of SSAMF/SSAMD; return the granularity and the sparsity to use.

    ``sparsity=None`` means the library default (0.5), or for N:M the implied 1 - N/M; an explicit sparsity that
    differs from the implied one is an error (it could not be honoured)."""
    gran = parse_granularity(granularity)
    if not isinstance(cost_aware, bool):
        raise ValueError(f"cost_aware: got {cost_aware!r}; allowed: True or False")
    if cost_aware and not gran.grouped:
        raise ValueError(
            f"cost_aware: got True with granularity={str(gran)!r}; allowed: True only with 'channel' "
            "or 'tensor' granularity"
        )
    implied = gran.implied_sparsity
    if implied is None:
        return gran, default_sparsity if sparsity is None else sparsity
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and math.isclose(sparsity, implied)):
        raise ValueError(
            f"sparsity: got {sparsity!r} with granularity={str(gran)!r}, which implies {implied:g}; "
            f"allowed: None (implied) or {implied:g}"
        )
    return gran, implied


def mask_from_scores(scores: Sequence[Tensor], gran: Granularity, budget: int, cost_aware: bool = False) -> Tensor:
    """SSAM-F's flat mask for channel, tensor or N:M granularity (element is ``select.top_k_mask``)."""
    if gran.kind == "nm":
        return nm_mask(scores, gran.n, gran.m)
    return structured_mask(scores, gran.kind, budget, cost_aware)

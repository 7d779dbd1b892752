"""What every framework integration does the same way: find the SAM optimizers and refresh their masks.

Mask refresh follows the optimizers' protocol (``opt.mask_refresh``): ``"before_epoch"`` (SSAM-F) is refreshed
here from a Fisher sample; ``"first_backward"`` (SSAM-D) by ``refresh_after_first_backward`` once the gradient at w
of the epoch's first step is in ``.grad``.

The Fisher examples of an epoch depend only on ``(seed, epoch)``, as in ``ssam train``: a resumed run and every
distributed rank draw the same ones. With several ranks each measures its own share and the sums are all-reduced,
so every rank builds the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..optim.sam import SAM

__all__ = ["sam_optimizers", "fisher_sample", "refresh_before_epoch", "refresh_after_first_backward", "mask_density"]


def sam_optimizers(optimizers: Iterable[Any]) -> list[SAM]:
    """The SAM-type optimizers among ``optimizers`` (unwrapping Lightning's and accelerate's wrappers)."""
    out = []
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)  # LightningOptimizer / AcceleratedOptimizer hold the real one here
        inner = getattr(inner, "_optimizer", inner)
        if isinstance(inner, SAM):
            out.append(inner)
    return out


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    for t in tensors:
        dist.all_reduce(t)
    return tensors


class _OneBatch:
    """An iterable of one batch, collated only when iterated: ``refresh_mask`` reads it only on epochs it updates."""

    def __init__(self, dataset: Any, indices: list[int], collate: Callable[[list], Any]) -> None:
        self.dataset, self.indices, self.collate = dataset, indices, collate

    def __iter__(self) -> Iterator[Any]:
        if self.indices:
            yield self.collate([self.dataset[i] for i in self.indices])


def fisher_sample(
    dataset: Any, num_samples: int, seed: int, epoch: int, collate: Callable[[list], Any] = default_collate
) -> tuple[Iterable, Callable | None]:
    """This rank's share of the epoch's Fisher examples as one batch (collated when iterated), and the reduce hook
    that sums the shares.

    ``dataset`` is map-style (examples chosen at random by a generator seeded from ``(seed, epoch)``) or an iterable
    of batches (used as given: every rank then measures the same first ``num_samples`` examples, no reduce).
    """
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return dataset, None
    if len(dataset) == 0:
        raise ValueError("fisher_data: the dataset is empty; allowed: a dataset with at least one example")
    rank, world = _rank_world()
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    chosen = torch.randperm(len(dataset), generator=g)[:num_samples].tolist()
    shard = chosen[rank::world]
    return _OneBatch(dataset, shard, collate), (_all_reduce_sum if world > 1 else None)


def refresh_before_epoch(
    opt: SAM,
    epoch: int,
    model: nn.Module,
    dataset: Any,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    collate: Callable[[list], Any] = default_collate,
) -> bool:
    """SSAM-F: recompute the mask when the epoch is on its update grid, or when there is none yet (a run started
    off the grid). False, and nothing done, for optimizers that refresh otherwise or not at all."""
    if getattr(opt, "mask_refresh", None) != "before_epoch":
        return False
    data, reduce = fisher_sample(dataset, opt.num_samples, seed, epoch, collate)
    return bool(opt.refresh_mask(epoch, model=model, data=data, reduce=reduce, loss_fn=loss_fn))


def refresh_after_first_backward(opt: SAM, epoch: int) -> bool:
    """SSAM-D: drop-and-grow from the gradient now in ``.grad`` (the epoch's first step, at w)."""
    if getattr(opt, "mask_refresh", None) != "first_backward":
        return False
    return bool(opt.refresh_mask(epoch))


def mask_density(opt: SAM) -> float | None:
    """Fraction of entries perturbed, or None for dense SAM (a host sync: once per epoch, not per step)."""
    density = getattr(opt, "mask_density", None)
    return float(density()) if density is not None else None

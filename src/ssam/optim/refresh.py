"""The mask refresh protocol, once: what ``ssam train``, the Lightning callback and the Hugging Face trainer call.

An optimizer says how its mask is refreshed in ``mask_refresh``: ``"before_epoch"`` (SSAM-F: a Fisher from a sample
of training examples, before the epoch's first step) or ``"first_backward"`` (SSAM-D: drop and grow from the
gradient at w of the epoch's first step, after its first backward). The Fisher examples of an epoch depend only on
``(seed, epoch)``, so a resumed run and every distributed rank draw the same ones; each rank measures its share
and one all-reduce sums the Fisher, so every rank builds the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import default_collate

from .sparse import SparseSAM
from .ssamf import SSAMF

__all__ = [
    "fisher_indices",
    "FisherSample",
    "fisher_sample",
    "all_reduce_sum",
    "refresh_before_epoch",
    "refresh_after_first_backward",
]


def fisher_indices(n: int, num_samples: int, seed: int, epoch: int) -> list[int]:
    """The examples of ``range(n)`` whose Fisher an epoch measures (all ranks together), a function of its inputs."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)[:num_samples].tolist()


class FisherSample:
    """This rank's share of an epoch's Fisher examples as one batch, collated only when iterated (``refresh_mask``
    reads it only on the epochs that update)."""

    def __init__(
        self,
        dataset: Any,
        num_samples: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        collate: Callable[[list], Any] = default_collate,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("fisher data: the dataset is empty; allowed: a dataset with at least one example")
        self.dataset, self.collate = dataset, collate
        self.indices = fisher_indices(len(dataset), num_samples, seed, epoch)[rank::world]

    def __iter__(self) -> Iterator[Any]:
        if self.indices:
            yield self.collate([self.dataset[i] for i in self.indices])


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum per-parameter tensors over the ranks with one collective; returns new tensors."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fisher_sample(
    dataset: Any,
    num_samples: int,
    seed: int,
    epoch: int,
    collate: Callable[[list], Any] = default_collate,
    rank_world: tuple[int, int] | None = None,
) -> tuple[Iterable, Callable | None]:
    """This rank's share of the epoch's Fisher examples, and the reduce hook that sums the shares (None alone).

    ``dataset`` is map-style, or an iterable of batches (used as given: every rank then measures the same first
    ``num_samples`` examples, no reduce). ``rank_world``: default the initialised process group's, else (0, 1).
    """
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return dataset, None
    rank, world = rank_world if rank_world is not None else _rank_world()
    sample = FisherSample(dataset, num_samples, seed, epoch, rank, world, collate)
    return sample, (all_reduce_sum if world > 1 else None)


def refresh_before_epoch(
    opt: torch.optim.Optimizer,
    epoch: int,
    model: nn.Module,
    dataset: Any,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    collate: Callable[[list], Any] = default_collate,
    rank_world: tuple[int, int] | None = None,
) -> bool:
    """SSAM-F: recompute the mask when the epoch is on its update grid, or when there is none yet (a run started
    off the grid); True when it did. False, and nothing done, for optimizers that refresh otherwise or not at all."""
    if not isinstance(opt, SSAMF) or opt.mask_refresh != "before_epoch":
        return False
    data, reduce = fisher_sample(dataset, opt.num_samples, seed, epoch, collate, rank_world)
    return bool(opt.refresh_mask(epoch, model=model, data=data, reduce=reduce, loss_fn=loss_fn))


def refresh_after_first_backward(opt: torch.optim.Optimizer, epoch: int) -> bool:
    """SSAM-D: drop and grow from the gradient now in ``.grad`` (the epoch's first step, at w); True when it did."""
    if not isinstance(opt, SparseSAM) or opt.mask_refresh != "first_backward":
        return False
    return bool(opt.refresh_mask(epoch))

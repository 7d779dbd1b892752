"""What every framework integration does the same way: find the SAM optimizers and refresh their masks.

Mask refresh is the optimizers' protocol, written once in ``ssam.optim.refresh`` (re-exported here): the same calls
as ``ssam train``, with the same Fisher examples per ``(seed, epoch)`` and one all-reduce of the Fisher.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..optim.refresh import fisher_sample, refresh_after_first_backward, refresh_before_epoch
from ..optim.sam import SAM
from ..optim.sparse import SparseSAM

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


def mask_density(opt: SAM) -> float | None:
    """Fraction of entries perturbed, or None for dense SAM (a host sync: once per epoch, not per step)."""
    return float(opt.mask_density()) if isinstance(opt, SparseSAM) else None

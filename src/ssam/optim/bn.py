"""BatchNorm running statistics around SAM's second pass.

The batch at w + e is the same batch already counted at w, and a perturbed model's activations are not the
statistics the model should remember; so the second forward pass should leave the running statistics alone. In
training mode BatchNorm still normalises with the batch's own statistics, so the gradient is unchanged.

Mechanism: ``track_running_stats=False`` on every BatchNorm that tracks statistics. A training-mode forward then
uses batch statistics and skips the update (running mean/var and ``num_batches_tracked`` all stay as they were,
whatever the momentum, ``None`` included); an eval-mode forward still uses the running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["frozen_bn_stats", "disable_running_stats", "enable_running_stats"]

_MARK = "_ssam_running_stats_disabled"  # set on the modules disable_running_stats turned off


def _freeze(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """Turn off every tracking BatchNorm's updates; return the modules changed."""
    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    return changed


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run forward passes in training mode without updating BatchNorm running statistics (around pass two)."""
    changed = _freeze(model)
    try:
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm running-statistics updates until ``enable_running_stats(model)``: the counterpart of
    davda54/sam's function of the same name (which sets the momentum to 0) for code migrating from it. Calling it
    twice is harmless. ``with frozen_bn_stats(model):`` does the same for one block."""
    for m in _freeze(model):
        setattr(m, _MARK, True)


def enable_running_stats(model: nn.Module) -> None:
    """Undo ``disable_running_stats(model)``: the BatchNorms it turned off update their statistics again (and only
    those; a BatchNorm built with ``track_running_stats=False`` stays so)."""
    for m in model.modules():
        if getattr(m, _MARK, False) and isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = True
            delattr(m, _MARK)

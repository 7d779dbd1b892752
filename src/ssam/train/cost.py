"""What a training step costs in forward + backward passes over its examples (SGD 1, SAM 2): a count that the noise
of a shared machine does not move, reported beside the wall time.

A pass that computes every gradient counts 1. A first pass that skips tensors (``--skip_dead``: tensors without a
live mask entry take no gradient) is counted with a work model, not measured: a pass is one part forward, one part
input gradients, one part weight gradients (a backward costs about two forwards), each part spread over the
parameter tensors in proportion to their sizes. A skipping pass keeps the whole forward, the weight gradients of
the live tensors, and the input gradients of the tensors that have a live tensor before them in the model's
parameter order (backward must reach it); the model of a full pass is the unit. Exact in FLOPs for a stack of
linear layers (the MLP of the memorization recipe); for convolutions, parameter sizes stand in for FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["pass_cost"]

FORWARD = INPUT_GRAD = WEIGHT_GRAD = 1.0


def _work(sizes: Sequence[int], live: Sequence[bool]) -> float:
    input_part = weight_part = 0
    seen_live = False
    for n, on in zip(sizes, live):
        if seen_live:
            input_part += n
        if on:
            weight_part += n
            seen_live = True
    total = max(1, sum(sizes))
    return FORWARD + INPUT_GRAD * input_part / total + WEIGHT_GRAD * weight_part / total


def pass_cost(params: Sequence[Tensor], live: Sequence[bool]) -> float:
    """One pass's cost relative to a full one, when only the tensors with ``live`` True take a gradient."""
    sizes = [p.numel() for p in params]
    return _work(sizes, live) / _work(sizes, [True] * len(sizes))

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
from typing import Any

from torch import Tensor

__all__ = ["pass_cost", "step_passes"]

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


def step_passes(
    ascend: bool, chunked: bool, first_backward: bool, direction: Any, first_pass: float, sizes: Sequence[int]
) -> float:
    """Passes per example of one trainer step: a plain step 1; m-sharpness 2 (a skipping first pass not modelled),
    plus 1 for the refresh's pass over the batch; a one-pass direction 1; a sub-batch 1 + its share of the batch
    (ceil(F * b) of each micro-batch of ``sizes`` examples); else ``first_pass`` (1, or a skipping pass's cost) + 1."""
    if not ascend:
        return 1.0
    if chunked:
        return 2.0 + float(first_backward)
    if direction is not None and direction.one_pass:
        return 1.0
    if direction is not None and direction.kind == "subbatch":
        return 1.0 + sum(direction.pass_one_size(s) for s in sizes) / sum(sizes)
    return first_pass + 1.0

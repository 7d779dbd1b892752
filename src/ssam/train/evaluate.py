"""Evaluation: loss and top-1/top-5 accuracy of a model over a loader, in eval mode, optionally collecting the
predicted classes (the memorization measure reads them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batch_sums", "evaluate"]


def batch_sums(loss_sum: torch.Tensor, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A batch's running sums, float64 on the batch's device: (loss summed over the examples, top-1 hits, top-5
    hits, examples); the train loop and the evaluation add them up the same way."""
    hit = outputs.topk(min(5, outputs.shape[1]), 1).indices == y[:, None]
    count = torch.tensor(float(len(y)), device=outputs.device, dtype=torch.float64)
    return torch.stack([loss_sum.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(), count])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    channels_last: bool = False,
    limit: int = 0,
    run: bool = True,
    reduce: Callable[[torch.Tensor], None] | None = None,
    prefix: str = "test",
    predictions: list | None = None,
) -> dict:
    """``{prefix}_loss``, ``{prefix}_acc1``, ``{prefix}_acc5`` over ``loader`` (at most ``limit`` batches; 0: all).

    run: whether this process evaluates (under DDP only some ranks do); reduce: combines the sums of the ranks in
    place (an all-reduce, or a broadcast from the rank that evaluated). predictions, if given, collects the
    predicted classes batch by batch, on the CPU.
    """
    was = model.training
    model.eval()
    tot = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    if run:
        for i, (x, y) in enumerate(loader):
            if limit and i >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(x)
            if predictions is not None:
                predictions.append(out.argmax(1).cpu())
            tot += batch_sums(F.cross_entropy(out.float(), y, reduction="sum"), out, y)
    if reduce is not None:
        reduce(tot)
    model.train(was)
    n = max(tot[3].item(), 1)
    return {
        f"{prefix}_loss": tot[0].item() / n,
        f"{prefix}_acc1": 100 * tot[1].item() / n,
        f"{prefix}_acc5": 100 * tot[2].item() / n,
    }

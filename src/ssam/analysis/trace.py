"""Hutchinson estimate of the Hessian trace."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .eigen import check_positive, check_tol
from .operator import HessianOperator, Progress, analysis_mode
from .params import resolve_params

__all__ = ["hessian_trace"]


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    max_iter: int = 200,
    tol: float = 1e-3,
    params: Any = None,
    seed: int = 0,
    device: Any = None,
    min_samples: int = 10,
    vectors_per_pass: int = 4,
    progress: Progress = None,
    graph_memory: int | None = None,
) -> tuple[float, float, int]:
    """Hutchinson estimate ``E[vᵀHv]`` with Rademacher ``v``: returns ``(trace, stderr, n_samples)``.

    Sampling stops once at least ``min_samples`` are drawn and the standard error of the mean is below
    ``tol·|mean|``, or after ``max_iter`` samples (``tol=0``: exactly ``max_iter``).  The stopping rule is
    checked every ``vectors_per_pass`` samples; batches whose graph is not cached (``graph_memory``, see
    :class:`HessianOperator`) build it once per pass for all its vectors.  Each sample's value does not
    depend on either setting: the k-th sample is always ``vₖᵀHvₖ`` for the k-th vector drawn from ``seed``.
    """
    check_positive("max_iter", max_iter)
    check_positive("vectors_per_pass", vectors_per_pass)
    check_tol("tol", tol)
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    gen = torch.Generator().manual_seed(int(seed))
    samples: list[float] = []
    min_samples = max(2, min(int(min_samples), int(max_iter)))
    with (
        analysis_mode(model, plist, device) as dev,
        HessianOperator(model, loss_fn, batches, plist, dev, progress, graph_memory) as op,
    ):
        while len(samples) < max_iter:
            vs = [op.random(gen, "rademacher") for _ in range(min(vectors_per_pass, max_iter - len(samples)))]
            hvs = op.matvec(vs)
            # One host transfer per pass for all its samples.
            samples += torch.stack([torch.dot(v.double(), hv.double()) for v, hv in zip(vs, hvs)]).tolist()
            if len(samples) >= min_samples:
                mean = float(np.mean(samples))
                stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
                if tol > 0 and stderr <= tol * abs(mean):
                    break
    mean = float(np.mean(samples))
    stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return mean, stderr, len(samples)

"""Curvature of each diagonal block of the Hessian: one row per parameter tensor or per module."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .eigen import hessian_eigenvalues
from .operator import Progress
from .params import param_groups, resolve_params
from .trace import hessian_trace

__all__ = ["PER_LAYER_COLUMNS", "per_layer"]

PER_LAYER_COLUMNS = ["name", "numel", "lambda_max", "trace", "trace_stderr", "trace_samples"]


def per_layer(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    params: Any = None,
    by: str = "param",
    max_iter: int = 100,
    tol: float = 1e-4,
    trace_max_iter: int = 200,
    trace_tol: float = 1e-2,
    seed: int = 0,
    device: Any = None,
    progress: Progress = None,
    graph_memory: int | None = None,
) -> list[dict]:
    """Top eigenvalue and trace of each diagonal block of the Hessian, one block per parameter tensor
    (``by="param"``) or per module's own parameters (``by="module"``).

    Returns rows with the keys of ``PER_LAYER_COLUMNS``.
    """
    named = resolve_params(model, params)
    groups = param_groups(model, named, by)
    data = list(batches)
    rows = []
    for name, group in groups:
        lam = hessian_eigenvalues(
            model,
            loss_fn,
            data,
            top_k=1,
            max_iter=max_iter,
            tol=tol,
            params=group,
            seed=seed,
            device=device,
            progress=progress,
            graph_memory=graph_memory,
        )[0]
        tr, se, ns = hessian_trace(
            model,
            loss_fn,
            data,
            max_iter=trace_max_iter,
            tol=trace_tol,
            params=group,
            seed=seed,
            device=device,
            progress=progress,
            graph_memory=graph_memory,
        )
        rows.append(
            {
                "name": name,
                "numel": int(sum(p.numel() for p in group)),
                "lambda_max": lam,
                "trace": tr,
                "trace_stderr": se,
                "trace_samples": ns,
            }
        )
    return rows

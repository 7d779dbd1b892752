"""Scalar sharpness measures of a trained model, and the comparison table across runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from ..errors import UsageError
from .hessian import hessian_eigenvalues, hessian_trace
from .landscape import evaluate, evaluate_grid, random_direction

__all__ = ["TABLE_COLUMNS", "loss_increase", "markdown_table", "summarize_run"]


def loss_increase(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    radius: float = 0.05,
    n_directions: int = 5,
    seed: int = 0,
    ignore: str | None = "biasbn",
    norm: str | None = "filter",
    device: Any = None,
) -> dict[str, Any]:
    """Average loss increase ``L(w + r·d) - L(w)`` over random filter-normalised directions ``d``.

    ``d = random_direction(model, seed + i, ignore, norm)`` for ``i < n_directions``.  Because every filter
    of ``d`` has the norm of the weight's own filter, the step ``r·d`` moves each filter by ``r`` times its
    own norm: ``radius`` is a RELATIVE perturbation size, unaffected by rescaling the layers of a ReLU/BN
    network (which leaves the function unchanged).  Biases and BN parameters stay fixed under
    ``ignore="biasbn"``.

    Returns ``{"radius", "base_loss", "values", "mean", "std"}`` (``std`` with ``ddof=1``; 0 for one
    direction).
    """
    if int(n_directions) < 1:
        raise UsageError(f"n_directions={n_directions} must be a positive integer")
    if not (math.isfinite(radius) and radius > 0):
        raise UsageError(f"radius={radius} must be a positive number")
    base, _ = evaluate(model, loss_fn, batches, device=device)
    data = list(batches)
    values = []
    for i in range(int(n_directions)):
        d = random_direction(model, seed=int(seed) + i, ignore=ignore, norm=norm)
        values.append(float(evaluate_grid(model, loss_fn, data, d, [radius], device=device)["loss"][0]) - base)
    return {
        "radius": float(radius),
        "base_loss": base,
        "values": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


TABLE_COLUMNS = [
    "run",
    "test_acc1",
    "train_loss",
    "lambda_max",
    "trace",
    "trace_stderr",
    "loss_increase",
    "loss_increase_std",
]


def summarize_run(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    name: str,
    test_acc1: float | None = None,
    radius: float = 0.05,
    n_directions: int = 5,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    trace_max_iter: int = 200,
    trace_tol: float = 1e-2,
    ignore: str | None = "biasbn",
    device: Any = None,
    progress: Callable | None = None,
) -> dict:
    """One row of the sharpness table: λ_max, Hutchinson trace and the loss increase at ``radius``,
    all on the same batches (with ``TABLE_COLUMNS`` as keys, plus ``radius`` and ``trace_samples``)."""
    data = list(batches)
    lam = hessian_eigenvalues(
        model, loss_fn, data, top_k=1, max_iter=max_iter, tol=tol, seed=seed, device=device, progress=progress
    )[0]
    tr, se, ns = hessian_trace(
        model, loss_fn, data, max_iter=trace_max_iter, tol=trace_tol, seed=seed, device=device, progress=progress
    )
    inc = loss_increase(
        model, loss_fn, data, radius=radius, n_directions=n_directions, seed=seed, ignore=ignore, device=device
    )
    return {
        "run": name,
        "test_acc1": None if test_acc1 is None else float(test_acc1),
        "train_loss": inc["base_loss"],
        "lambda_max": lam,
        "trace": tr,
        "trace_stderr": se,
        "trace_samples": ns,
        "loss_increase": inc["mean"],
        "loss_increase_std": inc["std"],
        "radius": inc["radius"],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (missing values shown as ``-``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)

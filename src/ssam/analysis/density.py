"""Eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .eigen import Lanczos, check_positive
from .operator import HessianOperator, Progress, analysis_mode
from .params import resolve_params

__all__ = ["broaden", "hessian_density"]


def broaden(
    runs: list[tuple[np.ndarray, np.ndarray]], sigma: float | None, grid: int | Sequence[float]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Quadrature ``(nodes, weights)`` of each run -> ``(grid, density, sigma)``: the average over runs of
    ``Σ w·N(t; θ, sigma²)``, renormalised to integrate to 1 (trapezoid rule) on the grid."""
    lo_node = min(r[0].min() for r in runs)
    hi_node = max(r[0].max() for r in runs)
    width = hi_node - lo_node
    if sigma is None:
        scale = max(abs(r[0]).max() for r in runs)
        sigma = 0.01 * width if width > 0 else max(1e-3 * scale, 1e-12)
    sigma = float(sigma)
    if not sigma > 0:
        raise UsageError(f"sigma: got {sigma!r}; allowed: a number > 0")
    if isinstance(grid, (int, np.integer)):
        if grid < 2:
            raise UsageError(f"grid: got {grid!r}; allowed: at least 2 points")
        t = np.linspace(lo_node - 6 * sigma, hi_node + 6 * sigma, int(grid))
    else:
        t = np.asarray(grid, dtype=np.float64)
        if t.ndim != 1 or t.size < 2 or np.any(np.diff(t) <= 0):
            raise UsageError(
                "grid: got a sequence that is not increasing or has fewer than 2 points; "
                "allowed: an increasing 1-D sequence of at least 2 points"
            )
    density = np.zeros_like(t)
    for theta, w in runs:
        z = (t[:, None] - theta[None, :]) / sigma
        density += (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))) @ w
    density /= len(runs)
    mass = float(np.sum(0.5 * (density[1:] + density[:-1]) * np.diff(t)))
    if mass > 0:
        density /= mass
    return t, density, sigma


def hessian_density(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    n_iter: int = 100,
    n_v: int = 1,
    sigma: float | None = None,
    grid: int | Sequence[float] = 1000,
    params: Any = None,
    seed: int = 0,
    device: Any = None,
    return_nodes: bool = False,
    progress: Progress = None,
    graph_memory: int | None = None,
):
    """Eigenvalue density by stochastic Lanczos quadrature with Gaussian broadening.

    Each of ``n_v`` runs starts Lanczos from a normalised Gaussian vector and takes ``n_iter`` steps; the
    eigenvalues θ of the tridiagonal matrix are the quadrature nodes and the squared first components of
    its eigenvectors the weights.  The density is the average over runs of ``Σ w·N(t; θ, sigma²)``,
    renormalised to integrate to 1 (trapezoid rule) on the grid.

    ``sigma``: broadening width in eigenvalue units; default 1% of the node range.  ``grid``: number of
    points, spanning the nodes padded by 6·sigma each side, or explicit points.
    Returns ``(grid, density)`` numpy arrays, plus ``(nodes, weights)`` arrays of shape ``(n_v, n_iter)``
    (unused slots NaN / 0, after an early breakdown) when ``return_nodes`` is true.
    """
    check_positive("n_iter", n_iter)
    check_positive("n_v", n_v)
    if sigma is not None and not sigma > 0:
        raise UsageError(f"sigma: got {sigma!r}; allowed: None (1% of the spectral range) or a number > 0")
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    gen = torch.Generator().manual_seed(int(seed))
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    with (
        analysis_mode(model, plist, device) as dev,
        HessianOperator(model, loss_fn, batches, plist, dev, progress, graph_memory) as op,
    ):
        for _ in range(n_v):
            # No restart on breakdown: the quadrature is that of the Krylov space of THIS start vector.
            lz = Lanczos(op, op.random(gen), n_iter, restart=None)
            while lz.step():
                pass
            theta, S = lz.ritz()
            runs.append((theta, S[0, :] ** 2))
    t, density, _ = broaden(runs, sigma, grid)
    if not return_nodes:
        return t, density
    m = max(len(r[0]) for r in runs)
    nodes = np.full((n_v, m), np.nan)
    weights = np.zeros((n_v, m))
    for i, (theta, w) in enumerate(runs):
        nodes[i, : len(theta)] = theta
        weights[i, : len(w)] = w
    return t, density, nodes, weights

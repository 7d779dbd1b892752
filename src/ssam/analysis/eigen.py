"""Top Hessian eigenvalues: Lanczos with full re-orthogonalisation (default) or power iteration."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UsageError
from .operator import HessianOperator, Progress, analysis_mode
from .params import resolve_params

__all__ = ["hessian_eigenvalues"]


class Lanczos:
    """Lanczos with full re-orthogonalisation (twice, which is enough in floating point).

    On breakdown (the Krylov space became invariant) it either stops, which is right for quadrature, or
    restarts from a random vector orthogonal to the basis, which is what an eigen-solver needs to find
    repeated eigenvalues: ``T`` then gets a zero off-diagonal and stays the exact projection of ``H``.
    """

    def __init__(self, op: HessianOperator, v0: Tensor, max_steps: int, restart: torch.Generator | None = None):
        self.op = op
        self.m = min(max_steps, op.n)
        self.V = torch.empty(self.m, op.n, dtype=op.dtype, device=op.device)
        self.V[0] = v0 / v0.norm()
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.next_beta = 0.0
        self.k = 0
        self.restart = restart
        self.scale = 0.0

    def _orth(self, w: Tensor, upto: int) -> Tensor:
        basis = self.V[:upto]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(self) -> bool:
        """One product with ``H``; False when no further step is possible."""
        j = self.k
        v = self.V[j]
        w = self.op(v)
        a = torch.dot(w, v)
        w = w - a * v
        if j > 0:
            w = w - self.beta[j - 1] * self.V[j - 1]
        w = self._orth(w, j + 1)
        # alpha and beta reach the host together: one device synchronisation per step, not two.
        a_host, b = torch.stack([a, w.norm()]).tolist()
        self.alpha.append(a_host)
        self.k = j + 1
        self.next_beta = b
        self.scale = max(self.scale, abs(a_host) + b + (self.beta[-1] if self.beta else 0.0))
        if self.k >= self.m:
            return False
        if b <= 100 * torch.finfo(self.op.dtype).eps * max(self.scale, 1e-30):
            self.next_beta = 0.0
            if self.restart is None:
                return False
            r = self._orth(self.op.random(self.restart), self.k)
            self.V[self.k] = r / r.norm()
            self.beta.append(0.0)
        else:
            self.V[self.k] = w / b
            self.beta.append(b)
        return True

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of the tridiagonal ``T``."""
        k = self.k
        T = np.diag(np.asarray(self.alpha, dtype=np.float64))
        if k > 1:
            off = np.asarray(self.beta[: k - 1], dtype=np.float64)
            T += np.diag(off, 1) + np.diag(off, -1)
        return np.linalg.eigh(T)

    def vectors(self, S: np.ndarray) -> Tensor:
        return torch.from_numpy(S).to(self.V.dtype).to(self.V.device).T @ self.V[: self.k]


def _error_bounds(theta: np.ndarray, S: np.ndarray, next_beta: float, idx: np.ndarray, values_only: bool) -> np.ndarray:
    """How far each wanted Ritz value may be from an eigenvalue of ``H``.

    ``r = ||H y - θ y|| = β_{k+1} |s_k|`` (free of further products) bounds it (Weyl).  A Ritz value's error
    shrinks like ``r² / gap`` (Kato-Temple), ``gap`` the distance to the rest of the spectrum, here taken
    from the other Ritz values, so when only values are wanted the smaller of the two decides: the same
    accuracy of λ in fewer products.  An eigenvector's accuracy follows ``r`` itself.
    """
    resid = next_beta * np.abs(S[-1, idx])
    if not values_only or len(theta) < 2:
        return resid
    others = np.abs(theta[idx][:, None] - theta[None, :])
    others[np.arange(len(idx)), idx] = np.inf
    gap = others.min(axis=1)
    with np.errstate(divide="ignore", over="ignore"):
        return np.minimum(resid, np.where(gap > 0, resid * resid / np.where(gap > 0, gap, 1.0), np.inf))


def _lanczos_top(
    op: HessianOperator, top_k: int, max_iter: int, tol: float, gen: torch.Generator, values_only: bool = False
):
    lz = Lanczos(op, op.random(gen), max(max_iter, top_k), restart=gen)
    while True:
        more = lz.step()
        if lz.k >= top_k:
            theta, S = lz.ritz()
            idx = np.argsort(theta)[::-1][:top_k]
            err = _error_bounds(theta, S, lz.next_beta, idx, values_only)
            if np.all(err <= tol * np.maximum(np.abs(theta[idx]), 1e-30)) or not more:
                break
    if not np.all(err <= tol * np.maximum(np.abs(theta[idx]), 1e-30)) and lz.k < op.n:
        worst = float(np.max(err / np.maximum(np.abs(theta[idx]), 1e-30)))
        warnings.warn(
            f"Lanczos stopped after {lz.k} products without reaching tol={tol} "
            f"(largest relative error bound {worst:.2e})",
            RuntimeWarning,
            stacklevel=3,
        )
    return theta[idx].tolist(), lz.vectors(S[:, idx])


def _power_top(op: HessianOperator, top_k: int, max_iter: int, tol: float, gen: torch.Generator):
    found: list[Tensor] = []
    values: list[float] = []

    def deflate(w: Tensor) -> Tensor:
        for u in found:
            w = w - torch.dot(u, w) * u
        return w

    for _ in range(top_k):
        v = deflate(op.random(gen))
        v = v / v.norm()
        lam = None
        converged = False
        for _ in range(max_iter):
            w = deflate(op(v))
            new, norm = torch.stack([torch.dot(v, w), w.norm()]).tolist()
            if norm == 0.0:
                lam, converged = 0.0, True
                break
            v = deflate(w / norm)
            v = v / v.norm()
            if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
                lam, converged = new, True
                break
            lam = new
        if not converged:
            warnings.warn(
                f"power iteration for eigenvalue {len(found) + 1} did not converge in {max_iter} products",
                RuntimeWarning,
                stacklevel=3,
            )
        found.append(v)
        values.append(float(lam))
    return values, torch.stack(found)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name}: got {value!r}; allowed: an integer >= 1")


def check_tol(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise UsageError(f"{name}: got {value!r}; allowed: a number >= 0")


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    top_k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-6,
    params: Any = None,
    seed: int = 0,
    device: Any = None,
    method: str = "lanczos",
    return_eigenvectors: bool = False,
    progress: Progress = None,
    graph_memory: int | None = None,
):
    """The ``top_k`` largest Hessian eigenvalues, in descending order.

    ``method="lanczos"`` (default): Lanczos with full re-orthogonalisation, returning the algebraically
    largest eigenvalues.  It stops after ``max_iter`` products or once every wanted value is within
    ``tol·|θ|`` of an eigenvalue: by the residual ``||H y - θ y||`` when eigenvectors are returned, else by
    the smaller of the residual and ``residual² / gap`` (the gap to the other Ritz values; a Ritz value
    converges twice as fast as its vector).  It stores ``max_iter`` vectors of the parameter size.
    ``method="power"``: power iteration with deflation (each new vector is kept orthogonal to the
    eigenvectors already found); it needs only ``top_k`` stored vectors but finds the eigenvalues
    largest in MAGNITUDE, and stops when the Rayleigh quotient changes by less than ``tol`` relative.
    ``graph_memory``: bytes of batch graphs kept between products (see :class:`HessianOperator`).

    Returns a list of floats, or ``(eigenvalues, eigenvectors)`` with each eigenvector a list of tensors
    shaped like the parameters when ``return_eigenvectors`` is true.
    """
    check_positive("top_k", top_k)
    check_positive("max_iter", max_iter)
    check_tol("tol", tol)
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    n = sum(p.numel() for p in plist)
    if top_k > n:
        raise UsageError(f"top_k: got {top_k}; allowed: at most the number of parameters analysed ({n})")
    if method not in ("lanczos", "power"):
        raise UsageError(f"method: got {method!r}; allowed: 'lanczos' or 'power'")
    gen = torch.Generator().manual_seed(int(seed))
    with (
        analysis_mode(model, plist, device) as dev,
        HessianOperator(model, loss_fn, batches, plist, dev, progress, graph_memory) as op,
    ):
        if method == "lanczos":
            values, vecs = _lanczos_top(op, top_k, max_iter, tol, gen, values_only=not return_eigenvectors)
        else:
            values, vecs = _power_top(op, top_k, max_iter, tol, gen)
        vectors = [[t.detach().clone() for t in op.split(v)] for v in vecs] if return_eigenvectors else None
    return (values, vectors) if return_eigenvectors else values

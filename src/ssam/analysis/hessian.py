"""Curvature of the training loss: Hessian-vector products, top eigenvalues, trace and spectral density.

Every function here studies the Hessian of ONE well-defined scalar: the mean loss over a fixed list of
batches, each batch weighted by its size over the total, so that unequal batches (a short last batch)
give exactly the Hessian of the mean over all examples.  ``loss_fn(outputs, targets)`` must return the
batch MEAN (as ``nn.CrossEntropyLoss()`` does by default).

The model is put in eval mode while it is analysed, because in train mode BatchNorm would mix the
examples of a batch (the Hessian would then depend on how the data is batched) and would update its
running statistics.  Its modes, parameters, ``requires_grad`` flags and ``.grad`` fields are left as they
were: products are formed with ``torch.autograd.grad``, which never accumulates into ``.grad``.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UsageError

__all__ = [
    "HessianOperator",
    "analysis_mode",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "per_layer",
    "prepare_batches",
    "resolve_params",
    "select_params",
]

Progress = Callable[[int], Any] | None


# ----------------------------------------------------------------------------------------------- plumbing

def _to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _batch_len(targets: Any) -> int:
    if torch.is_tensor(targets):
        return int(targets.shape[0]) if targets.dim() else 1
    return len(targets)


def prepare_batches(batches: Iterable, device: torch.device) -> list[tuple[Any, Any, int, float]]:
    """Materialise ``batches`` on ``device`` as ``(inputs, targets, size, weight)`` with weights summing to 1.

    Materialising once fixes the data: a shuffling DataLoader passed in would otherwise give a different
    Hessian at every product, which breaks Lanczos and power iteration alike.
    """
    staged = []
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise UsageError(f"batch {i} is a {type(b).__name__}; each batch must be an (inputs, targets) pair")
        x, y = b
        staged.append((_to_device(x, device), _to_device(y, device), _batch_len(y)))
    total = sum(n for _, _, n in staged)
    if total == 0:
        raise UsageError("no data: the batches hold no examples")
    return [(x, y, n, n / total) for x, y, n in staged]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def analysis_mode(model: nn.Module, params: Sequence[Tensor] = (), device: Any = None) -> Iterator[torch.device]:
    """Eval mode (and ``device``, if given) for the duration; everything is put back on exit.

    Modes are restored module by module, since a caller may deliberately keep some submodules in eval
    mode while training.  ``params`` get ``requires_grad`` for the duration so that frozen parameters can
    still be analysed when asked for explicitly.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    original = _model_device(model)
    target = torch.device(device) if device is not None else original
    moved = target != original
    try:
        if moved:
            model.to(target)
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield target
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if moved:
            model.to(original)


def select_params(model: nn.Module, regex: str) -> list[nn.Parameter]:
    """The parameters whose qualified names match ``regex`` (``re.search``), in ``named_parameters`` order."""
    return [p for _, p in _select_named(model, regex)]


def _select_named(model: nn.Module, regex: str) -> list[tuple[str, nn.Parameter]]:
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise UsageError(f"--params {regex!r} is not a valid regular expression ({e})") from None
    named = [(n, p) for n, p in model.named_parameters() if pattern.search(n)]
    if not named:
        names = [n for n, _ in model.named_parameters()]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UsageError(f"--params {regex!r} matches no parameter name; names look like: {shown}")
    return named


def resolve_params(model: nn.Module, params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Normalise the ``params`` argument of the analysis functions to ``(name, parameter)`` pairs.

    ``None``: every parameter with ``requires_grad`` (what training moves).  A string: a regex on names.
    Otherwise an iterable of parameters or ``(name, parameter)`` pairs.
    """
    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UsageError("the model has no trainable parameters; pass params= to choose some")
        return named
    if isinstance(params, str):
        return _select_named(model, params)
    names = {id(p): n for n, p in model.named_parameters()}
    out, seen = [], set()
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            name, p = item
        else:
            p = item
            name = names.get(id(p), f"param{i}")
        if not torch.is_tensor(p):
            raise UsageError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise UsageError("params is empty")
    return out


# ------------------------------------------------------------------------------------------- the operator

class HessianOperator:
    """``v -> H v`` for the Hessian of the size-weighted mean loss with respect to ``params``.

    Vectors are flat 1-D tensors laid out as the concatenation of the parameters, so that the
    eigen-solvers can work with plain dot products.  Build it inside :func:`analysis_mode`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, params: Sequence[Tensor],
                 device: torch.device, progress: Progress = None):
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        self.batches = prepare_batches(batches, device)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.progress = progress
        self.calls = 0

    def _split(self, v: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes)]

    def _flat(self, parts: Sequence[Tensor | None]) -> Tensor:
        return torch.cat([
            (h.reshape(-1) if h is not None else torch.zeros(k, dtype=self.dtype, device=self.device))
            for h, k in zip(parts, self.numels)
        ])

    def matvec(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """``[H v for v in vs]``; the forward pass and first backward are shared by all vectors of a batch."""
        parts = [self._split(v) for v in vs]
        out = [torch.zeros(self.n, dtype=self.dtype, device=self.device) for _ in vs]
        with torch.enable_grad():
            for x, y, _, w in self.batches:
                loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                # A gradient without a graph is constant in the parameters: its block of H is zero.
                live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if not live:
                    continue
                for k, pv in enumerate(parts):
                    dot = sum((g * pv[i]).sum() for i, g in live)
                    hv = torch.autograd.grad(dot, self.params, retain_graph=k < len(parts) - 1, allow_unused=True)
                    out[k].add_(self._flat(hv).detach(), alpha=w)
        self.calls += len(vs)
        if self.progress is not None:
            self.progress(len(vs))
        return out

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec([v])[0]

    def random(self, gen: torch.Generator, kind: str = "gaussian") -> Tensor:
        # Drawn on the CPU so that a seed gives the same vectors on every device.
        if kind == "rademacher":
            v = torch.randint(0, 2, (self.n,), generator=gen).to(self.dtype).mul_(2).sub_(1)
        else:
            v = torch.randn(self.n, generator=gen, dtype=torch.float64).to(self.dtype)
        return v.to(self.device)


# -------------------------------------------------------------------------------------------------- Lanczos

class _Lanczos:
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
        a = float(torch.dot(w, v))
        w = w - a * v
        if j > 0:
            w = w - self.beta[j - 1] * self.V[j - 1]
        w = self._orth(w, j + 1)
        b = float(w.norm())
        self.alpha.append(a)
        self.k = j + 1
        self.next_beta = b
        self.scale = max(self.scale, abs(a) + b + (self.beta[-1] if self.beta else 0.0))
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


def _lanczos_top(op: HessianOperator, top_k: int, max_iter: int, tol: float, gen: torch.Generator):
    lz = _Lanczos(op, op.random(gen), max(max_iter, top_k), restart=gen)
    while True:
        more = lz.step()
        if lz.k >= top_k:
            theta, S = lz.ritz()
            idx = np.argsort(theta)[::-1][:top_k]
            # ||H y - theta y|| = beta_{k+1} |s_k|: the classic residual bound, free of further products.
            resid = lz.next_beta * np.abs(S[-1, idx])
            if np.all(resid <= tol * np.maximum(np.abs(theta[idx]), 1e-30)) or not more:
                break
    if not np.all(resid <= tol * np.maximum(np.abs(theta[idx]), 1e-30)) and lz.k < op.n:
        warnings.warn(f"Lanczos stopped after {lz.k} products without reaching tol={tol} "
                      f"(largest relative residual {float(np.max(resid / np.maximum(np.abs(theta[idx]), 1e-30))):.2e})",
                      RuntimeWarning, stacklevel=3)
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
            new = float(torch.dot(v, w))
            norm = w.norm()
            if float(norm) == 0.0:
                lam, converged = 0.0, True
                break
            v = deflate(w / norm)
            v = v / v.norm()
            if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
                lam, converged = new, True
                break
            lam = new
        if not converged:
            warnings.warn(f"power iteration for eigenvalue {len(found) + 1} did not converge in {max_iter} products",
                          RuntimeWarning, stacklevel=3)
        found.append(v)
        values.append(float(lam))
    return values, torch.stack(found)


# --------------------------------------------------------------------------------------------- public API

def _check_positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise UsageError(f"{name}={value} must be a positive integer")


def hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batches: Iterable, top_k: int = 1,
                        max_iter: int = 100, tol: float = 1e-6, params: Any = None, seed: int = 0,
                        device: Any = None, method: str = "lanczos", return_eigenvectors: bool = False,
                        progress: Progress = None):
    """The ``top_k`` largest Hessian eigenvalues, in descending order.

    ``method="lanczos"`` (default): Lanczos with full re-orthogonalisation, returning the algebraically
    largest eigenvalues; it stops once every wanted Ritz pair has residual ``||H y - θ y|| <= tol·|θ|``
    or after ``max_iter`` products.  It stores ``max_iter`` vectors of the parameter size.
    ``method="power"``: power iteration with deflation (each new vector is kept orthogonal to the
    eigenvectors already found); it needs only ``top_k`` stored vectors but finds the eigenvalues
    largest in MAGNITUDE, and stops when the Rayleigh quotient changes by less than ``tol`` relative.

    Returns a list of floats, or ``(eigenvalues, eigenvectors)`` with each eigenvector a list of tensors
    shaped like the parameters when ``return_eigenvectors`` is true.
    """
    _check_positive("top_k", top_k)
    _check_positive("max_iter", max_iter)
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    n = sum(p.numel() for p in plist)
    if top_k > n:
        raise UsageError(f"top_k={top_k} exceeds the number of parameters analysed ({n})")
    if method not in ("lanczos", "power"):
        raise UsageError(f"method={method!r}; expected 'lanczos' or 'power'")
    gen = torch.Generator().manual_seed(int(seed))
    with analysis_mode(model, plist, device) as dev:
        op = HessianOperator(model, loss_fn, batches, plist, dev, progress)
        solver = _lanczos_top if method == "lanczos" else _power_top
        values, vecs = solver(op, top_k, max_iter, tol, gen)
        vectors = [[t.detach().clone() for t in op._split(v)] for v in vecs] if return_eigenvectors else None
    return (values, vectors) if return_eigenvectors else values


def hessian_trace(model: nn.Module, loss_fn: Callable, batches: Iterable, max_iter: int = 200, tol: float = 1e-3,
                  params: Any = None, seed: int = 0, device: Any = None, min_samples: int = 10,
                  vectors_per_pass: int = 4, progress: Progress = None) -> tuple[float, float, int]:
    """Hutchinson estimate ``E[vᵀHv]`` with Rademacher ``v``: returns ``(trace, stderr, n_samples)``.

    Sampling stops once at least ``min_samples`` are drawn and the standard error of the mean is below
    ``tol·|mean|``, or after ``max_iter`` samples.  ``vectors_per_pass`` vectors share one forward pass
    per batch (cheaper, checked for stopping together).
    """
    _check_positive("max_iter", max_iter)
    _check_positive("vectors_per_pass", vectors_per_pass)
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    gen = torch.Generator().manual_seed(int(seed))
    samples: list[float] = []
    min_samples = max(2, min(int(min_samples), int(max_iter)))
    with analysis_mode(model, plist, device) as dev:
        op = HessianOperator(model, loss_fn, batches, plist, dev, progress)
        while len(samples) < max_iter:
            vs = [op.random(gen, "rademacher") for _ in range(min(vectors_per_pass, max_iter - len(samples)))]
            for v, hv in zip(vs, op.matvec(vs)):
                samples.append(float(torch.dot(v.double(), hv.double())))
            if len(samples) >= min_samples:
                mean = float(np.mean(samples))
                stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
                if stderr <= tol * abs(mean):
                    break
    mean = float(np.mean(samples))
    stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return mean, stderr, len(samples)


def hessian_density(model: nn.Module, loss_fn: Callable, batches: Iterable, n_iter: int = 100, n_v: int = 1,
                    sigma: float | None = None, grid: int | Sequence[float] = 1000, params: Any = None,
                    seed: int = 0, device: Any = None, return_nodes: bool = False, progress: Progress = None):
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
    _check_positive("n_iter", n_iter)
    _check_positive("n_v", n_v)
    named = resolve_params(model, params)
    plist = [p for _, p in named]
    gen = torch.Generator().manual_seed(int(seed))
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    with analysis_mode(model, plist, device) as dev:
        op = HessianOperator(model, loss_fn, batches, plist, dev, progress)
        for _ in range(n_v):
            # No restart on breakdown: the quadrature is that of the Krylov space of THIS start vector.
            lz = _Lanczos(op, op.random(gen), n_iter, restart=None)
            while lz.step():
                pass
            theta, S = lz.ritz()
            runs.append((theta, S[0, :] ** 2))
    width = max(r[0].max() for r in runs) - min(r[0].min() for r in runs)
    if sigma is None:
        scale = max(abs(r[0]).max() for r in runs)
        sigma = 0.01 * width if width > 0 else max(1e-3 * scale, 1e-12)
    sigma = float(sigma)
    if not sigma > 0:
        raise UsageError(f"sigma={sigma} must be positive")
    if isinstance(grid, (int, np.integer)):
        if grid < 2:
            raise UsageError(f"grid={grid} must have at least 2 points")
        lo = min(r[0].min() for r in runs) - 6 * sigma
        hi = max(r[0].max() for r in runs) + 6 * sigma
        t = np.linspace(lo, hi, int(grid))
    else:
        t = np.asarray(grid, dtype=np.float64)
        if t.ndim != 1 or t.size < 2 or np.any(np.diff(t) <= 0):
            raise UsageError("grid must be an increasing 1-D sequence of at least 2 points")
    density = np.zeros_like(t)
    for theta, w in runs:
        z = (t[:, None] - theta[None, :]) / sigma
        density += (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))) @ w
    density /= n_v
    mass = float(np.sum(0.5 * (density[1:] + density[:-1]) * np.diff(t)))
    if mass > 0:
        density /= mass
    if not return_nodes:
        return t, density
    m = max(len(r[0]) for r in runs)
    nodes = np.full((n_v, m), np.nan)
    weights = np.zeros((n_v, m))
    for i, (theta, w) in enumerate(runs):
        nodes[i, : len(theta)] = theta
        weights[i, : len(w)] = w
    return t, density, nodes, weights


def _groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], by: str) -> list[tuple[str, list]]:
    if by == "param":
        return [(n, [p]) for n, p in named]
    if by != "module":
        raise UsageError(f"by={by!r}; expected 'param' or 'module'")
    wanted = {id(p) for _, p in named}
    groups = []
    for mname, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if own:
            groups.append((mname or "(root)", own))
    return groups


def per_layer(model: nn.Module, loss_fn: Callable, batches: Iterable, params: Any = None, by: str = "param",
              max_iter: int = 100, tol: float = 1e-4, trace_max_iter: int = 200, trace_tol: float = 1e-2,
              seed: int = 0, device: Any = None, progress: Progress = None) -> list[dict]:
    """Top eigenvalue and trace of each diagonal block of the Hessian, one block per parameter tensor
    (``by="param"``) or per module's own parameters (``by="module"``).

    Returns rows ``{"name", "numel", "lambda_max", "trace", "trace_stderr", "trace_samples"}``.
    """
    named = resolve_params(model, params)
    rows = []
    for name, group in _groups(model, named, by):
        lam = hessian_eigenvalues(model, loss_fn, batches, top_k=1, max_iter=max_iter, tol=tol, params=group,
                                  seed=seed, device=device, progress=progress)[0]
        tr, se, ns = hessian_trace(model, loss_fn, batches, max_iter=trace_max_iter, tol=trace_tol, params=group,
                                   seed=seed, device=device, progress=progress)
        rows.append({"name": name, "numel": int(sum(p.numel() for p in group)), "lambda_max": lam,
                     "trace": tr, "trace_stderr": se, "trace_samples": ns})
    return rows

"""Hutchinson estimate of the Hessian trace."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .eigen import check_positive, check_tol
from .operator import HessianOperator, Progress, analysis_mode
from .params import resolve_params
from .taylor import QuadraticForm, Unsupported

__all__ = ["TRACE_METHODS", "hessian_trace"]

# "auto": Taylor mode where the model is covered (ssam.analysis.taylor), Hessian-vector products elsewhere.
TRACE_METHODS = ("auto", "taylor", "hvp")


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
    method: str = "auto",
) -> tuple[float, float, int]:
    """Hutchinson estimate ``E[vᵀHv]`` with Rademacher ``v``: returns ``(trace, stderr, n_samples)``.

    Sampling stops once at least ``min_samples`` are drawn and the standard error of the mean is below
    ``tol·|mean|``, or after ``max_iter`` samples (``tol=0``: exactly ``max_iter``).  The stopping rule is
    checked every ``vectors_per_pass`` samples; batches whose graph is not cached (``graph_memory``, see
    :class:`HessianOperator`) build it once per pass for all its vectors.  Each sample's value does not
    depend on either setting: the k-th sample is always ``vₖᵀHvₖ`` for the k-th vector drawn from ``seed``.

    ``method``: how each ``vᵀHv`` is computed.  ``"taylor"``: one second-order forward pass per vector
    (:mod:`.taylor`; no graph is kept, the primal values of a batch are, within ``graph_memory``);
    ``"hvp"``: ``vᵀ(Hv)`` with a Hessian-vector product; ``"auto"`` (default): Taylor mode when the model
    and loss are covered, else products.  Both give the same samples up to float rounding.
    """
    if method not in TRACE_METHODS:
        raise UsageError(f"method: got {method!r}; allowed: {', '.join(TRACE_METHODS)}")
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
        form = _quadratic_form(model, loss_fn, plist, op, method)
        primals = _Primals(form, op) if form is not None else None
        while len(samples) < max_iter:
            vs = [op.random(gen, "rademacher") for _ in range(min(vectors_per_pass, max_iter - len(samples)))]
            if primals is None:
                hvs = op.matvec(vs)
                # One host transfer per pass for all its samples.
                samples += torch.stack([torch.dot(v.double(), hv.double()) for v, hv in zip(vs, hvs)]).tolist()
            else:
                samples += primals.quadratic_forms(vs).tolist()
                if progress is not None:
                    progress(len(vs))
            if len(samples) >= min_samples:
                mean = float(np.mean(samples))
                stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
                if tol > 0 and stderr <= tol * abs(mean):
                    break
    mean = float(np.mean(samples))
    stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return mean, stderr, len(samples)


def _quadratic_form(
    model: nn.Module, loss_fn: Callable, params: list, op: HessianOperator, method: str
) -> QuadraticForm | None:
    """The Taylor-mode form for ``method``, or ``None`` for Hessian-vector products."""
    if method == "hvp":
        return None
    try:
        if not all(torch.is_tensor(x) for x, _, _, _ in op.batches):
            raise Unsupported("inputs that are not one tensor per batch")
        return QuadraticForm(model, loss_fn, params)
    except Unsupported as e:
        if method == "taylor":
            raise UsageError(f"method='taylor': {e}; use method='hvp' (or 'auto') for this model") from None
        return None


class _Primals:
    """Each batch's primal values, kept across passes while they fit in the operator's graph memory."""

    def __init__(self, form: QuadraticForm, op: HessianOperator):
        self.form, self.op = form, op
        self.kept: dict[int, dict] = {}
        self.bytes = 0

    def _env(self, b: int) -> dict:
        if b in self.kept:
            return self.kept[b]
        env = self.form.primal(self.op.batches[b][0])
        size = sum(
            {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in env.values() if torch.is_tensor(t)
            }.values()
        )
        if self.bytes + size <= self.op.graph_memory:
            self.kept[b] = env
            self.bytes += size
        return env

    def quadratic_forms(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """``[vᵀHv for v in vs]`` in float64, the batches weighted by size."""
        out = torch.zeros(len(vs), dtype=torch.float64, device=self.op.device)
        parts = [self.op.split(v) for v in vs]
        for b, (_, y, _, w) in enumerate(self.op.batches):
            env = self._env(b)
            for k, pv in enumerate(parts):
                out[k] += w * self.form(env, y, pv)
        return out.cpu()

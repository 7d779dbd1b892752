"""The Hessian's quadratic form ``vᵀHv`` by second-order forward (Taylor) mode, for Hutchinson's trace.

The trace needs ``vᵀHv``, not ``Hv``.  Along ``w(t) = w + t·v`` every activation ``a(t)`` has derivatives
``a'`` and ``a''`` at ``t = 0``, and ``vᵀHv = L''(0)``.  Carrying ``(a, a', a'')`` forward through the
network costs, for a convolution or linear layer ``y = B(x, w)``,

    y'  = B(x', w) + B(x, v)          y'' = B(x'', w) + 2·B(x', v)

four products of the layer's size, where a Hessian-vector product by double backward takes six (two
through the forward graph, four through the graph of the gradient) and keeps a graph.  The primal values
``a`` are computed once per batch and shared by every vector of a pass; nothing runs under autograd.

Coverage: models that ``torch.fx.symbolic_trace`` can trace, built from stock convolutions, linear layers,
BatchNorm in eval mode, ReLU, max/average pooling, dropout in eval mode and the usual shape and arithmetic
operations, with ``nn.CrossEntropyLoss`` (mean reduction, optional label smoothing and ``ignore_index``).
Anything else raises :class:`Unsupported`, on which :func:`.trace.hessian_trace` falls back to
Hessian-vector products; both give the same samples up to float rounding (tests compare them with exact
Hessians).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .convolution import CONVOLUTIONS, runs_stock_forward

__all__ = ["QuadraticForm", "Unsupported"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS_MAX = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
# Modules that are linear maps of their one input (no parameters, no bias): apply them to each derivative.
_LINEAR_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
# Functions and methods linear in their first argument, the others constant.
_LINEAR_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.mean,
    torch.sum,
    operator.getitem,
    operator.neg,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.dropout,
}
_LINEAR_METHODS = {
    "view",
    "reshape",
    "flatten",
    "transpose",
    "permute",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "mean",
    "sum",
    "view_as",
    "expand",
    "expand_as",
    "__getitem__",
    "neg",
}
_COVERED_MODULES = (*CONVOLUTIONS, *_NORMS, nn.Linear, nn.ReLU, *_POOLS_MAX, *_LINEAR_MODULES)
_RELUS = {F.relu, torch.relu}
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul}
_ADDS = {operator.add, operator.iadd, torch.add}
_SUBS = {operator.sub, operator.isub, torch.sub}
_MULS = {operator.mul, operator.imul, torch.mul}


class Unsupported(Exception):
    """The model or loss has a part the Taylor mode does not cover (the message names it)."""


class _Jet:
    """An activation's derivatives along the line: ``d1 = a'``, ``d2 = a''``; ``None`` stands for zero.

    ``own``: both tensors were allocated for this jet (no view or alias of another), so the one consumer of
    a node may update them in place.  On a CPU every large allocation costs page faults (glibc maps blocks
    above 32 MiB afresh each time): in place, a ResNet's pass allocates about half as often."""

    __slots__ = ("d1", "d2", "own")

    def __init__(self, d1: Tensor | None, d2: Tensor | None, own: bool = False):
        self.d1, self.d2, self.own = d1, d2, own


def _zero(j: Any) -> bool:
    return not isinstance(j, _Jet) or (j.d1 is None and j.d2 is None)


def _sum(*terms: Tensor | None) -> Tensor | None:
    live = [t for t in terms if t is not None]
    if not live:
        return None
    out = live[0]
    for t in live[1:]:
        out = out + t
    return out


def _acc(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """``first + second`` into ``first`` (a fresh tensor of the caller's); ``None`` is zero."""
    if first is None:
        return second
    return first if second is None else first.add_(second)


def _map(f: Callable[[Tensor], Tensor], j: _Jet) -> _Jet:
    return _Jet(None if j.d1 is None else f(j.d1), None if j.d2 is None else f(j.d2))


def _mask(j: _Jet, keep: Tensor, in_place: bool) -> _Jet:
    if in_place:
        for d in (j.d1, j.d2):
            if d is not None:
                d.mul_(keep)
        return j
    return _Jet(None if j.d1 is None else j.d1 * keep, None if j.d2 is None else j.d2 * keep, True)


def _scale(t: Tensor | None, c: float) -> Tensor | None:
    return t if t is None or c == 1 else t * c


class QuadraticForm:
    """``vᵀHv`` of ``loss_fn(model(x), y)`` w.r.t. ``params`` for one batch and many ``v``.

    Raises :class:`Unsupported` at construction when the model or the loss is outside the coverage (module
    docstring).  ``model`` must already be in eval mode, as :func:`.operator.analysis_mode` leaves it."""

    def __init__(self, model: nn.Module, loss_fn: Callable, params: Sequence[Tensor]):
        if not isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn.reduction != "mean" or loss_fn.weight is not None:
            raise Unsupported(f"loss {loss_fn!r}: only nn.CrossEntropyLoss with mean reduction and no class weights")
        self.loss_fn = loss_fn
        try:
            self.graph = fx.symbolic_trace(model)
        except Exception as e:  # fx raises many types for data-dependent control flow
            raise Unsupported(f"torch.fx cannot trace the model: {type(e).__name__}: {e}") from None
        self.modules = dict(self.graph.named_modules())
        self.output = next(n for n in self.graph.graph.nodes if n.op == "output")
        self.params = list(params)
        self._slot = {id(p): i for i, p in enumerate(self.params)}
        for node in self.graph.graph.nodes:
            self._check(node)

    # -- coverage -------------------------------------------------------------------------------------
    def _check(self, node: fx.Node) -> None:
        if node.op == "call_module":
            m = self.modules[node.target]
            if not isinstance(m, _COVERED_MODULES):
                raise Unsupported(f"{node.target}: module {type(m).__name__} is not covered")
            if not runs_stock_forward(m):
                raise Unsupported(f"{node.target}: {type(m).__name__} has a forward of its own")
            if isinstance(m, _NORMS):
                if m.training or m.running_mean is None:
                    raise Unsupported(f"{node.target}: BatchNorm needs eval mode and running statistics")
            elif isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d) and m.training:
                raise Unsupported(f"{node.target}: dropout in train mode")
        elif node.op == "call_function":
            known = _LINEAR_FUNCTIONS | _RELUS | _ADDS | _SUBS | _MULS | {torch.cat, getattr}
            if node.target not in known:
                name = getattr(node.target, "__name__", node.target)
                raise Unsupported(f"node {node.name}: function {name} is not covered")
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if node.target is F.dropout and training:
                raise Unsupported(f"{node.name}: dropout in train mode")
        elif node.op == "call_method":
            if node.target not in _LINEAR_METHODS | {"size", "dim", "relu", "add", "mul", "sub"}:
                raise Unsupported(f"node {node.name}: method .{node.target}() is not covered")
        elif node.op == "get_attr":
            pass
        elif node.op not in ("placeholder", "output"):
            raise Unsupported(f"{node.name}: {node.op}")

    # -- passes ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def primal(self, x: Any) -> dict[fx.Node, Any]:
        """Every node's value for input ``x`` (shared by all vectors of the batch)."""
        env: dict[fx.Node, Any] = {}
        inputs = iter([x])
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(inputs, None) if not node.args else node.args[0]
            elif node.op == "output":
                env[node] = env[node.args[0]]
            else:
                env[node] = self._run(node, fx.node.map_arg(node.args, env.__getitem__), env)
                if self._is_relu(node):  # the derivative passes multiply by it: made once per batch
                    env[("keep", node)] = (env[node] > 0).to(env[node].dtype)
        return env

    def _is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], nn.ReLU)
        return node.target in _RELUS or (node.op == "call_method" and node.target == "relu")

    def _run(self, node: fx.Node, args: Any, env: dict) -> Any:
        # In-place operations would change values that the derivative pass reads later: run them out of place.
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            m = self.modules[node.target]
            return torch.relu(args[0]) if isinstance(m, nn.ReLU) else m(*args, **kwargs)
        if node.target is F.relu:
            return torch.relu(args[0])
        if node.op == "call_function":
            return _OUT_OF_PLACE.get(node.target, node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return operator.attrgetter(node.target)(self.graph)

    @torch.no_grad()
    def __call__(self, env: dict[fx.Node, Any], y: Any, v: Sequence[Tensor]) -> Tensor:
        """``vᵀHv`` (a 0-d tensor) for the batch whose :meth:`primal` is ``env``; ``v`` one tensor per param."""
        tangent = {i: t for i, t in enumerate(v)}
        jets: dict[fx.Node, Any] = {}
        out: _Jet | None = None
        waiting = {node: len(node.users) for node in self.graph.graph.nodes}
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                jets[node] = None
            elif node.op == "output":
                out = jets[node.args[0]]
            else:
                jets[node] = self._jet(node, env, jets, tangent)
                for inp in node.all_input_nodes:  # free what no later node reads
                    waiting[inp] -= 1
                    if waiting[inp] == 0:
                        jets.pop(inp, None)
        return self._loss(env[self.output], y, out if isinstance(out, _Jet) else _Jet(None, None))

    def _tan(self, p: Tensor | None, tangent: dict) -> Tensor | None:
        return None if p is None else tangent.get(self._slot.get(id(p), -1))

    def _jet(self, node: fx.Node, env: dict, jets: dict, tangent: dict) -> Any:
        def exclusive(i: int) -> bool:  # the i-th argument's jet may be updated in place
            a = node.args[i]
            return isinstance(a, fx.Node) and len(a.users) == 1 and isinstance(jets.get(a), _Jet) and jets[a].own

        jet_args = fx.node.map_arg(node.args, jets.__getitem__)
        vals = fx.node.map_arg(node.args, env.__getitem__)
        tgt = node.target
        if node.op == "get_attr":
            value = env[node]
            t = self._tan(value, tangent) if isinstance(value, Tensor) else None
            return _Jet(t, None) if t is not None else None
        if node.op == "call_module":
            m = self.modules[tgt]
            x, j = vals[0], jet_args[0]
            j = j if isinstance(j, _Jet) else _Jet(None, None)
            if isinstance(m, CONVOLUTIONS):
                return self._bilinear(lambda a, w, b=None: m._conv_forward(a, w, b), x, env[node], j, m, tangent)
            if isinstance(m, nn.Linear):
                return self._bilinear(F.linear, x, env[node], j, m, tangent)
            if isinstance(m, _NORMS):
                return self._norm(m, x, j, tangent, exclusive(0))
            if isinstance(m, nn.ReLU):
                return _mask(j, env[("keep", node)], exclusive(0))
            if isinstance(m, tuple(_POOLS_MAX)):
                return self._max_pool(m, x, j)
            return _map(m, j)  # a linear module
        if node.op == "call_method" and tgt in ("size", "dim"):
            return None
        if self._is_relu(node):
            j = jet_args[0]
            return None if _zero(j) else _mask(j, env[("keep", node)], exclusive(0))
        if tgt in _ADDS or tgt in _SUBS or (node.op == "call_method" and tgt in ("add", "sub")):
            sign = -1.0 if (tgt in _SUBS or tgt == "sub") else 1.0
            if node.kwargs.get("alpha", 1) != 1:
                raise Unsupported(f"{node.name}: add/sub with alpha")
            a, b = jet_args[0], jet_args[1]
            a = a if isinstance(a, _Jet) else _Jet(None, None)
            b = b if isinstance(b, _Jet) else _Jet(None, None)
            if exclusive(0) and (a.d1 is not None or b.d1 is None) and (a.d2 is not None or b.d2 is None):
                for da, db in ((a.d1, b.d1), (a.d2, b.d2)):
                    if da is not None and db is not None:
                        da.add_(db, alpha=sign)
                return a
            d1, d2 = _sum(a.d1, _scale(b.d1, sign)), _sum(a.d2, _scale(b.d2, sign))
            fresh = all(
                x is None or (x is not a.d1 and x is not b.d1 and x is not a.d2 and x is not b.d2) for x in (d1, d2)
            )
            return _Jet(d1, d2, fresh)
        if tgt in _MULS or (node.op == "call_method" and tgt == "mul"):
            (a, b), (a0, b0) = jet_args[:2], vals[:2]
            a = a if isinstance(a, _Jet) else _Jet(None, None)
            b = b if isinstance(b, _Jet) else _Jet(None, None)
            cross = None if a.d1 is None or b.d1 is None else 2 * a.d1 * b.d1
            return _Jet(
                _sum(None if a.d1 is None else a.d1 * b0, None if b.d1 is None else a0 * b.d1),
                _sum(None if a.d2 is None else a.d2 * b0, cross, None if b.d2 is None else a0 * b.d2),
            )
        if tgt is torch.cat:
            parts, rest = jet_args[0], vals[0]
            if all(_zero(p) for p in parts):
                return None
            kw = dict(node.kwargs)
            dim = node.args[1] if len(node.args) > 1 else kw.pop("dim", 0)
            cat = []
            for k in ("d1", "d2"):
                ds = [getattr(p, k) if isinstance(p, _Jet) else None for p in parts]
                cat.append(
                    None
                    if all(d is None for d in ds)
                    else torch.cat([d if d is not None else torch.zeros_like(r) for d, r in zip(ds, rest)], dim)
                )
            return _Jet(*cat, True)
        if tgt is getattr:
            return None
        # Linear in the first argument, the rest constant.
        j = jet_args[0]
        if any(isinstance(a, _Jet) and not _zero(a) for a in jet_args[1:]):
            raise Unsupported(f"{node.name}: {tgt} with more than one varying argument")
        if _zero(j):
            return None
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_method":
            return _map(lambda d: getattr(d, tgt)(*vals[1:], **kwargs), j)
        if tgt is operator.getitem and not isinstance(vals[0], Tensor):
            return j[vals[1]] if isinstance(j, tuple | list) else None
        return _map(lambda d: tgt(d, *vals[1:], **kwargs), j)

    def _bilinear(self, f: Callable, x: Tensor, y: Tensor, j: _Jet, m: nn.Module, tangent: dict) -> _Jet:
        """``y = f(x, w, b)``: ``y' = f(x', w) + f(x, w', b')``, ``y'' = f(x'', w) + 2 f(x', w')``."""
        w = m.weight
        w1, b1 = self._tan(w, tangent), self._tan(m.bias, tangent)
        # Every term is a fresh tensor, so the sums accumulate in place.
        d1 = _acc(None if j.d1 is None else f(j.d1, w), None if w1 is None else f(x, w1, b1))
        if w1 is None and b1 is not None:  # a frozen weight with a bias that is analysed
            bias = b1.view([1, -1] + [1] * (y.dim() - 2)).expand_as(y)
            d1 = bias.clone() if d1 is None else d1.add_(bias)
        d2 = _acc(
            None if j.d2 is None else f(j.d2, w),
            None if j.d1 is None or w1 is None else f(j.d1, w1 * 2),
        )
        return _Jet(d1, d2, True)

    def _norm(self, m: nn.Module, x: Tensor, j: _Jet, tangent: dict, in_place: bool) -> _Jet:
        """Eval-mode BatchNorm: ``y = x̂·γ + β`` with ``x̂ = (x − μ)/σ`` from the running statistics, so
        ``y' = x'·γ/σ + (x − μ)·γ'/σ + β'`` and ``y'' = x''·γ/σ + 2·x'·γ'/σ`` (per-channel factors first)."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(m.running_var + m.eps)
        a = (inv * m.weight if m.weight is not None else inv).view(shape)
        g1, b1 = self._tan(m.weight, tangent), self._tan(m.bias, tangent)
        c1 = None if g1 is None else (inv * g1).view(shape)
        shift = None
        if g1 is not None or b1 is not None:
            shift = (-m.running_mean.view(shape) * c1 if c1 is not None else 0) + (
                b1.view(shape) if b1 is not None else 0
            )
        # y'' first: it reads x', which the in-place y' overwrites.
        d2 = None
        if j.d2 is not None:
            d2 = j.d2.mul_(a) if in_place else j.d2 * a
        if c1 is not None and j.d1 is not None:
            d2 = j.d1 * (2 * c1) if d2 is None else d2.addcmul_(j.d1, 2 * c1)
        d1 = None
        if j.d1 is not None:
            d1 = j.d1.mul_(a) if in_place else j.d1 * a
        if c1 is not None:
            d1 = torch.addcmul(shift, x, c1) if d1 is None else d1.addcmul_(x, c1).add_(shift)
        elif shift is not None:
            d1 = shift.expand_as(x).clone() if d1 is None else d1.add_(shift)
        return _Jet(d1, d2, True)

    def _max_pool(self, m: nn.Module, x: Tensor, j: _Jet) -> _Jet:
        pool = next(f for cls, f in _POOLS_MAX.items() if isinstance(m, cls))
        out, idx = pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        flat = idx.flatten(2)
        return _map(lambda d: d.flatten(2).gather(2, flat).view_as(out), j)

    def _loss(self, z: Tensor, y: Tensor, j: _Jet) -> Tensor:
        """``L''`` of the mean cross-entropy: ``Σᵢ (pᵢ − qᵢ)·zᵢ'' + zᵢ'ᵀ(diag pᵢ − pᵢpᵢᵀ)zᵢ'`` over the counted rows."""
        if j.d1 is None and j.d2 is None:
            return z.new_zeros(())
        dim = 1 if z.dim() > 1 else 0
        p = torch.softmax(z.double(), dim)
        k = z.shape[dim]
        eps = self.loss_fn.label_smoothing
        if y.dtype.is_floating_point:  # class probabilities
            q, count = y.double(), float(z.shape[0] if z.dim() > 1 else 1)
            keep = None
        else:
            keep = (y != self.loss_fn.ignore_index).unsqueeze(dim)
            q = F.one_hot(y.clamp(min=0) * keep.squeeze(dim), k).double()
            if dim == 1 and z.dim() > 2:  # (N, C, d...) logits with (N, d...) targets
                q = q.movedim(-1, 1)
            count = float(keep.sum())
        if eps:
            q = q * (1 - eps) + eps / k
        total = z.new_zeros((), dtype=torch.float64)
        if j.d2 is not None:
            total = total + ((p - q) * j.d2.double() * (keep if keep is not None else 1)).sum()
        if j.d1 is not None:
            d1 = j.d1.double()
            quad = (p * d1 * d1).sum(dim) - (p * d1).sum(dim) ** 2
            total = total + (quad * (keep.squeeze(dim) if keep is not None else 1)).sum()
        return total / max(count, 1.0)

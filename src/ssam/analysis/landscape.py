"""Loss landscapes: filter-normalised random directions (Li et al., 2018), interpolation paths, grids.

A direction is a dict ``name -> tensor`` keyed like ``model.state_dict()``.  Evaluating a grid moves the
model's own tensors in place to ``w + x·d1 (+ y·d2)`` and puts the saved originals back at the end, so
the weights come back bit for bit even if an evaluation raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UsageError
from .hessian import analysis_mode, prepare_batches

__all__ = ["evaluate", "evaluate_grid", "interpolation_direction", "random_direction"]


def random_direction(
    model: nn.Module, seed: int = 0, ignore: str | None = "biasbn", norm: str | None = "filter"
) -> dict[str, Tensor]:
    """A Gaussian direction over the model's parameters (not its buffers), normalised per ``norm``.

    ``norm="filter"``: for every parameter with 2+ dimensions, each filter (slice along dim 0: an output
    channel of a conv, an output row of a linear layer) is rescaled to the norm of the same filter of the
    weight, which removes the scale invariance that makes raw random directions misleading.
    ``norm="layer"``: each whole tensor is rescaled to the weight tensor's norm.  ``norm=None``: raw.

    1-D parameters (biases, BatchNorm γ/β): ``ignore="biasbn"`` sets them to ZERO (they stay fixed);
    ``ignore=None`` normalises each of them as a whole to the parameter's norm.

    Draws are made on the CPU in float32, always for every parameter, so that a seed gives the same
    direction whatever the device, dtype or ``ignore`` setting.
    """
    if ignore not in ("biasbn", None):
        raise UsageError(f"ignore={ignore!r}; expected 'biasbn' or None")
    if norm not in ("filter", "layer", None):
        raise UsageError(f"norm={norm!r}; expected 'filter', 'layer' or None")
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(dtype=w.dtype, device=w.device)
        if w.dim() <= 1:
            if ignore == "biasbn":
                d.zero_()
            elif norm is not None:
                d.mul_(w.norm() / (d.norm() + 1e-10))
        elif norm == "filter":
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            d.mul_((wn / (dn + 1e-10)).view(-1, *([1] * (w.dim() - 1))))
        elif norm == "layer":
            d.mul_(w.norm() / (d.norm() + 1e-10))
        out[name] = d
    return out


def _state(obj: Any) -> Mapping[str, Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def interpolation_direction(model_a_state: Any, model_b_state: Any) -> dict[str, Tensor]:
    """``B - A`` over every floating-point entry of the state dicts (parameters AND float buffers).

    Buffers are included because a BatchNorm network in eval mode uses its running statistics: with
    parameters alone, ``x = 1`` would give B's weights with A's statistics, which is not model B.
    Integer buffers (``num_batches_tracked``) do not affect an eval-mode forward and are left out.
    Evaluate from model A: ``x = 0`` is A, ``x = 1`` is B.  Modules are accepted in place of state dicts.
    """
    a, b = _state(model_a_state), _state(model_b_state)
    out = {}
    for k, ta in a.items():
        if not torch.is_tensor(ta) or not ta.is_floating_point():
            continue
        if k not in b:
            raise UsageError(
                f"state entry {k!r} is in the first model but not in the second; "
                f"interpolation needs two models of the same architecture"
            )
        tb = b[k]
        if tuple(tb.shape) != tuple(ta.shape):
            raise UsageError(
                f"state entry {k!r} has shape {tuple(ta.shape)} in the first model and "
                f"{tuple(tb.shape)} in the second; interpolation needs the same architecture"
            )
        out[k] = tb.detach().to(ta.device, ta.dtype) - ta.detach()
    return out


def _live_tensors(model: nn.Module) -> dict[str, Tensor]:
    live = dict(model.named_buffers())
    live.update(model.named_parameters())
    return live


def _evaluate_prepared(model: nn.Module, loss_fn: Callable, data: list) -> tuple[float, float]:
    total, correct, counted, acc_ok = 0.0, 0, 0, True
    for x, y, n, w in data:
        out = model(x)
        total += float(loss_fn(out, y)) * w
        # Top-1 accuracy only makes sense for class scores against integer labels.
        if (
            acc_ok
            and torch.is_tensor(out)
            and out.dim() == 2
            and torch.is_tensor(y)
            and y.dim() == 1
            and not y.is_floating_point()
        ):
            correct += int((out.argmax(1) == y).sum())
            counted += n
        else:
            acc_ok = False
    return total, (100.0 * correct / counted if acc_ok and counted else float("nan"))


def evaluate(model: nn.Module, loss_fn: Callable, batches: Iterable, device: Any = None) -> tuple[float, float]:
    """``(mean loss, top-1 accuracy in percent)`` over the batches, in eval mode, size-weighted.

    Accuracy is NaN when outputs are not class scores against integer labels.
    """
    with analysis_mode(model, (), device) as dev, torch.no_grad():
        return _evaluate_prepared(model, loss_fn, prepare_batches(batches, dev))


def evaluate_grid(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    directions: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    xs: Sequence[float],
    ys: Sequence[float] | None = None,
    callback: Callable[[dict], Any] | None = None,
    resume: Mapping[str, Any] | None = None,
    device: Any = None,
) -> dict[str, np.ndarray]:
    """Loss and accuracy at ``w + x·d1`` (1-D, ``ys=None``) or ``w + x·d1 + y·d2`` (2-D).

    Returns ``{"xs", "ys" (2-D only), "loss", "acc"}`` with arrays of shape ``(len(xs),)`` or
    ``(len(xs), len(ys))``, ``loss[i, j]`` at ``(xs[i], ys[j])``; accuracy in percent.
    ``callback(partial)`` is called after each computed point with the same dict plus ``"done"`` (points
    computed in this call) and ``"total"``; its arrays hold NaN where nothing is computed yet, and belong to
    this function (copy them to keep them).  ``resume``: a mapping with ``"loss"`` and ``"acc"`` arrays of the
    grid's shape; only points whose loss is NaN are computed (a point whose loss really is NaN is simply
    recomputed).  Points are visited in row-major order.
    """
    dirs = [directions] if isinstance(directions, Mapping) else list(directions)
    xs = np.asarray(xs, dtype=np.float64).reshape(-1)
    two_d = ys is not None
    if len(dirs) != (2 if two_d else 1):
        raise UsageError(
            f"{len(dirs)} direction(s) given for a {'2-D' if two_d else '1-D'} grid; expected {2 if two_d else 1}"
        )
    shape: tuple[int, ...] = (len(xs),)
    if two_d:
        ys = np.asarray(ys, dtype=np.float64).reshape(-1)
        shape = (len(xs), len(ys))
    if resume is not None:
        loss = np.array(resume["loss"], dtype=np.float64, copy=True)
        acc = np.array(resume["acc"], dtype=np.float64, copy=True)
        if loss.shape != shape or acc.shape != shape:
            raise UsageError(f"resume arrays have shape {loss.shape}/{acc.shape}; this grid is {shape}")
    else:
        loss = np.full(shape, np.nan)
        acc = np.full(shape, np.nan)
    result: dict[str, Any] = {"xs": xs, "loss": loss, "acc": acc}
    if two_d:
        result["ys"] = ys
    todo = [idx for idx in np.ndindex(shape) if np.isnan(loss[idx])]
    if not todo:
        return result

    with analysis_mode(model, (), device) as dev, torch.no_grad():
        data = prepare_batches(batches, dev)
        live = _live_tensors(model)
        moved = []
        for d in dirs:
            md = {}
            for k, t in d.items():
                if k not in live:
                    raise UsageError(f"direction entry {k!r} is not a parameter or buffer of the model")
                if tuple(t.shape) != tuple(live[k].shape):
                    raise UsageError(
                        f"direction entry {k!r} has shape {tuple(t.shape)}, the model's is {tuple(live[k].shape)}"
                    )
                if not live[k].is_floating_point():
                    raise UsageError(f"direction entry {k!r} targets a non-floating tensor")
                md[k] = t.detach().to(device=live[k].device, dtype=live[k].dtype)
            moved.append(md)
        keys = sorted(set().union(*[md.keys() for md in moved]))
        origin = {k: live[k].detach().clone() for k in keys}
        try:
            for done, idx in enumerate(todo, 1):
                coeffs = [float(xs[idx[0]])] + ([float(ys[idx[1]])] if two_d else [])
                for k in keys:
                    t = origin[k].clone()
                    for c, md in zip(coeffs, moved):
                        if k in md:
                            t.add_(md[k], alpha=c)
                    live[k].copy_(t)
                loss[idx], acc[idx] = _evaluate_prepared(model, loss_fn, data)
                if callback is not None:
                    callback({**result, "done": done, "total": len(todo)})
        finally:
            for k in keys:
                live[k].copy_(origin[k])
    return result

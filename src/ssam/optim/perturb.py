"""The perturbation math as free functions, with a single-tensor and a multi-tensor (foreach) path, as torch.optim
keeps its update rules. The optimizer classes gather the tensors and call these.

    norm = || g ||            (|| |w| * g || for ASAM; of the masked g with renormalize)
    e    = scale * g  (* w^2 for ASAM)  (* mask),   scale = rho / (norm + perturb_eps)
    w   <- w + e, keeping a copy of w for ``restore_`` (restoring by copy is exact; w + e - e is not)

Which path: multi-tensor kernels on accelerators, a per-tensor loop on the CPU (where foreach kernels are loops of
the same ops, and the loop can fuse the scale into the add), unless the caller says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mask import MaskSegment

__all__ = ["use_foreach", "grad_norm", "perturb_", "restore_"]


def use_foreach(foreach: bool | None, tensors: list[Tensor]) -> bool:
    """The caller's choice, or (``None``) foreach when any tensor is off the CPU, as torch.optim decides."""
    return foreach if foreach is not None else any(t.device.type != "cpu" for t in tensors)


def _memory_order(t: Tensor) -> Tensor:
    """A dense tensor's entries as a flat view, in the order they lie in memory (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def _masked_flat(tensors: list[Tensor], seg: MaskSegment) -> Tensor:
    """The tensors concatenated (a new tensor) and multiplied by a flat mask laid out the same way: in logical order
    when the segment is in plain order (made in one C++ call), else each in memory order."""
    if seg.plain_order and len(tensors) > 1:  # (for one tensor _flatten_dense_tensors returns a view, not a copy)
        return torch._utils._flatten_dense_tensors(tensors).mul_(seg.mask)
    if seg.plain_order:
        return tensors[0].reshape(-1).mul(seg.mask)
    return torch.cat([_memory_order(t) for t in tensors]).mul_(seg.mask)


def grad_norm(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    adaptive: bool,
    foreach: bool,
    masks: list[Tensor] | None = None,
    segment: MaskSegment | None = None,
) -> Tensor:
    """One norm over every gradient (as in the paper), a device tensor (no host synchronisation).

    ``adaptive``: of |w| * g (ASAM). ``masks``: of the masked gradient (SSAM's renormalize, which puts the masked
    perturbation back on the rho-sphere); ``segment``, the masks as one stretch of the flat buffer, is used on the
    multi-tensor path.
    """
    if masks is not None:
        if segment is not None and foreach and not adaptive:  # pieces of one flat product (see _multi_tensor_perturb)
            grads = list(_masked_flat(grads, segment).split([g.numel() for g in grads]))  # type: ignore[arg-type]
        elif foreach:
            grads = list(torch._foreach_mul(grads, masks))
        else:
            grads = [g * m for g, m in zip(grads, masks)]
    if adaptive:
        scaled = (
            torch._foreach_mul(grads, torch._foreach_abs(params))
            if foreach
            else [g * p.abs() for p, g in zip(params, grads)]
        )
    else:
        scaled = grads
    norms = torch._foreach_norm(scaled) if foreach else [torch.linalg.vector_norm(g) for g in scaled]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    saved: list[Tensor],
    masks: list[Tensor | None],
    *,
    scale: Tensor,
    adaptive: bool,
    foreach: bool,
    segment: MaskSegment | None = None,
) -> None:
    """w <- w + scale * g (* w^2) (* mask), after copying w into ``saved``. ``segment`` (multi-tensor path only):
    the masks as one stretch of the flat mask buffer."""
    if foreach:
        _multi_tensor_perturb(params, grads, saved, masks, scale.to(grads[0].device), adaptive, segment)
    else:
        _single_tensor_perturb(params, grads, saved, masks, scale, adaptive)


def _multi_tensor_perturb(
    ps: list[Tensor],
    gs: list[Tensor],
    saved: list[Tensor],
    masks: list[Tensor | None],
    scale: Tensor,
    adaptive: bool,
    seg: MaskSegment | None,
) -> None:
    """Multi-tensor kernels; the scale stays on the device."""
    torch._foreach_copy_(saved, ps)
    if seg is not None:
        # One concatenation and two flat products replace a product per tensor (foreach cannot multiply float by
        # bool lists in one kernel). Same values: g * m * scale is g * scale where m is 1 and 0 where it is 0.
        flat = _masked_flat(gs, seg).mul_(scale)
        if seg.plain_order:  # memory order is logical order: the views are made in C++, not one by one here
            es = torch._utils._unflatten_dense_tensors(flat, ps)
        else:
            es = [e.as_strided(p.shape, p.stride()) for e, p in zip(flat.split([p.numel() for p in ps]), ps)]
        if adaptive:
            torch._foreach_mul_(es, torch._foreach_mul(ps, ps))
        torch._foreach_add_(ps, es)
        return
    es = torch._foreach_mul(gs, scale)
    if adaptive:
        torch._foreach_mul_(es, torch._foreach_mul(ps, ps))
    masked = [(e, m) for e, m in zip(es, masks) if m is not None]
    if masked:
        # Float times bool lists are not one dtype, so foreach falls back to one kernel per tensor here.
        torch._foreach_mul_([e for e, _ in masked], [m for _, m in masked])
    torch._foreach_add_(ps, es)


def _single_tensor_perturb(
    ps: list[Tensor], gs: list[Tensor], saved: list[Tensor], masks: list[Tensor | None], scale: Tensor, adaptive: bool
) -> None:
    """One tensor at a time, reusing one scratch buffer.

    On a CPU the scale becomes a Python number (no device to wait for) and fuses into the add; elsewhere it stays a
    device tensor so nothing synchronises. The masked product g * m is exact, so a full mask reproduces dense SAM
    bit for bit.
    """
    host = scale.device.type == "cpu"
    alpha = float(scale) if host else 1.0
    scratch = None
    for p, g, w, m in zip(ps, gs, saved, masks):
        w.copy_(p)
        if m is None and not adaptive and host:
            p.add_(g, alpha=alpha)
            continue
        if scratch is None or scratch.numel() < p.numel() or scratch.dtype != g.dtype or scratch.device != g.device:
            scratch = torch.empty(max(q.numel() for q in ps), dtype=g.dtype, device=g.device)
        e = scratch[: p.numel()].view_as(g)
        if m is not None:
            # A bool mask read as uint8 takes the vectorised mixed-type kernel; as bool it does not.
            torch.mul(g, m.view(torch.uint8), out=e)
        else:
            e.copy_(g)
        if adaptive:
            e.mul_(p).mul_(p)
        if not host:
            e.mul_(scale.to(e.device))
        p.add_(e, alpha=alpha)


def restore_(params: list[Tensor], saved: list[Tensor], *, foreach: bool) -> None:
    """w + e -> w by copy."""
    if foreach:
        torch._foreach_copy_(params, saved)
    else:
        for p, w in zip(params, saved):
            p.copy_(w)

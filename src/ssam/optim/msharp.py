"""m-sharpness: the perturbation taken per micro-batch of m examples, not from the whole batch (Foret et al. 2021,
section 4; Andriushchenko & Flammarion 2022; Baek, Kolter & Raghunathan 2024: the label-noise gains are largest at
m = 1). ``micro_batch=m`` of SAM, SSAMF and SSAMD.

One step over a batch split into chunks of m (the last chunk of a short batch may be smaller): for each chunk,
pass one at w gives its gradient g_i, its own ascent e_i (the optimizer's rule: norm, ASAM, mask), pass two at
w + e_i, and w is restored; the base optimizer then steps with the chunks' second gradients averaged, each weighted by
its share of the batch (the plain mean when the chunks are equal). rho stays as given. BatchNorm: pass one's chunks
update the running statistics and pass two's are frozen, so each example counts once per step.

Two paths: ``ascend_by_chunks`` (a Python loop over the chunks, any model; what ``opt.step(closure, batch=...)``
and the trainer call) and ``vectorised_ascent`` (m = 1 without a loop over the examples, for stacks of Linear
layers: two batched passes, from the rank-one structure of a Linear layer's per-example gradient, as the Fisher's
``hooks`` method uses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .bn import frozen_bn_stats

# The optimizer is typed Any here: importing SAM (which imports this module) would make a cycle.
SAM = Any

__all__ = ["split_batch", "ascend_by_chunks", "vectorised_ascent", "vectorise_refusal", "check_micro_batch"]


def check_micro_batch(m: object) -> int | None:
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"micro_batch: got {m!r}; allowed: None (the whole batch) or an integer >= 1")
    return m


def split_batch(batch: Sequence[Tensor], m: int) -> list[tuple[Tensor, ...]]:
    """The tensors of ``batch`` split along dim 0 into chunks of ``m`` (the last may be smaller)."""
    if not batch or not all(isinstance(t, Tensor) for t in batch):
        raise ValueError("batch: got no tensors; allowed: a tuple of tensors split along dim 0, e.g. (inputs, targets)")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch):
        raise ValueError(f"batch: tensors of {[t.shape[0] for t in batch]} examples; allowed: the same count in each")
    return list(zip(*(t.split(m) for t in batch)))


def ascend_by_chunks(
    opt: SAM,
    chunks: Sequence[tuple[Tensor, ...]],
    run_pass: Callable[[tuple[Tensor, ...], bool], Tensor],
    *,
    model: nn.Module | None = None,
    skip_dead: bool = False,
    reduce_grads: Callable[[list[Tensor]], None] | None = None,
) -> Tensor:
    """One SAM step with a perturbation per chunk; returns the mean pass-one loss (weighted by chunk size).

    ``run_pass(chunk, first)`` runs forward + backward of the chunk's mean loss at the current weights and returns
    the loss; ``first`` tells pass one from pass two. ``model``: whose BatchNorm statistics pass two leaves alone.
    ``skip_dead``: pass one inside ``opt.first_pass()``. ``reduce_grads``: applied to the averaged second gradient
    before the base step (DDP: the mean over the ranks, when every pass ran under ``no_sync``).
    """
    n = sum(c[0].shape[0] for c in chunks)
    params = [p for p in opt._all_params() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    loss_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for chunk in chunks:
        share = chunk[0].shape[0] / n

        def pass_one(chunk: tuple[Tensor, ...] = chunk) -> Tensor:
            opt.zero_grad()
            with opt.first_pass() if skip_dead else contextlib.nullcontext():
                return run_pass(chunk, True)

        def pass_two(chunk: tuple[Tensor, ...] = chunk) -> Tensor:
            with frozen_bn_stats(model) if model is not None else contextlib.nullcontext():
                return run_pass(chunk, False)

        loss, _, _ = opt.ascend(pass_two, pass_one=pass_one, finish=False)  # perturb, pass two, restore
        loss_sum += loss.detach().double() * share
        for a, p in zip(acc, params):
            if p.grad is not None:
                a.add_(p.grad, alpha=share)
    for p, a in zip(params, acc):
        p.grad = a
    if reduce_grads is not None:
        reduce_grads(acc)
    opt._step_after_ascent()
    return loss_sum.float()


def vectorise_refusal(model: nn.Module, batch_size: int, params: Sequence[Tensor]) -> str | None:
    """Why m = 1 cannot be vectorised for this model (None: it can): every trainable parameter must be the weight or
    bias of an ``nn.Linear`` (the layers between them without parameters), as in the MLP."""
    linear = {id(t) for mod in model.modules() if isinstance(mod, nn.Linear) for t in mod.parameters(recurse=False)}
    other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in linear]
    if other:
        return f"parameter {other[0]!r} is not a Linear layer's"
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        return f"the model has {norms[0]}"
    return None


def vectorised_ascent(
    opt: SAM,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    reduce_grads: Callable[[list[Tensor]], None] | None = None,
    m: int = 1,
) -> Tensor:
    """One SAM step with a perturbation per chunk of ``m`` examples for a stack of ``nn.Linear`` layers, in two
    batched passes: the same step as ``ascend_by_chunks``, without a loop over the chunks. Returns the mean loss at w.

    A Linear layer's gradient for example i is ``d_i a_i^T`` (d: the gradient at its output, a: its input). At
    m = 1 the ascent of example i is ``E_i = s_i (C * d_i a_i^T)`` with ``s_i = rho / (|g_i| + eps)`` and C the mask
    (SSAM), w^2 (ASAM) or 1, and its layer computes ``(W + E_i) a'_i = W a'_i + s_i d_i * (C (a_i * a'_i))``: one
    extra product per layer in pass two, whose gradient with respect to W is then the batch's ordinary one; the
    norms come from the same products, ``|C' * d a^T|^2 = (d^2)^T C' (a^2)``. For m > 1 (plain SAM: C = 1) the chunk's
    gradient is ``(1/m) sum_j d_j a_j^T`` and example i of the chunk gets ``(s_c/m) sum_j d_j (a_j . a'_i)``: the
    Gram matrices of the chunk's inputs and output gradients, block by block.
    """
    layers = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    rhos = {group_of[id(p)]["rho"] for mod in layers for p in mod.parameters()}
    epss = {group_of[id(p)]["perturb_eps"] for mod in layers for p in mod.parameters()}
    adaptive = any(group_of[id(p)]["adaptive"] for mod in layers for p in mod.parameters())
    if len(rhos) > 1 or len(epss) > 1:
        raise ValueError("micro_batch vectorised: param groups with different rho or perturb_eps are not supported")
    masked = any(opt._mask_for(p) is not None for mod in layers for p in mod.parameters())
    n = inputs.shape[0]
    if m > 1 and (adaptive or masked or n % m):
        raise ValueError(
            f"micro_batch={m} vectorised: only plain SAM (no mask, no ASAM) on a batch of whole chunks "
            f"(got {n} examples); use ascend_by_chunks"
        )
    rho, eps = rhos.pop(), epss.pop()
    renormalize = bool(getattr(opt, "renormalize", False))
    acts: dict[nn.Module, Tensor] = {}
    outs: dict[nn.Module, Tensor] = {}

    def keep(mod: nn.Module, args: tuple, out: Tensor) -> None:
        acts[mod] = args[0].detach()
        out.retain_grad()
        outs[mod] = out

    handles = [mod.register_forward_hook(keep) for mod in layers]
    try:
        opt.zero_grad()
        losses = loss_fn(model(inputs), targets, reduction="none")  # type: ignore[call-arg]
        losses.sum().backward()  # d_i: each example's own gradient at each layer's output
    finally:
        for h in handles:
            h.remove()
    d: dict[nn.Module, Tensor] = {mod: outs[mod].grad.detach() for mod in layers}  # type: ignore[union-attr]
    coef_w: dict[nn.Module, Tensor] = {}
    coef_b: dict[nn.Module, Tensor] = {}
    chunks = n // m
    sq = torch.zeros(chunks, dtype=torch.float64, device=inputs.device)
    for mod in layers:
        a, dd = acts[mod].double(), d[mod].double()
        w = mod.weight.detach()
        mask_w = opt._mask_for(mod.weight)
        c = (w * w) if adaptive else torch.ones_like(w)
        coef_w[mod] = c * mask_w if mask_w is not None else c
        if m > 1:  # |(1/m) sum_j d_j a_j^T|^2 = (1/m^2) sum_jk (d_j.d_k)(a_j.a_k)
            ga = a.view(chunks, m, -1) @ a.view(chunks, m, -1).transpose(1, 2)
            gd = dd.view(chunks, m, -1) @ dd.view(chunks, m, -1).transpose(1, 2)
            sq += (ga * gd).sum((1, 2)) / m**2
        else:
            norm_c = c if adaptive else torch.ones_like(w)
            if renormalize and mask_w is not None:
                norm_c = norm_c * mask_w
            sq += ((dd**2) @ norm_c.double() * a**2).sum(1)
        if mod.bias is not None:
            b = mod.bias.detach()
            mask_b = opt._mask_for(mod.bias)
            cb = (b * b) if adaptive else torch.ones_like(b)
            coef_b[mod] = cb * mask_b if mask_b is not None else cb
            if m > 1:
                sq += (dd.view(chunks, m, -1).sum(1) ** 2).sum(1) / m**2
            else:
                nb = cb if adaptive else torch.ones_like(b)
                if renormalize and mask_b is not None:
                    nb = nb * mask_b
                sq += (dd**2 * nb.double()).sum(1)
    scale = (rho / (sq.sqrt() + eps)).to(inputs.dtype).repeat_interleave(m) / m  # s_c / m for each example

    def perturbed(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        a_new, a_old, dm = args[0], acts[mod], d[mod]
        if m > 1:  # example i of chunk c: sum_j d_j (a_j . a'_i), j over the chunk
            gram = a_new.view(chunks, m, -1) @ a_old.view(chunks, m, -1).transpose(1, 2)
            extra = (gram @ dm.view(chunks, m, -1)).reshape(n, -1)
            if mod in coef_b:
                extra = extra + dm.view(chunks, m, -1).sum(1).repeat_interleave(m, 0)
        else:
            extra = dm * ((a_old * a_new) @ coef_w[mod].T)
            if mod in coef_b:
                extra = extra + dm * coef_b[mod]
        return out + scale[:, None] * extra

    handles = [mod.register_forward_hook(perturbed) for mod in layers]
    try:
        opt.zero_grad()
        loss_fn(model(inputs), targets).backward()
    finally:
        for h in handles:
            h.remove()
    if reduce_grads is not None:
        reduce_grads([p.grad for p in opt._all_params() if p.grad is not None])
    opt._step_after_ascent()
    return losses.mean().detach()

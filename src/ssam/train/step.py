"""One optimizer step of the trainer, as a function the benchmark can call and time unchanged.

A SAM-family step, as in the paper:
    pass one: forward + backward at w, accumulated over micro-batches
    (``after_first_backward``: where the trainer refreshes an SSAM-D mask from that gradient)
    perturb to w + e, pass two: forward + backward there, restore w, base optimizer step
A plain optimizer (SGD, AdamW) takes pass one and steps. With ``ascent='subbatch:F'`` pass one sees the first
ceil(F * b) examples of each micro-batch; with a one-pass direction (``previous``, ``momentum``, ``msam``) there is
no pass one, and the step's outputs and loss are pass two's (as for ``subbatch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import SAM, TwoPassScaler, frozen_bn_stats
from ..optim.msharp import ascend_by_chunks, split_batch, vectorised_ascent

__all__ = ["StepResult", "train_step", "micro_batch_step"]

LossFn = Callable[..., Tensor]  # loss_fn(logits, targets, *extras): the extras ride along in each micro-batch


@dataclass
class StepResult:
    """What a step hands back; tensors stay on the device so that reading them is the caller's choice of sync."""

    outputs: Tensor  # pass one's logits, detached, concatenated over the micro-batches
    loss_sum: Tensor  # pass one's loss summed over the examples (the mean loss times the batch size)
    nonfinite: Tensor  # bool scalar: the loss (or, without loss scaling, the gradient norm) is not finite


def _forward_backward(
    net: nn.Module,
    model: nn.Module,
    micro_batches: Sequence[tuple[Tensor, ...]],
    loss_fn: LossFn,
    scaler: TwoPassScaler,
    autocast: Callable[[], AbstractContextManager[Any]],
    no_sync: Callable[[], AbstractContextManager[Any]] | None,
    sync_last: bool,
    freeze_bn: bool,
) -> tuple[list[Tensor], Tensor]:
    """Forward + backward over the micro-batches; under DDP only the last one all-reduces, and only if sync_last."""
    n = sum(mb[0].shape[0] for mb in micro_batches)
    outs: list[Tensor] = []
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y, *extras) in enumerate(micro_batches):
        sync = sync_last and i == len(micro_batches) - 1
        quiet = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        bn = frozen_bn_stats(model) if freeze_bn else contextlib.nullcontext()
        with quiet, bn, autocast():
            out = net(x)
            loss = loss_fn(out, y, *extras)
        # Weighted by the micro-batch's share, the accumulated gradient is that of the whole batch's mean loss.
        scaler.scale(loss * (x.shape[0] / n)).backward()
        outs.append(out.detach())
        loss_sum = loss_sum + loss.detach().float() * x.shape[0]
    return outs, loss_sum


def _nonfinite(model: nn.Module, loss_sum: Tensor, scaler: TwoPassScaler) -> Tensor:
    if scaler.enabled:  # overflowing gradients are the scaler's business, a non-finite loss is not
        return ~torch.isfinite(loss_sum)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss_sum.new_zeros(())
    return ~(torch.isfinite(loss_sum) & torch.isfinite(gnorm))


def train_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[Tensor, ...]],
    loss_fn: LossFn = F.cross_entropy,
    *,
    model: nn.Module | None = None,
    scaler: TwoPassScaler | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    sync_first_pass: bool = True,
    skip_dead: bool = False,
    reduce_first_grads: Callable[[list[Tensor]], None] | None = None,
    freeze_bn_second_pass: bool = False,
    after_first_backward: Callable[[], None] | None = None,
    grads_to_none: bool = True,
    ascend: bool = True,
) -> StepResult:
    """One training step over ``micro_batches`` (a list of ``(inputs, targets, *extras)``; one for no accumulation;
    ``loss_fn(logits, targets, *extras)``: the extras are what a trajectory loss looks up, ssam.train.trajectory).

    net: the module called (a DDP or compiled wrapper); model: the plain module (BatchNorm, gradients), default net.
    scaler: ``TwoPassScaler`` for fp16 (default: a disabled one); autocast: a context factory for the passes.
    no_sync: DDP's ``net.no_sync`` (None in one process). sync_first_pass=False perturbs with each rank's own
    gradient (pass one entirely under no_sync). skip_dead: pass one runs inside ``opt.first_pass()``, so
    parameters without a live mask entry take no gradient; under DDP such a pass runs under no_sync (DDP's reducer
    waits for every parameter) and ``reduce_first_grads`` averages the gradients that exist (when syncing).
    after_first_backward: called once pass one's gradient is complete. grads_to_none: how gradients are zeroed
    (zeros in place are faster on a CPU when every parameter takes a gradient in every pass). ascend: False for a
    plain step of a SAM optimizer's schedule (ask ``opt.ascent_due()`` before calling): one pass, ``opt.step()``.
    """
    model = net if model is None else model
    scaler = scaler if scaler is not None else TwoPassScaler(enabled=False)
    autocast = autocast if autocast is not None else contextlib.nullcontext
    # ascend=False: a plain step of SAM's schedule (opt.ascent_due() was False): one synchronised pass, base step.
    sam = isinstance(opt, SAM) and ascend
    skip = sam and skip_dead
    if skip and no_sync is not None and sync_first_pass and reduce_first_grads is None:
        raise ValueError(
            "reduce_first_grads: got None; allowed: a function averaging gradients over the ranks "
            "(needed with skip_dead under DDP when the first pass is synced)"
        )
    # With skipping, a parameter may have no gradient this pass: a zero left from the last pass would be read
    # as a gradient, so gradients go back to None.
    to_none = grads_to_none or skip

    # Where the perturbation's direction comes from (ssam.optim.ascent): pass one on the batch, on a sub-batch of
    # each micro-batch, or no pass one at all (a stored direction); the base step's gradient is pass two's always.
    direction = opt.direction if sam and isinstance(opt, SAM) else None
    one_pass = direction is not None and direction.one_pass
    if direction is not None and direction.kind == "subbatch":
        first_batches = [tuple(t[: direction.pass_one_size(len(mb[0]))] for t in mb) for mb in micro_batches]
    else:
        first_batches = list(micro_batches)
    at_w = direction is None or direction.at_w
    out: dict[str, Any] = {"outs": [], "loss": torch.zeros((), device=micro_batches[0][0].device)}
    out["bad"] = torch.zeros((), dtype=torch.bool, device=out["loss"].device)

    def pass_one() -> None:
        first_pass = opt.first_pass() if skip and isinstance(opt, SAM) else contextlib.nullcontext()
        with first_pass:
            out["outs"], out["loss"] = _forward_backward(
                net,
                model,
                first_batches,
                loss_fn,
                scaler,
                autocast,
                no_sync,
                sync_last=sync_first_pass and not skip,
                freeze_bn=False,
            )
        if skip and no_sync is not None and sync_first_pass:
            reduce_first_grads([p.grad for p in model.parameters() if p.grad is not None])  # type: ignore[misc]
        out["bad"] = _nonfinite(model, out["loss"], scaler)
        if after_first_backward is not None:
            after_first_backward()

    def pass_two() -> None:
        freeze = freeze_bn_second_pass
        outs_two, loss_two = _forward_backward(
            net, model, micro_batches, loss_fn, scaler, autocast, no_sync, sync_last=True, freeze_bn=freeze
        )
        if not at_w:  # the step's loss is pass two's, over the whole batch (pass one saw a sub-batch or none ran)
            out["outs"], out["loss"] = outs_two, loss_two
        if one_pass:
            out["bad"] = _nonfinite(model, loss_two, scaler)
            if after_first_backward is not None:  # (SSAM-D's refresh scores this gradient, at w + e)
                after_first_backward()

    if sam and isinstance(opt, SAM):
        # The one protocol of a SAM step (SAM.ascend): pass one, unscale, perturb, pass two (w restored on any
        # exception), unscale, restore and base step; an overflow gives the step up (TwoPassScaler.skip).
        unscale = (lambda: scaler.unscale_(opt)) if scaler.enabled else None
        first = None if one_pass else pass_one
        _, _, stepped = opt.ascend(pass_two, pass_one=first, unscale=unscale, set_to_none=to_none)
        if not stepped:
            scaler.skip(opt)
    else:
        pass_one()
        scaler.step(opt)
    outs, loss_sum, bad = out["outs"], out["loss"], out["bad"]
    opt.zero_grad(set_to_none=to_none)
    scaler.update()
    return StepResult(torch.cat(outs), loss_sum, bad)


def micro_batch_step(
    net: nn.Module,
    opt: SAM,
    x: Tensor,
    y: Tensor,
    m: int,
    loss_fn: LossFn = F.cross_entropy,
    *,
    model: nn.Module | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    reduce_grads: Callable[[list[Tensor]], None] | None = None,
    skip_dead: bool = False,
    vectorised: bool = False,
    before_ascent: Callable[[], None] | None = None,
) -> StepResult:
    """One SAM step with a perturbation per chunk of ``m`` examples (m-sharpness, ``ssam.optim.msharp``).

    Every pass runs under ``no_sync`` (DDP): the chunks are this rank's, and ``reduce_grads`` averages the step's
    gradient over the ranks once. ``vectorised``: a stack of Linear layers, two batched passes instead of the loop
    (``ssam.optim.msharp.vectorised_ascent``). ``before_ascent``: called with the whole batch's gradient at w in
    ``.grad`` (a pass over the batch first; SSAM-D refreshes its mask from it), before the chunks perturb.
    """
    model = net if model is None else model
    autocast = autocast if autocast is not None else contextlib.nullcontext
    quiet = no_sync if no_sync is not None else contextlib.nullcontext
    outs: list[Tensor] = []

    def run_pass(chunk: tuple[Tensor, ...], first: bool) -> Tensor:
        cx, cy = chunk
        with quiet(), autocast():
            out = net(cx)
            loss = loss_fn(out, cy)
        loss.backward()
        if first:
            outs.append(out.detach())
        return loss.detach().float()

    if before_ascent is not None:
        opt.zero_grad()
        for chunk in split_batch((x, y), m):
            with quiet(), autocast():
                loss = loss_fn(net(chunk[0]), chunk[1]) * (chunk[0].shape[0] / x.shape[0])
            loss.backward()
        before_ascent()
    if vectorised:
        with torch.no_grad():
            outs.append(net(x).detach())  # pass one's logits for the training accuracy (no BatchNorm: pure)
        mean_loss = vectorised_ascent(opt, model, x, y, loss_fn, reduce_grads=reduce_grads, m=m)
    else:
        mean_loss = ascend_by_chunks(
            opt, split_batch((x, y), m), run_pass, model=model, skip_dead=skip_dead, reduce_grads=reduce_grads
        )
    opt.zero_grad()
    loss_sum = mean_loss * x.shape[0]
    return StepResult(torch.cat(outs), loss_sum, ~torch.isfinite(loss_sum))

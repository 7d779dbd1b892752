"""Diagonal empirical Fisher: the sum over single examples of the squared per-example gradient.

Two ways to get per-example gradients, giving the same numbers (tests compare them with a slow reference):
- ``loop``: one forward + backward per example. Fastest on a small CPU, where vmap's batching buys nothing.
- ``vmap``: ``torch.func.vmap(grad)`` over chunks of examples. Far faster on a GPU.
In training mode each example is its own BatchNorm batch in both (the paper's code uses batch size 1), and the
running statistics are never touched: the Fisher pass is a measurement, not training.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["empirical_fisher", "frozen_bn_stats", "iter_examples"]

FISHER_METHODS = ("auto", "loop", "vmap")


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run forward passes in training mode without updating BatchNorm running statistics.

    Use it around SAM's second forward pass: the batch at w + e is the same batch already counted at w, and a
    perturbed model's activations are not the statistics the model should remember. In training mode BatchNorm
    still normalises with the batch's own statistics, so the gradient is unchanged; only the running mean/var and
    ``num_batches_tracked`` stay as they were.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            saved.append(m)
            # With track_running_stats off, a training-mode forward uses batch statistics and skips the update.
            m.track_running_stats = False
    try:
        yield model
    finally:
        for m in saved:
            m.track_running_stats = True


def iter_examples(data: Any, num_samples: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``num_samples`` (input, target) examples, each with a leading batch dimension of 1 stripped.

    ``data`` is a map-style ``Dataset`` (examples drawn at random without replacement) or an iterable of
    ``(inputs, targets)`` batches (consumed in order until ``num_samples`` examples are used).
    """
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        n = len(data)
        if n == 0:
            raise ValueError("data: the dataset is empty; allowed: a dataset with at least one example")
        take = min(num_samples, n)
        idx = torch.randperm(n, generator=generator)[:take].tolist()
        for i in idx:
            x, y = data[i]
            yield torch.as_tensor(x), torch.as_tensor(y)
        return
    used = 0
    for batch in data:
        xs, ys = batch[0], batch[1]
        for x, y in zip(xs, ys):
            yield x, y
            used += 1
            if used >= num_samples:
                return


def _chunks(examples: Iterator[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    xs, ys = [], []
    for x, y in examples:
        xs.append(x)
        ys.append(torch.as_tensor(y))
        if len(xs) == size:
            yield torch.stack(xs), torch.stack(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


def empirical_fisher(
    model: nn.Module,
    params: list[Tensor],
    data: Any,
    num_samples: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    mode: str = "train",
    method: str = "auto",
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Return, for each tensor in ``params``, the sum over examples of the squared per-example gradient.

    Leaves no trace: the model's mode, every buffer (BatchNorm statistics) and every ``.grad`` are as before, and
    gradients already in ``.grad`` do not enter the sum.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"fisher_mode: got {mode!r}; allowed: 'train', 'eval'")
    if method not in FISHER_METHODS:
        raise ValueError(f"fisher_method: got {method!r}; allowed: {', '.join(FISHER_METHODS)}")
    loss_fn = loss_fn or F.cross_entropy
    device = params[0].device
    if method == "auto":
        method = "vmap" if device.type == "cuda" else "loop"

    was_training = model.training
    saved_grads = [p.grad for p in params]
    fisher = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    examples = iter_examples(data, num_samples, generator)
    try:
        model.train(mode == "train")
        with frozen_bn_stats(model):
            if method == "loop":
                _fisher_loop(model, params, examples, loss_fn, device, fisher)
            else:
                _fisher_vmap(model, params, examples, loss_fn, device, fisher, chunk_size)
    finally:
        model.train(was_training)
        for p, g in zip(params, saved_grads):
            p.grad = g
    return fisher


def _fisher_loop(model, params, examples, loss_fn, device, fisher) -> None:
    for x, y in examples:
        x = x.to(device, non_blocking=True).unsqueeze(0)
        y = torch.as_tensor(y).to(device, non_blocking=True).reshape(1)
        loss = loss_fn(model(x), y)
        # autograd.grad leaves .grad alone, so the caller's gradients cannot leak in.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        present = [(f, g) for f, g in zip(fisher, grads) if g is not None]
        if present:
            torch._foreach_addcmul_([f for f, _ in present], [g for _, g in present], [g for _, g in present])


def _fisher_vmap(model, params, examples, loss_fn, device, fisher, chunk_size) -> None:
    from torch.func import functional_call, grad, vmap

    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"model: {len(missing)} optimizer parameters are not parameters of the model given to update_mask")
    wanted = {names[id(p)]: p for p in params}
    others = {n: p for n, p in model.named_parameters() if n not in wanted}
    buffers = dict(model.named_buffers())

    def one_loss(w: dict, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (w, others, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.reshape(1))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0), randomness="different")
    order = [names[id(p)] for p in params]
    detached = {n: p.detach() for n, p in wanted.items()}
    for xs, ys in _chunks(examples, chunk_size):
        gs = per_example(detached, xs.to(device, non_blocking=True), ys.to(device, non_blocking=True))
        sq = [gs[n].pow(2).sum(0) for n in order]
        torch._foreach_add_(fisher, sq)

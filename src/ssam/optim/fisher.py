"""Diagonal empirical Fisher: the sum over single examples of the squared per-example gradient.

Three ways to get per-example gradients, giving the same numbers (tests compare them with a slow reference):
- ``loop``: one forward + backward per example. Works for any model; the slowest.
- ``vmap``: ``torch.func.vmap(grad)`` over chunks of examples. Works for any functional model.
- ``hooks``: one batched forward + backward per chunk; module hooks catch each layer's input and output gradient
  and form the per-example weight gradients themselves (Linear, Conv2d, BatchNorm2d, LayerNorm). Autograd never
  forms the parameter gradients, so the pass costs a training step of the chunk with the weight-gradient products
  done per example. Needs every Fisher parameter to sit in one of those layers, each called once per forward.
``auto``: ``hooks`` where the model allows it, else ``loop`` on a CPU and ``vmap`` on a GPU (see ``auto_method``).

In training mode each example is its own BatchNorm batch in every method (the paper's code uses batch size 1):
``hooks`` gets there in one batched pass because BatchNorm over a batch of one is instance normalisation. The
running statistics are never touched: the Fisher pass is a measurement, not training.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn import frozen_bn_stats
from .fisher_hooks import _fisher_hooks, chunks, hook_plan

__all__ = [
    "FISHER_METHODS",
    "FISHER_MODES",
    "auto_method",
    "empirical_fisher",
    "frozen_bn_stats",
    "hook_plan",
    "iter_examples",
    "resolve_fisher_mode",
    "train_mode_refusal",
]

#: How the per-example gradients are computed (see the module docstring); "auto" picks one.
FISHER_METHODS = ("auto", "loop", "vmap", "hooks")
#: The model's mode while the Fisher is measured: "train" (each example its own BatchNorm batch, the paper's code),
#: "eval" (the running statistics), "auto" ("train" where every BatchNorm sees more than one value per channel in a
#: batch of one, else "eval").
FISHER_MODES = ("auto", "train", "eval")


@torch.no_grad()
def train_mode_refusal(model: nn.Module, example: Tensor) -> str | None:
    """Why a per-example (batch of one) train-mode pass cannot run on ``model``: the first BatchNorm that would see
    one value per channel (1x1 feature maps, or a BatchNorm1d on (N, C) features); None when every one sees more.
    One forward of ``example`` in eval mode, so nothing is normalised or updated."""
    bad: list[str] = []

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        if x.shape[0] * (x[0, 0].numel() if x.dim() > 2 else 1) <= 1 and not bad:
            bad.append(type(module).__name__)

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    handles = [m.register_forward_hook(hook) for m in norms]
    was_training = model.training
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model(torch.as_tensor(example).to(device)[None])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return f"a {bad[0]} sees one value per channel in a batch of one (1x1 feature maps)" if bad else None


def resolve_fisher_mode(mode: str, model: nn.Module, example: Tensor) -> str:
    """``"auto"`` -> ``"train"`` where per-example train mode runs on this model, else ``"eval"``; the others as
    they are."""
    if mode != "auto":
        return mode
    return "eval" if train_mode_refusal(model, example) else "train"


def iter_examples(
    data: Any, num_samples: int, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``num_samples`` (input, target) examples, each with a leading batch dimension of 1 stripped.

    ``data`` is a map-style ``Dataset`` (examples drawn at random without replacement), an iterable of
    ``(inputs, targets)`` batches (consumed in order until ``num_samples`` examples are used) such as a DataLoader,
    or one ``(inputs, targets)`` batch.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = [data]  # one batch, not two batches
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
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"data: got a batch that is {what}; allowed: (inputs, targets) batches, one such batch, "
                "or a Dataset of (input, target) examples"
            )
        xs, ys = batch[0], batch[1]
        for x, y in zip(xs, ys):
            yield x, y
            used += 1
            if used >= num_samples:
                return


def empirical_fisher(
    model: nn.Module,
    params: list[Tensor],
    data: Any,
    num_samples: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    mode: str = "train",
    method: str = "auto",
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Return, for each tensor in ``params``, the sum over examples of the squared per-example gradient.

    Leaves no trace: the model's mode, every buffer (BatchNorm statistics) and every ``.grad`` are as before, and
    gradients already in ``.grad`` do not enter the sum. ``chunk_size``: examples per batched pass (``vmap`` and
    ``hooks``; default 32, and 64 on a CPU or 128 on a GPU).
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"fisher_mode: got {mode!r}; allowed: 'auto', 'train', 'eval'")
    if method not in FISHER_METHODS:
        raise ValueError(f"fisher_method: got {method!r}; allowed: {', '.join(FISHER_METHODS)}")
    loss_fn = loss_fn or F.cross_entropy
    device = params[0].device
    if method == "auto":
        method = auto_method(model, params, mode)
    plan = None
    if method == "hooks":
        plan, why = hook_plan(model, params, mode)
        if plan is None:
            raise ValueError(f"fisher_method: 'hooks' cannot handle this model: {why}; use 'auto', 'vmap' or 'loop'")
    fallback = _fallback_method(device)

    was_training = model.training
    saved_grads = [p.grad for p in params]
    fisher = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    examples = iter_examples(data, num_samples, generator)
    if mode == "auto":  # decided on the first example, which is then measured like the others
        first = next(examples, None)
        mode = "train" if first is None else resolve_fisher_mode(mode, model, first[0])
        examples = itertools.chain([] if first is None else [first], examples)
    try:
        model.train(mode == "train")
        with frozen_bn_stats(model):
            if method == "hooks":
                # Larger chunks pay on a GPU; on a CPU the per-example work dominates and 64 keeps memory modest.
                chunk = chunk_size or (64 if device.type == "cpu" else 128)
                rest = _fisher_hooks(model, plan, examples, loss_fn, device, fisher, chunk)
                # Whatever the batched pass could not take (see _Unsupported) is done the general way.
                if rest is not None:
                    method, examples = fallback, rest
            if method == "loop":
                _fisher_loop(model, params, examples, loss_fn, device, fisher)
            elif method == "vmap":
                _fisher_vmap(model, params, examples, loss_fn, device, fisher, chunk_size or 32)
    except ValueError as e:
        # torch's words for a BatchNorm given one value per channel (batch of one, 1x1 map) in training mode
        if mode == "train" and str(e).startswith("Expected more than 1"):
            raise ValueError(
                "fisher_mode: got 'train', where every example is its own BatchNorm batch, but a "
                "BatchNorm here sees one value per channel (1x1 feature maps); allowed: 'eval' (the "
                "running statistics) for this model"
            ) from None
        raise
    finally:
        model.train(was_training)
        for p, g in zip(params, saved_grads):
            p.grad = g
    return fisher


def auto_method(model: nn.Module, params: list[Tensor], mode: str = "train") -> str:
    """The method ``method="auto"`` runs: ``hooks`` where the model allows it, the fastest of the three on CPUs and
    GPUs alike (BENCHMARKS.md has the timings); else ``loop`` on a CPU and ``vmap`` on an accelerator."""
    if hook_plan(model, params, mode)[0] is not None:
        return "hooks"
    return _fallback_method(params[0].device)


def _fallback_method(device: torch.device) -> str:
    # On a 2-core CPU vmap's batched per-example convolutions took twice the loop's time (BENCHMARKS.md); on a GPU
    # the loop's batch-of-one passes are bound by kernel launches, which vmap's batching removes.
    return "loop" if device.type == "cpu" else "vmap"


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
        raise ValueError(
            f"model: {len(missing)} optimizer parameters are not parameters of the model given to update_mask"
        )
    wanted = {names[id(p)]: p for p in params}
    others = {n: p for n, p in model.named_parameters() if n not in wanted}
    buffers = dict(model.named_buffers())

    def one_loss(w: dict, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (w, others, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.reshape(1))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0), randomness="different")
    order = [names[id(p)] for p in params]
    detached = {n: p.detach() for n, p in wanted.items()}
    for xs, ys in chunks(examples, chunk_size):
        gs = per_example(detached, xs.to(device, non_blocking=True), ys.to(device, non_blocking=True))
        sq = [gs[n].pow(2).sum(0) for n in order]
        torch._foreach_add_(fisher, sq)

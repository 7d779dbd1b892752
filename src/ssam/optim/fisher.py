"""Diagonal empirical Fisher: the sum over single examples of the squared per-example gradient.

Three ways to get per-example gradients, giving the same numbers (tests compare them with a slow reference):
- ``loop``: one forward + backward per example. Works for any model; the slowest.
- ``vmap``: ``torch.func.vmap(grad)`` over chunks of examples. Works for any functional model.
- ``hooks``: one batched forward + backward per chunk; module hooks catch each layer's input and output gradient
  and form the per-example weight gradients themselves (Linear, Conv2d, BatchNorm2d). Parameter gradients are
  never formed by autograd, so the pass costs about one ordinary training step of the chunk. Needs every Fisher
  parameter to sit in one of those layers, each called once per forward.
``auto`` takes ``hooks`` where the model allows it and ``vmap`` otherwise (see ``BENCHMARKS.md``).

In training mode each example is its own BatchNorm batch in every method (the paper's code uses batch size 1):
``hooks`` gets there in one batched pass because BatchNorm over a batch of one is instance normalisation. The
running statistics are never touched: the Fisher pass is a measurement, not training.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["empirical_fisher", "frozen_bn_stats", "hook_plan", "iter_examples"]

FISHER_METHODS = ("auto", "loop", "vmap", "hooks")


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
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Return, for each tensor in ``params``, the sum over examples of the squared per-example gradient.

    Leaves no trace: the model's mode, every buffer (BatchNorm statistics) and every ``.grad`` are as before, and
    gradients already in ``.grad`` do not enter the sum. ``chunk_size``: examples per batched pass (``vmap`` and
    ``hooks``; default 32 and 64).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"fisher_mode: got {mode!r}; allowed: 'train', 'eval'")
    if method not in FISHER_METHODS:
        raise ValueError(f"fisher_method: got {method!r}; allowed: {', '.join(FISHER_METHODS)}")
    loss_fn = loss_fn or F.cross_entropy
    device = params[0].device
    plan = None
    if method in ("auto", "hooks"):
        plan, why = hook_plan(model, params, mode)
        if plan is None and method == "hooks":
            raise ValueError(f"fisher_method: 'hooks' cannot handle this model: {why}; use 'auto', 'vmap' or 'loop'")
        if plan is not None:
            method = "hooks"
    fallback = _fallback_method(device)
    if method == "auto":
        method = fallback

    was_training = model.training
    saved_grads = [p.grad for p in params]
    fisher = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    examples = iter_examples(data, num_samples, generator)
    try:
        model.train(mode == "train")
        with frozen_bn_stats(model):
            if method == "hooks":
                rest = _fisher_hooks(model, plan, examples, loss_fn, device, fisher, chunk_size or 64)
                # Whatever the batched pass could not take (see _Unsupported) is done the general way.
                if rest is not None:
                    method, examples = fallback, rest
            if method == "loop":
                _fisher_loop(model, params, examples, loss_fn, device, fisher)
            elif method == "vmap":
                _fisher_vmap(model, params, examples, loss_fn, device, fisher, chunk_size or 32)
    finally:
        model.train(was_training)
        for p, g in zip(params, saved_grads):
            p.grad = g
    return fisher


def _fallback_method(device: torch.device) -> str:
    # Measured (BENCHMARKS.md): vmap beats the loop on both a 2-core CPU and a GPU, by several times.
    return "vmap"


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


# ---------------------------------------------------------------------------------------------- hooks
_HOOKABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
# Elements (of U and G below) one conv layer may hold at a time: a few MB, so the products stay in cache.
_CONV_BUDGET = 1 << 21


class _Unsupported(Exception):
    """The batched pass met something it cannot reproduce per example; raised before anything is added."""


def hook_plan(model: nn.Module, params: list[Tensor], mode: str) -> tuple[dict | None, str]:
    """For ``hooks``: {module: {"weight"/"bias": index in params}}, or None and the reason it does not apply.

    Examples stay independent in one batched pass when every module that normalises with batch statistics is a
    BatchNorm2d (replaced by its batch-of-one equivalent) and every Fisher parameter is the weight or bias of a
    Linear, Conv2d (zero padding, one group) or BatchNorm2d. Exact types only: a subclass may change forward.
    """
    slot = {id(p): i for i, p in enumerate(params)}
    plan: dict[nn.Module, dict[str, int]] = {}
    found: set[int] = set()
    for name, mod in model.named_modules():
        where = f"{name or 'the model'} ({type(mod).__name__})"
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            batch_stats = mode == "train" or mod.running_mean is None
            if batch_stats and type(mod) is not nn.BatchNorm2d:
                return None, f"{where} normalises with the statistics of the whole batch"
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) in slot]
        if not own:
            continue
        if type(mod) not in _HOOKABLE or any(n not in ("weight", "bias") for n, _ in own):
            return None, f"{where} holds Fisher parameters and is not a plain Linear, Conv2d or BatchNorm2d"
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros" or mod.padding == "same"):
            return None, f"{where} uses groups, 'same' or non-zero padding"
        for _, p in own:
            if id(p) in found:
                return None, f"{where} shares a parameter with another module"
            found.add(id(p))
        plan[mod] = {n: slot[id(p)] for n, p in own}
    if len(found) != len(slot):
        return None, f"{len(slot) - len(found)} Fisher parameters are not weights of the model's modules"
    return plan, ""


@contextlib.contextmanager
def _batch_of_one_bn(model: nn.Module) -> Iterator[None]:
    """Make each BatchNorm2d that would use batch statistics normalise every example on its own."""
    patched = []
    for mod in model.modules():
        if type(mod) is nn.BatchNorm2d and (mod.training or mod.running_mean is None):
            patched.append((mod, mod.__dict__.get("forward")))
            # BatchNorm over a batch of one is instance normalisation with the same affine map.
            mod.forward = functools.partial(_instance_norm, mod)
    try:
        yield
    finally:
        for mod, old in patched:
            del mod.forward
            if old is not None:
                mod.forward = old


def _instance_norm(mod: nn.BatchNorm2d, x: Tensor) -> Tensor:
    return F.instance_norm(x, None, None, mod.weight, mod.bias, True, 0.0, mod.eps)


def _normalized(mod: nn.BatchNorm2d, x: Tensor, per_example: bool) -> Tensor:
    if per_example:
        return F.instance_norm(x, eps=mod.eps)
    shape = (1, -1, 1, 1)
    return (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)


def _fisher_hooks(model, plan, examples, loss_fn, device, fisher, chunk_size) -> Iterator | None:
    """Add every chunk's Fisher; on the first chunk the batched pass cannot take, return the examples left."""
    for xs, ys in _chunks(examples, chunk_size):
        try:
            _hooked_pass(model, plan, xs.to(device, non_blocking=True), ys.to(device, non_blocking=True),
                         loss_fn, fisher)
        except _Unsupported:
            return itertools.chain(zip(xs, ys), examples)
    return None


def _hooked_pass(model, plan, xs, ys, loss_fn, fisher) -> None:
    if not xs.is_floating_point():
        raise _Unsupported("integer inputs cannot carry the gradient that drives the hooks")
    seen: dict[nn.Module, tuple[Tensor, int]] = {}
    per_example_bn = {m for m in plan if type(m) is nn.BatchNorm2d and (m.training or m.running_mean is None)}

    def on_output(mod, args, out):
        a = args[0] if args else None
        if mod in seen or not isinstance(a, Tensor) or not isinstance(out, Tensor) or not a.requires_grad:
            # A second call would need its per-example gradients summed before squaring; an input that does not
            # come from the examples would leave the layer off the backward pass to them.
            raise _Unsupported(mod)
        seen[mod] = (a, a._version)
        if out._is_view():
            # A hook on a view is lost if the view is later changed in place (instance_norm returns a view).
            out = out.clone()
        out.register_hook(functools.partial(on_grad, mod))
        return out

    def on_grad(mod, d):
        a = seen[mod][0]
        slots = plan[mod]
        fw = fisher[slots["weight"]] if "weight" in slots else None
        fb = fisher[slots["bias"]] if "bias" in slots else None
        if isinstance(mod, nn.Conv2d):
            _conv_fisher(mod, a, d, fw, fb)
        elif isinstance(mod, nn.Linear):
            _linear_fisher(a, d, fw, fb)
        else:
            _bn_fisher(mod, a, d, fw, fb, mod in per_example_bn)
        seen[mod] = (None, 0)  # let the activation go as soon as autograd is done with it

    handles = [m.register_forward_hook(on_output) for m in plan]
    try:
        x = xs.detach().requires_grad_(True)
        with _batch_of_one_bn(model):
            out = model(x)
        if not isinstance(out, Tensor) or out.shape[:1] != xs.shape[:1]:
            raise _Unsupported("the model's output is not one tensor with a row per example")
        if any(a._version != v for a, v in seen.values()):
            raise _Unsupported("a layer input was changed in place after the layer read it")
        total = sum(loss_fn(out[i:i + 1], ys[i:i + 1]) for i in range(len(ys)))
        # The gradient with respect to the input: it runs the backward through every layer (firing the hooks)
        # but never forms a parameter gradient, which the hooks form per example instead.
        torch.autograd.grad(total, [x])
    finally:
        for h in handles:
            h.remove()


def _linear_fisher(a, d, fw, fb) -> None:
    if a.dim() == 2:
        # (d_i a_i^T)^2 summed over i is (d^2)^T a^2: one product, no per-example matrices.
        if fw is not None:
            fw.add_((d * d).t() @ (a * a))
        if fb is not None:
            fb.add_((d * d).sum(0))
        return
    b = a.shape[0]
    a, d = a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1])
    if fw is not None:
        fw.add_(torch.bmm(d.transpose(1, 2), a).square_().sum(0))
    if fb is not None:
        fb.add_(d.sum(1).square_().sum(0))


def _conv_fisher(mod, a, d, fw, fb) -> None:
    b, o = d.shape[:2]
    d = d.reshape(b, o, -1)
    if fb is not None:
        fb.add_(d.sum(2).square_().sum(0))
    if fw is None:
        return
    padding = 0 if mod.padding == "valid" else mod.padding
    ckk = fw[0].numel()
    step = max(1, _CONV_BUDGET // (ckk * (d.shape[2] + o)))
    acc = fw.view(o, ckk) if fw.is_contiguous() else torch.zeros(o, ckk, dtype=fw.dtype, device=fw.device)
    for i in range(0, b, step):
        u = F.unfold(a[i:i + step], mod.kernel_size, mod.dilation, padding, mod.stride)
        g = torch.bmm(d[i:i + step], u.transpose(1, 2))
        acc.add_(g.square_().sum(0))
    if acc.data_ptr() != fw.data_ptr():
        fw.add_(acc.view(fw.shape))


def _bn_fisher(mod, a, d, fw, fb, per_example) -> None:
    if fw is not None:
        fw.add_((d * _normalized(mod, a, per_example)).sum((2, 3)).square_().sum(0))
    if fb is not None:
        fb.add_(d.sum((2, 3)).square_().sum(0))

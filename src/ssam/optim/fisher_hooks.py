"""The Fisher's ``hooks`` method: one batched forward + backward per chunk of examples, with module hooks that catch
each layer's input and output gradient and form the per-example squared weight gradients themselves (Linear,
Conv2d, BatchNorm2d, LayerNorm). ``ssam.optim.fisher`` is the API; this module is its fast path: which models it
takes (``hook_plan``) and the per-layer formulas, with the convolution's three kernels.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["hook_plan", "chunks"]


def chunks(examples: Iterator[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    xs, ys = [], []
    for x, y in examples:
        xs.append(x)
        ys.append(torch.as_tensor(y))
        if len(xs) == size:
            yield torch.stack(xs), torch.stack(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


_HOOKABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)
# Subclasses whose forward is known to compute what their torch base does (timm's: F.layer_norm or its fused twin).
_SAME_AS_BASE = {"timm.layers.norm.LayerNorm"}
# Elements of input patches that the CPU path of _conv_fisher holds at a time (sized for a last-level cache), and
# of patches or per-example gradients a GPU chunk may hold (large: there each launch should carry much work).
_PATCH_BUDGET = 1 << 22
_DEVICE_BUDGET = 1 << 26
# Stride-1 convs at least this wide take _conv_fisher_shifted (the widened rows cost (W + 2p) / W more products),
# this many examples at a time.
_SHIFT_MIN_WIDTH = 16
_SHIFT_STEP = 4


class _Unsupported(Exception):
    """The batched pass met something it cannot reproduce per example; raised before anything is added."""


def hook_plan(model: nn.Module, params: list[Tensor], mode: str) -> tuple[dict | None, str]:
    """For ``hooks``: {module: {"weight"/"bias": index in params}}, or None and the reason it does not apply.

    Examples stay independent in one batched pass when every module that normalises with batch statistics is a
    BatchNorm2d (replaced by its batch-of-one equivalent) and every Fisher parameter is the weight or bias of a
    Linear, Conv2d (zero padding, one group), BatchNorm2d or LayerNorm (which never mixes examples). Parameters
    used outside such a layer (a ViT's ``pos_embed`` and ``cls_token``) are not covered. Exact types only: a
    subclass may change forward.
    What the plan cannot see: a model whose own forward code mixes the examples of a batch (no ordinary
    classifier does) would get wrong numbers; pass ``method="loop"`` for such a model.
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
        if not _hookable(mod) or any(n not in ("weight", "bias") for n, _ in own):
            return None, f"{where} holds Fisher parameters and is not a plain Linear, Conv2d, BatchNorm2d or LayerNorm"
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


def _hookable(mod: nn.Module) -> bool:
    cls = type(mod)
    return cls in _HOOKABLE or f"{cls.__module__}.{cls.__qualname__}" in _SAME_AS_BASE


@contextlib.contextmanager
def _batch_of_one_bn(model: nn.Module) -> Iterator[set]:
    """Make each BatchNorm2d that would use batch statistics normalise every example on its own; yields them."""
    patched = []
    for mod in model.modules():
        if type(mod) is nn.BatchNorm2d and (mod.training or mod.running_mean is None):
            patched.append((mod, mod.__dict__.get("forward")))
            mod.forward = functools.partial(_batch_of_one, mod)  # type: ignore[method-assign]
    try:
        yield {mod for mod, _ in patched}
    finally:
        for mod, old in patched:
            del mod.forward
            if old is not None:
                mod.forward = old  # type: ignore[method-assign]


def _batch_of_one(mod: nn.BatchNorm2d, x: Tensor) -> Tensor:
    # BatchNorm over a batch of one is instance normalisation with the same affine map.
    return F.instance_norm(x, None, None, mod.weight, mod.bias, True, 0.0, mod.eps)


def _normalized(mod: nn.BatchNorm2d, x: Tensor, per_example: bool) -> Tensor:
    """BatchNorm's input normalised as its forward did (the factor of its weight's gradient), recomputed: cheaper
    than keeping it from the forward, which would cost a separate affine step there."""
    if per_example:
        return F.instance_norm(x, eps=mod.eps)
    shape = (1, -1, 1, 1)
    mean, var = cast(Tensor, mod.running_mean), cast(Tensor, mod.running_var)  # eval mode: the running statistics
    return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + mod.eps)


def _fisher_hooks(model, plan, examples, loss_fn, device, fisher, chunk_size) -> Iterator | None:
    """Add every chunk's Fisher; on the first chunk the batched pass cannot take, return the examples left."""
    for xs, ys in chunks(examples, chunk_size):
        try:
            _hooked_pass(
                model, plan, xs.to(device, non_blocking=True), ys.to(device, non_blocking=True), loss_fn, fisher
            )
        except _Unsupported:
            return itertools.chain(zip(xs, ys), examples)
    return None


def _hooked_pass(model, plan, xs, ys, loss_fn, fisher) -> None:
    if not xs.is_floating_point():
        raise _Unsupported("integer inputs cannot carry the gradient that drives the hooks")
    seen: dict[nn.Module, tuple[Tensor, int]] = {}
    scratch: dict[str, Tensor] = {}
    per_example: set = set()

    def on_output(mod, args, out):
        a = args[0] if args else None
        if mod in seen or not isinstance(a, Tensor) or not isinstance(out, Tensor) or not a.requires_grad:
            # A second call would need its per-example gradients summed before squaring; an input that does not
            # come from the examples would leave the layer off the backward pass to them.
            raise _Unsupported(mod)
        seen[mod] = (a, a._version)
        if not out._is_view():
            out.register_hook(functools.partial(on_grad, mod))
            return None
        # A hook on a view is lost if the view is later changed in place (instance_norm returns a view); one on
        # its base is not, and gets the same numbers when the view is the whole base, reshaped.
        base = out._base
        if base is not None and base.numel() == out.numel() and base.is_contiguous() and out.is_contiguous():
            base.register_hook(lambda g, mod=mod, shape=out.shape: on_grad(mod, g.view(shape)))
            return None
        out = out.clone()
        out.register_hook(functools.partial(on_grad, mod))
        return out

    def on_grad(mod, d):
        a = seen[mod][0]
        slots = plan[mod]
        fw = fisher[slots["weight"]] if "weight" in slots else None
        fb = fisher[slots["bias"]] if "bias" in slots else None
        if isinstance(mod, nn.Conv2d):
            _conv_fisher(mod, a, d, fw, fb, scratch)
        elif isinstance(mod, nn.Linear):
            _linear_fisher(a, d, fw, fb)
        elif isinstance(mod, nn.LayerNorm):
            _ln_fisher(mod, a, d, fw, fb)
        else:
            _bn_fisher(d, _normalized(mod, a, mod in per_example) if fw is not None else None, fw, fb)
        seen[mod] = (None, 0)  # let the activation go as soon as autograd is done with it

    handles = [m.register_forward_hook(on_output) for m in plan]
    try:
        x = xs.detach().requires_grad_(True)
        with _batch_of_one_bn(model) as patched:
            per_example.update(patched)
            out = model(x)
        if not isinstance(out, Tensor) or out.shape[:1] != xs.shape[:1]:
            raise _Unsupported("the model's output is not one tensor with a row per example")
        if any(a._version != v for a, v in seen.values()):
            raise _Unsupported("a layer input was changed in place after the layer read it")
        if loss_fn is F.cross_entropy:
            total = F.cross_entropy(out, ys, reduction="sum")  # the sum of the batch-of-one means, in one call
        else:
            total = sum(loss_fn(out[i : i + 1], ys[i : i + 1]) for i in range(len(ys)))
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


def _conv_fisher(mod, a, d, fw, fb, scratch) -> None:
    b, o, ho, wo = d.shape
    d = d.reshape(b, o, ho * wo)
    if fb is not None:
        fb.add_(d.sum(2).square_().sum(0))
    if fw is None:
        return
    # Per-example gradients G_i = d_i U_i^T (U_i: example i's input patches) take the products of one weight
    # gradient, but each G_i is as large as the weight: they are squared and summed a few at a time, never kept.
    if a.device.type != "cpu":
        _conv_fisher_unfold(mod, a, d, fw, _DEVICE_BUDGET)
        return
    (kh, kw), c = mod.kernel_size, fw.shape[1]
    if mod.stride == (1, 1) and wo >= _SHIFT_MIN_WIDTH:
        acc = torch.zeros(kh, kw, o, c, dtype=fw.dtype, device=fw.device)
        _conv_fisher_shifted(mod, a, d.view(b, o, ho, wo), acc)
        fw.add_(acc.permute(2, 3, 0, 1))
    else:
        acc = torch.zeros(o, kh, kw, c, dtype=fw.dtype, device=fw.device)
        step = max(1, min(b, _PATCH_BUDGET // (fw[0].numel() * ho * wo)))
        _conv_fisher_patches(mod, a, d, acc.view(o, -1), scratch, step)
        fw.add_(acc.permute(0, 3, 1, 2))


def _conv_fisher_unfold(mod, a, d, fw, budget: int) -> None:
    """GPU: F.unfold and batched products over chunks of examples and output channels, ``budget`` elements each."""
    b, o, length = d.shape
    ckk = fw[0].numel()
    acc = fw.view(o, ckk) if fw.is_contiguous() else torch.zeros(o, ckk, dtype=fw.dtype, device=fw.device)
    step = max(1, min(b, budget // (ckk * length)))
    rows = max(1, min(o, budget // (step * ckk)))
    padding = 0 if mod.padding == "valid" else mod.padding
    for i in range(0, b, step):
        u = F.unfold(a[i : i + step], mod.kernel_size, mod.dilation, padding, mod.stride).transpose(1, 2)
        di = d[i : i + step]
        for r in range(0, o, rows):
            acc[r : r + rows].add_(torch.bmm(di[:, r : r + rows], u).square_().sum(0))
    if acc.data_ptr() != fw.data_ptr():
        fw.add_(acc.view(fw.shape))


def _conv_fisher_patches(mod, a, d, acc, scratch, step) -> None:
    """CPU: one matrix product per example over patches laid out (L, kh*kw*C), which strided copies build fast;
    on a CPU that beats batched products over F.unfold by several times (BENCHMARKS.md)."""
    g = _scratch(scratch, "grad", acc.numel(), acc).view(acc.shape)
    for i in range(0, d.shape[0], step):
        u = _patches_last(mod, a[i : i + step], scratch)
        for j in range(u.shape[0]):
            torch.mm(d[i + j], u[j], out=g)
            acc.addcmul_(g, g)


def _conv_fisher_shifted(mod, a, d, acc) -> None:
    """CPU, stride 1: no patches at all. In a zero-padded channels-last image, the inputs that kernel tap (y, x)
    meets form a plain strided (rows, C) matrix if the output rows are taken as wide as the padded image; the
    extra output columns get a zero gradient, so they add nothing. Each tap is then one product, per example."""
    kh, kw, o, c = acc.shape
    b, _, h, w = a.shape
    (dh, dw), (ph, pw) = mod.dilation, ((0, 0) if mod.padding == "valid" else mod.padding)
    ho, wo = d.shape[2:]
    hp, wp = h + 2 * ph, w + 2 * pw
    k = ho * wp
    for i in range(0, d.shape[0], _SHIFT_STEP):
        n = min(_SHIFT_STEP, b - i)
        # One spare row: the windows of the widened last output row run past the image's end.
        src = a.new_zeros(n, hp + 1, wp, c)
        src[:, ph : ph + h, pw : pw + w].copy_(a[i : i + n].permute(0, 2, 3, 1))
        dp = a.new_zeros(n, o, ho, wp)
        dp[..., :wo].copy_(d[i : i + n])
        dp = dp.view(n, o, k)
        g = a.new_empty(kh, kw, n, o, c)
        for y in range(kh):
            for x in range(kw):
                tap = src.as_strided(
                    (n, k, c), ((hp + 1) * wp * c, c, 1), src.storage_offset() + (y * dh * wp + x * dw) * c
                )
                torch.bmm(dp, tap, out=g[y, x])
        acc.add_(g.square_().sum(2))


def _scratch(scratch: dict, key: str, numel: int, like: Tensor) -> Tensor:
    """A flat buffer of at least ``numel`` elements kept for the whole Fisher pass: fresh large allocations on a
    CPU are fresh pages, and touching them for the first time costs more than the copies written into them."""
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        scratch[key] = buf
    return buf[:numel]


def _patches_last(mod: nn.Conv2d, a: Tensor, scratch: dict) -> Tensor:
    """The conv's input patches as (b, L, kh*kw*C): F.unfold's entries, transposed, in (kh, kw, C) order."""
    b, c, h, w = a.shape
    kh, kw = mod.kernel_size
    (sh, sw), (dh, dw) = mod.stride, mod.dilation
    ph, pw = cast("tuple[int, int]", (0, 0) if mod.padding == "valid" else mod.padding)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    src = a.permute(0, 2, 3, 1)
    if ph or pw:
        padded = a.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
        padded[:, ph : ph + h, pw : pw + w].copy_(src)
        src = padded
    out = _scratch(scratch, "patches", b * ho * wo * kh * kw * c, a).view(b, ho, wo, kh, kw, c)
    for y in range(kh):
        for x in range(kw):
            # In channels-last order each copied row is W*C contiguous numbers, not W.
            out[:, :, :, y, x].copy_(
                src[:, y * dh : y * dh + sh * (ho - 1) + 1 : sh, x * dw : x * dw + sw * (wo - 1) + 1 : sw]
            )
    return out.view(b, ho * wo, kh * kw * c)


def _ln_fisher(mod: nn.LayerNorm, a: Tensor, d: Tensor, fw: Tensor | None, fb: Tensor | None) -> None:
    """Per example, LayerNorm's weight gradient is the sum over positions of d * (normalised input), its bias's of d."""
    shape = (a.shape[0], -1, *mod.normalized_shape)
    if fw is not None:
        xhat = F.layer_norm(a, mod.normalized_shape, eps=mod.eps)
        fw.add_((d * xhat).reshape(shape).sum(1).square_().sum(0))
    if fb is not None:
        fb.add_(d.reshape(shape).sum(1).square_().sum(0))


def _bn_fisher(d, xhat, fw, fb) -> None:
    if fw is not None:
        fw.add_((d * xhat).sum((2, 3)).square_().sum(0))
    if fb is not None:
        fb.add_(d.sum((2, 3)).square_().sum(0))

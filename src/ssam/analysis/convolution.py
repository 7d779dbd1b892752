"""Convolutions whose second derivative runs on the first-order kernels.

A Hessian-vector product is a backward pass through the graph of the first gradient, so every convolution
is differentiated twice.  PyTorch's double backward of a convolution (``_convolution_double_backward``)
forms the weight part of that second derivative as a convolution of the input with the output gradient,
batch and channel dimensions swapped and the whole feature map as the kernel: on a CPU (oneDNN) that one
call takes longer than the whole first-order ``convolution_backward`` of the layer.  Every quantity of the
double backward is the forward, the input gradient or the weight gradient of a convolution with other
arguments, so :class:`_ConvBackward` computes each with the kernel made for it:

- gradient w.r.t. the output gradient ``gO``: ``conv(ggI, w) + conv(x, ggW) + ggb`` (forward kernels);
- w.r.t. the input ``x`` (through ``gW``): the input gradient of a convolution whose weight is ``ggW``;
- w.r.t. the weight ``w`` (through ``gI``): the weight gradient of a convolution whose input is ``ggI``.

The products are the same up to float rounding (tests compare them with the native double backward and
with exact Hessians); BENCHMARKS.md has what it saves.  Only modules that run the stock forward of
``nn.Conv1d/2d/3d`` with zero padding given as numbers are switched, and only while the operator builds a
graph: subclasses with a forward of their own (weight standardisation and the like) keep it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CONVOLUTIONS", "first_order_kernels", "runs_stock_forward"]

_aten = torch.ops.aten
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def runs_stock_forward(m: nn.Module) -> bool:
    """Whether ``m`` runs the forward of the ``torch.nn`` class it derives from: not overridden by a subclass
    or on the instance (for convolutions, ``_conv_forward`` neither).  Code that replaces a module's
    computation by its own formulas (here, :mod:`.taylor`) may do so only then."""
    if "forward" in vars(m):
        return False
    base = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules")), None)
    if base is None or type(m).forward is not base.forward:
        return False
    return not isinstance(m, CONVOLUTIONS) or type(m)._conv_forward is base._conv_forward


class _ConvBackward(torch.autograd.Function):
    """``(gO, x, w) -> (gI, gW, gb)`` of a convolution, differentiable once more with first-order kernels.

    ``wanted``: which of the three to compute (as ``convolution_backward``'s output mask); the others come
    back as non-differentiable zero-size placeholders, since a Function's outputs must be tensors."""

    @staticmethod
    def forward(ctx: Any, g_out: Tensor, x: Tensor, w: Tensor, conf: tuple, wanted: tuple) -> Any:
        ctx.save_for_backward(g_out, x, w)
        ctx.conf, ctx.has_bias = conf, wanted[2]
        stride, padding, dilation, groups = conf
        bias_sizes = [w.shape[0]] if wanted[2] else None
        outs = _aten.convolution_backward(
            g_out, x, w, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, list(wanted)
        )
        holders = [g_out.new_zeros(0) for ok in wanted if not ok]
        ctx.mark_non_differentiable(*holders)
        it = iter(holders)
        return tuple(o if ok else next(it) for o, ok in zip(outs, wanted))

    @staticmethod
    def backward(ctx: Any, gg_in: Tensor | None, gg_w: Tensor | None, gg_b: Tensor | None) -> Any:
        g_out, x, w = ctx.saved_tensors
        # Placeholders come back as zero-size gradients: treat them as absent.
        gg_in = gg_in if gg_in is not None and gg_in.numel() else None
        gg_w = gg_w if gg_w is not None and gg_w.numel() else None
        stride, padding, dilation, groups = ctx.conf
        zeros = [0] * len(stride)
        need_g_out, need_x, need_w = ctx.needs_input_grad[:3]
        d_g_out = d_x = d_w = None
        if need_g_out:
            terms = []
            if gg_in is not None:
                terms.append(_aten.convolution(gg_in, w, None, stride, padding, dilation, False, zeros, groups))
            if gg_w is not None:
                terms.append(_aten.convolution(x, gg_w, None, stride, padding, dilation, False, zeros, groups))
            if ctx.has_bias and gg_b is not None and gg_b.numel():
                terms.append(gg_b.view(1, -1, *([1] * (g_out.dim() - 2))).expand_as(g_out))
            d_g_out = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_w is not None:
            d_x = _aten.convolution_backward(
                g_out, x, gg_w, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
            )[0]
        if need_w and gg_in is not None:
            d_w = _aten.convolution_backward(
                g_out, gg_in, w, None, stride, padding, dilation, False, zeros, groups, [False, True, False]
            )[1]
        return d_g_out, d_x, d_w, None, None


class _Conv(torch.autograd.Function):
    """A convolution whose backward is :class:`_ConvBackward`, so that its graph can be differentiated again."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, conf: tuple) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.has_bias = conf, b is not None
        stride, padding, dilation, groups = conf
        return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> Any:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g_in, g_w, g_b = _ConvBackward.apply(g_out, x, w, ctx.conf, (need_x, need_w, need_b and ctx.has_bias))
        return (g_in if need_x else None), (g_w if need_w else None), (g_b if need_b and ctx.has_bias else None), None


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    conf = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
    return _Conv.apply(x, self.weight, self.bias, conf)


def _switchable(m: nn.Module) -> bool:
    return (
        isinstance(m, CONVOLUTIONS)
        and runs_stock_forward(m)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


@contextlib.contextmanager
def first_order_kernels(model: nn.Module) -> Iterator[int]:
    """For the duration, the stock convolutions of ``model`` record nodes whose double backward runs on the
    first-order kernels; yields how many were switched.  Use it around the forward and the ``create_graph``
    backward of any Hessian-vector product of your own::

        with first_order_kernels(model):
            grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)

    The products may be taken after the block: the graph keeps its nodes.  On exit, also after an exception,
    every module runs its class's forward again."""
    switched = [m for m in model.modules() if _switchable(m)]
    try:
        for m in switched:
            m.forward = types.MethodType(_forward, m)  # an instance attribute: hooks still run through __call__
        yield len(switched)
    finally:
        for m in switched:
            vars(m).pop("forward", None)

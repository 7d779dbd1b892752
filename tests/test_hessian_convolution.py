"""Convolutions whose second derivative runs on the first-order kernels: the same Hessian-vector products as
PyTorch's own double backward and as an exact Hessian, for every convolution setting a model may use, and
nothing switched that should not be (subclasses with their own forward, non-zero padding modes)."""

import numpy as np
import pytest
import torch
from torch import nn

from ssam.analysis import HessianOperator, analysis_mode
from ssam.analysis.convolution import _Conv, first_order_kernels
from test_hessian import exact_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


class Standardised(nn.Conv2d):
    """A convolution with a forward of its own (weight standardisation): must be left as it is."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class Plain(nn.Conv2d):
    """A subclass without a forward of its own: runs the stock forward, so it is switched."""


class Net(nn.Module):
    """Every setting at once: stride, padding, dilation, groups, no bias, 1-D and 3-D, a reflect-padded and a
    'same'-padded convolution (both left stock), and a standardised one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = Plain(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = Standardised(4, 4, 1)
        self.c4 = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
        self.c5 = nn.Conv2d(2, 2, 3, padding="same")
        self.c1d = nn.Conv1d(2, 3, 2, stride=2)
        self.c3d = nn.Conv3d(1, 2, (1, 2, 2), padding=(0, 1, 0))
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(2 * 3 * 3 + 3 * 4 + 2 * 2 * 4 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        h = torch.tanh(self.c3(torch.tanh(self.c2(h))))
        h = torch.tanh(self.c5(torch.tanh(self.c4(h))))
        a = torch.tanh(self.c1d(h.flatten(2)))
        b = torch.tanh(self.c3d(h.unsqueeze(1)))
        return self.fc(torch.cat([h.flatten(1), a.flatten(1), b.flatten(1)], 1))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net().double()
    batches = [(torch.randn(n, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)]
    with torch.no_grad():
        model(batches[0][0] + 1)  # running statistics that are not the defaults
    return model, nn.CrossEntropyLoss(), batches


def products(model, loss_fn, batches, vs, first_order_convs):
    params = list(model.parameters())
    with analysis_mode(model, params) as dev:
        op = HessianOperator(model, loss_fn, batches, params, dev, first_order_convs=first_order_convs)
        try:
            return [hv.clone() for hv in op.matvec(vs)]
        finally:
            op.close()


def test_products_equal_native_and_exact():
    model, loss_fn, batches = make()
    H = exact_hessian(model, loss_fn, batches)
    gen = torch.Generator().manual_seed(1)
    vs = [torch.randn(H.shape[0], generator=gen, dtype=torch.float64) for _ in range(3)]
    fast = products(model, loss_fn, batches, vs, True)
    native = products(model, loss_fn, batches, vs, False)
    for v, a, b in zip(vs, fast, native):
        np.testing.assert_allclose(a.numpy(), (H @ v).numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_only_stock_zero_padded_convolutions_are_switched_and_all_are_restored():
    model, _, _ = make()
    seen = {}
    with first_order_kernels(model) as n:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                seen[name] = "forward" in vars(m)
    assert seen == {"c1": True, "c2": True, "c3": False, "c4": False, "c5": False, "c1d": True, "c3d": True}
    assert n == 4
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"):
        with first_order_kernels(model):
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_model_with_its_own_instance_forward_is_left_alone():
    conv = nn.Conv2d(1, 1, 1)
    own = conv.forward = lambda x: x  # e.g. a wrapper patched onto the instance
    with first_order_kernels(conv) as n:
        assert n == 0 and conv.forward is own
    assert conv.forward is own


@pytest.mark.parametrize(
    "dims, kw",
    [
        (1, dict(stride=2, padding=1)),
        (2, dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
        (3, dict(padding=1, bias=False)),
    ],
)
def test_second_derivative_matches_finite_differences(dims, kw):
    """gradgradcheck: the backward of the backward against finite differences of the backward."""
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{dims}d")(2, 4, 3, **kw).double()
    x = torch.randn(2, 2, *([5] * dims), dtype=torch.float64, requires_grad=True)
    conf = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    w = conv.weight.detach().clone().requires_grad_()
    if conv.bias is None:
        inputs = (x, w)
        assert torch.autograd.gradgradcheck(lambda x, w: _Conv.apply(x, w, None, conf), inputs)
    else:
        b = conv.bias.detach().clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda x, w, b: _Conv.apply(x, w, b, conf), (x, w, b))
    # and the forward is the module's
    with torch.no_grad():
        torch.testing.assert_close(_Conv.apply(x, w, conv.bias, conf), conv(x), rtol=0, atol=0)

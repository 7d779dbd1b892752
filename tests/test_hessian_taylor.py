"""Taylor-mode vᵀHv against exact Hessians of tiny models, and the trace's two methods against each other."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam.analysis import analysis_mode, hessian_trace
from ssam.analysis.taylor import QuadraticForm, Unsupported
from ssam.errors import UsageError
from test_hessian import exact_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


class Covered(nn.Module):
    """Every covered operation at least once: convolutions with stride, dilation, groups, reflect padding and
    no bias, eval BatchNorm, ReLU as module, function and method (in place too), a residual ``+=``, max,
    average and adaptive pooling, dropout, a product and a difference of two activations, cat and views."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.c1d = nn.Conv1d(2, 2, 2)
        self.fc = nn.Linear(2 + 2 + 2 * 4 + 2, 3)

    def forward(self, x):
        h = self.relu(self.bn1(self.c1(x)))  # (n, 4, 4, 4)
        r = self.bn2(self.c2(h))
        r += h
        h = F.relu(r, inplace=True)
        h = self.c3(h).relu()  # (n, 2, 4, 4)
        m = self.pool(h)  # (n, 2, 2, 2)
        a = self.avg(h).view(h.size(0), -1)
        p = torch.flatten(m * F.avg_pool2d(h, 2), 1)  # a product of two varying activations
        seq = self.c1d(h.mean(dim=3) - h.mean(dim=2))  # (n, 2, 3)
        z = torch.cat([a, torch.relu(p[:, :2] - a), p, seq[:, :, 0]], dim=1)
        return self.fc(self.drop(z))


def make(seed=0):
    torch.manual_seed(seed)
    model = Covered().double()
    batches = [(torch.randn(n, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)]
    with torch.no_grad():
        model.train()(batches[0][0] * 2 + 1)  # running statistics that are not the defaults
    return model, batches


def forms(model, loss_fn, batches, params, vs):
    """Σ_b w_b vᵀH_b v by Taylor mode, one per v (eval mode, as the trace runs it)."""
    total = sum(len(y) for _, y in batches)
    with analysis_mode(model, params):
        form = QuadraticForm(model, loss_fn, params)
        out = []
        for v in vs:
            parts = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
            out.append(sum(float(form(form.primal(x), y, parts)) * len(y) / total for x, y in batches))
    return np.array(out)


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.2), nn.CrossEntropyLoss(ignore_index=1)],
    ids=["plain", "label_smoothing", "ignore_index"],
)
def test_quadratic_forms_equal_exact(loss_fn):
    model, batches = make()
    H = exact_hessian(model, loss_fn, batches)
    gen = torch.Generator().manual_seed(1)
    vs = [torch.randn(H.shape[0], generator=gen, dtype=torch.float64) for _ in range(3)]
    got = forms(model, loss_fn, batches, list(model.parameters()), vs)
    want = np.array([float(v @ H @ v) for v in vs])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_probability_targets_and_a_parameter_subset():
    model, batches = make(seed=3)
    probs = [(x, torch.softmax(torch.randn(len(y), 3, dtype=torch.float64), 1)) for x, y in batches]
    names = ["c2.weight", "bn2.weight", "fc.bias", "c1.bias"]  # a frozen weight with a live bias among them
    pdict = dict(model.named_parameters())
    H = exact_hessian(model, nn.CrossEntropyLoss(), probs, names=names)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = forms(model, nn.CrossEntropyLoss(), probs, [pdict[n] for n in names], [v])
    np.testing.assert_allclose(got, [float(v @ H @ v)], rtol=1e-9, atol=1e-12)


def test_trace_methods_give_the_same_samples():
    model, batches = make()
    loss_fn = nn.CrossEntropyLoss()
    runs = {
        m: hessian_trace(model, loss_fn, batches, max_iter=6, tol=0, seed=5, vectors_per_pass=4, method=m)
        for m in ("taylor", "hvp", "auto")
    }
    for m in ("taylor", "auto"):
        np.testing.assert_allclose(runs[m][:2], runs["hvp"][:2], rtol=1e-10)
        assert runs[m][2] == 6
    # and the primal values kept or not kept change nothing
    bare = hessian_trace(model, loss_fn, batches, max_iter=6, tol=0, seed=5, graph_memory=0, method="taylor")
    np.testing.assert_allclose(bare[:2], runs["hvp"][:2], rtol=1e-10)


class Smooth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x))


class OwnConv(nn.Conv2d):
    """A subclass with its own forward: torch.fx traces into it and meets the bare conv2d function."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "model, loss_fn, says",
    [
        (Smooth(), nn.CrossEntropyLoss(), "tanh"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), nn.MSELoss(), "CrossEntropyLoss"),
        (nn.Sequential(OwnConv(1, 3, 2), nn.Flatten()), nn.CrossEntropyLoss(), "function conv2d is not covered"),
    ],
    ids=["tanh", "mse", "own_forward"],
)
def test_outside_coverage_falls_back_or_says_why(model, loss_fn, says):
    model = model.double()
    if isinstance(model, Smooth):
        batches = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    elif isinstance(loss_fn, nn.MSELoss):
        batches = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))]
    else:
        batches = [(torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    with pytest.raises(Unsupported, match=says):
        QuadraticForm(copy.deepcopy(model).eval(), loss_fn, list(model.parameters()))
    with pytest.raises(UsageError, match=f"method='taylor'.*{says}"):
        hessian_trace(model, loss_fn, batches, max_iter=2, tol=0, method="taylor")
    auto = hessian_trace(model, loss_fn, batches, max_iter=4, tol=0, seed=1)
    hvp = hessian_trace(model, loss_fn, batches, max_iter=4, tol=0, seed=1, method="hvp")
    assert auto == hvp


def test_bad_method_is_one_line():
    model, batches = make()
    with pytest.raises(UsageError, match="method: got 'fast'; allowed: auto, taylor, hvp"):
        hessian_trace(model, nn.CrossEntropyLoss(), batches, method="fast")


@pytest.mark.parametrize("name", ["cnn_small", "resnet8", "vgg11_bn"])
def test_bundled_models_are_covered_and_agree_with_products(name):
    from ssam.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 10, 1, 8 if name != "vgg11_bn" else 32).double()
    size = 8 if name != "vgg11_bn" else 32
    batches = [(torch.randn(4, 1, size, size, dtype=torch.float64), torch.randint(0, 10, (4,)))]
    QuadraticForm(copy.deepcopy(model).eval(), nn.CrossEntropyLoss(), list(model.parameters()))  # covered
    kw = dict(max_iter=2, tol=0, seed=3)
    taylor = hessian_trace(model, nn.CrossEntropyLoss(), batches, method="taylor", **kw)
    hvp = hessian_trace(model, nn.CrossEntropyLoss(), batches, method="hvp", **kw)
    np.testing.assert_allclose(taylor[:2], hvp[:2], rtol=1e-9)

"""Hessian tools against exact Hessians of tiny models (torch.autograd.functional.hessian + eigvalsh)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from ssam.analysis import hessian_density, hessian_eigenvalues, hessian_trace, per_layer, resolve_params, select_params
from ssam.errors import UsageError

BATCH_SIZES = (5, 7, 4)  # unequal on purpose: the weighting by size must matter


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = (MLP() if kind == "mlp" else ConvBN()).to(dtype)
    shape = (4,) if kind == "mlp" else (1, 6, 6)
    batches = [(torch.randn(n, *shape, dtype=dtype), torch.randint(0, 3, (n,))) for n in BATCH_SIZES]
    if kind == "conv":
        # Non-trivial running statistics, then back to train mode: the analysis must switch to eval itself.
        with torch.no_grad():
            for x, _ in batches:
                model(2 * x + 1)
    model.train()
    return model, nn.CrossEntropyLoss(), batches


def exact_hessian(model, loss_fn, batches, names=None):
    """Hessian of the size-weighted mean loss in eval mode, over the named parameters (all by default)."""
    model = copy.deepcopy(model).eval()
    pdict = dict(model.named_parameters())
    names = names or list(pdict)
    shapes = [pdict[n].shape for n in names]
    numels = [pdict[n].numel() for n in names]
    theta0 = torch.cat([pdict[n].detach().reshape(-1) for n in names])
    total = sum(len(y) for _, y in batches)

    def f(theta):
        sub = {n: c.view(s) for n, c, s in zip(names, theta.split(numels), shapes)}
        out = 0.0
        for x, y in batches:
            out = out + loss_fn(functional_call(model, sub, (x,)), y) * (len(y) / total)
        return out

    return torch.autograd.functional.hessian(f, theta0)


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_same(a, b):
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grads"]:
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    assert a["req"] == b["req"]
    assert a["modes"] == b["modes"]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_top_k_lanczos_matches_exact(kind):
    model, loss_fn, batches = make(kind)
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches)).flip(0)[:5].numpy()
    vals, vecs = hessian_eigenvalues(model, loss_fn, batches, top_k=5, return_eigenvectors=True)
    np.testing.assert_allclose(vals, exact, rtol=1e-4)
    H = exact_hessian(model, loss_fn, batches)
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vecs])
    np.testing.assert_allclose((flat @ flat.T).numpy(), np.eye(5), atol=1e-6)
    for lam, v in zip(vals, flat):
        assert float((H @ v - lam * v).norm()) <= 1e-4 * abs(exact[0])


def test_power_iteration_matches_exact_by_magnitude():
    model, loss_fn, batches = make("mlp")
    ev = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches)).numpy()
    exact = ev[np.argsort(-np.abs(ev))][:3]
    vals = hessian_eigenvalues(model, loss_fn, batches, top_k=3, method="power", max_iter=3000, tol=1e-12)
    np.testing.assert_allclose(vals, exact, rtol=1e-4)


def test_float32_model_against_float64_exact():
    model, loss_fn, batches = make("conv", dtype=torch.float32)
    exact = (
        torch.linalg.eigvalsh(
            exact_hessian(copy.deepcopy(model).double(), loss_fn, [(x.double(), y) for x, y in batches])
        )
        .flip(0)[:2]
        .numpy()
    )
    vals = hessian_eigenvalues(model, loss_fn, batches, top_k=2, tol=1e-5)
    np.testing.assert_allclose(vals, exact, rtol=1e-4)


def test_batching_does_not_change_the_hessian():
    # Eval mode + size weighting: one big batch and three unequal ones are the same objective.
    model, loss_fn, batches = make("conv")
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    a = hessian_eigenvalues(model, loss_fn, batches, top_k=3)
    b = hessian_eigenvalues(model, loss_fn, whole, top_k=3)
    np.testing.assert_allclose(a, b, rtol=1e-8)
    # ... while the unweighted mean of the three batch losses is a different objective.
    unweighted = torch.linalg.eigvalsh(sum(exact_hessian(model, loss_fn, [b_]) for b_ in batches) / 3).max()
    assert abs(float(unweighted) - a[0]) > 1e-4 * abs(a[0])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_trace_within_stderr(kind):
    model, loss_fn, batches = make(kind)
    exact = float(torch.trace(exact_hessian(model, loss_fn, batches)))
    tr, se, n = hessian_trace(model, loss_fn, batches, max_iter=400, tol=2e-2, seed=1)
    assert 10 <= n <= 400
    assert 0 < se <= 0.2 * abs(exact)
    assert abs(tr - exact) <= 3 * se
    assert hessian_trace(model, loss_fn, batches, max_iter=400, tol=2e-2, seed=1) == (tr, se, n)
    # A loose tolerance stops at the minimum number of samples.
    assert hessian_trace(model, loss_fn, batches, max_iter=400, tol=10.0, min_samples=8, vectors_per_pass=4)[2] == 8


def test_density_mass_sits_on_the_exact_spectrum():
    model, loss_fn, batches = make("mlp")
    ev = np.sort(torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches)).numpy())
    width = ev[-1] - ev[0]
    sigma = 2e-3 * width
    t, dens, nodes, weights = hessian_density(
        model, loss_fn, batches, n_iter=30, n_v=20, sigma=sigma, grid=4000, seed=3, return_nodes=True
    )
    dt = np.diff(t)
    assert np.sum(0.5 * (dens[1:] + dens[:-1]) * dt) == pytest.approx(1.0, abs=1e-9)
    assert np.all(dens >= 0)
    assert np.all(np.abs(weights.sum(1) - 1) < 1e-8)  # quadrature weights of a unit start vector
    # Extreme Ritz values converge first: the largest node is the top eigenvalue.
    assert np.nanmax(nodes) == pytest.approx(ev[-1], rel=1e-6)
    assert t[0] < ev[0] and t[-1] > ev[-1]
    mean = np.sum(0.5 * (t[1:] * dens[1:] + t[:-1] * dens[:-1]) * dt)
    assert abs(mean - ev.mean()) <= 0.2 * ev.std()
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * dt)])
    delta = 4 * sigma
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        x = np.quantile(ev, q)
        lo = np.mean(ev <= x - delta) - 0.1
        hi = np.mean(ev <= x + delta) + 0.1
        assert lo <= np.interp(x, t, cdf) <= hi, q


def test_density_defaults_and_explicit_grid():
    model, loss_fn, batches = make("conv")
    t, dens = hessian_density(model, loss_fn, batches, n_iter=20)
    assert t.shape == dens.shape == (1000,)
    grid = np.linspace(-1, 3, 500)
    t2, d2 = hessian_density(model, loss_fn, batches, n_iter=20, grid=grid, sigma=0.05)
    np.testing.assert_array_equal(t2, grid)
    assert np.sum(0.5 * (d2[1:] + d2[:-1]) * np.diff(t2)) == pytest.approx(1.0)


def test_per_layer_matches_exact_blocks():
    model, loss_fn, batches = make("mlp")
    rows = per_layer(model, loss_fn, batches, trace_max_iter=400, trace_tol=2e-2, seed=2)
    assert [r["name"] for r in rows] == [n for n, _ in model.named_parameters()]
    for r in rows:
        H = exact_hessian(model, loss_fn, batches, [r["name"]])
        assert r["numel"] == H.shape[0]
        assert r["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H).max()), rel=1e-4)
        assert abs(r["trace"] - float(torch.trace(H))) <= 4 * r["trace_stderr"] + 1e-12
    mods = per_layer(model, loss_fn, batches, by="module", trace_max_iter=50)
    assert [r["name"] for r in mods] == ["net.0", "net.2"]
    H = exact_hessian(model, loss_fn, batches, ["net.2.weight", "net.2.bias"])
    assert mods[1]["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H).max()), rel=1e-4)


def test_param_subset_by_regex_and_list():
    model, loss_fn, batches = make("conv")
    chosen = select_params(model, r"^(conv|bn)\.")
    assert chosen == [model.conv.weight, model.conv.bias, model.bn.weight, model.bn.bias]
    names = ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches, names)).flip(0)[:2].numpy()
    np.testing.assert_allclose(
        hessian_eigenvalues(model, loss_fn, batches, top_k=2, params=r"^(conv|bn)\."), exact, rtol=1e-4
    )
    np.testing.assert_allclose(hessian_eigenvalues(model, loss_fn, batches, top_k=2, params=chosen), exact, rtol=1e-4)
    assert [n for n, _ in resolve_params(model, chosen)] == names
    with pytest.raises(UsageError, match="nomatch"):
        select_params(model, "nomatch")
    with pytest.raises(UsageError, match="regular expression"):
        select_params(model, "(")
    with pytest.raises(UsageError, match="top_k"):
        hessian_eigenvalues(model, loss_fn, batches, top_k=10, params=[model.bn.bias])


@pytest.mark.filterwarnings("ignore:Lanczos stopped")  # max_iter=10 on purpose: speed
def test_no_side_effects():
    model, loss_fn, batches = make("conv")
    model.conv.eval()  # mixed modes must come back as they were
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.fc.bias.grad = None
    model.bn.weight.requires_grad_(False)
    before = snapshot(model)
    with torch.no_grad():  # the caller's grad mode must not matter either
        vals = hessian_eigenvalues(model, loss_fn, batches, top_k=2, params=[model.bn.weight, model.fc.weight])
    hessian_trace(model, loss_fn, batches, max_iter=12)
    hessian_density(model, loss_fn, batches, n_iter=10)
    per_layer(model, loss_fn, batches, max_iter=10, trace_max_iter=10)
    assert_same(before, snapshot(model))
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches, ["bn.weight", "fc.weight"])).flip(0)[:2]
    np.testing.assert_allclose(vals, exact.numpy(), rtol=1e-4)

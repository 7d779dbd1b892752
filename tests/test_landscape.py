"""Landscape directions, grids and the loss-increase sharpness, checked against hand-made perturbations."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam.analysis import (
    evaluate,
    evaluate_grid,
    interpolation_direction,
    loss_increase,
    markdown_table,
    random_direction,
    summarize_run,
)
from ssam.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net().double()
    batches = [(torch.randn(n, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 3, 5)]
    with torch.no_grad():
        for x, _ in batches:
            model(x * (1 + seed) + seed)  # distinct running statistics per model
    model.train()
    return model, nn.CrossEntropyLoss(), batches


def reference_loss(model, batches):
    """Mean cross-entropy over all examples at once, in eval mode, on a copy: independent of the library."""
    m = copy.deepcopy(model).eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        out = m(x)
    return float(F.cross_entropy(out, y)), 100.0 * float((out.argmax(1) == y).double().mean())


def perturbed(model, dirs, coeffs):
    m = copy.deepcopy(model)
    sd = m.state_dict()
    with torch.no_grad():
        for d, c in zip(dirs, coeffs):
            for k, v in d.items():
                sd[k] += c * v
    return m


def test_filter_normalisation():
    model, _, _ = make()
    d = random_direction(model, seed=3)
    assert set(d) == {n for n, _ in model.named_parameters()}  # parameters only, no BN buffers
    for name, p in model.named_parameters():
        if p.dim() > 1:
            np.testing.assert_allclose(
                d[name].flatten(1).norm(dim=1).numpy(), p.detach().flatten(1).norm(dim=1).numpy(), rtol=1e-9
            )
            assert not torch.allclose(d[name], p.detach())
        else:
            assert torch.count_nonzero(d[name]) == 0, name
    kept = random_direction(model, seed=3, ignore=None)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert float(kept[name].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-9)
        else:
            assert torch.equal(kept[name], d[name])  # the ignore setting does not change the other draws
    again = random_direction(model, seed=3)
    other = random_direction(model, seed=4)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["conv.weight"], other["conv.weight"])
    layer = random_direction(model, seed=3, norm="layer")
    assert float(layer["fc.weight"].norm()) == pytest.approx(float(model.fc.weight.detach().norm()), rel=1e-9)
    with pytest.raises(UsageError, match="ignore"):
        random_direction(model, ignore="bias")


def test_grid_values_origin_and_restoration():
    model, loss_fn, batches = make()
    model.conv.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    xs, ys = [-0.5, 0.0, 0.25], [0.0, 0.4]
    res = evaluate_grid(model, loss_fn, batches, [d1, d2], xs, ys)
    assert res["loss"].shape == res["acc"].shape == (3, 2)
    base_loss, base_acc = reference_loss(model, batches)
    assert res["loss"][1, 0] == pytest.approx(base_loss, rel=1e-12, abs=1e-12)
    assert res["acc"][1, 0] == pytest.approx(base_acc)
    assert evaluate(model, loss_fn, batches)[0] == pytest.approx(base_loss, rel=1e-12)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            ref = reference_loss(perturbed(model, [d1, d2], [x, y]), batches)
            assert res["loss"][i, j] == pytest.approx(ref[0], rel=1e-10)
            assert res["acc"][i, j] == pytest.approx(ref[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes
    one = evaluate_grid(model, loss_fn, batches, d1, xs)
    np.testing.assert_allclose(one["loss"], res["loss"][:, 0], rtol=1e-12)


def test_weights_restored_after_a_failing_evaluation():
    model, loss_fn, batches = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_grid(model, failing_loss, batches, random_direction(model), [0.3, 0.6])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_fills_only_missing_points():
    model, loss_fn, batches = make()
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-1, 1, 4)
    seen = []
    full = evaluate_grid(
        model,
        loss_fn,
        batches,
        [d1, d2],
        xs,
        ys,
        callback=lambda p: seen.append((p["done"], p["total"], int(np.isnan(p["loss"]).sum()))),
    )
    assert seen == [(i, 12, 12 - i) for i in range(1, 13)]
    partial = {"loss": full["loss"].copy(), "acc": full["acc"].copy()}
    missing = [(0, 1), (2, 3), (1, 0)]
    for idx in missing:
        partial["loss"][idx] = np.nan
        partial["acc"][idx] = np.nan
    partial["loss"][0, 0] = 123.0  # a computed point must be kept as is, not recomputed
    n_calls = []

    def counting_loss(out, y):
        n_calls.append(1)
        return F.cross_entropy(out, y)

    res = evaluate_grid(model, counting_loss, batches, [d1, d2], xs, ys, resume=partial)
    assert len(n_calls) == len(missing) * len(batches)
    assert res["loss"][0, 0] == 123.0
    for idx in missing:
        assert res["loss"][idx] == pytest.approx(full["loss"][idx], rel=1e-12)
        assert res["acc"][idx] == full["acc"][idx]
    assert np.isnan(partial["loss"][missing[0]])  # the caller's arrays are not written into
    with pytest.raises(UsageError, match="shape"):
        evaluate_grid(model, loss_fn, batches, [d1, d2], xs, ys, resume={"loss": np.zeros(3), "acc": np.zeros(3)})


def test_interpolation_endpoints_are_the_two_models():
    a, loss_fn, batches = make(seed=0)
    b, _, _ = make(seed=1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    d = interpolation_direction(a.state_dict(), b.state_dict())
    assert "bn.running_mean" in d and "bn.num_batches_tracked" not in d
    res = evaluate_grid(a, loss_fn, batches, d, [0.0, 0.5, 1.0])
    assert res["loss"][0] == pytest.approx(reference_loss(a, batches)[0], rel=1e-12)
    assert res["loss"][2] == pytest.approx(reference_loss(b, batches)[0], rel=1e-9)
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for k, v in mid.state_dict().items():
            if v.is_floating_point():
                v.copy_(0.5 * (a.state_dict()[k] + b.state_dict()[k]))
    assert res["loss"][1] == pytest.approx(reference_loss(mid, batches)[0], rel=1e-9)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(UsageError, match="same architecture"):
        interpolation_direction(a, nn.Linear(2, 2))


def test_loss_increase_matches_hand_perturbation():
    model, loss_fn, batches = make()
    r = 0.07
    out = loss_increase(model, loss_fn, batches, radius=r, n_directions=3, seed=5)
    base = reference_loss(model, batches)[0]
    expected = [
        reference_loss(perturbed(model, [random_direction(model, seed=5 + i)], [r]), batches)[0] - base
        for i in range(3)
    ]
    np.testing.assert_allclose(out["values"], expected, rtol=1e-9, atol=1e-13)
    assert out["mean"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert out["std"] == pytest.approx(np.std(expected, ddof=1), rel=1e-9)
    assert out["base_loss"] == pytest.approx(base, rel=1e-12)
    row = summarize_run(
        model, loss_fn, batches, name="run-a", test_acc1=91.5, radius=r, n_directions=3, seed=5, trace_max_iter=20
    )
    assert row["loss_increase"] == pytest.approx(out["mean"], rel=1e-9)
    assert row["lambda_max"] > 0 and row["trace"] > 0
    table = markdown_table([row])
    assert table.splitlines()[0].startswith("| run | test_acc1 |") and "run-a" in table and "91.5" in table
    with pytest.raises(UsageError, match="radius"):
        loss_increase(model, loss_fn, batches, radius=-1.0)

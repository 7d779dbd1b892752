"""SSAM-F and SSAM-D with channel, tensor and N:M masks, checked against slow loops written here; the element mask
unchanged; the skipping first pass against the renormalised full step."""

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssam import SSAMD, SSAMF
from ssam.optim.select import top_k_mask
from test_groups import drop_grow_reference, fit_reference, nm_drop_grow_reference, nm_reference

KINDS = ["element", "channel", "tensor", "2:4"]


def tiny_net(channels_last=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),  # stem: reduction 27
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),  # reduction 36
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )  # reduction 8
    model = model.double()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def params(model):
    return [p for p in model.parameters()]


def planted(model, seed=2):
    """Distinct positive scores per entry, in each parameter's logical shape and memory layout."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(p.shape, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
        if p.dim() == 4 and not p.is_contiguous()
        else torch.rand(p.shape, generator=g, dtype=torch.float64)
        for p in model.parameters()
    ]


def masks(opt, model):
    return [opt.state[p]["mask"] for p in model.parameters()]


def flat_logical(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def group_rows(t, kind):
    """A tensor's groups, each as a flat list of entries, in flat order (written out with a loop)."""
    if t.numel() == 0:
        return []
    if kind == "tensor" or t.dim() == 0:
        return [t.reshape(-1)]
    return [t[i].reshape(-1) for i in range(t.shape[0])]


def expected_structured(scores, kind, budget, cost_aware=False):
    groups = [(i, row) for i, s in enumerate(scores) for row in group_rows(s, kind)]
    keys = np.array([float(r.double().mean()) for _, r in groups])
    sizes = np.array([r.numel() for _, r in groups])
    owner = np.array([i for i, _ in groups])
    chosen = fit_reference(keys, sizes, budget)
    if cost_aware:  # the deepest tensor from which on the fit still keeps half the budget (or all the full fit does)
        target = min(sizes[chosen].sum(), (budget + 1) // 2)
        kept = [sizes[fit_reference(keys, sizes, budget, owner >= c)].sum() for c in range(len(scores))]
        cut = max(c for c, k in enumerate(kept) if k >= target)
        chosen = fit_reference(keys, sizes, budget, owner >= cut)
    return torch.tensor(np.repeat(chosen, sizes))


# ------------------------------------------------------------------ construction
def test_bad_granularity_arguments():
    model = tiny_net()
    with pytest.raises(ValueError, match=r"^granularity: got '3:2'; allowed: "):
        SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, granularity="3:2")
    with pytest.raises(ValueError, match=r"^granularity: got 'row'; allowed: "):
        SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, granularity="row")
    for cls in (SSAMF, SSAMD):
        with pytest.raises(ValueError, match=r"^cost_aware: got True with granularity='element'; allowed: "):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, cost_aware=True)
        with pytest.raises(ValueError, match=r"^cost_aware: got True with granularity='2:4'; allowed: "):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, granularity="2:4", cost_aware=True)
        with pytest.raises(ValueError, match=r"^cost_aware: got 'yes'; allowed: True or False"):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, granularity="tensor", cost_aware="yes")
        with pytest.raises(ValueError, match=r"^sparsity: got 0.5 with granularity='1:4', which implies 0.75; "):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, granularity="1:4", sparsity=0.5)


def test_sparsity_default_and_implied():
    model = tiny_net()
    assert SSAMF(model.parameters(), torch.optim.SGD, lr=0.1).sparsity == 0.5
    assert SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, granularity="tensor", sparsity=0.9).sparsity == 0.9
    assert SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, granularity="1:4").sparsity == 0.75
    assert SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, granularity="1:4", sparsity=0.75).sparsity == 0.75
    assert SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, granularity=" 2:4").granularity == "2:4"


# ------------------------------------------------------------------ element: unchanged
def test_element_masks_are_todays_masks():
    model = tiny_net()
    n = sum(p.numel() for p in model.parameters())
    scores = planted(model)
    opt = SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.7, granularity="element")
    opt.set_mask_from_scores(scores)
    expected = top_k_mask(flat_logical(scores).float(), int(n * 0.3))
    assert torch.equal(flat_logical(masks(opt, model)), expected)
    d = SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.7, seed=11)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(flat_logical(masks(d, model)), top_k_mask(torch.rand(n, generator=g), int(n * 0.3)))


# ------------------------------------------------------------------ SSAM-F
@pytest.mark.parametrize("kind", ["channel", "tensor"])
@pytest.mark.parametrize("channels_last, cost_aware", [(False, False), (True, False), (False, True)])
def test_ssamf_structured_masks_follow_group_means(kind, channels_last, cost_aware):
    model = tiny_net(channels_last)
    n = sum(p.numel() for p in model.parameters())
    scores = planted(model)
    for sparsity in (0.3, 0.6, 0.9):
        opt = SSAMF(
            model.parameters(), torch.optim.SGD, lr=0.1, sparsity=sparsity, granularity=kind, cost_aware=cost_aware
        )
        opt.set_mask_from_scores(scores)
        budget = int(n * (1 - sparsity))
        expected = expected_structured(scores, kind, budget, cost_aware)
        got = masks(opt, model)
        assert all(m.dtype == torch.bool and m.shape == p.shape for m, p in zip(got, model.parameters()))
        assert torch.equal(flat_logical(got), expected)
        assert int(expected.sum()) <= budget
        assert opt.mask_density() == pytest.approx(int(expected.sum()) / n)


@pytest.mark.parametrize("channels_last", [False, True])
def test_ssamf_nm_masks_and_density(channels_last):
    model = tiny_net(channels_last)
    scores = planted(model)
    opt = SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, granularity="2:4")
    opt.set_mask_from_scores(scores)
    stem, stem_b, bn_w, bn_b, conv, conv_b, lin, lin_b = masks(opt, model)
    assert stem_b.all() and bn_w.all() and bn_b.all() and conv_b.all() and lin_b.all()
    assert torch.equal(conv, nm_reference(scores[4], 2, 4)) and torch.equal(lin, nm_reference(scores[6], 2, 4))
    k = 4 * 27 // 2  # the stem's reduction (27) is no multiple of 4: its best half, element-wise
    assert int(stem.sum()) == k and bool(scores[0][stem].min() > scores[0][~stem].max())
    n = sum(p.numel() for p in model.parameters())
    live = k + 4 + 4 + 4 + 8 * 36 // 2 + 8 + 3 * 8 // 2 + 3
    assert opt.mask_density() == pytest.approx(live / n)
    rows = {r["name"]: r["density"] for r in opt.mask_stats()}
    assert list(rows.values())[4] == pytest.approx(0.5)


def test_perturbation_touches_live_groups_only():
    model = tiny_net()
    opt = SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.6, granularity="channel")
    opt.set_mask_from_scores(planted(model))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    opt.first_step()
    for p, w, m in zip(model.parameters(), before, masks(opt, model)):
        e = p.detach() - w
        assert not e[~m].any()
        torch.testing.assert_close(e, 0.05 * p.grad * m / (norm + 1e-7), rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ SSAM-D
def grads_and_weights(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("kind", ["channel", "tensor"])
@pytest.mark.parametrize("cost_aware", [False, True])
def test_ssamd_groups_die_and_regrow_whole(kind, cost_aware):
    model = tiny_net()
    shapes = [tuple(p.shape) for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    opt = SSAMD(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        sparsity=0.6,
        granularity=kind,
        cost_aware=cost_aware,
        drop_strategy="weight",
        growth_strategy="gradient",
        T_end=4,
        seed=0,
    )
    budget = int(n * 0.4)
    for epoch in range(3):
        grads_and_weights(model, epoch)
        old = flat_logical(masks(opt, model)).clone()
        drop = flat_logical([p.detach().abs() for p in model.parameters()]).float()
        grow = flat_logical([p.grad.abs() for p in model.parameters()]).float()
        grow_from = opt.grow_from if cost_aware else 0
        opt.update_mask(epoch)
        new = flat_logical(masks(opt, model))
        ref = drop_grow_reference(old, shapes, kind, drop, grow, budget, opt.death_rate(epoch), grow_from)
        assert torch.equal(new, ref) and int(new.sum()) <= budget


def test_ssamd_nm_keeps_the_pattern():
    model = tiny_net()
    shapes = [tuple(p.shape) for p in model.parameters()]
    opt = SSAMD(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        granularity="2:4",
        drop_strategy="gradient",
        growth_strategy="weight",
        T_end=4,
        seed=0,
    )
    for epoch in range(3):
        grads_and_weights(model, epoch)
        old = flat_logical(masks(opt, model)).clone()
        drop = flat_logical([p.grad.abs() for p in model.parameters()]).float()
        grow = flat_logical([p.detach().abs() for p in model.parameters()]).float()
        opt.update_mask(epoch)
        new = flat_logical(masks(opt, model))
        assert torch.equal(new, nm_drop_grow_reference(old, shapes, 2, 4, drop, grow, opt.death_rate(epoch)))
        conv = opt.state[model[3].weight]["mask"]
        assert torch.equal(conv.reshape(-1, 4).sum(1), torch.full((conv.numel() // 4,), 2))


def test_ssamd_add_param_group_draws_whole_groups_for_the_new_tensors():
    model = tiny_net()
    head = nn.Linear(3, 5).double()
    opt = SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, granularity="channel", seed=1)
    before = flat_logical(masks(opt, model)).clone()
    opt.add_param_group({"params": list(head.parameters())})
    n = sum(p.numel() for p in list(model.parameters()) + list(head.parameters()))
    assert torch.equal(flat_logical(masks(opt, model)), before)
    w, b = opt.state[head.weight]["mask"], opt.state[head.bias]["mask"]
    assert all(bool(row.all()) or not bool(row.any()) for row in w)
    assert int(before.sum()) + int(w.sum()) + int(b.sum()) <= int(n * 0.5)


# ------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [SSAMF, SSAMD])
def test_state_dict_round_trip(kind, cls):
    kw = dict(lr=0.1, granularity=kind, cost_aware=kind in ("channel", "tensor"))
    if cls is SSAMD:
        kw.update(seed=3, T_end=5, drop_strategy="gradient", growth_strategy="random")
    model = tiny_net()
    opt = cls(model.parameters(), torch.optim.SGD, **kw)
    if cls is SSAMF:
        opt.set_mask_from_scores(planted(model))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    if cls is SSAMD:
        opt.update_mask(0)
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    twin = copy.deepcopy(model)
    other = cls(twin.parameters(), torch.optim.SGD, **{**kw, **({"seed": 99} if cls is SSAMD else {})})
    other.load_state_dict(opt.state_dict())
    for a, b in zip(masks(opt, model), masks(other, twin)):
        assert b.dtype == torch.bool and torch.equal(a, b)
    if cls is SSAMD:  # the generator and the cost-aware cut came back too: the next update is the same
        for mdl, o in ((model, opt), (twin, other)):
            grads_and_weights(mdl, 9)
            o.update_mask(1)
        for a, b in zip(masks(opt, model), masks(other, twin)):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ the first pass that skips the dead
def perturbation(model, opt, x, y, skip):
    before = [p.detach().clone() for p in model.parameters()]
    with opt.first_pass() if skip else contextlib.nullcontext():
        F.cross_entropy(model(x), y).backward()
    if skip:
        for p, m in zip(model.parameters(), masks(opt, model)):
            assert (p.grad is None) == (not bool(m.any()))
    opt.first_step(zero_grad=True)
    return [p.detach() - w for p, w in zip(model.parameters(), before)]


def make_pair(kind, renormalize_full, renormalize_skip=False, sparsity=0.6):
    m1 = tiny_net()
    m2 = copy.deepcopy(m1)
    scores = planted(m1)
    sparsity = None if ":" in kind else sparsity
    o1 = SSAMF(
        m1.parameters(), torch.optim.SGD, lr=0.1, sparsity=sparsity, granularity=kind, renormalize=renormalize_full
    )
    o2 = SSAMF(
        m2.parameters(), torch.optim.SGD, lr=0.1, sparsity=sparsity, granularity=kind, renormalize=renormalize_skip
    )
    o1.set_mask_from_scores(scores)
    o2.set_mask_from_scores(scores)
    return m1, o1, m2, o2


def test_skipping_tensor_masks_equals_renormalised_full_step():
    m1, o1, m2, o2 = make_pair("tensor", renormalize_full=True)
    assert any(not m.any() for m in masks(o2, m2)) and any(m.all() for m in masks(o2, m2))
    x, y = batch()
    full = perturbation(m1, o1, x, y, skip=False)
    skipped = perturbation(m2, o2, x, y, skip=True)
    for a, b in zip(full, skipped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    live = [e for e, m in zip(full, masks(o1, m1)) if m.any()]
    assert torch.linalg.vector_norm(torch.cat([e.reshape(-1) for e in live])).item() == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["element", "channel", "2:4"])
def test_skipping_with_renormalize_changes_nothing(kind):
    m1, o1, m2, o2 = make_pair(kind, renormalize_full=True, renormalize_skip=True, sparsity=0.9)
    assert any(not m.any() for m in masks(o2, m2)) or kind == "2:4"  # (N:M leaves no tensor dead)
    x, y = batch()
    for a, b in zip(perturbation(m1, o1, x, y, skip=False), perturbation(m2, o2, x, y, skip=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["channel", "2:4"])
def test_skipping_without_renormalize_takes_the_norm_over_tensors_with_a_live_entry(kind):
    _, _, model, opt = make_pair(kind, renormalize_full=False, sparsity=0.9)
    x, y = batch()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    ms = masks(opt, model)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p, m in zip(reference.parameters(), ms) if m.any()))
    expected = [0.05 * p.grad * m / (norm + 1e-7) for p, m in zip(reference.parameters(), ms)]
    for a, b in zip(perturbation(model, opt, x, y, skip=True), expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)

"""The optimizers against hand-derived steps, slow reference loops and the invariants of the paper."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssam import SAM, SSAMD, SSAMF, TwoPassScaler, frozen_bn_stats
from ssam.optim import empirical_fisher, top_k_mask


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def make_opt(kind, model, **kw):
    base = kw.pop("base", torch.optim.SGD)
    base_kw = kw.pop("base_kw", dict(lr=0.1, momentum=0.9, weight_decay=5e-4))
    if kind == "base":
        return base(model.parameters(), **base_kw)
    cls = {"sam": SAM, "ssamf": SSAMF, "ssamd": SSAMD}[kind]
    return cls(model.named_parameters(), base, **kw, **base_kw)


def sam_step(model, opt, x, y, update=None):
    F.cross_entropy(model(x), y).backward()
    if isinstance(opt, torch.optim.Optimizer) and not isinstance(opt, SAM):
        opt.step()
        opt.zero_grad()
        return
    if update is not None:
        update()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v), (u - v).abs().max()


# ---------------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("adaptive", [False, True])
def test_quadratic_step_matches_hand_derivation(adaptive):
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    A = A @ A.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)
    rho, lr, eps = 0.3, 0.05, 1e-7
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)

    def loss():
        return 0.5 * w @ A @ w - b @ w

    loss().backward()
    opt.step(lambda: loss().backward() or loss())

    g = A @ w0 - b
    if adaptive:
        e = rho * w0 * w0 * g / ((w0.abs() * g).norm() + eps)
    else:
        e = rho * g / (g.norm() + eps)
    expected = w0 - lr * (A @ (w0 + e) - b)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-12)


def test_step_closure_equals_two_calls_and_returns_loss():
    x, y = batch()
    m1, m2 = tiny_net(), tiny_net()
    o1, o2 = make_opt("sam", m1, rho=0.1), make_opt("sam", m2, rho=0.1)
    for _ in range(3):
        sam_step(m1, o1, x, y)
        F.cross_entropy(m2(x), y).backward()

        def closure():
            loss = F.cross_entropy(m2(x), y)
            loss.backward()
            return loss

        loss = o2.step(closure)
        o2.zero_grad()
        assert loss.ndim == 0 and torch.isfinite(loss)
    assert_same(params_of(m1), params_of(m2))


# ---------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize(
    "base,base_kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_rho_zero_is_the_base_optimizer(kind, base, base_kw):
    x, y = batch()
    m_ref, m = tiny_net(), tiny_net()
    ref = make_opt("base", m_ref, base=base, base_kw=dict(base_kw))
    kw = dict(rho=0.0, base=base, base_kw=dict(base_kw))
    if kind != "sam":
        kw["sparsity"] = 0.5
    opt = make_opt(kind, m, **kw)
    if kind == "ssamf":
        opt.update_mask(m, [(x, y)])
    for _ in range(4):
        sam_step(m_ref, ref, x, y)
        sam_step(m, opt, x, y)
    assert_same(params_of(m_ref), params_of(m))


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_sparsity_zero_is_sam(kind):
    x, y = batch()
    m_ref, m = tiny_net(), tiny_net()
    ref = make_opt("sam", m_ref, rho=0.2)
    opt = make_opt(kind, m, rho=0.2, sparsity=0.0)
    if kind == "ssamf":
        opt.update_mask(m, [(x, y)])
    for _ in range(3):
        sam_step(m_ref, ref, x, y)
        sam_step(m, opt, x, y, update=(lambda: opt.update_mask(0)) if kind == "ssamd" else None)
    assert opt.mask_density() == 1.0
    assert_same(params_of(m_ref), params_of(m))


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_full_sparsity_is_the_base_optimizer(kind):
    x, y = batch()
    m_ref, m = tiny_net(), tiny_net()
    ref = make_opt("base", m_ref)
    n = sum(p.numel() for p in m.parameters())
    opt = make_opt(kind, m, rho=0.5, sparsity=1 - 0.5 / n)  # int(N * (1 - s)) == 0
    if kind == "ssamf":
        opt.update_mask(m, [(x, y)])
    assert opt.num_live == 0 and opt.mask_density() == 0.0
    for _ in range(3):
        sam_step(m_ref, ref, x, y)
        sam_step(m, opt, x, y)
    assert_same(params_of(m_ref), params_of(m))


@pytest.mark.parametrize("renormalize", [False, True])
def test_perturbation_norm(renormalize):
    x, y = batch()
    m = tiny_net()
    rho = 0.3
    opt = make_opt("ssamf", m, rho=rho, sparsity=0.7, renormalize=renormalize)
    opt.update_mask(m, [(x, y)])
    F.cross_entropy(m(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    mask = opt.flat_mask()
    w0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    opt.first_step()
    w1 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    e = w1 - w0
    assert torch.all(e[~mask] == 0)
    if renormalize:
        assert math.isclose(e.norm().item(), rho, rel_tol=1e-6)
    else:
        assert math.isclose(e.norm().item(), rho * (g * mask).norm().item() / (g.norm().item() + 1e-7), rel_tol=1e-9)
    opt.second_step()


def test_dense_sam_perturbation_norm_and_restore():
    x, y = batch()
    m = tiny_net()
    opt = make_opt("sam", m, rho=0.25, base_kw=dict(lr=0.0))
    w0 = params_of(m)
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    e = torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(m.parameters(), w0)])
    assert math.isclose(e.norm().item(), 0.25, rel_tol=1e-6)
    F.cross_entropy(m(x), y).backward()
    opt.second_step(zero_grad=True)
    assert_same(params_of(m), w0)  # lr 0: back exactly at w


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_foreach_and_per_tensor_paths_agree(kind):
    x, y = batch()
    outs = []
    for foreach in (True, False):
        m = tiny_net()
        kw = dict(rho=0.2, perturb_foreach=foreach, adaptive=(kind == "sam"))
        if kind != "sam":
            kw.update(sparsity=0.6, renormalize=True)
        if kind == "ssamd":
            kw["seed"] = 3
        opt = make_opt(kind, m, **kw)
        if kind == "ssamf":
            opt.update_mask(m, [(x, y)])
        for _ in range(3):
            sam_step(m, opt, x, y, update=(lambda: opt.update_mask(1)) if kind == "ssamd" else None)
        outs.append(params_of(m))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def sparse_opt(kind, m, x, y, flat, seed, **kw):
    """An SSAM-F (mask from (x, y)) or SSAM-D optimizer on the multi-tensor path; ``flat=False`` turns the flat mask
    path off, leaving masking tensor by tensor."""
    opt = make_opt(kind, m, perturb_foreach=True, **kw, **({"seed": seed} if kind == "ssamd" else {}))
    if kind == "ssamf":
        opt.update_mask(m, [(x, y)])
    if not flat:
        opt._mask_segment = lambda ps, gs: None
    return opt


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_flat_mask_path_equals_per_tensor_masking(kind, renormalize, adaptive):
    """The multi-tensor path masks one concatenated perturbation against the flat mask buffer; it must give exactly
    the weights of masking tensor by tensor, also after a state_dict round trip (which rebuilds the buffer)."""
    x, y = batch()
    outs, taken = [], []
    for flat in (True, False):
        m = tiny_net()
        kw = dict(rho=0.2, sparsity=0.6, renormalize=renormalize, adaptive=adaptive)
        opt = sparse_opt(kind, m, x, y, flat, 3, **kw)
        sam_step(m, opt, x, y, update=(lambda: opt.update_mask(1)) if kind == "ssamd" else None)
        fresh = make_opt(kind, m, perturb_foreach=True, **kw, **({"seed": 3} if kind == "ssamd" else {}))
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
        if not flat:
            fresh._mask_segment = lambda ps, gs: None
        assert torch.equal(fresh.flat_mask(), opt.flat_mask())
        taken.append(fresh._mask_segment(list(m.parameters()), [p.detach() for p in m.parameters()]) is not None)
        for _ in range(2):
            sam_step(m, fresh, x, y, update=(lambda: fresh.update_mask(2)) if kind == "ssamd" else None)
        outs.append(params_of(m))
    assert taken == [True, False]
    assert_same(*outs)


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_flat_mask_path_with_channels_last_parameters(kind):
    """channels_last weights: masks are laid out as their parameters, the flat path is taken, and the masks and the
    weights are those of masking tensor by tensor (masks compared in logical order)."""
    x, y = batch()
    x = x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    outs, masks_seen, taken = [], [], []
    for flat in (True, False):
        torch.manual_seed(0)
        m = (
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.Conv2d(4, 5, 1),
                nn.Flatten(),
                nn.Linear(5 * 6 * 6, 3),
            )
            .double()
            .to(memory_format=torch.channels_last)
        )
        opt = sparse_opt(kind, m, x, y, flat, 4, rho=0.2, sparsity=0.5)
        F.cross_entropy(m(x), y).backward()
        taken.append(opt._mask_segment(list(m.parameters()), [p.grad for p in m.parameters()]) is not None)
        opt.zero_grad()
        for _ in range(2):
            sam_step(m, opt, x, y, update=(lambda: opt.update_mask(1)) if kind == "ssamd" else None)
        masks_seen.append(opt.flat_mask())
        outs.append(params_of(m))
    assert taken == [True, False]
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last) and not m[0].weight.is_contiguous()
    assert torch.equal(*masks_seen)
    assert_same(*outs)


def test_set_flat_mask_round_trips_in_logical_order_for_any_layout():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    m[0].to(memory_format=torch.channels_last)  # one channels_last weight among contiguous ones
    opt = make_opt("ssamd", m, sparsity=0.5)
    n = sum(p.numel() for p in m.parameters())
    ref = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.3
    opt.set_flat_mask(ref)
    assert torch.equal(opt.flat_mask(), ref)
    offset = 0
    for p in m.parameters():
        assert torch.equal(opt.state[p]["mask"], ref[offset : offset + p.numel()].view(p.shape))
        assert opt.state[p]["mask"].stride() == p.stride()
        offset += p.numel()


def test_flat_mask_path_with_a_non_contiguous_gradient():
    """Contiguous parameters put the mask buffer in plain order; a gradient set by hand in another layout (here a
    transposed one) is then read in plain order too, and the step equals masking tensor by tensor."""
    outs = []
    for flat in (True, False):
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(5, 7, dtype=torch.float64)), nn.Parameter(torch.randn(7, dtype=torch.float64))
        opt = SSAMD([w, b], torch.optim.SGD, lr=0.1, rho=0.3, sparsity=0.5, perturb_foreach=True, seed=2)
        if not flat:
            opt._mask_segment = lambda ps, gs: None
        w.grad = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).t()
        b.grad = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert not w.grad.is_contiguous()
        if flat:
            assert opt._mask_segment([w, b], [w.grad, b.grad]) is not None
        opt.first_step()
        outs.append([w.detach().clone(), b.detach().clone()])
        opt.restore()
    assert_same(*outs)


def test_flat_mask_path_skips_parameters_without_gradients():
    """A parameter left out of the backward breaks the masks' tiling of the buffer: the general path takes over."""
    x, y = batch()
    outs = []
    for foreach in (True, False):
        m = tiny_net()
        opt = make_opt("ssamf", m, rho=0.2, perturb_foreach=foreach, sparsity=0.5)
        opt.update_mask(m, [(x, y)])
        # Frozen after the optimizer was built: still maskable, but without a gradient in the middle of the list.
        m[1].weight.requires_grad_(False)
        for _ in range(2):
            sam_step(m, opt, x, y)
        outs.append(params_of(m))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_set_flat_mask_rejects_a_wrong_length():
    m = tiny_net()
    opt = make_opt("ssamd", m, sparsity=0.5)
    n = sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match=f"got {n - 1} entries.*exactly {n}"):
        opt.set_flat_mask(torch.ones(n - 1, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_state_dict_round_trip_mid_training(kind):
    x, y = batch()
    m = tiny_net()
    kw = dict(rho=0.2)
    if kind != "sam":
        kw["sparsity"] = 0.5
    if kind == "ssamd":
        kw.update(growth_strategy="random", drop_strategy="random", seed=5)
    opt = make_opt(kind, m, **kw)
    upd = {
        "ssamf": lambda mm, oo: lambda: None,
        "ssamd": lambda mm, oo: lambda: oo.update_mask(2),
        "sam": lambda mm, oo: lambda: None,
    }[kind]
    if kind == "ssamf":
        opt.update_mask(m, [(x, y)])
    for _ in range(3):
        sam_step(m, opt, x, y, update=upd(m, opt))
    saved_model = copy.deepcopy(m.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        sam_step(m, opt, x, y, update=upd(m, opt))
    m2 = tiny_net(seed=99)
    m2.load_state_dict(saved_model)
    kw2 = dict(kw)
    if kind == "ssamd":
        kw2["seed"] = 12345  # the loaded generator state must win over the constructor's seed
    opt2 = make_opt(kind, m2, **kw2)
    opt2.load_state_dict(saved_opt)
    for _ in range(3):
        sam_step(m2, opt2, x, y, update=upd(m2, opt2))
    assert_same(params_of(m), params_of(m2))
    assert "momentum_buffer" in saved_opt["state"][0]  # the base optimizer's state, in torch's layout


def test_state_dict_survives_torch_save(tmp_path):
    x, y = batch()
    m = tiny_net()
    opt = make_opt("ssamd", m, sparsity=0.5)
    sam_step(m, opt, x, y)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    sd = torch.load(tmp_path / "o.pt", weights_only=True)
    opt2 = make_opt("ssamd", tiny_net(), sparsity=0.5)
    opt2.load_state_dict(sd)
    assert torch.equal(opt.flat_mask(), opt2.flat_mask())
    assert opt2.flat_mask().dtype == torch.bool


def test_instance_and_class_styles_agree_and_scheduler_on_either():
    x, y = batch()
    m1, m2 = tiny_net(), tiny_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2.base_optimizer, 1, gamma=0.5)
    for _ in range(3):
        sam_step(m1, o1, x, y)
        sam_step(m2, o2, x, y)
        s1.step()
        s2.step()
    assert o1.base_optimizer.param_groups[0]["lr"] == o2.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert_same(params_of(m1), params_of(m2))


def test_param_groups_with_named_parameters():
    m = tiny_net()
    named = list(m.named_parameters())
    groups = [{"params": named[:2], "rho": 0.0}, {"params": named[2:]}]
    opt = SSAMD(groups, torch.optim.SGD, rho=0.1, lr=0.1, sparsity=0.5)
    names = [r["name"] for r in opt.mask_stats()]
    assert names == [n for n, _ in named]
    x, y = batch()
    w0 = params_of(m)
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    # rho 0 in the first group: those weights are not moved.
    assert torch.equal(next(m.parameters()), w0[0])
    opt.second_step()


def test_params_without_grad_are_skipped():
    x, y = batch()
    m = tiny_net()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never used: grad stays None
    opt = SSAMF(list(m.parameters()) + [extra], torch.optim.SGD, lr=0.1, sparsity=0.5)
    opt.update_mask(m, [(x, y)]) if False else None
    # The Fisher of a parameter the model does not use is zero; give masks directly.
    opt.set_mask_from_scores([torch.rand_like(p) for p in list(m.parameters()) + [extra]])
    sam_step(m, opt, x, y)
    assert torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))


def test_ssamf_without_mask_says_what_to_do():
    x, y = batch()
    m = tiny_net()
    opt = make_opt("ssamf", m)
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="update_mask"):
        opt.first_step()


@pytest.mark.parametrize(
    "cls,kw,name",
    [
        (SAM, dict(rho=-0.1), "rho"),
        (SSAMF, dict(sparsity=1.0), "sparsity"),
        (SSAMF, dict(sparsity=-0.1), "sparsity"),
        (SSAMF, dict(num_samples=0), "num_samples"),
        (SSAMF, dict(update_freq=0), "update_freq"),
        (SSAMD, dict(drop_rate=1.5), "drop_rate"),
        (SSAMD, dict(drop_strategy="magnitude"), "drop_strategy"),
        (SSAMD, dict(growth_strategy="x"), "growth_strategy"),
        (SSAMD, dict(T_start=10, T_end=10), "T_end"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kw, name):
    m = tiny_net()
    with pytest.raises(ValueError, match=name):
        cls(m.parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_base_instance_over_other_parameters_is_rejected():
    m, other = tiny_net(), tiny_net()
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(m.parameters(), torch.optim.SGD(other.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------- masks
def test_top_k_mask_exact_count_with_ties():
    s = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 2.0])
    for k in range(7):
        m = top_k_mask(s, k)
        assert int(m.sum()) == k
        if 0 < k < 6:
            assert s[m].min() >= s[~m].max()


def reference_fisher(model, xs, ys):
    """The definition, by hand: one example at a time, squared gradient, summed."""
    model = copy.deepcopy(model)
    model.train()
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in zip(xs, ys):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for t, p in zip(total, model.parameters()):
            t += p.grad**2
    return total


@pytest.mark.parametrize("method", ["loop", "vmap", "hooks"])
def test_fisher_matches_per_example_definition_without_side_effects(method):
    x, y = batch(n=12)
    m = tiny_net()
    m.eval()  # the call must put it in train mode and back
    F.cross_entropy(m(x), y).backward()  # stale gradients that must neither leak in nor be lost
    grads_before = [p.grad.clone() for p in m.parameters()]
    buffers_before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = reference_fisher(m, x[:10], y[:10])
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    got = empirical_fisher(m, list(m.parameters()), batches, num_samples=10, method=method)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert not m.training
    for p, g in zip(m.parameters(), grads_before):
        assert torch.equal(p.grad, g)
    for k, v in m.state_dict().items():
        assert torch.equal(v, buffers_before[k]), k


def test_fisher_from_dataset_and_mask_is_global_top_k():
    x, y = batch(n=20)
    ds = torch.utils.data.TensorDataset(x, y)
    m = tiny_net()
    opt = make_opt("ssamf", m, sparsity=0.8, num_samples=20)  # all examples: order cannot matter
    opt.update_mask(m, ds)
    ref = torch.cat([f.reshape(-1) for f in reference_fisher(m, x, y)])
    mask = opt.flat_mask()
    assert int(mask.sum()) == int(ref.numel() * 0.2) == opt.num_live
    assert ref[mask].min() >= ref[~mask].max()
    for p in m.parameters():
        assert opt.state[p]["mask"].dtype == torch.bool and opt.state[p]["mask"].shape == p.shape


def test_ssamd_death_rate_cosine():
    opt = SSAMD(tiny_net().parameters(), torch.optim.SGD, lr=0.1, drop_rate=0.4, T_start=10, T_end=30)
    for epoch, want in [(10, 0.4), (20, 0.2), (30, 0.0), (15, 0.4 * (1 + math.cos(math.pi / 4)) / 2), (0, 0.4)]:
        assert math.isclose(opt.death_rate(epoch), want, abs_tol=1e-12)


@pytest.mark.parametrize("drop,grow", [("gradient", "weight"), ("weight", "gradient"), ("gradient", "random")])
def test_ssamd_update_matches_sorting_reference(drop, grow):
    x, y = batch()
    m = tiny_net()
    opt = SSAMD(
        m.parameters(),
        torch.optim.SGD,
        lr=0.1,
        sparsity=0.6,
        drop_rate=0.5,
        drop_strategy=drop,
        growth_strategy=grow,
        T_end=10,
        seed=0,
    )
    F.cross_entropy(m(x), y).backward()
    old = opt.flat_mask().clone()
    k = int(old.sum())
    assert k == opt.num_live
    g = torch.cat([p.grad.abs().reshape(-1) for p in m.parameters()]).float()
    w = torch.cat([p.detach().abs().reshape(-1) for p in m.parameters()]).float()
    score = {"gradient": g, "weight": w}
    epoch = 3
    opt.update_mask(epoch)
    new = opt.flat_mask()
    assert int(new.sum()) == k
    n_keep = int(k * (1 - opt.death_rate(epoch)))
    live_idx = old.nonzero().squeeze(1)
    order = torch.argsort(score[drop][live_idx], descending=True, stable=True)
    expect_keep = set(live_idx[order[:n_keep]].tolist())
    kept = set((new & old).nonzero().squeeze(1).tolist())
    assert kept == expect_keep
    grown = (new & ~old).nonzero().squeeze(1)
    assert grown.numel() == k - n_keep
    if grow != "random":
        dead_idx = (~old).nonzero().squeeze(1)
        top = torch.sort(score[grow][dead_idx], descending=True).values[: k - n_keep]
        assert torch.equal(torch.sort(score[grow][grown], descending=True).values, top)


def test_ssamd_same_seed_same_masks():
    a = SSAMD(tiny_net().parameters(), torch.optim.SGD, lr=0.1, seed=7)
    b = SSAMD(tiny_net().parameters(), torch.optim.SGD, lr=0.1, seed=7)
    assert torch.equal(a.flat_mask(), b.flat_mask())


def test_extra_state_is_five_bytes_per_parameter():
    x, y = batch()
    m = tiny_net().float()
    opt = SSAMD(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.0)
    F.cross_entropy(m(x.float()), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(m(x.float()), y).backward()
    opt.second_step()
    n = sum(p.numel() for p in m.parameters())
    extra = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    assert extra == 5 * n


# ---------------------------------------------------------------------------------------------- BN and fp16 helpers
def test_frozen_bn_stats_keeps_statistics_and_output():
    m = tiny_net()
    m.train()
    x, _ = batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with frozen_bn_stats(m):
        out = m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(out, m(x))  # a normal training forward: same output, now with an update
    assert not torch.equal(m[1].running_mean, before["1.running_mean"])


def test_two_pass_scaler_equals_unscaled_and_skips_overflow():
    x, y = batch()
    m1, m2 = tiny_net(), tiny_net()
    o1, o2 = make_opt("sam", m1, rho=0.1), make_opt("sam", m2, rho=0.1)
    scaler = TwoPassScaler(init_scale=2.0**10)
    for _ in range(2):
        sam_step(m1, o1, x, y)
        scaler.scale(F.cross_entropy(m2(x), y)).backward()
        assert scaler.first_step(o2)
        scaler.scale(F.cross_entropy(m2(x), y)).backward()
        assert scaler.second_step(o2)
        scaler.update()
    for a, b in zip(params_of(m1), params_of(m2)):  # power-of-two scaling: equal to rounding
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
    # An overflow in the second pass: no step, weights back at w, scale halved.
    w = params_of(m2)
    scaler.scale(F.cross_entropy(m2(x), y)).backward()
    assert scaler.first_step(o2)
    (F.cross_entropy(m2(x), y) * float("inf")).backward()
    assert not scaler.second_step(o2)
    scaler.update()
    assert_same(params_of(m2), w)
    assert scaler.get_scale() == 2.0**9 and scaler.skipped_steps == 1
    # skip() gives a step up from outside: w back, gradients dropped, the overflow counted.
    scaler.scale(F.cross_entropy(m2(x), y)).backward()
    assert scaler.first_step(o2)
    scaler.skip(o2)
    scaler.update()
    assert_same(params_of(m2), w)
    assert all(p.grad is None for p in m2.parameters()) and o2._perturbed is None
    assert scaler.get_scale() == 2.0**8 and scaler.skipped_steps == 2


def test_ssamd_update_with_nan_gradients_keeps_the_live_count():
    """A NaN gradient scores 0, the lowest a live entry can score: the live count stays exact and no survivor scores
    below an entry that died."""
    m = tiny_net()
    opt = make_opt("ssamd", m, sparsity=0.5, seed=1, drop_strategy="gradient")
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    m[0].weight.grad[0] = float("nan")  # one whole filter
    score = torch.cat([p.grad.reshape(-1) for p in m.parameters()]).abs().nan_to_num(nan=0.0)
    before = opt.flat_mask()
    opt.update_mask(1)
    after = opt.flat_mask()
    assert int(after.sum()) == opt.num_live
    died, survived = before & ~after, before & after
    assert died.any() and score[survived].min() >= score[died].max()
    nan_live = before.clone()
    nan_live[m[0].weight.numel() // m[0].weight.shape[0] :] = False
    assert nan_live.any() and not (after & nan_live).any()  # the threshold is above 0 here: all of them died

"""The optimizers' API contracts: keyword routing, the closure rule, the maskable set, the mask refresh protocol,
first_pass(), add_param_group and the BatchNorm helpers; each against an independent computation."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
from ssam import SAM, SSAMD, SSAMF
from ssam.optim.select import device_top_k_mask, top_k_mask

KINDS = ["sam", "ssamf", "ssamd"]


def net(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers).double()


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def build(kind, model, params=None, **kw):
    x, y = batch()
    params = model.named_parameters() if params is None else params
    base_kw = dict(lr=0.1, momentum=0.9)
    if kind == "sam":
        return SAM(params, torch.optim.SGD, rho=0.1, **base_kw, **kw)
    if kind == "ssamf":
        opt = SSAMF(params, torch.optim.SGD, rho=0.1, sparsity=0.5, **base_kw, **kw)
        opt.update_mask(model, [(x, y)])
        return opt
    return SSAMD(params, torch.optim.SGD, rho=0.1, sparsity=0.5, seed=3, **base_kw, **kw)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v), (u - v).abs().max()


# ---------------------------------------------------------------------------------------------- keywords
def test_eps_and_foreach_reach_the_base_optimizer():
    m = net()
    opt = SAM(m.parameters(), torch.optim.AdamW, lr=1e-3, eps=1e-3, foreach=False)
    assert opt.base_optimizer.param_groups[0]["eps"] == 1e-3
    assert opt.base_optimizer.param_groups[0]["foreach"] is False
    assert opt.perturb_eps == 1e-7 and opt.perturb_foreach is None
    # And they act: with rho = 0 the wrapper is AdamW(eps=1e-3) step for step.
    ref = net()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-3)
    opt = SSAMF(m.parameters(), torch.optim.AdamW, rho=0.0, lr=1e-3, eps=1e-3)
    x, y = batch()
    opt.update_mask(m, [(x, y)])
    for _ in range(3):
        F.cross_entropy(ref(x), y).backward()
        plain.step()
        plain.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(m(x), y).backward()
        opt.second_step(zero_grad=True)
    assert_same(weights(ref), weights(m))


def test_perturb_eps_enters_the_norm():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.3, perturb_eps=0.5, lr=0.0)
    (w**3).sum().backward()
    opt.first_step()
    g = 3 * w0**2
    assert torch.allclose(w.detach(), w0 + 0.3 * g / (g.norm() + 0.5), rtol=0, atol=1e-15)
    opt.restore()


@pytest.mark.parametrize("cls", [SAM, SSAMF, SSAMD])
def test_a_keyword_the_base_does_not_take_is_named(cls):
    m = net()
    with pytest.raises(ValueError, match=r"^eps: got 1e-07.*SGD.*perturb_eps"):
        cls(m.parameters(), torch.optim.SGD, lr=0.1, eps=1e-7)
    with pytest.raises(ValueError, match=r"^betas: got \(0\.9, 0\.99\).*SGD's lr, momentum"):
        cls(m.parameters(), torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(perturb_eps=-1.0), "perturb_eps"),
        (dict(perturb_foreach="yes"), "perturb_foreach"),
        (dict(closure_passes="first"), "closure_passes"),
    ],
)
def test_bad_own_keywords_are_named(kw, name):
    with pytest.raises(ValueError, match=f"^{name}: got"):
        SAM(net().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_closure_passes_attribute_is_validated():
    opt = SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    opt.closure_passes = "both"
    assert opt.closure_passes == "both"
    with pytest.raises(ValueError, match="closure_passes: got 'all'; allowed: 'second', 'both'"):
        opt.closure_passes = "all"


# ---------------------------------------------------------------------------------------------- no gradient
@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_anywhere_raises_instead_of_skipping(kind):
    m = net()
    opt = build(kind, m)
    w0 = weights(m)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    x, y = batch()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.step(lambda: F.cross_entropy(m(x), y).backward())  # closure_passes="second": pass one was not run
    assert_same(weights(m), w0)
    assert opt._perturbed is None


# ---------------------------------------------------------------------------------------------- closure_passes
@pytest.mark.parametrize("zeroes_itself", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_both_passes_in_one_call_equal_the_two_call_path(kind, zeroes_itself):
    x, y = batch()
    m1, m2 = net(), net()
    o1, o2 = build(kind, m1), build(kind, m2, closure_passes="both")
    for step in range(3):
        o1.zero_grad()
        loss_w = F.cross_entropy(m1(x), y)
        loss_w.backward()
        o1.first_step(zero_grad=True)
        F.cross_entropy(m1(x), y).backward()
        o1.second_step()

        for p in m2.parameters():  # stale gradients: "both" must not use them
            p.grad = torch.full_like(p, 7.0)

        def closure():
            if zeroes_itself:
                o2.zero_grad()
            loss = F.cross_entropy(m2(x), y)
            loss.backward()
            return loss

        got = o2.step(closure)
        assert torch.equal(got, loss_w)  # the loss of pass one, at w
    assert_same(weights(m1), weights(m2))


@pytest.mark.parametrize("kind", KINDS)
def test_step_without_closure_finishes_a_first_step(kind):
    x, y = batch()
    m1, m2 = net(), net()
    o1, o2 = build(kind, m1), build(kind, m2)
    for o, m in ((o1, m1), (o2, m2)):
        for _ in range(2):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            o.second_step() if o is o1 else o.step()
    assert_same(weights(m1), weights(m2))
    # Nothing pending, an ascent due, pass two's gradient still in .grad: refused, naming the calls (rule 5).
    before = weights(m2)
    with pytest.raises(RuntimeError, match="due an ascent.*first_step.*SAMTrainer"):
        o2.step()
    assert_same(weights(m2), before)


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_step_without_closure_is_the_schedules_plain_step(kind):
    """Under schedule every:2, step 1 is plain: step() takes the base step with the gradient at w, by hand."""
    x, y = batch()
    m = net()
    o = build(kind, m, schedule="every:2")
    assert o.ascent_due()
    F.cross_entropy(m(x), y).backward()
    o.first_step(zero_grad=True)
    F.cross_entropy(m(x), y).backward()
    o.second_step(zero_grad=True)
    assert not o.ascent_due() and o.steps_taken == (1, 1)
    F.cross_entropy(m(x), y).backward()
    lr, mom = 0.1, 0.9
    expected = [p - lr * (mom * o.state[p]["momentum_buffer"] + p.grad) for p in m.parameters()]
    o.step()
    for p, e in zip(m.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=0, atol=1e-15)
    assert o.ascent_due() and o.steps_taken == (2, 1)


# ---------------------------------------------------------------------------------------------- maskable set
def frozen_net():
    m = net()
    m[0].weight.requires_grad_(False)
    return m


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_frozen_parameters_take_no_budget(kind):
    m = frozen_net()
    opt = build(kind, m)
    trainable = [p for p in m.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    assert opt.num_live == int(n_train * 0.5)
    assert int(opt.flat_mask().sum()) == opt.num_live and opt.flat_mask().numel() == n_train
    assert opt.mask_density() == opt.num_live / n_train
    assert opt.excluded_params() == ["0.weight"]
    assert [r["name"] for r in opt.mask_stats()] == [n for n, p in m.named_parameters() if p.requires_grad]
    assert "mask" not in opt.state.get(m[0].weight, {})
    if kind == "ssamf":  # the mask is the top half of the trainable weights' Fisher, the frozen weight unscored
        x, y = batch()
        fisher = [torch.zeros_like(p) for p in trainable]
        for xi, yi in zip(x, y):  # the definition: squared per-example gradients, summed
            m.zero_grad()
            F.cross_entropy(m(xi[None]), yi[None]).backward()
            for f, p in zip(fisher, trainable):
                f += p.grad**2
        score = torch.cat([f.reshape(-1) for f in fisher])
        mask = opt.flat_mask()
        assert score[mask].min() >= score[~mask].max()


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_the_maskable_set_is_fixed_when_built(kind):
    x, y = batch()
    m = frozen_net()
    opt = build(kind, m)
    m[0].weight.requires_grad_(True)  # unfrozen later: still not maskable, never perturbed
    m[4].weight.requires_grad_(False)  # frozen later: still maskable
    assert opt.excluded_params() == ["0.weight"]
    F.cross_entropy(m(x), y).backward()
    w0 = m[0].weight.detach().clone()
    opt.first_step()
    assert torch.equal(m[0].weight.detach(), w0)
    opt.restore()


def test_ssamd_gradient_scoring_names_parameters_without_gradients():
    x, y = batch()
    m = net()
    opt = build("ssamd", m)
    F.cross_entropy(m(x), y).backward()
    m[1].weight.grad = None
    m[4].bias.grad = None
    before = opt.flat_mask()
    with pytest.raises(RuntimeError, match=r"have none: 1\.weight, 4\.bias"):
        opt.update_mask(1)
    assert torch.equal(opt.flat_mask(), before)
    weight_only = SSAMD(
        m.named_parameters(), torch.optim.SGD, lr=0.1, drop_strategy="weight", growth_strategy="random", seed=1
    )
    weight_only.update_mask(1)  # no gradient needed
    assert int(weight_only.flat_mask().sum()) == weight_only.num_live


# ---------------------------------------------------------------------------------------------- refresh protocol
def test_sam_has_no_mask_to_refresh():
    opt = SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.mask_refresh is None and opt.refresh_mask(0) is False


def test_ssamf_refresh_follows_update_freq():
    x, y = batch()
    m = net()
    opt = SSAMF(m.parameters(), torch.optim.SGD, lr=0.1, update_freq=2)
    assert opt.mask_refresh == "before_epoch"
    with pytest.raises(ValueError, match="model, data"):
        opt.refresh_mask(0)
    ran = [opt.refresh_mask(e, model=m, data=[(x, y)]) for e in range(5)]
    assert ran == [True, False, True, False, True] and opt.num_updates == 3
    twin = SSAMF(m.parameters(), torch.optim.SGD, lr=0.1)
    twin.update_mask(m, [(x, y)])
    assert torch.equal(opt.flat_mask(), twin.flat_mask())
    late = SSAMF(m.parameters(), torch.optim.SGD, lr=0.1, update_freq=2)
    assert late.refresh_mask(3, model=m, data=[(x, y)])  # no mask yet: builds one whatever the epoch


def test_ssamf_refresh_passes_the_loss_on():
    x, y = batch()
    m = net()

    def flipped(out, target):  # a loss whose Fisher differs from cross-entropy's
        return F.cross_entropy(-out, target)

    opt, twin, plain = (SSAMF(m.parameters(), torch.optim.SGD, lr=0.1) for _ in range(3))
    assert opt.refresh_mask(0, model=m, data=[(x, y)], loss_fn=flipped)
    twin.update_mask(m, [(x, y)], loss_fn=flipped)
    plain.update_mask(m, [(x, y)])
    assert torch.equal(opt.flat_mask(), twin.flat_mask())
    assert not torch.equal(opt.flat_mask(), plain.flat_mask())


def test_ssamd_refresh_once_per_epoch():
    x, y = batch()
    m = net()
    opt, twin = build("ssamd", m), build("ssamd", m)
    assert opt.mask_refresh == "first_backward"
    F.cross_entropy(m(x), y).backward()
    assert [opt.refresh_mask(0), opt.refresh_mask(0), opt.refresh_mask(1)] == [True, False, True]
    twin.update_mask(0)
    twin.update_mask(1)
    assert torch.equal(opt.flat_mask(), twin.flat_mask()) and opt.num_updates == 2


# ---------------------------------------------------------------------------------------------- first_pass
def dead_bias_opt(m, **kw):
    """SSAM-D with a hand-set mask: every entry of the conv bias and the BN weight dead, half of the rest live."""
    opt = SSAMD(m.named_parameters(), torch.optim.SGD, lr=0.1, rho=0.2, seed=0, **kw)
    flat = torch.zeros(sum(p.numel() for p in m.parameters()), dtype=torch.bool)
    flat[::2] = True
    offset = 0
    for name, p in m.named_parameters():
        if name in ("0.bias", "1.weight"):
            flat[offset : offset + p.numel()] = False
        offset += p.numel()
    opt.set_flat_mask(flat)
    return opt


def test_first_pass_freezes_dead_tensors_only_inside():
    x, y = batch()
    m = net()
    opt = dead_bias_opt(m)
    with opt.first_pass():
        frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
        F.cross_entropy(m(x), y).backward()
    assert frozen == ["0.bias", "1.weight"]
    assert all(p.requires_grad for p in m.parameters())
    assert m[0].bias.grad is None and m[1].weight.grad is None and m[0].weight.grad is not None
    with pytest.raises(KeyError):
        with opt.first_pass():
            raise KeyError("boom")
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_first_pass_changes_nothing_with_a_live_entry_everywhere(kind):
    m = net()
    opt = build(kind, m)
    if kind != "sam":  # a mask with a live entry in every tensor (a Fisher mask may kill a small tensor)
        flat = torch.zeros(sum(p.numel() for p in m.parameters()), dtype=torch.bool)
        flat[::2] = True
        opt.set_flat_mask(flat)
        assert all(r["density"] > 0 for r in opt.mask_stats())
    with opt.first_pass():
        assert all(p.requires_grad for p in m.parameters())


def test_first_pass_step_equals_the_plain_step_when_renormalized():
    """With renormalize the norm is of the masked gradient, so leaving out dead tensors' gradients changes nothing."""
    x, y = batch()
    outs = []
    for use in (False, True):
        m = net()
        opt = dead_bias_opt(m, renormalize=True, perturb_foreach=False)
        for _ in range(2):
            with opt.first_pass() if use else torch.enable_grad():
                F.cross_entropy(m(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step(zero_grad=True)
        outs.append(weights(m))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------- add_param_group
def test_add_param_group_joins_the_budget():
    m = net()
    named = list(m.named_parameters())
    opt = SSAMD(named[:2], torch.optim.SGD, lr=0.1, rho=0.2, seed=0)
    opt.add_param_group({"params": named[2:], "lr": 0.01})
    n = sum(p.numel() for p in m.parameters())
    assert opt.flat_mask().numel() == n and int(opt.flat_mask().sum()) == opt.num_live == int(n * 0.5)
    assert [r["name"] for r in opt.mask_stats()] == [k for k, _ in named]
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["momentum"] == 0
    assert opt.base_optimizer.param_groups is opt.param_groups
    f = SSAMF(named[:2], torch.optim.SGD, lr=0.1)
    x, y = batch()
    f.update_mask(m, [(x, y)])
    f.add_param_group({"params": named[2:]})
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="update_mask"):
        f.first_step()


# ---------------------------------------------------------------------------------------------- BatchNorm helpers
def test_disable_and_enable_running_stats():
    x, _ = batch()
    m = net()
    extra = nn.BatchNorm2d(4, track_running_stats=False)
    m.append(extra)  # not tracking to begin with: must stay so
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ssam.disable_running_stats(m)
    ssam.disable_running_stats(m)  # twice is harmless
    out = m[:4](x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    ssam.enable_running_stats(m)
    assert torch.equal(out, m[:4](x))  # same training-mode output, and now the statistics move
    assert not torch.equal(m[1].running_mean, before["1.running_mean"])
    assert m[1].track_running_stats and not extra.track_running_stats


# ---------------------------------------------------------------------------------------------- selection among
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_top_k_among_a_subset_matches_sorting(path):
    select = top_k_mask if path == "cpu" else device_top_k_mask
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        n = int(torch.randint(1, 300, (1,), generator=g))
        s = torch.randint(0, 4, (n,), generator=g).float()
        s[torch.rand(n, generator=g) < 0.1] = float("nan")
        among = torch.rand(n, generator=g) < 0.6
        size = int(among.sum())
        k = int(torch.randint(0, size + 2, (1,), generator=g))
        got = select(s, k, among)
        # Reference: rank members by (score with NaN lowest, then position), keep the first k.
        key = torch.nan_to_num(s, nan=-math.inf)
        members = among.nonzero().squeeze(1).tolist()
        order = sorted(members, key=lambda i: (-key[i].item(), i))
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- Fisher data forms
def test_ssamf_update_mask_takes_one_batch_and_names_dict_batches():
    x, y = batch()
    m = net()
    one, many = SSAMF(m.parameters(), torch.optim.SGD, lr=0.1), SSAMF(m.parameters(), torch.optim.SGD, lr=0.1)
    one.update_mask(m, (x, y))
    many.update_mask(m, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert torch.equal(one.flat_mask(), many.flat_mask())
    with pytest.raises(ValueError, match=r"data: got a batch that is a dict with keys \['input', 'label'\]"):
        one.update_mask(m, [{"input": x, "label": y}])


@pytest.mark.parametrize("method", ["loop", "hooks"])
def test_fisher_in_train_mode_on_1x1_batchnorm_says_use_eval(method):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    x, y = batch()
    with pytest.raises(ValueError, match=r"^fisher_mode: got 'train', .* \(1x1 feature maps\); allowed: 'eval'"):
        ssam.optim.empirical_fisher(m, list(m.parameters()), [(x.float(), y)], 4, method=method)
    assert all(
        torch.isfinite(f).all()
        for f in ssam.optim.empirical_fisher(m, list(m.parameters()), [(x.float(), y)], 4, mode="eval", method=method)
    )


def test_fisher_mode_auto_picks_train_where_it_runs_and_eval_on_1x1_batchnorm():
    from ssam.optim.fisher import resolve_fisher_mode, train_mode_refusal

    torch.manual_seed(0)
    x, y = batch()
    pooled = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3)
    )
    spatial = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    spatial(x[:2].float())  # materialise the lazy layer
    assert "BatchNorm2d sees one value per channel" in train_mode_refusal(pooled, x[0].float())
    assert train_mode_refusal(spatial, x[0].float()) is None
    assert resolve_fisher_mode("auto", pooled, x[0].float()) == "eval"
    assert resolve_fisher_mode("auto", spatial, x[0].float()) == "train"
    data = [(x.float(), y)]
    for model, concrete in ((pooled, "eval"), (spatial, "train")):  # auto gives the concrete mode's numbers
        auto = ssam.optim.empirical_fisher(model, list(model.parameters()), data, 6, mode="auto", method="loop")
        want = ssam.optim.empirical_fisher(model, list(model.parameters()), data, 6, mode=concrete, method="loop")
        assert all(torch.equal(a, b) for a, b in zip(auto, want))
    assert ssam.SSAMF(spatial.parameters(), torch.optim.SGD, lr=0.1).fisher_mode == "auto"  # the default

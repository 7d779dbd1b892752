"""The optimizers' state as torch sees it: settings in defaults and param groups, opt.state, state_dict formats (this
one and ssam 0.1's), a torch.distributed.checkpoint round trip, and what step() does without a closure."""

import copy
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import ssam
from ssam import SAM, SSAMD, SSAMF, SparseSAM

KINDS = ["sam", "ssamf", "ssamd"]


def net(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers).double()


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def build(kind, model, mask=True, seed=3, base=torch.optim.SGD, **kw):
    base_kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if base is torch.optim.SGD else dict(lr=1e-2)
    base_kw.update(kw.pop("base_kw", {}))
    if kind == "sam":
        return SAM(model.parameters(), base, rho=0.1, **base_kw, **kw)
    if kind == "ssamf":
        opt = SSAMF(model.parameters(), base, rho=0.1, sparsity=0.5, **base_kw, **kw)
        if mask:
            opt.update_mask(model, [batch()])
        return opt
    return SSAMD(model.parameters(), base, rho=0.1, sparsity=0.5, seed=seed, drop_strategy="random", **base_kw, **kw)


def sam_step(model, opt, epoch):
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    if isinstance(opt, SSAMD):
        opt.update_mask(epoch)  # draws from the optimizer's generator: a resumed one must draw the same
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v), (u - v).abs().max()


# ---------------------------------------------------------------------------------------------- settings
def test_every_setting_is_in_defaults_and_every_group():
    m = net()
    groups = [{"params": list(m.parameters())[:2], "rho": 0.3}, {"params": list(m.parameters())[2:]}]
    opt = SSAMD(groups, torch.optim.SGD, rho=0.1, sparsity=0.6, update_freq=2, T_end=9, seed=4, lr=0.1)
    want = dict(rho=0.1, adaptive=False, perturb_eps=1e-7, perturb_foreach=None, closure_passes="second")
    want.update(sparsity=0.6, granularity="element", cost_aware=False, update_freq=2, renormalize=False)
    want.update(drop_rate=0.5, drop_strategy="gradient", growth_strategy="random", T_start=0, T_end=9, seed=4)
    for k, v in want.items():
        assert opt.defaults[k] == v, k
        assert [g[k] for g in opt.param_groups] == ([0.3, 0.1] if k == "rho" else [v, v]), k
    assert opt.defaults["lr"] == 0.1 and opt.defaults["momentum"] == 0  # the base's, beside
    saved = opt.state_dict()["param_groups"]
    assert [g["sparsity"] for g in saved] == [0.6, 0.6] and [g["rho"] for g in saved] == [0.3, 0.1]
    assert (opt.sparsity, opt.update_freq, opt.T_end, opt.seed, opt.perturb_eps) == (0.6, 2, 9, 4, 1e-7)


def test_settings_are_read_only_or_checked_and_written_everywhere():
    m = net()
    opt = build("ssamf", m, mask=False)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    opt.num_samples = 7
    opt.closure_passes = "both"
    assert [g["num_samples"] for g in opt.param_groups] == [7, 7] and opt.defaults["num_samples"] == 7
    assert [g["closure_passes"] for g in opt.param_groups] == ["both", "both"]
    with pytest.raises(ValueError, match=r"^num_samples: got 0; allowed: an integer >= 1"):
        opt.num_samples = 0
    with pytest.raises(AttributeError, match="^sparsity: fixed when SSAMF is built"):
        opt.sparsity = 0.9
    assert opt.num_samples == 7 and opt.sparsity == 0.5


def test_a_group_may_not_change_a_setting_of_the_whole_optimizer():
    ps = list(net().parameters())
    with pytest.raises(ValueError, match=r"^sparsity: got 0\.9 in param group 1; allowed: 0\.5"):
        SSAMF([{"params": ps[:2]}, {"params": ps[2:], "sparsity": 0.9}], torch.optim.SGD, lr=0.1)
    opt = SSAMF([{"params": ps[:2]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^param group 1: rho: got -1"):
        opt.add_param_group({"params": ps[2:], "rho": -1})
    assert len(opt.param_groups) == 1  # refused before the base optimizer took it


def test_base_optimizer_with_a_setting_named_like_ours_is_refused():
    with pytest.raises(ValueError, match=r"^base_optimizer: Adadelta has its own 'rho' setting"):
        SAM(net().parameters(), torch.optim.Adadelta, lr=1.0)


def test_per_group_rho_and_perturb_eps_by_hand():
    """One norm over every gradient; each group scales it by its own rho / (norm + perturb_eps)."""
    a, b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)), nn.Parameter(torch.tensor([0.5]).double())
    groups = [{"params": [a], "rho": 0.2, "perturb_eps": 0.5}, {"params": [b]}]
    opt = SAM(groups, torch.optim.SGD, rho=0.1, lr=0.0)
    ((a**2).sum() + 3 * b.sum()).backward()
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), 2 * a.detach(), torch.tensor([3.0]).double()
    norm = math.sqrt(float((ga**2).sum() + (gb**2).sum()))
    opt.first_step()
    assert torch.allclose(a.detach(), a0 + 0.2 * ga / (norm + 0.5), rtol=0, atol=1e-15)
    assert torch.allclose(b.detach(), b0 + 0.1 * gb / (norm + 1e-7), rtol=0, atol=1e-15)
    opt.restore()


# ---------------------------------------------------------------------------------------------- opt.state
def test_state_view_shows_both_and_writes_each_key_where_it_lives():
    m = net()
    opt = build("ssamd", m, base=torch.optim.AdamW)
    p = m[0].weight
    assert not opt.state and len(opt.state) == 0  # torch's rule: nothing listed before the first step
    assert torch.equal(opt.state[p]["mask"], opt.flat_mask()[: p.numel()].view_as(p))
    sam_step(m, opt, 0)  # AdamW's lazy initialisation still sees its own empty dict
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "mask", "w_saved", "ssam"}
    assert set(opt.base_optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert len(opt.state) == len(list(m.parameters()))
    opt.state[p]["exp_avg"] = torch.ones_like(p)
    assert torch.equal(opt.base_optimizer.state[p]["exp_avg"], torch.ones_like(p))
    flat = torch.zeros(opt.flat_mask().numel(), dtype=torch.bool)
    opt.state[p]["mask"] = torch.ones_like(p, dtype=torch.bool)  # copied into the one flat buffer
    flat[: p.numel()] = True
    assert torch.equal(opt.flat_mask()[: p.numel()], flat[: p.numel()])
    with pytest.raises(ValueError, match=r"^state\[p\]\['mask'\]: got \(2,\)"):
        opt.state[p]["mask"] = torch.ones(2, dtype=torch.bool)


def test_writing_every_entry_back_changes_nothing():
    """What Lightning does after loading a checkpoint (moving the state to the device): read every entry of
    opt.state and write it back. The masks stay one buffer, the counters stay; "ssam" written sets them."""
    m = net()
    opt = build("ssamd", m)
    for e in range(2):
        sam_step(m, opt, e)
    before = copy.deepcopy(opt.state_dict())
    for _, entry in opt.state.items():
        for key, value in entry.items():
            if key != "step":
                entry[key] = value.to("cpu") if torch.is_tensor(value) else copy.deepcopy(value)
    after = opt.state_dict()
    for i, entry in before["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(after["state"][i][key], value), (i, key)
    assert after["state"][0]["ssam"]["num_updates"] == 2
    opt.state[next(m.parameters())]["ssam"] = {**before["state"][0]["ssam"], "num_updates": 7}
    assert opt.num_updates == 7


def test_sgd_without_momentum_lists_ssams_state_after_a_step():
    m = net()
    opt = build("ssamd", m, base_kw=dict(momentum=0.0))
    sam_step(m, opt, 0)
    assert not opt.base_optimizer.state and len(opt.state) == len(list(m.parameters()))
    n = sum(p.numel() for p in m.parameters())
    own = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    assert own == 9 * n  # w (8 bytes, float64) + the mask (1 byte)


# ---------------------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_torch_shaped(kind):
    m = net()
    opt = build(kind, m)
    for e in range(2):
        sam_step(m, opt, e)
    sd = opt.state_dict()
    assert list(sd) == ["state", "param_groups"]
    params = list(m.parameters())
    assert sd["param_groups"][0]["params"] == list(range(len(params)))
    for i, p in enumerate(params):
        entry = sd["state"][i]
        assert torch.equal(entry["momentum_buffer"], opt.base_optimizer.state[p]["momentum_buffer"])
        assert "w_saved" not in entry
        if kind != "sam":
            assert entry["mask"].dtype == torch.bool and torch.equal(entry["mask"], opt.state[p]["mask"])
    assert sd["state"][0]["ssam"]["format"] == 2 and all("ssam" not in sd["state"][i] for i in range(1, len(params)))
    if kind == "ssamd":
        assert sd["state"][0]["ssam"]["num_updates"] == 2 and sd["state"][0]["ssam"]["last_update_epoch"] == 1
    # The base optimizer's part is what the same SGD alone would save.
    plain = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3).state_dict()["param_groups"][0]
    assert {k: v for k, v in sd["param_groups"][0].items() if k in plain} == plain


def test_a_fresh_ssamf_saves_stand_in_masks_and_says_so():
    m = net()
    sd = build("ssamf", m, mask=False).state_dict()
    assert sd["state"][0]["ssam"]["has_masks"] is False
    assert all(not sd["state"][i]["mask"].any() for i in range(len(list(m.parameters()))))
    twin = build("ssamf", net(), mask=False)
    twin.load_state_dict(sd)
    assert not twin.has_masks()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_torch_save_continues_bit_for_bit(kind, tmp_path):
    m = net()
    opt = build(kind, m, perturb_eps=1e-6, base=torch.optim.AdamW)
    for e in range(2):
        sam_step(m, opt, e)
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    sam_step(m, opt, 2)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = net(seed=9)
    m2.load_state_dict(ck["model"])
    opt2 = build(kind, m2, mask=False, seed=77, perturb_eps=1e-6, base=torch.optim.AdamW)
    opt2.load_state_dict(ck["opt"])
    sam_step(m2, opt2, 2)
    assert_same(weights(m), weights(m2))


def test_load_keeps_the_whole_optimizers_settings_and_takes_the_groups():
    m = net()
    opt = build("ssamd", m, update_freq=2)
    opt.param_groups[0]["rho"] = 0.25  # per group: the saved value wins on load, as lr does in torch
    other = build("ssamd", net(), update_freq=3, T_end=50)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["rho"] == 0.25
    assert other.update_freq == 3 and other.param_groups[0]["update_freq"] == 3 and other.T_end == 50


def test_bad_state_dicts_are_one_line_errors():
    opt = build("ssamd", net())
    with pytest.raises(ValueError, match=r"^state_dict: got keys \['a'\]; allowed: a state_dict from SSAMD"):
        opt.load_state_dict({"a": 1})
    sd = opt.state_dict()
    sd["state"][0]["ssam"]["format"] = 3
    with pytest.raises(ValueError, match=r"^state_dict: format 3; allowed: 2 or older"):
        opt.load_state_dict(sd)
    small = build("ssamd", nn.Sequential(nn.Linear(2, 2)).double())
    with pytest.raises(ValueError, match=r"^state_dict: 2 parameters in its param_groups; allowed: 6"):
        opt.load_state_dict(small.state_dict())


# ---------------------------------------------------------------------------------------------- ssam 0.1's format
def state_dict_v01(opt):
    """ssam 0.1's SAM.state_dict, frozen: it wrote every checkpoint of ``ssam train``, Lightning and the Hugging Face
    Trainer before format 2. Its own state by index (its pop of w_saved did not reach the entries torch returned, so
    they kept it), the base optimizer's state_dict whole (whose groups held only rho and adaptive of the wrapper's
    settings), the counters apart."""
    params = [p for g in opt.param_groups for p in g["params"]]
    own = {}
    for i, p in enumerate(params):
        entry = {k: opt.state[p][k] for k in ("mask", "w_saved") if k in opt.state[p]}
        if entry:
            own[i] = entry
    base = copy.deepcopy(opt.base_optimizer.state_dict())
    later = set(opt.defaults) - set(opt.base_optimizer.defaults) - {"rho", "adaptive"}
    for g in base["param_groups"]:
        for k in later:
            del g[k]
    extra = {}
    if isinstance(opt, SSAMF):
        extra = {"num_updates": opt.num_updates}
    if isinstance(opt, SSAMD):
        counters = opt.state_dict()["state"][0]["ssam"]
        extra = {k: counters[k] for k in ("num_updates", "last_update_epoch", "generator", "grow_from")}
    return {"state": own, "base_optimizer": base, "extra": extra}


@pytest.mark.parametrize("kind", KINDS)
def test_ssam_01_state_dicts_load_and_continue_bit_for_bit(kind):
    m = net()
    opt = build(kind, m)
    for e in range(2):
        sam_step(m, opt, e)
    old = copy.deepcopy(state_dict_v01(opt))
    assert (
        set(old) == {"state", "base_optimizer", "extra"}
        and "perturb_eps" not in old["base_optimizer"]["param_groups"][0]
    )
    model_sd = copy.deepcopy(m.state_dict())
    sam_step(m, opt, 2)
    m2 = net(seed=9)
    m2.load_state_dict(model_sd)
    opt2 = build(kind, m2, mask=False, seed=77, perturb_eps=1e-7)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["perturb_eps"] == 1e-7  # a setting the old dict lacks: this optimizer's
    sam_step(m2, opt2, 2)
    assert_same(weights(m), weights(m2))


def test_earliest_ssamd_dicts_without_grow_from_load():
    opt = build("ssamd", net())
    old = state_dict_v01(opt)
    del old["extra"]["grow_from"]
    twin = build("ssamd", net(), seed=5)
    twin.load_state_dict(old)
    assert twin.grow_from == 0 and torch.equal(twin.flat_mask(), opt.flat_mask())


# ---------------------------------------------------------------------------------------------- DCP
@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_distributed_checkpoint_round_trip(kind, flatten, gloo, tmp_path):
    """Model and optimizer saved with torch.distributed.checkpoint and loaded into fresh ones (SSAM-F without a mask,
    SSAM-D with another seed): the base's state and the masks bit for bit, then the same next step."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    m = net()
    opt = build(kind, m)
    for e in range(2):
        sam_step(m, opt, e)
    dcp.save(
        {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt, options=options)},
        checkpoint_id=tmp_path,
    )
    m2 = net(seed=9)
    opt2 = build(kind, m2, mask=False, seed=77)
    if flatten and kind == "ssamf":  # only keys opt.state shows are loaded: a fresh SSAM-F has no mask to show
        opt2.update_mask(m2, [batch(seed=4)])
    # DCP initialises the fresh optimizer's state by step() on zero gradients at lr 0 (step's rule 4).
    sd = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, opt2, options=options)}
    dcp.load(sd, checkpoint_id=tmp_path)
    set_model_state_dict(m2, sd["model"])
    set_optimizer_state_dict(m2, opt2, sd["optim"], options=options)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    if kind != "sam":
        assert torch.equal(opt.flat_mask(), opt2.flat_mask())
        assert opt2.num_updates == opt.num_updates
    sam_step(m, opt, 2)
    sam_step(m2, opt2, 2)
    assert_same(weights(m), weights(m2))


def test_flattened_dcp_into_a_fresh_ssamf_without_mask_is_refused(gloo, tmp_path):

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    m = net()
    saved = get_optimizer_state_dict(m, build("ssamf", m), options=options)
    m2 = net()
    fresh = build("ssamf", m2, mask=False)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict, give a fresh SSAMF a mask before loading"):
        set_optimizer_state_dict(m2, fresh, copy.deepcopy(saved), options=options)


# ---------------------------------------------------------------------------------------------- step() without closure
@pytest.mark.parametrize("kind", KINDS)
def test_step_with_no_gradient_anywhere_raises_and_moves_nothing(kind):
    m = net()
    opt = build(kind, m)
    w = weights(m)
    with pytest.raises(
        RuntimeError,
        match=r"step\(\): no perturbation is pending and no parameter has a gradient.*SAMCallback.*SAMTrainer",
    ):
        opt.step()
    assert_same(weights(m), w)
    assert not opt.base_optimizer.state


def test_plain_step_of_a_sparse_optimizer_without_mask_names_the_trainers():
    m = net()
    opt = build("ssamf", m, mask=False)
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    w = weights(m)
    with pytest.raises(
        RuntimeError, match=r"no mask yet, so this would be a plain SGD step.*SAMCallback.*SAMTrainer.*update_mask"
    ):
        opt.step()
    assert_same(weights(m), w)
    assert not opt.base_optimizer.state


def test_zero_gradient_step_initialises_state_as_distributed_checkpoint_does():
    """SSAM-F without a mask, every gradient zero, lr 0: the perturbation would be zero, so the plain step is the SAM
    step. The momentum buffer SGD starts from is g + weight_decay * w = weight_decay * w."""
    m = net()
    opt = build("ssamf", m, mask=False)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    w = weights(m)
    opt.step()
    assert_same(weights(m), w)
    for p in m.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], 1e-3 * p.detach())


# ---------------------------------------------------------------------------------------------- messages and the loss
def test_second_pass_closure_without_gradient_names_both_and_the_callback():
    m = net()
    opt = build("sam", m)
    x, y = batch()
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient.*closure_passes='both'.*SAMCallback"):
        opt.step(lambda: F.cross_entropy(m(x), y).backward())


def test_ssamf_without_mask_names_what_refreshes_masks():
    m = net()
    opt = build("ssamf", m, mask=False)
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match=r"update_mask.*refresh_mask.*SAMCallback.*SAMTrainer"):
        opt.first_step()


@pytest.mark.parametrize("passes", ["second", "both"])
def test_step_returns_a_detached_loss_that_converts_quietly(passes):
    m, ref = net(), net()
    opt = build("sam", m, closure_passes=passes)
    x, y = batch()
    want = F.cross_entropy(ref(x), y).item()  # the loss at w (pass one) for "both"; pass two's differs
    if passes == "second":
        F.cross_entropy(m(x), y).backward()

    def closure():
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(closure)
        value = float(loss)
    assert not loss.requires_grad
    assert (value == want) == (passes == "both")


# ---------------------------------------------------------------------------------------------- the sparse base class
def test_sparse_base_class_is_public():
    assert ssam.SparseSAM is ssam.optim.SparseSAM is ssam.optim.sparse.SparseSAM is SparseSAM
    assert issubclass(SSAMF, SparseSAM) and issubclass(SSAMD, SparseSAM) and not issubclass(SAM, SparseSAM)

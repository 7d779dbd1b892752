"""The SAM family as a torch optimizer, where torch's own optimizer tests say how one behaves (issue 33).

In the shape of torch's OptimizerInfo / optim_db, written for this library: ``DB`` lists the optimizers (one small
``OptimInfo`` each: the class, the base optimizer, the keywords, and whether it needs a mask before its first
step), and the generic tests run over every entry. Every check is against something computed apart: a second
identical run, the same run continued on a deep copy of the model, torch's own optimizer given the same input, or
the records the hooks keep themselves. The steps are real ones: ``step(closure)`` with ``closure_passes='both'``,
the closure a forward and backward of a tiny model.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ssam import SAM, SSAMD, SSAMF, SparseSAM


# ---------------------------------------------------------------------------------------------- the entries
@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of the family and how to build it over a model (``make``)."""

    name: str
    cls: type
    base: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs_mask: bool = False  # SSAM-F: a mask (update_mask on a batch) before its first step
    lr: float = 0.1

    def make(self, model: nn.Module, params: Any = None, **overrides: Any) -> torch.optim.Optimizer:
        params = model.parameters() if params is None else params
        kw = {"lr": self.lr, "rho": 0.1, "closure_passes": "both", **self.kwargs, **overrides}
        opt = self.cls(params, self.base, **kw)
        self.prepare(opt, model)
        return opt

    def prepare(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        """What the optimizer needs before a step (again after add_param_group): SSAM-F's mask."""
        if self.needs_mask:
            opt.update_mask(model, [batch()])


SGD_KW = {"momentum": 0.9, "weight_decay": 1e-3}
DB = [
    OptimInfo("sam_sgd", SAM, torch.optim.SGD, SGD_KW),
    OptimInfo("sam_adamw", SAM, torch.optim.AdamW, {"weight_decay": 1e-2}, lr=1e-2),
    OptimInfo("asam", SAM, torch.optim.SGD, {**SGD_KW, "adaptive": True, "rho": 0.5}),
    OptimInfo("ssamf", SSAMF, torch.optim.SGD, {**SGD_KW, "sparsity": 0.5}, needs_mask=True),
    OptimInfo("ssamd", SSAMD, torch.optim.SGD, {**SGD_KW, "sparsity": 0.5, "seed": 3, "drop_strategy": "random"}),
    OptimInfo("sam_every2", SAM, torch.optim.SGD, {**SGD_KW, "schedule": "every:2"}),
    OptimInfo("sam_momentum", SAM, torch.optim.SGD, {**SGD_KW, "ascent": "momentum"}),
]
# The copies must carry a stored direction too: ascent='previous' keeps last step's gradient in ssam's own state.
COPY_DB = [*DB, OptimInfo("sam_previous", SAM, torch.optim.SGD, {**SGD_KW, "ascent": "previous"})]


def over(db: list[OptimInfo]) -> Any:
    return pytest.mark.parametrize("info", db, ids=[i.name for i in db])


# ---------------------------------------------------------------------------------------------- helpers
def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def closure_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], record: list | None = None) -> Any:
    x, y = data

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if record is not None:  # the gradients as this call left them
            record[:] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        return loss

    return closure


def drive(model: nn.Module, opt: Any, steps: int, start: int = 0) -> None:
    """``steps`` optimizer steps on batches start, start + 1, ...; SSAM-D also updates its mask each step (from a
    gradient at w and its own generator), as a training loop does at an epoch's first step."""
    for i in range(start, start + steps):
        data = batch(seed=10 + i)
        if isinstance(opt, SSAMD):
            opt.zero_grad()
            F.cross_entropy(model(data[0]), data[1]).backward()
            opt.update_mask(i)
        opt.step(closure_of(model, data))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for u, v in zip(a.parameters(), b.parameters()):
        assert torch.equal(u, v), (u - v).abs().max()


def assert_equal_trees(a: Any, b: Any, where: str = "") -> None:
    """Equal nested dicts/lists of tensors and plain values (tensors equal in value, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_equal_trees(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_equal_trees(u, v, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def tensors_in(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, dict):
        return sum(tensors_in(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensors_in(v) for v in tree)
    return 0


# ---------------------------------------------------------------------------------------------- state_dict
@over(DB)
def test_state_dict_is_deterministic(info):
    sds = []
    for _ in range(2):
        m = net()
        opt = info.make(m)
        drive(m, opt, 3)
        sds.append(opt.state_dict())
    assert tensors_in(sds[0]["state"]) > 0  # (a state worth comparing: the base's buffers, masks, counters)
    assert_equal_trees(sds[0], sds[1])
    m = net()
    other = info.make(m)
    drive(m, other, 3, start=5)  # other batches: the comparison above can tell states apart
    with pytest.raises(AssertionError):
        assert_equal_trees(sds[0], other.state_dict())


@over(DB)
def test_state_dict_round_trip_through_weights_only_load(info):
    m = net()
    opt = info.make(m)
    drive(m, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(m)
    fresh = info.make(m2)
    fresh.load_state_dict(loaded)
    assert_equal_trees(fresh.state_dict(), opt.state_dict())
    drive(m, opt, 3, start=3)
    drive(m2, fresh, 3, start=3)
    assert_same_weights(m, m2)


# ---------------------------------------------------------------------------------------------- deepcopy, pickle
def pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


@over(COPY_DB)
@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copy_continues_as_the_original(info, how):
    m = net()
    opt = info.make(m)
    drive(m, opt, 3)
    opt.register_state_dict_pre_hook(lambda o: None)  # a lambda does not pickle: hooks stay out of a copy, as torch's
    m2, opt2 = how((m, opt))
    assert type(opt2) is type(opt) and type(opt2.base_optimizer) is type(opt.base_optimizer)
    assert opt2.param_groups is opt2.base_optimizer.param_groups  # shared, as in the original
    assert [p for g in opt2.param_groups for p in g["params"]] == list(m2.parameters())
    assert not opt2._optimizer_state_dict_pre_hooks
    assert_equal_trees(opt2.state_dict(), opt.state_dict())
    # The original first: a copy that shared a buffer with it would see it changed.
    drive(m, opt, 4, start=3)
    drive(m2, opt2, 4, start=3)
    assert_same_weights(m, m2)
    assert opt2.steps_taken == opt.steps_taken
    assert_equal_trees(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copys_masks_are_its_own_single_buffer(how):
    m = net()
    opt = DB[4].make(m)  # SSAM-D, its mask set when built
    drive(m, opt, 2)
    m2, opt2 = how((m, opt))
    assert torch.equal(opt2.flat_mask(), opt.flat_mask())
    new = ~opt.flat_mask()
    opt2.set_flat_mask(new)
    assert torch.equal(opt2.flat_mask(), new) and not torch.equal(opt.flat_mask(), new)
    p = next(m2.parameters())
    assert torch.equal(opt2.state[p]["mask"], new[: p.numel()].view(p.shape))  # the view opt.state shows is the mask
    # writing one mask through opt.state changes the flat mask (one buffer, not a copy of it)
    opt2.state[p]["mask"] = torch.ones_like(p, dtype=torch.bool)
    assert bool(opt2.flat_mask()[: p.numel()].all())


# ---------------------------------------------------------------------------------------------- repr
@over(DB)
def test_repr_names_the_class_the_base_and_rho(info):
    opt = info.make(net())
    rho = info.kwargs.get("rho", 0.1)
    assert repr(opt) == f"{info.cls.__name__}(base={info.base.__name__}, rho={rho})"
    assert str(opt) == repr(opt)


# ---------------------------------------------------------------------------------------------- add_param_group
@over(DB)
def test_add_param_group_reaches_both_and_steps_the_new_group(info):
    m = net()
    first, second = list(m[0].parameters()), list(m[2].parameters())
    opt = info.make(m, first)
    opt.add_param_group({"params": second, "lr": info.lr / 2})
    info.prepare(opt, m)
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    g = opt.param_groups[1]
    assert g["lr"] == info.lr / 2 and g["rho"] == opt.defaults["rho"] and g["params"] == second
    w0 = weights(m)
    drive(m, opt, 2)
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(m)))
    if not isinstance(opt, SparseSAM):  # (a sparse optimizer draws the masks of a late group apart)
        ref = net()
        ref_opt = info.make(
            ref, [{"params": list(ref[0].parameters())}, {"params": list(ref[2].parameters()), "lr": info.lr / 2}]
        )
        drive(ref, ref_opt, 2)
        assert_same_weights(m, ref)
    assert [len(g["params"]) for g in opt.state_dict()["param_groups"]] == [2, 2]


# ---------------------------------------------------------------------------------------------- hooks
@over(DB)
def test_state_dict_hooks_run_in_order_with_torchs_arguments(info):
    m = net()
    opt = info.make(m)
    drive(m, opt, 2)
    calls: list[tuple[str, Any]] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre_first", o)), prepend=True)

    def post(o, sd):
        calls.append(("post", o))
        return {**sd, "note": "from the post-hook"}  # a new dict: state_dict returns it

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert [c for c, _ in calls] == ["pre_first", "pre", "post"] and all(o is opt for _, o in calls)
    assert sd["note"] == "from the post-hook" and "state" in sd

    calls.clear()
    fresh = info.make(copy.deepcopy(m))
    replacement = copy.deepcopy(sd)
    replacement["param_groups"][0]["lr"] = 0.125

    def load_pre(o, given):
        calls.append(("load_pre", o))
        assert given is not sd and given == sd  # a shallow copy of the caller's dict
        given.pop("note")  # (changes the copy only)
        return replacement

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    fresh.load_state_dict(sd)
    assert [c for c, _ in calls] == ["load_pre", "load_post"] and all(o is fresh for _, o in calls)
    assert "note" in sd  # the caller's dict is as it was
    assert fresh.param_groups[0]["lr"] == 0.125 == fresh.base_optimizer.param_groups[0]["lr"]  # the replacement


@over(DB)
def test_step_hooks_fire_once_per_step_for_the_wrapper(info):
    m = net()
    opt = info.make(m)
    calls: list[tuple[str, Any]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global_pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global_post", o))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
    ]
    try:
        drive(m, opt, 3)
        # the manual two-call protocol: one step as well
        data = batch(seed=30)
        opt.zero_grad()
        F.cross_entropy(m(data[0]), data[1]).backward()
        if opt.ascent_due():
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(data[0]), data[1]).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert all(o is opt for _, o in calls)  # the inner base optimizer's step announces nothing
    assert [c for c, _ in calls] == ["global_pre", "pre", "post", "global_post"] * 4


# ---------------------------------------------------------------------------------------------- zero_grad
@over(DB)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(info, set_to_none):
    m = net()
    opt = info.make(m)
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    before = [p.grad for p in m.parameters()]
    assert all(g is not None and bool(g.ne(0).any()) for g in before)
    opt.zero_grad(set_to_none=set_to_none)
    for p, g in zip(m.parameters(), before):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g and torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------- lr schedulers
@over(DB)
@pytest.mark.parametrize("attach", ["wrapper", "base"])
def test_step_lr_halves_the_base_optimizers_lr(info, attach):
    m = net()
    opt = info.make(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()": the step went unseen
        sched = torch.optim.lr_scheduler.StepLR(opt if attach == "wrapper" else opt.base_optimizer, 1, gamma=0.5)
        lrs = []
        for i in range(3):
            drive(m, opt, 1, start=i)
            sched.step()
            lrs.append(opt.base_optimizer.param_groups[0]["lr"])
    assert lrs == [info.lr * 0.5, info.lr * 0.25, info.lr * 0.125]
    assert opt.param_groups[0]["lr"] == lrs[-1]
    # the base optimizer steps with it: a run at the scheduled lrs by hand lands on the same weights
    ref = net()
    ref_opt = info.make(ref)
    for i, lr in enumerate([info.lr, *lrs[:-1]]):
        for g in ref_opt.param_groups:
            g["lr"] = lr
        drive(ref, ref_opt, 1, start=i)
    assert_same_weights(m, ref)


@over(DB)
def test_a_tensor_lr_steps_as_the_float_one(info):
    lr = 2.0**-4  # exact in float32 and float64
    runs = []
    for value in (lr, torch.tensor(lr)):
        m = net()
        opt = info.make(m, lr=value)
        drive(m, opt, 3)
        runs.append(weights(m))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    # (AdamW computes with a float32 lr tensor in float32, its bias correction and decay: a rounding apart)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(runs[0][0], weights(net())[0], rtol=1e-3)  # (the runs moved the weights)


# ------------------------------------------------------------------------------------- parameters without a gradient
class WithIdle(nn.Module):
    """A frozen bias (requires_grad False) and a parameter the forward never uses (its grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
        self.a.bias.requires_grad_(False)
        self.idle = nn.Parameter(torch.ones(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@over(DB)
def test_parameters_without_gradient_do_not_move_and_do_not_break_the_step(info):
    m = WithIdle()
    opt = info.make(m)
    frozen, idle = m.a.bias.detach().clone(), m.idle.detach().clone()
    w0 = m.a.weight.detach().clone()
    drive(m, opt, 3)
    assert m.idle.grad is None and m.a.bias.grad is None
    assert torch.equal(m.a.bias, frozen) and torch.equal(m.idle, idle)
    assert not torch.equal(m.a.weight, w0)
    opt.state_dict()


# ---------------------------------------------------------------------------------------------- gradients
@over(DB)
def test_step_leaves_the_gradients_as_the_closure_left_them(info):
    m = net()
    opt = info.make(m)
    drive(m, opt, 1)  # (a stored direction for the one-pass ascents, momentum buffers)
    for i in range(2):  # every:2 takes a plain step and an ascent
        record: list = []
        opt.step(closure_of(m, batch(seed=20 + i), record))
        assert all(g is not None for g in record)
        for p, g in zip(m.parameters(), record):
            assert torch.equal(p.grad, g)  # restoring w and the base step read the gradient, never write it


@over(DB)
def test_pass_one_gradients_a_caller_holds_are_not_overwritten(info):
    m = net()
    opt = info.make(m, closure_passes="second")
    for i in range(2):  # (the second: a stored direction for the one-pass ascents; every:2's plain step)
        x, y = batch(seed=40 + i)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        held = [p.grad for p in m.parameters()]
        copies = [g.clone() for g in held]
        opt.step(closure_of(m, (x, y)))
        for g, c in zip(held, copies):
            assert torch.equal(g, c)


# ---------------------------------------------------------------------------------------------- opt.state
def test_state_takes_keys_that_are_not_parameters_as_torch_does():
    m = net()
    opt = DB[0].make(m)
    drive(m, opt, 1)
    sgd = torch.optim.SGD(net().parameters(), lr=0.1, momentum=0.9)  # torch's behaviour, to compare with
    for o in (opt, sgd):
        o.state["k"] = 1
    p = next(m.parameters())
    assert opt.state["k"] == sgd.state["k"] == 1
    assert "k" in opt.state and "missing" not in opt.state and opt.state.get("missing") is None
    assert len(opt.state) == len(list(m.parameters())) + 1 and "k" in list(opt.state)
    assert "momentum_buffer" in opt.state[p] and p in opt.state  # the parameters' view is as it was
    assert opt.state_dict()["state"]["k"] == sgd.state_dict()["state"]["k"] == 1
    assert opt.state["new"] == sgd.state["new"] == {}  # a missing key reads as a new empty dict, defaultdict's way
    fresh = DB[0].make(copy.deepcopy(m))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state["k"] == 1
    del opt.state["k"]
    assert "k" not in opt.state
    drive(m, opt, 1, start=1)


# ---------------------------------------------------------------------------------------------- named parameters
@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_named_parameters_are_kept_in_the_groups_as_torch_keeps_them(kind):
    def build(model):
        cls = SAM if kind == "sam" else SSAMD
        kw = {"seed": 1} if kind == "ssamd" else {}
        return cls(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, closure_passes="both", **kw)

    m = net()
    opt = build(m)
    names = [n for n, _ in m.named_parameters()]
    ref = torch.optim.SGD(net().named_parameters(), lr=0.1)
    assert (
        opt.state_dict()["param_groups"][0]["param_names"]
        == names
        == ref.state_dict()["param_groups"][0]["param_names"]
    )
    assert [opt.param_name(p, i) for i, p in enumerate(m.parameters())] == names
    drive(m, opt, 2)
    m2 = copy.deepcopy(m)
    fresh = build(m2)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's load keeps the dict's tensors: not shared)
    assert fresh.param_groups[0]["param_names"] == names
    drive(m, opt, 2, start=2)
    drive(m2, fresh, 2, start=2)
    assert_same_weights(m, m2)
    # an unnamed optimizer loads it too, and takes the names (torch's rule)
    m3 = copy.deepcopy(m)
    plain = SAM(m3.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    plain.load_state_dict(SAM(m3.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9).state_dict())
    assert plain.param_name(next(m3.parameters()), 0) == names[0]


# ---------------------------------------------------------------------------------------------- refused input
def test_a_lone_parameter_is_refused_as_torch_refuses_it():
    p = nn.Parameter(torch.ones(3, 2))
    with pytest.raises(TypeError) as theirs:
        torch.optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError) as ours:
        SAM(p, torch.optim.SGD, lr=0.1)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith("params argument given to the optimizer should be an iterable of Tensors")


def test_named_and_unnamed_parameters_together_are_refused():
    m = net()
    (na, a), (_, b) = list(m.named_parameters())[:2]
    with pytest.raises(ValueError):  # torch refuses it too
        torch.optim.SGD([(na, a), b], lr=0.1)
    with pytest.raises(ValueError, match=r"^params: 1 of 2 parameters are named; allowed: all named"):
        SAM([(na, a), b], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="with/without names"):  # one group named, the other not
        SAM([{"params": [(na, a)]}, {"params": [b]}], torch.optim.SGD, lr=0.1)


def test_adaptive_differing_between_groups_is_refused_when_built():
    m = net()
    first, second = list(m[0].parameters()), list(m[2].parameters())
    with pytest.raises(ValueError, match=r"^adaptive: got True in param group 1 and False in param group 0"):
        SAM([{"params": first}, {"params": second, "adaptive": True}], torch.optim.SGD, lr=0.1)
    opt = SAM(first, torch.optim.SGD, lr=0.1, adaptive=True)
    with pytest.raises(ValueError, match=r"^adaptive: got True in param group 0 and False in param group 1"):
        opt.add_param_group({"params": second, "adaptive": False})
    assert len(opt.param_groups) == 1 == len(opt.base_optimizer.param_groups)
    # written into a group after the fact: refused at the next first_step, before anything moves
    opt.add_param_group({"params": second})
    opt.param_groups[1]["adaptive"] = False
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    w0 = weights(m)
    with pytest.raises(ValueError, match="^adaptive: got True in param group 0"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(w0, weights(m)))


def test_asam_refuses_complex_parameters_naming_them():
    w = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    r = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"^params: w is complex \(torch.complex64\) and adaptive=True; allowed: real"):
        SAM([("r", r), ("w", w)], torch.optim.SGD, lr=0.1, adaptive=True)
    with pytest.raises(ValueError, match=r"^params: param1 is complex"):
        SAM([r, w], torch.optim.SGD, lr=0.1, adaptive=True)
    opt = SAM([r], torch.optim.SGD, lr=0.1, adaptive=True)
    with pytest.raises(ValueError, match=r"^params: param1 is complex"):
        opt.add_param_group({"params": [w]})
    SAM([r, w], torch.optim.SGD, lr=0.1)  # plain SAM is not refused


@over(DB)
def test_a_state_dict_from_before_the_newest_settings_loads_and_continues(info):
    """As torch fills the group settings that an older release's state dict lacks, a state dict without the newest
    ssam settings (``ascent``) and without torch's ``param_names`` loads into an optimizer built with the same
    settings, and the run continues exactly as after loading the full dict."""
    m = net()
    opt = info.make(m)
    drive(m, opt, 3)
    full = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(full)
    for g in old["param_groups"]:
        for key in ("ascent", "param_names"):
            g.pop(key, None)
    runs = []
    for sd in (full, old):
        m2 = copy.deepcopy(m)
        fresh = info.make(m2)
        fresh.load_state_dict(sd)
        assert fresh.defaults["ascent"] == opt.defaults["ascent"]
        assert all(g["ascent"] == opt.defaults["ascent"] for g in fresh.param_groups)
        drive(m2, fresh, 3, start=3)
        runs.append(m2)
    assert_same_weights(runs[0], runs[1])

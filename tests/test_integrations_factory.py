"""ssam.create_optimizer: every --opt form, keyword routing, timm's no-decay groups, one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssam
from ssam.optim.factory import BASE_OPTIMIZERS, OPT_NAMES, WRAPPERS, parse_opt


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


SPARSE = {"sam": {}, "ssamf": dict(sparsity=0.5), "ssamd": dict(sparsity=0.5, seed=1)}


@pytest.mark.parametrize("name", OPT_NAMES)
def test_every_opt_form_builds_its_classes(name):
    wrapper, base = parse_opt(name)
    opt = ssam.create_optimizer(
        net(), name.upper() if name == "sam-sgd" else name, lr=0.1, **(SPARSE[wrapper] if wrapper else {})
    )
    if wrapper is None:
        assert type(opt) is BASE_OPTIMIZERS[base]
    else:
        assert type(opt) is WRAPPERS[wrapper] and type(opt.base_optimizer) is BASE_OPTIMIZERS[base]
    assert opt.param_groups[0]["lr"] == 0.1


def test_keywords_reach_wrapper_and_base():
    opt = ssam.create_optimizer(
        net(), "ssamf-adamw", lr=1e-3, rho=0.1, sparsity=0.75, num_samples=8, eps=1e-6, betas=(0.8, 0.9)
    )
    assert opt.sparsity == 0.75 and opt.num_samples == 8 and opt.param_groups[0]["rho"] == 0.1
    assert opt.base_optimizer.defaults["eps"] == 1e-6 and opt.base_optimizer.defaults["betas"] == (0.8, 0.9)
    sgd = ssam.create_optimizer(net(), "sam-sgd", lr=0.1, momentum=0.9, nesterov=True)
    assert sgd.base_optimizer.defaults["momentum"] == 0.9 and sgd.base_optimizer.defaults["nesterov"]


def test_sam_from_factory_steps_like_sam_built_by_hand():
    a, b = net(), net()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    fa = ssam.create_optimizer(a, "sam-sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.2)
    fb = ssam.SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.2)
    for model, opt in ((a, fa), (b, fb)):
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_no_decay_bias_norm_groups():
    model = net()
    opt = ssam.create_optimizer(
        model, "ssamd-sgd", lr=0.1, weight_decay=5e-4, no_decay_bias_norm=True, **SPARSE["ssamd"]
    )
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    none = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[3].weight)}
    assert none == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    # The SSAM budget still spans every parameter, whatever its group.
    assert opt.num_live == sum(p.numel() for p in model.parameters()) // 2
    flat = ssam.create_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in flat.param_groups] == [5e-4]


def test_model_no_weight_decay_names_are_honoured():
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.head = nn.Linear(8, 2)

        def no_weight_decay(self):
            return {"pos_embed"}

    model = WithToken()
    opt = ssam.create_optimizer(model, "sam-adamw", lr=1e-3, weight_decay=0.05, no_decay_bias_norm=True)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.pos_embed)] == 0.0 and wd[id(model.head.weight)] == 0.05


@pytest.mark.parametrize(
    "opt, kw, match",
    [
        ("sam-sdg", {}, "did you mean 'sam-sgd'"),
        ("lion", {}, "choose from"),
        ("sgd", {"rho": 0.1}, "takes no SAM settings"),
        ("ssamf-sgd", {"seed": 1}, "seed: got 1"),
        ("ssamd-adamw", {"sparsity": 1.5}, "sparsity: got 1.5"),
    ],
)
def test_bad_input_is_one_line_value_error(opt, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        ssam.create_optimizer(net(), opt, lr=0.1, **kw)
    assert "\n" not in str(e.value)


def test_frozen_model_is_rejected():
    model = net().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        ssam.create_optimizer(model, "sam-sgd", lr=0.1)

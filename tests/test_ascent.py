"""Ascent directions (``ssam.optim.ascent``): each against a hand-written reference loop (which tensors move, the
gradient the base optimizer gets), ``subbatch:1`` against SAM bit for bit, the closure's call count, the step before
a direction exists, resume bit for bit, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam import SAM, SSAMF
from ssam.cli import main
from ssam.optim.ascent import AscentDirection, parse_ascent


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(n_steps: int = 5, b: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n_steps)]  # fmt: skip


def _grads(net, x, y):
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def _closure(net, x, y):
    """forward + backward of the batch's mean loss; returns the loss."""

    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def _reference(kind: str, rho: float, steps, fraction: float = 1.0, lr: float = 0.1, mom: float = 0.9):
    """The loop a paper describes, written out: SGD with momentum, the weights moved by e along the direction d of
    the step, the gradient taken there, the weights put back, the SGD step with that gradient."""
    net = _net()
    ps = list(net.parameters())
    sgd = torch.optim.SGD(ps, lr=lr, momentum=mom)
    prev = None
    for x, y in steps:
        if kind == "subbatch":
            k = max(1, -(-int(fraction * len(x) * 1e6) // int(1e6)))  # ceil without float surprises
            d = _grads(net, x[:k], y[:k])
        elif kind == "previous":
            d = prev
        else:  # momentum / msam: the buffer before this step's update
            bufs = [sgd.state[p].get("momentum_buffer") for p in ps]
            d = None if bufs[0] is None else [b.clone() for b in bufs]
        sign = -1.0 if kind == "msam" else 1.0
        e = None
        if d is not None:
            norm = torch.sqrt(sum((t * t).sum() for t in d))
            e = [sign * rho * t / (norm + 1e-7) for t in d]
            with torch.no_grad():
                for p, t in zip(ps, e):
                    p.add_(t)
        g = _grads(net, x, y)
        if e is not None:
            with torch.no_grad():
                for p, t in zip(ps, e):
                    p.sub_(t)
        prev = g
        sgd.step()
    return net


def _ssam(kind: str, rho: float, steps, **kw):
    net = _net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=rho, ascent=kind, **kw)
    calls = []

    def closure(x, y):
        calls.append(len(x))
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for x, y in steps:
        opt.step(closure, batch=(x, y))
    return net, opt, calls


@pytest.mark.parametrize("kind, rho, fraction", [("previous", 0.3, 1), ("momentum", 0.3, 1), ("msam", 0.5, 1),
                                                 ("subbatch", 0.3, 0.25), ("subbatch", 0.3, 0.5)])  # fmt: skip
def test_each_direction_matches_the_hand_written_loop(kind, rho, fraction):
    steps = _batches()
    spec = f"subbatch:{fraction}" if kind == "subbatch" else kind
    got, _, calls = _ssam(spec, rho, steps)
    ref = _reference(kind, rho, steps, fraction)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if kind == "subbatch":  # pass one on the sub-batch, pass two on the batch
        assert calls == [parse_ascent(spec).pass_one_size(8), 8] * len(steps)
    else:  # one call per step, at w + e
        assert calls == [8] * len(steps)


def test_subbatch_1_is_sam_bit_for_bit():
    steps = _batches()
    a, _, _ = _ssam("subbatch:1", 0.2, steps)
    b, _, _ = _ssam("gradient", 0.2, steps)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_the_first_step_before_any_direction_is_a_plain_base_step():
    steps = _batches(1)
    for kind in ("previous", "momentum", "msam"):
        net, opt, _ = _ssam(kind, 0.5, steps)
        plain = _net()
        sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
        _grads(plain, *steps[0])
        sgd.step()
        for p, q in zip(net.parameters(), plain.parameters()):
            assert torch.equal(p, q), kind
        assert opt.steps_taken == (1, 0)  # a step, no ascent yet


@pytest.mark.parametrize("passes", ["second", "both"])
@pytest.mark.parametrize("kind", ["previous", "momentum", "msam"])
def test_one_pass_step_calls_the_closure_once_at_w_plus_e(kind, passes):
    net = _net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3, ascent=kind, closure_passes=passes)
    x, y = _batches(1)[0]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in net.parameters()])
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        before = [p.detach().clone() for p in net.parameters()]
        seen.clear()
        opt.step(closure)
        assert len(seen) == 1
    # On the third step a direction exists: the closure saw w + e, not w, and the weights came back to w first.
    moved = sum(float((a - b).norm() ** 2) for a, b in zip(seen[0], before)) ** 0.5
    assert moved == pytest.approx(0.3, rel=1e-6)


def test_first_step_needs_no_gradient_and_moves_only_parameters_with_a_direction():
    net = _net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3, ascent="previous")
    x, y = _batches(1)[0]
    net[2].weight.requires_grad_(False)  # takes no gradient: no stored direction, never moved

    closure = _closure(net, x, y)

    opt.step(closure)  # no direction yet: a plain step, which stores its gradient
    w = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.first_step()
    moved = [not torch.equal(p, q) for p, q in zip(net.parameters(), w)]
    assert moved == [True, True, False, True]
    opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w))


def test_previous_is_in_the_state_dict_and_resume_is_bit_for_bit():
    steps = _batches(6)
    full, _, _ = _ssam("previous", 0.3, steps)
    net, opt, _ = _ssam("previous", 0.3, steps[:3])
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    assert any("ascent_previous" in s for s in saved_opt["state"].values())
    net2 = _net()
    net2.load_state_dict(saved_model)
    opt2 = SAM(net2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3, ascent="previous")
    opt2.load_state_dict(saved_opt)

    def closure(x, y):
        loss = F.cross_entropy(net2(x), y)
        loss.backward()
        return loss

    for x, y in steps[3:]:
        opt2.step(closure, batch=(x, y))
    for p, q in zip(net2.parameters(), full.parameters()):
        assert torch.equal(p, q)


def test_momentum_over_adamw_reads_exp_avg():
    net = _net()
    opt = SAM(net.parameters(), torch.optim.AdamW, lr=0.01, rho=0.2, ascent="momentum")
    x, y = _batches(1)[0]

    closure = _closure(net, x, y)

    opt.step(closure)
    p = next(net.parameters())
    assert opt.direction == AscentDirection("momentum") and opt._direction(p) is opt.base_optimizer.state[p]["exp_avg"]


def test_sparse_masks_apply_to_a_one_pass_direction():
    net = _net()
    opt = SSAMF(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3, sparsity=0.5, ascent="momentum")
    opt.set_flat_mask(torch.arange(sum(p.numel() for p in net.parameters())) % 2 == 0)
    x, y = _batches(1)[0]

    closure = _closure(net, x, y)

    opt.step(closure)
    w = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.first_step()
    for p, q in zip(net.parameters(), w):
        dead = ~opt.state[p]["mask"]
        assert torch.equal(p[dead], q[dead]) and not torch.equal(p, q)
    opt.restore()


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"ascent": "sideways"}, "ascent: got 'sideways'; allowed: 'gradient', 'subbatch:F'"),
        ({"ascent": "subbatch:0"}, "whose F 0 is outside (0, 1]"),
        ({"ascent": "subbatch:1.5"}, "whose F 1.5 is outside (0, 1]"),
        ({"ascent": "subbatch:x"}, "whose F 'x' is not a number"),
        ({"ascent": "subbatch:"}, "whose F '' is not a number"),
        ({"ascent": "momentum", "momentum": 0.0}, "SGD with momentum 0.0 (it keeps no momentum)"),
        ({"ascent": "msam", "momentum": 0.0}, "allowed bases: torch.optim.SGD with momentum > 0, Adam or AdamW"),
        ({"ascent": "previous", "schedule": "looksam:2"}, "ascent: got 'previous' with schedule 'looksam'"),
        ({"ascent": "momentum", "schedule": "aesam"}, "with schedule 'aesam'"),
        ({"ascent": "subbatch:0.5", "micro_batch": 2}, "with micro_batch 2"),
    ],
)
def test_bad_ascent_is_a_value_error_naming_it(kwargs, says):
    kwargs = {"momentum": 0.9, **kwargs}
    with pytest.raises(ValueError) as e:
        SAM(_net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    assert says in str(e.value)


def test_momentum_over_a_base_without_one_names_the_allowed_bases():
    with pytest.raises(ValueError, match="over Adagrad; allowed bases"):
        SAM(_net().parameters(), torch.optim.Adagrad, lr=0.1, ascent="momentum")


def test_every_k_composes_with_a_one_pass_direction():
    steps = _batches(4)
    _, opt, calls = _ssam("previous", 0.3, steps, schedule="every:2")
    assert calls == [8] * 4 and opt.steps_taken == (4, 1)  # step 0: no direction yet; step 2 ascends


def test_subbatch_step_closure_both_without_batch_is_refused():
    net = _net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, ascent="subbatch:0.5", closure_passes="both")
    with pytest.raises(ValueError, match=r"step\(closure, batch="):
        opt.step(lambda: None)


# ------------------------------------------------------------------------------------------ the trainer
QUICK = ["--dataset", "digits", "--model", "mlp", "--mlp_width", "16", "--augment", "none", "--quiet",
         "--epochs", "1", "--limit_train_batches", "4", "--batch_size", "32", "--opt", "sam-sgd"]  # fmt: skip


@pytest.mark.parametrize("ascent, passes", [("subbatch:0.25", 1.25), ("previous", 1.0), ("msam", 1.0)])
def test_trainer_counts_the_passes_of_each_direction(tmp_path, one_thread, ascent, passes):
    assert main(["train", *QUICK, "--sam_ascent", ascent, "--output_dir", str(tmp_path), "--output_name", "r"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["passes_per_example"] == pytest.approx(passes)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--sam_ascent", "up"], "--sam_ascent: got 'up'"),
        (["--sam_ascent", "subbatch:2"], "outside (0, 1]"),
        (
            ["--sam_ascent", "previous", "--sam_schedule", "looksam:2"],
            "--sam_ascent: got 'previous' with --sam_schedule",
        ),
        (["--sam_ascent", "momentum", "--sam_micro_batch", "4"], "with --sam_micro_batch 4"),
        (["--sam_ascent", "momentum", "--momentum", "0"], "--sam_ascent momentum with --momentum 0"),
    ],
)
def test_bad_sam_ascent_flag_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert main(["train", *QUICK, *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

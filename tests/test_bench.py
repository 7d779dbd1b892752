"""`ssam bench` end to end on a tiny model, and the fast paths it led to, against slow references."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssam import SSAMD, SSAMF
from ssam.bench import OPTIMIZERS, main, run, state_bytes
from ssam.bench.args import parse_args
from ssam.models import build_model
from ssam.optim import empirical_fisher
from ssam.optim.fisher import auto_method, hook_plan


# ---------------------------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads and loses much to a busy neighbour
    try:
        assert main(["--quick", "--model", "cnn_small", "--dataset", "digits", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return json.loads((out / "bench.json").read_text())


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel)


def test_bench_reports_environment_and_config(report):
    env, cfg = report["environment"], report["config"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert env["date"] and env["wall_s"] > 0
    assert cfg["model"] == "cnn_small" and cfg["input_shape"] == [1, 8, 8]
    assert (cfg["batch_size"], cfg["steps"], cfg["warmup"], cfg["num_samples"]) == (16, 2, 1, 16)
    model = build_model("cnn_small", 10, in_channels=1, image_size=8)
    assert cfg["num_params"] == sum(p.numel() for p in model.parameters())


def test_bench_step_times_and_ratios_agree(report):
    steps = report["steps"]
    for name in OPTIMIZERS:
        row = steps[name]
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert min(row["times_s"]) <= row["median_s"] <= max(row["times_s"])
        assert close(row["images_per_s"], 16 / row["median_s"])
    sgd, sam = steps["SGD"]["median_s"], steps["SAM"]["median_s"]
    r = report["ratios"]
    assert close(r["SAM/SGD"], sam / sgd)
    assert close(r["SSAM-F/SAM"], steps["SSAM-F"]["median_s"] / sam)
    assert close(r["SSAM-D/SAM"], steps["SSAM-D"]["median_s"] / sam)
    fastest = {n: steps[n]["min_s"] for n in OPTIMIZERS}
    assert all(fastest[n] == min(steps[n]["times_s"]) for n in OPTIMIZERS)
    q = report["ratios_of_min"]
    assert close(q["SAM/SGD"], fastest["SAM"] / fastest["SGD"])
    assert close(q["SSAM-D/SAM"], fastest["SSAM-D"] / fastest["SAM"])


def test_bench_optimizer_only_and_mask_updates(report):
    sam, sgd = report["steps"]["SAM"]["median_s"], report["steps"]["SGD"]["median_s"]
    for name in OPTIMIZERS:
        row = report["optimizer_only"][name]
        assert row["median_s"] > 0
        assert close(row["pct_of_sam_step"], 100 * row["median_s"] / sam)
    fisher = report["mask_update"]["SSAM-F"]
    assert fisher["num_samples"] == 16 and fisher["auto"] == "hooks"
    for method in ("loop", "vmap", "hooks"):
        assert fisher[method]["seconds"] > 0
        assert close(fisher[method]["sgd_steps"], fisher[method]["seconds"] / sgd)
    d = report["mask_update"]["SSAM-D"]
    assert d["median_s"] > 0 and close(d["sgd_steps"], d["median_s"] / sgd)


def test_bench_memory_and_state(report):
    mem = report["memory"]
    assert mem["kind"].startswith("cpu")
    for name in OPTIMIZERS:
        assert mem[name]["peak_bytes"] > 0 and mem[name]["step_extra_bytes"] >= 0
    assert mem["SGD"]["extra_state_bytes_per_param"] == 0
    assert close(mem["SGD"]["state_bytes_per_param"], 4.0)  # the momentum buffer
    assert close(mem["SAM"]["extra_state_bytes_per_param"], 4.0)  # the saved copy of w
    for name in ("SSAM-F", "SSAM-D"):
        assert 4 <= mem[name]["extra_state_bytes_per_param"] <= 6  # w (4) + the bool mask (1)
        assert close(mem[name]["state_bytes_per_param"], 4 + mem[name]["extra_state_bytes_per_param"])
    assert "skipped" in report["throughput"] and "skipped" in report["data_loader"]


def test_state_bytes_counts_only_what_the_wrapper_adds():
    m = nn.Linear(3, 2)
    opt = SSAMD(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    m(torch.randn(4, 3)).sum().backward()
    opt.first_step()
    opt.second_step()
    total, extra = state_bytes(opt)
    assert (total, extra) == (8 * 4 + 8 * 5, 8 * 5)


def test_bench_rejects_unknown_names(tmp_path):
    from ssam.errors import UsageError

    with pytest.raises(UsageError, match="dataset"):
        main(["--quick", "--dataset", "svhn", "--output", str(tmp_path)])
    with pytest.raises(UsageError, match="fisher_methods"):
        main(["--quick", "--fisher_methods", "loop,fast", "--output", str(tmp_path)])


def test_bench_rejects_unknown_sections(tmp_path):
    from ssam.errors import UsageError

    with pytest.raises(UsageError, match="--section: unknown fast"):
        main(["--quick", "--section", "main,fast", "--output", str(tmp_path)])
    with pytest.raises(UsageError, match="--section"):
        main(["--quick", "--section", ",", "--output", str(tmp_path)])


def test_bench_builds_its_optimizers_with_the_recipe():
    """The benchmark's optimizers come from the trainer's factory with the CIFAR recipe's settings."""
    from ssam.bench.args import LR, MOMENTUM, RHO, SPARSITY, WEIGHT_DECAY
    from ssam.bench.side_by_side import make_optimizer

    m = nn.Linear(3, 2)
    sgd = make_optimizer("SGD", m, 8)
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (LR, MOMENTUM, WEIGHT_DECAY)
    f = make_optimizer("SSAM-F", m, 8, sparsity=0.9)
    assert type(f) is SSAMF and f.num_samples == 8 and f.sparsity == 0.9 and f.defaults["rho"] == RHO
    base = f.base_optimizer
    assert type(base) is torch.optim.SGD and base.param_groups[0]["momentum"] == MOMENTUM
    assert base.param_groups[0]["weight_decay"] == WEIGHT_DECAY
    assert make_optimizer("SSAM-D", m, 8).sparsity == SPARSITY


# ---------------------------------------------------------------------------------------------- skip section
class Stack(nn.Module):
    """Parameters in forward order: 0.weight 100, 0.bias 10, 1.weight 10, 1.bias 10, 3.weight 30, 3.bias 3 (163)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))

    def forward(self, x):
        return self.net(x)


def test_last_tensors_walks_back_and_passes_over_what_does_not_fit():
    from ssam.bench.skip import last_tensors

    m = Stack()
    # 25% of 163 = 40 entries: 3.bias (3) and 3.weight (30) fit, then nothing else does (10 > 7).
    assert last_tensors(m, 0.25) == {"net.3.bias", "net.3.weight"}
    # 50% = 81: the head (33), both BatchNorm tensors (20) and 0.bias (10); 0.weight (100) is passed over.
    assert last_tensors(m, 0.5) == {"net.3.bias", "net.3.weight", "net.1.bias", "net.1.weight", "net.0.bias"}


def test_norms_and_classifier_and_live_summary():
    from ssam.bench.skip import live_summary, norms_and_classifier, set_whole_tensor_mask

    m = Stack()
    chosen = norms_and_classifier(m)
    assert chosen == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    opt = SSAMF(m.named_parameters(), torch.optim.SGD, lr=0.1)
    set_whole_tensor_mask(opt, m, chosen)
    masks = {n: opt.state[p]["mask"] for n, p in m.named_parameters()}
    assert all(bool(masks[n].all()) == (n in chosen) and bool(masks[n].any()) == (n in chosen) for n in masks)
    live = live_summary(opt, m)
    assert live == {
        "live_tensors": 4,
        "tensors": 6,
        "live_params_fraction": 53 / 163,
        "density": 53 / 163,
        "lowest_live": "net.1.weight",
    }
    with torch.no_grad():  # part of a tensor live: the tensor counts as live, the density counts entries
        masks["net.0.weight"][0, :5] = True
    assert live_summary(opt, m)["live_tensors"] == 5 and live_summary(opt, m)["density"] == 58 / 163
    assert live_summary(opt, m)["lowest_live"] == "net.0.weight"


def test_skip_section_end_to_end(tmp_path, one_thread):
    if not hasattr(SSAMF, "first_pass"):
        pytest.skip("SSAMF has no first_pass() yet")
    assert (
        main(
            [
                "--quick",
                "--model",
                "cnn_small",
                "--dataset",
                "digits",
                "--section",
                "skip",
                "--steps",
                "1",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert "steps" not in rep and rep["config"]["sections"] == ["skip"]
    sec = rep["skip"]
    from ssam.bench.skip import HAND_MASKS, fisher_variants

    assert list(sec["variants"]) == ["SAM", *fisher_variants(), *HAND_MASKS]
    sam = sec["variants"]["SAM"]
    assert sam["live"]["live_tensors"] == sam["live"]["tensors"] and sam["live"]["density"] == 1
    m = build_model("cnn_small", 10, in_channels=1, image_size=8)
    assert sec["num_params"] == sum(p.numel() for p in m.parameters())
    hand = sec["variants"]["hand: norms + classifier"]["live"]
    from ssam.bench.skip import norms_and_classifier

    kept = norms_and_classifier(m)
    assert hand["live_tensors"] == len(kept)
    assert close(
        hand["live_params_fraction"], sum(p.numel() for n, p in m.named_parameters() if n in kept) / sec["num_params"]
    )
    ran = {k: r for k, r in sec["variants"].items() if "skipped" not in r}
    for key, row in ran.items():
        assert len(row["step"]["times_s"]) == 1 and row["step"]["median_s"] > 0 and row["first_pass"]["median_s"] > 0
        assert close(row["step_vs_sam"], row["step"]["median_s"] / sam["step"]["median_s"])
        assert close(row["first_pass_vs_sam"], row["first_pass"]["median_s"] / sam["first_pass"]["median_s"])
        assert 0 < row["live"]["density"] <= row["live"]["live_params_fraction"] <= 1
    for key, settings in fisher_variants().items():
        row = sec["variants"][key]
        if "skipped" in row:
            continue
        if settings["sparsity"] is None:  # N:M: N/M of each weight, 1-D tensors all live
            assert 0.5 - 1e-3 <= row["live"]["density"] < 1
        elif settings["granularity"] == "element":  # exact count: int(N (1 - s)) entries live
            assert row["live"]["density"] == int(sec["num_params"] * (1 - settings["sparsity"])) / sec["num_params"]
        else:  # whole groups: never more than the budget
            assert row["live"]["density"] <= 1 - settings["sparsity"] + 1e-12


# ---------------------------------------------------------------------------------------------- Fisher by hooks
def reference_fisher(model, xs, ys, mode):
    """The definition: one example at a time (its own BatchNorm batch in training mode), squared gradient, summed."""
    model = copy.deepcopy(model)
    model.train(mode == "train")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and mode == "train":
            m.track_running_stats = False
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in zip(xs, ys):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for t, p in zip(total, model.parameters()):
            if p.grad is not None:
                t += p.grad**2
    return total


class Mixed(nn.Module):
    """Every case the hooks take: a wide stride-1 conv (the no-patch path), stride 2 (patches), a 1x1 conv,
    BatchNorm followed by in-place ops, and a Linear on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 1, bias=True)
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5 * 64, 3)

    def forward(self, x):
        h = F.relu_(self.bn1(self.c1(x)))
        h = self.bn2(self.c2(h))
        h += 0.5
        h = F.relu(self.c3(F.relu_(h)))
        h = torch.tanh(self.l1(h.flatten(2).transpose(1, 2)))
        return self.l2(h.flatten(1))


def mixed(seed=0):
    torch.manual_seed(seed)
    m = Mixed().double()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):  # away from the initial 1 / 0, so a wrong formula cannot hide
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hooks_fisher_matches_definition(mode, one_thread):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    m = mixed()
    ref = reference_fisher(m, x, y, mode)
    got = empirical_fisher(
        m, list(m.parameters()), [(x[:4], y[:4]), (x[4:], y[4:])], 7, mode=mode, method="hooks", chunk_size=3
    )
    for (name, _), a, b in zip(m.named_parameters(), got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), name


def test_hooks_fisher_channels_last_float32(one_thread):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 16, 16, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    m = mixed().float().to(memory_format=torch.channels_last)
    ref = reference_fisher(m, x, y, "train")
    got = empirical_fisher(m, list(m.parameters()), [(x.to(memory_format=torch.channels_last), y)], 5, method="hooks")
    scale = max(b.abs().max().item() for b in ref)  # c1.bias feeds BatchNorm: its true Fisher is 0, its values noise
    for (name, _), a, b in zip(m.named_parameters(), got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale), name


class Twice(nn.Module):
    """The same Linear called twice per forward: its per-example gradients would need summing before squaring."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


def test_hooks_fall_back_where_the_batched_pass_cannot_go(one_thread):
    torch.manual_seed(0)
    m = Twice().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    ref = reference_fisher(m, x, y, "train")
    # The plan cannot see the second call: the pass finds it and hands the examples to the general method.
    assert auto_method(m, list(m.parameters())) == "hooks"
    got = empirical_fisher(m, list(m.parameters()), [(x, y)], 6, method="auto")
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)

    # A layer holding Fisher parameters that the hooks do not model (GroupNorm) sends the model to the general method.
    ln = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)).double()
    assert hook_plan(ln, list(ln.parameters()), "train")[0] is None
    assert auto_method(ln, list(ln.parameters())) == "loop"
    with pytest.raises(ValueError, match="hooks"):
        empirical_fisher(ln, list(ln.parameters()), [(x, y)], 6, method="hooks")
    bn1d = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)).double()
    assert "batch" in hook_plan(bn1d, list(bn1d.parameters()), "train")[1]
    assert hook_plan(bn1d.eval(), list(bn1d.parameters()), "eval")[0] is not None


def test_ssamf_accepts_hooks_and_leaves_no_trace(one_thread):
    m = mixed()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    hooks_before = [(len(mod._forward_hooks), "forward" in mod.__dict__) for mod in m.modules()]
    opt = SSAMF(m.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.7, num_samples=6, fisher_method="hooks")
    opt.update_mask(m, [(x, y)])
    assert int(opt.flat_mask().sum()) == opt.num_live
    assert [(len(mod._forward_hooks), "forward" in mod.__dict__) for mod in m.modules()] == hooks_before
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="fisher_method"):
        SSAMF(m.parameters(), torch.optim.SGD, lr=0.1, fisher_method="fast")


# ---------------------------------------------------------------------------------------------- SAM / SSAM on CPU
@pytest.mark.parametrize("adaptive", [False, True])
def test_cpu_masked_perturbation_matches_formula(adaptive):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = SSAMD([w], torch.optim.SGD, lr=0.0, rho=0.3, sparsity=0.6, adaptive=adaptive, seed=1)
    (w.sin() * torch.arange(50.0, dtype=torch.float64)).sum().backward()
    g, w0, mask = w.grad.clone(), w.detach().clone(), opt.flat_mask()
    opt.first_step()
    scale = w0.abs() if adaptive else torch.ones_like(w0)
    e = 0.3 * g * scale**2 / ((g * scale).norm() + 1e-7) * mask
    assert torch.allclose(w.detach() - w0, e, rtol=1e-12, atol=1e-15)
    opt.second_step()
    assert torch.equal(w.detach(), w0)  # lr 0: restored exactly


# ---------------------------------------------------------------------------------------------- SSAM-D selection
def test_ssamd_random_growth_is_exact_and_covers_the_dead():
    m = nn.Linear(300, 100)
    opt = SSAMD(
        m.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, drop_strategy="random", growth_strategy="random", seed=0
    )
    before = opt.flat_mask().clone()
    m(torch.randn(2, 300)).sum().backward()
    hits = torch.zeros(before.numel())
    for epoch in range(40):
        old = opt.flat_mask().clone()
        opt.update_mask(0)  # death rate 0.5: half the live die, as many dead grow
        new = opt.flat_mask()
        k = int(old.sum())
        assert int(new.sum()) == k == opt.num_live
        assert int((new & old).sum()) == k - (k - int(k * 0.5))
        hits += (new & ~old).float()
    # Uniform growth: no region of the parameter vector is favoured (a fix-up taking entries in order would be).
    tenth = hits.numel() // 10
    parts = torch.stack([hits[i * tenth : (i + 1) * tenth].mean() for i in range(10)])
    assert (parts.max() - parts.min()) < 0.03 * parts.mean()
    assert not torch.equal(before, opt.flat_mask())


def test_ssamd_ties_at_the_threshold_keep_the_count():
    m = nn.Linear(40, 10)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.weight[:, ::3] = 2.0
    opt = SSAMD(
        m.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, drop_strategy="weight", growth_strategy="weight", seed=0
    )
    m(torch.randn(3, 40)).sum().backward()
    for epoch in range(3):
        opt.update_mask(epoch)
        assert int(opt.flat_mask().sum()) == opt.num_live


def test_gpu_conv_path_agrees_on_cpu():
    """The GPU's unfold-and-batched-product route, run on CPU tensors, against the CPU routes (tiny budget: many
    chunks of examples and of output channels)."""
    from ssam.optim.fisher_hooks import _conv_fisher, _conv_fisher_unfold

    g = torch.Generator().manual_seed(4)
    for stride, width in ((1, 16), (2, 9), (1, 5)):
        conv = nn.Conv2d(3, 5, 3, stride=stride, padding=1, dilation=1).double()
        a = torch.randn(6, 3, width, width, generator=g, dtype=torch.float64)
        out = conv(a)
        d = torch.randn(out.shape, generator=g, dtype=torch.float64)
        cpu, dev = torch.zeros_like(conv.weight), torch.zeros_like(conv.weight)
        _conv_fisher(conv, a, d, cpu, None, {})
        _conv_fisher_unfold(conv, a, d.flatten(2), dev, budget=200)
        per_example = torch.stack(
            [torch.autograd.grad((conv(a[i : i + 1]) * d[i : i + 1]).sum(), conv.weight)[0] for i in range(6)]
        )
        ref = per_example.square().sum(0)
        assert torch.allclose(cpu, ref, rtol=1e-10) and torch.allclose(dev, ref, rtol=1e-10)


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, one_thread):
    class Broken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Broken(m))
    assert (
        main(
            [
                "--quick",
                "--model",
                "cnn_small",
                "--dataset",
                "digits",
                "--compile",
                "--fisher_methods",
                "hooks",
                "--steps",
                "1",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert any("torch.compile failed" in n and "no C++ compiler" in n for n in rep["notes"])
    assert all(rep["steps"][n]["median_s"] > 0 for n in OPTIMIZERS)


def test_bench_cheap_section_times_schedules_and_micro_batches(tmp_path):
    report = run(
        parse_args(
            [
                "--quick",
                "--model",
                "mlp",
                "--dataset",
                "digits",
                "--section",
                "cheap",
                "--batch_size",
                "16",
                "--output",
                str(tmp_path),
            ]
        )  # fmt: skip
    )
    steps = report["cheap"]["steps"]
    assert {"SGD", "SAM", "plain", "plain looksam", "m=8", "m=1"} <= set(steps)
    assert steps["SAM"]["vs_sam"] == 1.0
    # Expected per-step cost of a schedule: share x SAM + (1 - share) x plain, from the same run's medians.
    sam, plain = steps["SAM"]["median_s"], steps["plain"]["median_s"]
    assert report["cheap"]["schedules"]["every:2"]["vs_sam"] == pytest.approx((0.5 * sam + 0.5 * plain) / sam)


def test_bench_cheap_section_times_every_direction_with_its_state(tmp_path):
    args = ["--quick", "--model", "mlp", "--dataset", "digits", "--section", "cheap", "--batch_size", "16"]
    report = run(parse_args([*args, "--output", str(tmp_path)]))
    steps = report["cheap"]["steps"]
    assert {"subbatch:0.25", "subbatch:0.125", "previous", "momentum", "msam"} <= set(steps)
    assert steps["SGD"]["vs_sgd"] == 1.0
    # fp32 MLP: SGD keeps its momentum (4 B); SAM adds the saved w (4 B); 'previous' adds its gradient (4 B).
    assert steps["SGD"]["state_bytes_per_param"] == 4.0
    assert steps["SAM"]["state_bytes_per_param"] == 8.0
    assert steps["momentum"]["state_bytes_per_param"] == 8.0
    assert steps["previous"]["state_bytes_per_param"] == 12.0


@pytest.mark.parametrize("bad", ["0", "x", "8,-1"])
def test_bad_micro_batches_is_a_usage_error(bad):
    from ssam.errors import UsageError

    with pytest.raises(UsageError, match="--micro_batches"):
        parse_args(["--section", "cheap", "--micro_batches", bad])

"""m-sharpness: a perturbation per chunk of m examples, against a hand-written loop over the chunks; m = batch is
SAM bit for bit; the vectorised path equals the loop; BatchNorm statistics count each example once; bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam import SAM, SSAMF
from ssam.cli import main
from ssam.optim.msharp import ascend_by_chunks, split_batch, vectorised_ascent

LR, RHO, EPS = 0.1, 0.3, 1e-7


def data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def test_chunked_step_against_a_loop_over_chunks():
    """10 examples in chunks of 4, 4, 2: each chunk's own ascent, pass two there, gradients weighted by share."""
    x, y = data()
    ref, net = mlp(), mlp()
    # The reference: plain autograd on copies of the weights, SGD without momentum.
    w = [p.detach().clone() for p in ref.parameters()]
    total = [torch.zeros_like(t) for t in w]
    for lo, hi in ((0, 4), (4, 8), (8, 10)):
        ws = [t.clone().requires_grad_(True) for t in w]
        g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(ref, dict(zip(["0.weight", "0.bias",
              "2.weight", "2.bias"], ws)), (x[lo:hi],)), y[lo:hi]), ws)  # fmt: skip
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        we = [(t + RHO * gi / (norm + EPS)).requires_grad_(True) for t, gi in zip(w, g)]
        names = ["0.weight", "0.bias", "2.weight", "2.bias"]
        g2 = torch.autograd.grad(
            F.cross_entropy(torch.func.functional_call(ref, dict(zip(names, we)), (x[lo:hi],)), y[lo:hi]), we
        )
        for acc, gi in zip(total, g2):
            acc += gi * (hi - lo) / 10
    want = [t - LR * gi for t, gi in zip(w, total)]
    opt = SAM(net.parameters(), torch.optim.SGD, lr=LR, rho=RHO, micro_batch=4)

    def closure(cx, cy):
        loss = F.cross_entropy(net(cx), cy)
        loss.backward()
        return loss

    loss = opt.step(closure, batch=(x, y))
    for p, e in zip(net.parameters(), want):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    chunk_losses = [F.cross_entropy(ref(x[a:b]), y[a:b]) * (b - a) / 10 for a, b in ((0, 4), (4, 8), (8, 10))]
    assert loss.item() == pytest.approx(sum(chunk_losses).item()) and not loss.requires_grad


def test_whole_batch_is_plain_sam_bit_for_bit():
    x, y = data(12)
    nets = [mlp(), mlp(), mlp()]
    opts = [SAM(n.parameters(), torch.optim.SGD, lr=LR, rho=RHO, momentum=0.9, micro_batch=mb,
                closure_passes="both") for n, mb in zip(nets, (None, 12, None))]  # fmt: skip
    for _ in range(3):
        for i, (n, o) in enumerate(zip(nets, opts)):

            def closure(cx=x, cy=y, n=n):
                loss = F.cross_entropy(n(cx), cy)
                loss.backward()
                return loss

            o.step(closure, batch=(x, y)) if i < 2 else o.step(closure)
    for a, b, c in zip(*(n.parameters() for n in nets)):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("m,kind", [(1, "sam"), (1, "asam"), (1, "ssamf"), (4, "sam"), (12, "sam")])
def test_vectorised_equals_the_loop(m, kind):
    x, y = data(12)
    nets = [mlp(), mlp()]

    def build(n):
        if kind == "ssamf":
            opt = SSAMF(n.parameters(), torch.optim.SGD, lr=LR, rho=RHO, sparsity=0.5, num_samples=6)
            opt.update_mask(n, [(x[:6], y[:6])])
            return opt
        return SAM(n.parameters(), torch.optim.SGD, lr=LR, rho=RHO, adaptive=kind == "asam")

    o1, o2 = build(nets[0]), build(nets[1])
    vectorised_ascent(o1, nets[0], x, y, F.cross_entropy, m=m)

    def run_pass(chunk, first):
        loss = F.cross_entropy(nets[1](chunk[0]), chunk[1])
        loss.backward()
        return loss.detach()

    ascend_by_chunks(o2, split_batch((x, y), m), run_pass)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert o1.steps_taken == o2.steps_taken == (1, 1)


def test_batchnorm_counts_each_example_once():
    x, y = data(12)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    bn = net[1]
    # What pass one alone does to the statistics: three chunks of four, in order.
    ref = nn.BatchNorm1d(5).double()
    with torch.no_grad():
        h = net[0](x)
        for lo in (0, 4, 8):
            ref(h[lo : lo + 4])
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.0, rho=RHO, micro_batch=4)

    def run_pass(chunk, first):
        loss = F.cross_entropy(net(chunk[0]), chunk[1])
        loss.backward()
        return loss.detach()

    ascend_by_chunks(opt, split_batch((x, y), 4), run_pass, model=net)
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_bad_micro_batch():
    net = mlp()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch: got"):
            SAM(net.parameters(), torch.optim.SGD, lr=0.1, micro_batch=bad)
    with pytest.raises(ValueError, match="looksam"):
        SAM(net.parameters(), torch.optim.SGD, lr=0.1, micro_batch=4, schedule="looksam:2")


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--sam_micro_batch", "0"], "--sam_micro_batch 0 is out of range"),
        (["--sam_micro_batch", "5"], "--sam_micro_batch 5 does not divide the --batch_size 64"),
        (["--sam_micro_batch", "16", "--grad_accum", "8"], "does not divide the micro-batch 8"),
        (["--sam_micro_batch", "8", "--sam_schedule", "aesam"], "aesam"),
    ],
)
def test_bad_micro_batch_on_the_command_line(tmp_path, capsys, flags, expect):
    rc = main(["train", "--opt", "sam-sgd", "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err
    assert not (tmp_path / "out").exists()


def test_trainer_resume_is_bit_identical(tmp_path, one_thread):
    args = ["train", "--model", "mlp", "--mlp_width", "16", "--opt", "ssamd-sgd", "--sparsity", "0.5", "--quiet",
            "--update_freq", "1", "--sam_micro_batch", "8", "--limit_train_batches", "3", "--output_dir",
            str(tmp_path)]  # fmt: skip
    assert main([*args, "--output_name", "a", "--epochs", "2"]) == 0
    assert main([*args, "--output_name", "b", "--epochs", "1"]) == 0
    assert main([*args, "--output_name", "b", "--epochs", "2", "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["passes_per_example"] > 2.0  # the refresh pass

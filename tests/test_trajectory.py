"""SAF and MESA (``ssam.train.trajectory``): the loss against a hand computation on a tiny batch, SAF's ring of
logits, MESA's EMA teacher, the trainer's passes and exact resume, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam.cli import main
from ssam.train.trajectory import MESALoss, SAFLoss, trajectory_kl


def _hand_kl(logits, past, t):
    """T^2 * mean over the batch of sum_c p_c (log p_c - log q_c), p = softmax(past / T), q = softmax(logits / T)."""
    total = 0.0
    for row, prow in zip(logits.tolist(), past.tolist()):
        zq = sum(math.exp(v / t) for v in row)
        zp = sum(math.exp(v / t) for v in prow)
        for v, pv in zip(row, prow):
            p, q = math.exp(pv / t) / zp, math.exp(v / t) / zq
            total += p * (math.log(p) - math.log(q))
    return t * t * total / len(logits)


def test_trajectory_kl_matches_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    logits, past = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g)
    assert float(trajectory_kl(logits, past, 5.0)) == pytest.approx(_hand_kl(logits, past, 5.0), rel=1e-6)
    assert float(trajectory_kl(past, past, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_saf_reads_the_logits_of_lag_epochs_ago_and_adds_the_weighted_kl():
    saf = SAFLoss(num_examples=6, num_classes=3, lam=0.3, temperature=2.0, lag=2, start=0)
    idx = torch.tensor([4, 1])
    y = torch.tensor([0, 2])
    seen = {}
    for epoch in range(5):
        logits = torch.full((2, 3), float(epoch)) + torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]]) * (epoch + 1)
        logits.requires_grad_(True)
        loss = saf(logits, y, idx, epoch)
        ce = F.cross_entropy(logits, y)
        if epoch < 2:  # nothing recorded lag epochs ago yet: plain cross-entropy
            assert torch.equal(loss, ce)
        else:
            want = float(ce) + 0.3 * _hand_kl(logits.detach(), seen[epoch - 2], 2.0)
            assert float(loss) == pytest.approx(want, rel=1e-5)
        seen[epoch] = logits.detach().clone()
    assert saf.table.shape == (6, 3, 3)  # examples x (lag + 1) x classes
    assert torch.equal(saf.table[0], torch.zeros(3, 3))  # examples never seen stay empty


def test_mesa_teacher_is_an_ema_of_the_weights_and_its_logits_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    mesa = MESALoss(model, lam=0.8, temperature=5.0, decay=0.9, start=0)
    before = {k: v.clone() for k, v in mesa.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(8, 3))  # moves the BN statistics and counter
    mesa.update(model)
    after, now = mesa.teacher.state_dict(), model.state_dict()
    for k, v in after.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * now[k])
        else:
            assert torch.equal(v, now[k])
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    logits = model(x)
    with torch.no_grad():
        target = mesa.teacher(x)  # eval mode: its running statistics
    want = float(F.cross_entropy(logits, y)) + 0.8 * _hand_kl(logits.detach(), target, 5.0)
    assert float(mesa(logits, y, x, 0)) == pytest.approx(want, rel=1e-5)
    assert not mesa.teacher.training and not any(p.requires_grad for p in mesa.teacher.parameters())


QUICK = ["--dataset", "digits", "--model", "mlp", "--mlp_width", "16", "--augment", "none", "--quiet", "--opt", "sgd",
         "--momentum", "0.9", "--kl_start", "1", "--saf_lag", "1", "--limit_train_batches", "5"]  # fmt: skip


def test_mesa_counts_its_teacher_forward_as_a_third_of_a_pass(tmp_path, one_thread):
    args = ["train", *QUICK, "--mesa", "0.5", "--epochs", "4", "--output_dir", str(tmp_path), "--output_name", "m"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["passes_per_example"] == pytest.approx(1.0 + 3 / 4 / 3)  # the term on in 3 of 4 epochs


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--saf", "-0.1"], "--saf -0.1 is out of range; allowed: a number >= 0"),
        (["--mesa", "-1"], "--mesa -1.0 is out of range"),
        (["--saf", "0.3", "--mesa", "0.8"], "--saf and --mesa together"),
        (["--saf", "0.3", "--opt", "sam-sgd"], "--saf with --opt sam-sgd: the trajectory loss replaces SAM's ascent"),
        (["--mesa", "0.8", "--mesa_decay", "1"], "--mesa_decay 1.0 is out of range; allowed: 0 <= decay < 1"),
        (["--saf", "0.3", "--saf_lag", "0"], "--saf_lag 0 is out of range"),
        (["--saf", "0.3", "--kl_temperature", "0"], "--kl_temperature 0.0 is out of range"),
    ],
)
def test_bad_trajectory_flags_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert main(["train", *QUICK, *flags, "--epochs", "1", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

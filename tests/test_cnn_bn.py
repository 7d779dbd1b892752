"""The memorization CNN (``--model cnn_bn``): shapes and parameter count by hand, per-example Fisher on its
BatchNorm against a loop of single-example passes, the width through a checkpoint, and its flags' bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ssam.cli import main
from ssam.models import build_model
from ssam.optim.fisher import empirical_fisher


def _hand_count(c_in: int, side: int, w: int, classes: int) -> int:
    conv1 = c_in * w * 5 * 5  # no bias: BatchNorm follows
    conv2 = w * 2 * w * 3 * 3
    bns = 2 * w + 2 * (2 * w)  # weight and bias of each
    q = ((side + 1) // 2 + 1) // 2  # two stride-2 convolutions with 'same' padding
    fc1 = 2 * w * q * q * 16 * w + 16 * w
    fc2 = 16 * w * classes + classes
    return conv1 + conv2 + bns + fc1 + fc2


@pytest.mark.parametrize("c_in, side, w", [(1, 28, 16), (3, 32, 4), (1, 8, 2), (1, 7, 3)])
def test_shapes_and_parameter_count_match_a_hand_count(c_in, side, w):
    model = build_model("cnn_bn", 10, c_in, side, width=w)
    assert sum(p.numel() for p in model.parameters()) == _hand_count(c_in, side, w, 10)
    assert model(torch.randn(5, c_in, side, side)).shape == (5, 10)


def test_default_width_is_the_recipes_0_41m_parameters():
    assert sum(p.numel() for p in build_model("cnn_bn", 10, 1, 28).parameters()) == _hand_count(1, 28, 16, 10)
    assert _hand_count(1, 28, 16, 10) == 409_338


def test_per_example_fisher_in_train_mode_equals_single_example_passes():
    torch.manual_seed(0)
    model = build_model("cnn_bn", 4, 1, 8, width=2).double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    ref = [torch.zeros_like(p) for p in model.parameters()]
    model.train()
    for i in range(6):  # each example its own BatchNorm batch, as the paper's code (batch size 1)
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for r, p in zip(ref, model.parameters()):
            r += p.grad**2
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("loop", "hooks"):
        got = empirical_fisher(model, list(model.parameters()), [(x, y)], num_samples=6, method=method, mode="train")
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-14), method
    for k, v in model.state_dict().items():  # the BN running statistics are left alone
        assert torch.equal(v, stats[k]), k


QUICK = ["--dataset", "digits", "--model", "cnn_bn", "--augment", "none", "--quiet", "--epochs", "1"]


def test_width_round_trips_through_the_checkpoint(tmp_path, one_thread):
    from ssam.checkpoint import load_checkpoint, model_from_checkpoint

    args = ["train", *QUICK, "--cnn_width", "3", "--limit_train_batches", "2", "--output_dir", str(tmp_path)]
    assert main([*args, "--output_name", "c", "--opt", "sam-sgd"]) == 0
    ckpt = load_checkpoint(tmp_path / "c" / "last.pt")
    assert ckpt["model_args"]["width"] == 3 and ckpt["model_args"]["name"] == "cnn_bn"
    model = model_from_checkpoint(ckpt, "last.pt")
    assert model.conv1.out_channels == 3 and model.fc1.out_features == 48
    config = (tmp_path / "c" / "config.yaml").read_text()
    assert "cnn_width: 3" in config
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["finished"] is True


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--cnn_width", "0"], "--cnn_width 0 is out of range; allowed: an integer >= 1"),
        (["--model", "mlp", "--cnn_width", "8"], "--cnn_width 8 was given with --model mlp"),
        (["--mlp_width", "8"], "--mlp_width 8 was given with --model cnn_bn"),
    ],
)
def test_bad_width_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert main(["train", *QUICK, *flags, "--output_dir", str(out)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()

"""timm models with every optimizer; the Fisher's hooks path on a tiny ViT against the per-example loop."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

import ssam  # noqa: E402
from integrations_util import last_value, run_example  # noqa: E402
from ssam.errors import UsageError  # noqa: E402
from ssam.integrations.timm import build_timm_model  # noqa: E402
from ssam.models import build_model  # noqa: E402
from ssam.optim.fisher import empirical_fisher  # noqa: E402

# fisher_mode="eval": at 32x32 a ResNet's last BatchNorm sees 1x1 maps, which a batch of one cannot normalise.
SETTINGS = {
    "sam-sgd": {},
    "ssamf-sgd": dict(sparsity=0.8, num_samples=8, fisher_mode="eval"),
    "ssamd-sgd": dict(sparsity=0.8, seed=0),
}


def tiny_vit(num_classes=3):
    torch.manual_seed(0)
    return build_timm_model(
        "vit_tiny_patch16_224", num_classes, image_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2
    )


def small_resnet(num_classes=3):
    torch.manual_seed(0)
    return build_model("timm:test_resnet", num_classes, in_channels=3, image_size=32)


def batch(n=8, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("opt_name", list(SETTINGS))
@pytest.mark.parametrize("make", [small_resnet, tiny_vit], ids=["test_resnet", "vit"])
def test_timm_models_train_with_each_optimizer(make, opt_name):
    model = make()
    x, y = batch(4, size=32 if make is small_resnet else 16)
    opt = ssam.create_optimizer(
        model,
        opt_name,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        no_decay_bias_norm=True,
        rho=0.05,
        **SETTINGS[opt_name],
    )
    if opt_name.startswith("ssamf"):
        opt.update_mask(model, [(x, y)])
    opt.closure_passes = "both"

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(3)]
    assert losses[-1] < losses[0]  # one fixed batch: SAM descends on it
    if opt_name != "sam-sgd":
        assert opt.mask_density() == pytest.approx(0.2, abs=0.01)


def test_vit_weight_decay_groups_follow_timm():
    model = tiny_vit()
    opt = ssam.create_optimizer(model, "sam-adamw", lr=1e-3, weight_decay=0.05, no_decay_bias_norm=True)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert wd[id(names["pos_embed"])] == wd[id(names["cls_token"])] == wd[id(names["blocks.0.norm1.weight"])] == 0
    assert wd[id(names["blocks.0.attn.qkv.weight"])] == wd[id(names["head.weight"])] == 0.05


def test_fisher_hooks_on_vit_linear_norm_and_patch_layers_match_the_loop():
    model = tiny_vit()
    x, y = batch(6)
    # The layers hooks covers: every Linear (on token sequences too), LayerNorm and the patch embedding's Conv2d.
    kinds = (nn.Linear, nn.Conv2d, nn.LayerNorm)  # (timm's LayerNorm subclasses torch's)
    covered = [m.weight for m in model.modules() if isinstance(m, kinds)]
    covered += [m.bias for m in model.modules() if isinstance(m, kinds) and m.bias is not None]
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    fast = empirical_fisher(model, covered, [(x, y)], 6, method="hooks")
    slow = empirical_fisher(model, covered, [(x, y)], 6, method="loop")
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-9)
    assert all(float(s.sum()) > 0 for s in slow)


def test_fisher_on_whole_vit_falls_back_cleanly():
    model = tiny_vit()
    x, y = batch(4)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="cannot handle this model: .* is not a plain Linear"):
        empirical_fisher(model, params, [(x, y)], 4, method="hooks")
    auto = empirical_fisher(model, params, [(x, y)], 4, method="auto")
    loop = empirical_fisher(model, params, [(x, y)], 4, method="loop")
    for a, b in zip(auto, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_fisher_hooks_on_timm_resnet_match_the_loop():
    model = small_resnet()
    x, y = batch(4, size=32)
    params = list(model.parameters())
    model(x)  # running statistics that are not the initial ones
    fast = empirical_fisher(model, params, [(x, y)], 4, mode="eval", method="hooks")
    slow = empirical_fisher(model, params, [(x, y)], 4, mode="eval", method="loop")
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-3, atol=1e-8)


@pytest.mark.slow
def test_build_model_errors_are_one_line():
    with pytest.raises(UsageError, match="did you mean 'resnet10t'"):
        build_model("timm:resnet10", 3)
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "from ssam.models import build_model\n"
        "try:\n    build_model('timm:resnet10t', 3)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("UsageError") and "pip install 'sparse-sam[timm]'" in out and out.count("\n") == 1


@pytest.mark.slow
def test_example_timm_runs():
    out = run_example("timm_ssam.py", "--epochs", "2")
    first, last = last_value(out, "loss after epoch")
    assert last < first
    assert last_value(out, "epoch") == [0.5, 0.5]  # "epoch E mask density D": sparsity 0.5, refreshed each epoch


def test_default_fisher_mode_on_a_timm_resnet_is_eval_and_explicit_train_is_refused_before_writing(tmp_path, capsys):
    from ssam.cli import main

    flags = ["train", "--dataset", "digits", "--model", "timm:resnet10t", "--opt", "ssamf-sgd", "--epochs", "1",
             "--limit_train_batches", "1", "--num_samples", "4", "--quiet", "--output_dir"]  # fmt: skip
    assert main([*flags, str(tmp_path / "auto")]) == 0
    (run,) = (tmp_path / "auto").iterdir()
    assert "fisher_mode: eval" in (run / "config.yaml").read_text()
    assert "fisher_mode auto: eval (a BatchNorm2d sees one value per channel" in (run / "log.txt").read_text()
    capsys.readouterr()
    assert main([*flags, str(tmp_path / "train"), "--fisher_mode", "train"]) == 2
    err = capsys.readouterr().err
    assert "--fisher_mode train: a BatchNorm2d sees one value per channel" in err and "--fisher_mode eval" in err
    assert not (tmp_path / "train").exists()


def test_a_model_that_cannot_take_the_images_is_exit_2_before_anything_is_written(tmp_path, capsys):
    from ssam.cli import main

    out = tmp_path / "out"
    assert main(["train", "--dataset", "digits", "--model", "timm:vit_tiny_patch16_224", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model timm:vit_tiny_patch16_224 cannot take --dataset digits's (1, 8, 8) inputs" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

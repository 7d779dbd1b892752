"""The analysis commands end to end on the bundled digits set, with tiny subsets and grids."""

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from ssam.analysis import evaluate, hessian_eigenvalues
from ssam.analysis.cli import (
    add_hessian_args,
    add_landscape_args,
    add_sharpness_args,
    parse_range,
    run_hessian,
    run_landscape,
    run_sharpness,
)
from ssam.data import build_datasets
from ssam.errors import UsageError
from ssam.io import save_torch as save_atomic
from ssam.models import build_model

MODEL = "cnn_small"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_checkpoint(path, seed, best_acc1=0.0):
    torch.manual_seed(seed)
    model = build_model(MODEL, 10, in_channels=1, image_size=8)
    with torch.no_grad():  # non-default BN statistics, as a trained model would have
        model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(
        {
            "version": 1,
            "model": model.state_dict(),
            "model_args": {"name": MODEL, "num_classes": 10, "in_channels": 1, "image_size": 8},
            "config": {"dataset": "digits", "datadir": None, "model": MODEL, "seed": seed},
            "best_acc1": best_acc1,
        },
        path,
    )
    return model.eval()


def subset(n, seed=0, batch_size=32):
    """The analysis subset, rebuilt here from its definition: first n of a seeded permutation, no augmentation."""
    train = build_datasets("digits", None, augment=False)[0]
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    xs = torch.stack([train[int(i)][0] for i in idx])
    ys = torch.tensor([train[int(i)][1] for i in idx])
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]


def parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = make_checkpoint(root / "runA" / "best.pt", 0, best_acc1=87.5)
    b = make_checkpoint(root / "runB" / "best.pt", 1)
    (root / "runB" / "metrics.jsonl").write_text(
        '{"epoch": 0, "test_acc1": 40.0}\n{"epoch": 1, "test_acc1": 55.25}\nnot json\n'
    )
    c = make_checkpoint(root / "runC" / "best.pt", 2)
    return root, {"runA": a, "runB": b, "runC": c}


@pytest.mark.filterwarnings("ignore:Lanczos stopped")  # max_iter kept tiny for speed
def test_hessian_command(runs, tmp_path, capsys):
    root, models = runs
    out = tmp_path / "h"
    args = parse(
        add_hessian_args,
        [
            "--checkpoint",
            str(root / "runA" / "best.pt"),
            "--num_samples",
            "48",
            "--batch_size",
            "20",
            "--top_k",
            "2",
            "--max_iter",
            "30",
            "--trace",
            "--trace_max_iter",
            "8",
            "--density",
            "--density_iter",
            "12",
            "--per_layer",
            "--params",
            "fc|bn3",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert run_hessian(args) == 0
    res = json.loads((out / "hessian.json").read_text())
    for key in ("eigenvalues", "trace", "density", "per_layer", "settings", "seed", "num_params", "checkpoint"):
        assert key in res, key
    assert res["num_params"] == sum(p.numel() for n, p in models["runA"].named_parameters() if "fc" in n or "bn3" in n)
    assert len(res["eigenvalues"]) == 2 and res["eigenvalues"][0] >= res["eigenvalues"][1]
    assert set(res["trace"]) == {"mean", "stderr", "n_samples"} and res["trace"]["n_samples"] == 8
    grid, dens = np.array(res["density"]["grid"]), np.array(res["density"]["density"])
    assert np.sum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid)) == pytest.approx(1.0)
    assert [r["name"] for r in res["per_layer"]] == ["bn3.weight", "bn3.bias", "fc.weight", "fc.bias"]
    assert (out / "esd.png").stat().st_size > 1000 and (out / "per_layer.csv").is_file()
    printed = capsys.readouterr().out
    assert "| name | numel |" in printed
    assert f"wrote {out / 'hessian.json'}, {out / 'per_layer.csv'}, {out / 'esd.png'}" in printed  # every file
    # The command analysed exactly the documented subset.
    model = models["runA"]
    ref = hessian_eigenvalues(
        model, nn.CrossEntropyLoss(), subset(48, batch_size=20), top_k=2, max_iter=30, tol=1e-4, params="fc|bn3"
    )
    np.testing.assert_allclose(res["eigenvalues"], ref, rtol=1e-5)


def test_landscape_1d_two_checkpoints_and_resume(runs, tmp_path):
    root, models = runs
    out = tmp_path / "l1"
    argv = [
        "--checkpoint",
        str(root / "runA" / "best.pt"),
        str(root / "runB" / "best.pt"),
        "--xrange",
        "-1:1:5",
        "--num_samples",
        "40",
        "--batch_size",
        "16",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--quiet",
    ]
    assert run_landscape(parse(add_landscape_args, argv)) == 0
    with np.load(out / "landscape.npz") as z:
        assert set(z.files) >= {"xs", "loss", "acc", "names", "settings"}
        loss, acc = z["loss"].copy(), z["acc"].copy()
        np.testing.assert_array_equal(z["xs"], [-1, -0.5, 0, 0.5, 1])
    assert loss.shape == acc.shape == (2, 5) and np.isfinite(loss).all()
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["names"] == ["runA", "runB"] and meta["settings"]["dims"] == 1
    data = subset(40)
    for i, name in enumerate(["runA", "runB"]):
        ref_loss, ref_acc = evaluate(models[name], nn.CrossEntropyLoss(), data)
        assert loss[i, 2] == pytest.approx(ref_loss, rel=1e-5)
        assert acc[i, 2] == pytest.approx(ref_acc)
    assert (out / "landscape_loss.png").is_file() and (out / "landscape_acc.png").is_file()

    with pytest.raises(UsageError, match="--resume"):
        run_landscape(parse(add_landscape_args, argv))
    # Knock points out of the saved grid: --resume recomputes exactly those.
    with np.load(out / "landscape.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["loss"] = arrays["loss"].copy()
    arrays["loss"][1, 3] = np.nan
    arrays["loss"][0, 0] = -7.0  # a kept point must survive untouched
    np.savez(out / "landscape.npz", **arrays)
    assert run_landscape(parse(add_landscape_args, argv + ["--resume"])) == 0
    with np.load(out / "landscape.npz") as z:
        assert z["loss"][0, 0] == -7.0
        assert z["loss"][1, 3] == pytest.approx(loss[1, 3], rel=1e-6)
    with pytest.raises(UsageError, match="seed"):
        run_landscape(parse(add_landscape_args, argv + ["--resume", "--seed", "3"]))


def test_landscape_2d_interpolation(runs, tmp_path):
    root, models = runs
    out = tmp_path / "l2"
    argv = [
        "--checkpoint",
        str(root / "runA" / "best.pt"),
        "--to",
        str(root / "runC" / "best.pt"),
        "--dims",
        "2",
        "--xrange",
        "0:1:3",
        "--yrange",
        "-0.5:0.5:3",
        "--num_samples",
        "30",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--quiet",
    ]
    assert run_landscape(parse(add_landscape_args, argv)) == 0
    with np.load(out / "landscape.npz") as z:
        loss = z["loss"]
        assert loss.shape == (1, 3, 3) and "ys" in z.files
    data = subset(30)
    assert loss[0, 0, 1] == pytest.approx(evaluate(models["runA"], nn.CrossEntropyLoss(), data)[0], rel=1e-5)
    assert loss[0, 2, 1] == pytest.approx(evaluate(models["runC"], nn.CrossEntropyLoss(), data)[0], rel=1e-4)
    assert (out / "landscape_contour.png").is_file() and (out / "landscape_surface.png").is_file()


@pytest.mark.parametrize("bad", ["1:-1:5", "a:1:3", "-1:1", "-1:1:1", "-1:1:2.5", "nan:1:3", "-1:1:5:2", ""])
def test_bad_range_is_a_usage_error(bad, tmp_path):
    with pytest.raises(UsageError, match="START:STOP:NUM") as e:
        run_landscape(parse(add_landscape_args, ["--checkpoint", "x.pt", "--xrange", bad, "--output", str(tmp_path)]))
    assert repr(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--yrange"):
        parse_range(bad, "--yrange")
    np.testing.assert_array_equal(parse_range("-2:2:5"), [-2, -1, 0, 1, 2])


@pytest.mark.filterwarnings("ignore:Lanczos stopped")
def test_sharpness_command(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "s"
    args = parse(
        add_sharpness_args,
        [
            "--checkpoint",
            *[str(root / r / "best.pt") for r in ("runA", "runB", "runC")],
            "--radius",
            "0.1",
            "--n_directions",
            "2",
            "--num_samples",
            "32",
            "--max_iter",
            "15",
            "--trace_max_iter",
            "6",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert run_sharpness(args) == 0
    printed = capsys.readouterr().out
    assert "| run | test_acc1 |" in printed
    res = json.loads((out / "sharpness.json").read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert rows["runA"]["test_acc1"] == 87.5 and rows["runA"]["acc_source"] == "checkpoint"
    assert rows["runB"]["test_acc1"] == 55.25 and rows["runB"]["acc_source"] == "metrics.jsonl"
    assert rows["runC"]["acc_source"] == "evaluated" and 0 <= rows["runC"]["test_acc1"] <= 100
    for r in rows.values():
        assert r["lambda_max"] > 0 and r["trace_samples"] == 6 and r["radius"] == 0.1
        assert np.isfinite(r["loss_increase"])
    header = (out / "sharpness.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "test_acc1", "train_loss", "lambda_max"]
    assert (out / "sharpness.md").read_text().startswith("| run |")
    with pytest.raises(UsageError, match="--radius"):
        run_sharpness(parse(add_sharpness_args, ["--checkpoint", "x.pt", "--radius", "0"]))


def _bad_checkpoint(kind, root, tmp_path):
    """A path that is missing, or a truncated copy of a real checkpoint."""
    if kind == "missing":
        return tmp_path / "gone" / "best.pt"
    bad = tmp_path / "cut" / "best.pt"
    bad.parent.mkdir()
    bad.write_bytes((root / "runA" / "best.pt").read_bytes()[:1500])
    return bad


ANALYSIS_FLAGS = {
    "hessian": ["--top_k", "1", "--max_iter", "3"],
    "hessian --profile": ["--profile", "--max_iter", "3"],
    "landscape": ["--xrange", "-1:1:3"],
    "sharpness": ["--n_directions", "1", "--max_iter", "3", "--trace_max_iter", "2"],
}


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
@pytest.mark.parametrize("command", sorted(ANALYSIS_FLAGS))
@pytest.mark.parametrize("where", ["output", "default"])
def test_bad_checkpoint_writes_nothing(command, kind, where, runs, tmp_path, capsys):
    """One line on stderr, exit 2, and no output folder: neither --output nor the default one next to the file."""
    from ssam.cli import main

    root, _ = runs
    bad = _bad_checkpoint(kind, root, tmp_path)
    out = tmp_path / "out"
    argv = [command.split()[0], "--checkpoint", str(bad), "--num_samples", "16", "--device", "cpu", "--quiet"]
    argv += ANALYSIS_FLAGS[command] + (["--output", str(out)] if where == "output" else [])
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert ("not found" if kind == "missing" else "truncated or corrupt") in err
    assert str(bad) in err
    assert not out.exists() and not (bad.parent / "analysis").exists()
    assert sorted(tmp_path.rglob("*")) == before  # not even an empty folder


@pytest.mark.parametrize("command", ["landscape", "sharpness"])
def test_bad_checkpoint_among_several_stops_before_any_work(command, runs, tmp_path, capsys):
    """The second of two checkpoints is truncated: the command stops at once, before the first one's results."""
    from ssam.cli import main

    root, _ = runs
    bad = _bad_checkpoint("corrupt", root, tmp_path)
    out = tmp_path / "out"
    argv = [command, "--checkpoint", str(root / "runA" / "best.pt"), str(bad), "--num_samples", "16"]
    argv += ["--device", "cpu", "--quiet", "--output", str(out)] + ANALYSIS_FLAGS[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "truncated or corrupt" in captured.err
    assert not out.exists()

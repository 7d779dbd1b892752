"""The analysis commands' newer surfaces: run folders as --checkpoint, --graph_memory, --help defaults, plot
file names and labels, and the ssam-vs-PyHessian profile."""

import importlib.util
import json

import numpy as np
import pytest
from torch import nn

from ssam.analysis import hessian_eigenvalues, hessian_trace
from ssam.analysis.cli import add_hessian_args, add_landscape_args, run_hessian, run_landscape
from ssam.analysis.plots import file_slug, short_label
from ssam.bench.hessian import add_profile_args, format_profile, measure, run_hessian_profile
from ssam.errors import ArgumentParser, UsageError
from test_analysis_cli import make_checkpoint, parse, subset

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "sam-sgd_resnet18_cifar10_lr0.1_wd0.0005_rho0.05_sparsity0.5_update5_fisher1024_seed0_" + "x" * 30


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    model = make_checkpoint(root / "runA" / "best.pt", 0)
    make_checkpoint(root / "runA" / "last.pt", 5)
    make_checkpoint(root / "only_last" / "last.pt", 0)
    (root / "empty").mkdir()
    return root, model


def add_hessian_and_profile_args(parser):
    """The parser of ``ssam hessian``: the analysis flags and the bench's --profile flags (composed in ssam.cli)."""
    add_hessian_args(parser)
    add_profile_args(parser)


def hessian_args(checkpoint, out, *extra):
    return parse(
        add_hessian_and_profile_args,
        [
            "--checkpoint",
            str(checkpoint),
            "--num_samples",
            "40",
            "--batch_size",
            "16",
            "--top_k",
            "1",
            "--max_iter",
            "40",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--quiet",
            *extra,
        ],
    )


def test_run_folder_takes_best_then_last(run_folder, tmp_path, capsys):
    root, model = run_folder
    assert run_hessian(hessian_args(root / "runA", tmp_path / "a")) == 0
    res = json.loads((tmp_path / "a" / "hessian.json").read_text())
    assert res["checkpoint"] == str((root / "runA" / "best.pt").resolve()) and res["run"] == "runA"
    assert "using " + str(root / "runA" / "best.pt") in capsys.readouterr().err
    ref = hessian_eigenvalues(model, nn.CrossEntropyLoss(), subset(40, batch_size=16), max_iter=40, tol=1e-4)
    np.testing.assert_allclose(res["eigenvalues"], ref, rtol=1e-5)
    assert run_hessian(hessian_args(root / "only_last", tmp_path / "b")) == 0
    assert json.loads((tmp_path / "b" / "hessian.json").read_text())["checkpoint"].endswith("last.pt")
    with pytest.raises(UsageError, match="best.pt or last.pt"):
        run_hessian(hessian_args(root / "empty", tmp_path / "c"))


def test_graph_memory_flag(run_folder, tmp_path):
    root, _ = run_folder
    values = []
    for gib in ("auto", "0", "0.5"):
        out = tmp_path / gib
        assert (
            run_hessian(hessian_args(root / "runA", out, "--graph_memory", gib, "--trace", "--trace_max_iter", "6"))
            == 0
        )
        res = json.loads((out / "hessian.json").read_text())
        values.append(res["eigenvalues"] + [res["trace"]["mean"]])
    np.testing.assert_allclose(values[1], values[0], rtol=1e-10)
    np.testing.assert_allclose(values[2], values[0], rtol=1e-10)
    for bad in ("-1", "lots", "inf"):
        with pytest.raises(UsageError, match="--graph_memory"):
            run_hessian(hessian_args(root / "runA", tmp_path / "x", "--graph_memory", bad))


@pytest.mark.parametrize(
    "add, shown",
    [
        (add_hessian_args, ["(default: 4096)", "(default: 5)", "(default: 0.0001)", "(default: auto)"]),
        (add_landscape_args, ["(default: -1:1:41)", "(default: biasbn)"]),
    ],
)
def test_help_shows_defaults(add, shown):
    p = ArgumentParser(prog="ssam x")
    add(p)
    text = " ".join(p.format_help().split())
    for s in shown:
        assert s in text, s
    assert "(default: None)" not in text


def test_labels_and_file_names_stay_short():
    assert short_label("short") == "short"
    s = short_label(LONG)
    assert len(s) == 40 and s.startswith(LONG[:19]) and s.endswith(LONG[-20:]) and "…" in s
    slug = file_slug("runs/" + LONG)
    assert len(slug) <= 24 and slug.startswith("runs_sam-sgd")
    assert file_slug("///") == "run"


def test_2d_several_checkpoints_short_distinct_file_names(tmp_path):
    a = make_checkpoint(tmp_path / (LONG + "_a") / "best.pt", 0)
    make_checkpoint(tmp_path / (LONG + "_b") / "best.pt", 1)
    out = tmp_path / "l2"
    argv = [
        "--checkpoint",
        str(tmp_path / (LONG + "_a")),
        str(tmp_path / (LONG + "_b")),
        "--dims",
        "2",
        "--xrange",
        "-1:1:3",
        "--num_samples",
        "20",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--quiet",
    ]
    assert run_landscape(parse(add_landscape_args, argv)) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and all(len(n) <= 60 for n in pngs), pngs
    assert pngs[0].startswith("landscape_contour_1_") and pngs[1].startswith("landscape_contour_2_")
    with np.load(out / "landscape.npz") as z:
        assert z["loss"][0, 1, 1] == pytest.approx(
            float(__import__("ssam.analysis", fromlist=["evaluate"]).evaluate(a, nn.CrossEntropyLoss(), subset(20))[0]),
            rel=1e-5,
        )


@pytest.mark.filterwarnings("ignore:Lanczos stopped", "ignore:.*create_graph.*")
def test_profile_measures_the_same_work(run_folder):
    root, model = run_folder
    source = {
        "checkpoint": str(root / "runA" / "best.pt"),
        "dataset": None,
        "datadir": None,
        "model": None,
        "num_samples": 40,
        "batch_size": 16,
        "data_seed": 0,
    }
    # A tight tolerance: at 1e-3 power iteration stalls on this model (0.20 for 0.47) while Lanczos is done.
    spec = {"source": source, "tol": 1e-6, "max_iter": 300, "trace_samples": 6, "seed": 0, "device": "cpu"}
    data = subset(40, batch_size=16)
    mine = measure({**spec, "tool": "ssam"})
    ref = hessian_eigenvalues(model, nn.CrossEntropyLoss(), data, max_iter=300, tol=1e-6)[0]
    assert mine["lambda_max"] == pytest.approx(ref, rel=1e-6) and mine["products"] >= 2
    assert mine["trace_samples"] == 6
    assert mine["trace"] == pytest.approx(hessian_trace(model, nn.CrossEntropyLoss(), data, max_iter=6, tol=0)[0])
    rows = [{**mine, "round": 0}]
    if importlib.util.find_spec("pyhessian") is not None:
        theirs = measure({**spec, "tool": "pyhessian"})
        assert theirs["trace_samples"] == 6 and theirs["products"] >= 2
        assert theirs["lambda_max"] == pytest.approx(ref, rel=1e-2)
        rows.append({**theirs, "round": 0})
    table = format_profile(rows)
    assert table.startswith("| tool | λ_max |") and ("ssam / PyHessian" in table) == (len(rows) == 2)


@pytest.mark.slow
def test_profile_command_runs_each_tool_in_its_own_process(run_folder, tmp_path, capsys, monkeypatch):
    root, _ = run_folder
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers inherit it: a tiny model on a shared machine
    out = tmp_path / "p"
    assert run_hessian_profile(hessian_args(root / "runA", out, "--profile", "--trace", "--trace_max_iter", "4")) == 0
    res = json.loads((out / "profile.json").read_text())
    assert res["rows"][0]["tool"] == "ssam" and res["rows"][0]["trace_samples"] == 4
    assert res["rows"][0]["peak_rss_mib"] >= res["rows"][0]["base_rss_mib"] > 0
    assert "| ssam" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--profile"):
        run_hessian_profile(hessian_args(root / "runA", out, "--profile", "--per_layer"))


def test_trace_method_flag(run_folder, tmp_path, capsys):
    """Both methods give the same trace from the command line; an unknown one is one line and exit 2."""
    from ssam.cli import main

    root, _ = run_folder
    traces = []
    for method in ("taylor", "hvp"):
        out = tmp_path / method
        args = hessian_args(root / "runA", out, "--trace", "--trace_max_iter", "6", "--trace_method", method)
        assert run_hessian(args) == 0
        traces.append(json.loads((out / "hessian.json").read_text())["trace"]["mean"])
    np.testing.assert_allclose(traces[0], traces[1], rtol=1e-5)
    capsys.readouterr()
    assert main(["hessian", "--checkpoint", str(root / "runA"), "--trace", "--trace_method", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trace_method" in err and "'fast'" in err and "taylor" in err

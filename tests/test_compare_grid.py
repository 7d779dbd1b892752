"""`ssam compare`'s generic grid: variants with their own flags, swept axes (rho, label noise, any flag), seeds that
cannot be misread, the report's setting columns, bars in masks.png, and a dry run into a closed pipe."""

import csv
import math
import random
import statistics
import subprocess
import sys

import pytest
import yaml

from ssam.compare import PAPER_SEEDS, action_for, build_parser, main, plan_runs, plots, resolve
from ssam.errors import UsageError
from ssam.train.config import parse_args
from test_compare import write_run


def plan(*argv):
    return plan_runs(resolve(list(argv)))


def recipe(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


# --------------------------------------------------------------------------------------------------- seeds


def test_seeds_a_bare_number_from_ten_is_refused_and_lists_and_counts_are_explicit(tmp_path):
    out = str(tmp_path)
    with pytest.raises(UsageError, match=r"--num_seeds 42 .*--seeds 42,"):
        resolve(["--seeds", "42", "--output", out])
    assert [r.seed for r in plan("--opts", "sgd", "--seeds", "42,", "--output", out)] == [42]
    assert [r.seed for r in plan("--opts", "sgd", "--num_seeds", "6", "--output", out)] == [*PAPER_SEEDS, 10001, 10002]
    assert [r.seed for r in plan("--opts", "sgd", "--seeds", "2", "--output", out)] == [1234, 4321]
    with pytest.raises(UsageError, match="both"):
        resolve(["--seeds", "1,2", "--num_seeds", "2", "--output", out])
    with pytest.raises(UsageError, match="num_seeds"):
        resolve(["--num_seeds", "0", "--output", out])
    with pytest.raises(UsageError, match="ambiguous"):
        resolve(["--config", recipe(tmp_path, {"compare": {"seeds": 42}}), "--output", out])
    r = recipe(tmp_path, {"compare": {"num_seeds": 2, "opts": ["sgd"]}})
    assert [x.seed for x in plan("--config", r, "--output", out)] == [1234, 4321]
    assert [x.seed for x in plan("--config", r, "--output", out, "--seeds", "7,")] == [7]  # command line wins
    assert "ambiguous" in build_parser().format_help()  # --help says how a bare number reads


# ---------------------------------------------------------------------------------------------------- axes


def test_rho_axis_runs_every_sam_family_optimizer_at_every_rho_and_sgd_once(tmp_path):
    runs = plan(
        "--opts", "sgd,sam,ssamf", "--seeds", "1,2", "--rho", "0.02,0.1", "--sparsity", "0.5", "--output", str(tmp_path)
    )
    assert [r.name for r in runs if r.seed == 1] == [
        "sgd_seed1",
        "sam_rho0.02_seed1",
        "sam_rho0.1_seed1",
        "ssamf_s0.5_rho0.02_seed1",
        "ssamf_s0.5_rho0.1_seed1",
    ]
    assert len(runs) == 10
    by = {r.name: r for r in runs}
    assert by["sam_rho0.02_seed2"].config["rho"] == 0.02 and by["ssamf_s0.5_rho0.1_seed1"].config["rho"] == 0.1
    assert by["sgd_seed1"].config["rho"] == parse_args([]).rho  # rho does not apply: the train default stays
    assert by["ssamf_s0.5_rho0.1_seed1"].label == "SSAM-F s=0.5 rho=0.1"
    # One value is a setting, not a sweep: folder names stay those of the old pass-through --rho.
    runs = plan("--opts", "sgd,sam", "--seeds", "1,", "--rho", "0.1", "--output", str(tmp_path))
    assert [(r.name, r.config["rho"]) for r in runs] == [("sgd_seed1", parse_args([]).rho), ("sam_seed1", 0.1)]
    for bad in ("-0.1", "x", "0.1,0.1"):
        with pytest.raises(UsageError, match="rho"):
            plan("--rho", bad, "--output", str(tmp_path))


def test_label_noise_and_generic_sweeps(tmp_path):
    runs = plan("--opts", "sgd,sam", "--seeds", "1,", "--label_noise", "0,0.4", "--output", str(tmp_path))
    assert [(r.name, r.config["label_noise"]) for r in runs] == [
        ("sgd_noise0_seed1", 0.0),
        ("sgd_noise0.4_seed1", 0.4),
        ("sam_noise0_seed1", 0.0),
        ("sam_noise0.4_seed1", 0.4),
    ]
    with pytest.raises(UsageError, match="label_noise"):
        plan("--label_noise", "1.0", "--output", str(tmp_path))
    # A flag of SSAM-D only is swept over SSAM-D only; SGD runs once.
    runs = plan("--opts", "sgd,ssamd", "--seeds", "1,", "--sweep", "update_freq=1,5", "--output", str(tmp_path))
    assert [(r.name, r.config["update_freq"]) for r in runs] == [
        ("sgd_seed1", parse_args([]).update_freq),
        ("ssamd_update_freq1_seed1", 1),
        ("ssamd_update_freq5_seed1", 5),
    ]
    runs = plan(
        "--opts",
        "ssamf",
        "--seeds",
        "1,",
        "--sparsity",
        "0.5",
        "--sweep",
        "granularity=element,2:4",
        "--sweep",
        "lr=0.1",
        "--output",
        str(tmp_path),
    )
    assert [r.name for r in runs] == ["ssamf_s0.5_granularity-element_seed1", "ssamf_s0.5_granularity-2-4_seed1"]
    assert all(r.config["lr"] == 0.1 for r in runs)
    for bad, needle in (
        (["--sweep", "lr"], "FLAG=V1,V2"),
        (["--sweep", "seed=1,2"], "seed"),
        (["--sweep", "momentun=0.5,0.9"], "did you mean 'momentum'"),
        (["--sweep", "lr=1,1"], "twice"),
    ):
        with pytest.raises(UsageError, match=needle):
            plan(*bad, "--output", str(tmp_path))


# ------------------------------------------------------------------------------------------------ variants


def test_recipe_variants_with_their_own_flags(tmp_path):
    r = recipe(
        tmp_path,
        {
            "compare": {"opts": ["sgd", "asam", "ssamf_pinned", "ssamf"], "seeds": [1], "sparsity": [0.5, 0.8]},
            "per_opt": {"ssamf": {"num_samples": 16}, "ssamf_pinned": {"num_samples": 32}},
            "variants": {
                "asam": {"opt": "sam", "adaptive": True, "label": "ASAM"},
                "ssamf_pinned": {"opt": "ssamf-sgd", "sparsity": 0.9, "renormalize": True},
            },
        },
    )
    runs = plan("--config", r, "--output", str(tmp_path))
    by = {r.name: r for r in runs}
    assert list(by) == ["sgd_seed1", "asam_seed1", "ssamf_pinned_seed1", "ssamf_s0.5_seed1", "ssamf_s0.8_seed1"]
    assert by["asam_seed1"].config["adaptive"] is True and by["asam_seed1"].config["opt"] == "sam-sgd"
    assert by["asam_seed1"].opt == "sam" and by["asam_seed1"].label == "ASAM"
    # A variant that sets the swept flag itself is not swept; per_opt: by family, then by variant name.
    pinned = by["ssamf_pinned_seed1"].config
    assert pinned["sparsity"] == 0.9 and pinned["renormalize"] is True and pinned["num_samples"] == 32
    assert by["ssamf_s0.8_seed1"].config["num_samples"] == 16 and by["ssamf_s0.8_seed1"].config["renormalize"] is False
    # The command line beats the recipe, variants included; --base reaches declared variants named by family.
    runs = plan("--config", r, "--output", str(tmp_path), "--num_samples", "8", "--base", "adamw")
    assert {x.config["num_samples"] for x in runs} == {8}
    assert [x.config["opt"] for x in runs] == ["adamw", "sam-adamw", "ssamf-sgd", "ssamf-adamw", "ssamf-adamw"]


@pytest.mark.parametrize(
    "variants, opts, needle",
    [
        ({"a": {"opt": "sam"}, "b": {"opt": "sam"}}, None, "same settings"),
        ({"a": {"adaptive": True}}, None, "opt"),
        ({"a": {"opt": "sam", "seed": 3}}, None, "seed"),
        ({"1a": {"opt": "sam"}}, None, "variant name"),
        ({"a": {"opt": "sam", "rhoo": 0.1}}, None, "did you mean 'rho'"),
        ({"a": {"opt": "sam-adam"}}, None, "sam-adamw"),
        ({"ssamf_tensor": {"opt": "ssamf"}}, ["ssamf_tensr"], "did you mean 'ssamf_tensor'"),
    ],
)
def test_variant_errors(tmp_path, variants, opts, needle):
    content = {"variants": variants, **({"compare": {"opts": opts}} if opts else {})}
    with pytest.raises(UsageError, match=needle):
        plan("--config", recipe(tmp_path, content), "--output", str(tmp_path))


def test_staleness_ignores_flags_that_do_not_apply(tmp_path):
    sgd, sam = plan("--opts", "sgd,sam", "--seeds", "1,", "--rho", "0.1", "--output", str(tmp_path))
    for run in (sgd, sam):
        write_run(run.folder, 90, 89, 0.1, 1.0, [(89, 0.5)], config={**run.config, "rho": 0.3})
    assert action_for(sgd, {}, False) == "done"  # SGD's rho means nothing
    with pytest.raises(UsageError, match="rho: 0.3 -> 0.1"):
        action_for(sam, {}, False)


# ------------------------------------------------------------------------------------------------- report


def test_report_of_a_rho_sweep(tmp_path):
    rng = random.Random(1)
    out = tmp_path / "cmp"
    argv = [
        "--opts",
        "sgd,sam,ssamf",
        "--seeds",
        "3",
        "--rho",
        "0.05,0.1",
        "--sparsity",
        "0.5",
        "--output",
        str(out),
        "--no_hessian",
    ]
    finals, density = {}, {}
    for r in plan(*argv):
        masks = None
        if r.opt == "ssamf":
            masks = [{"name": f"l{i}.weight", "numel": n, "density": rng.random()} for i, n in enumerate((9, 90, 900))]
            density.setdefault(r.label, []).append(sum(m["numel"] * m["density"] for m in masks) / 999)
        final = rng.uniform(80, 90)
        finals.setdefault(r.label, []).append(final)
        write_run(r.folder, final + 1, final, 0.1, 1.0, [(final, 0.5)], masks)
    assert main(argv + ["--report_only"]) == 0
    with open(out / "results.csv") as f:
        rows = {row["optimizer"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["SGD", "SAM rho=0.05", "SAM rho=0.1", "SSAM-F s=0.5 rho=0.05", "SSAM-F s=0.5 rho=0.1"]
    assert rows["SGD"]["rho"] == "" and rows["SAM rho=0.1"]["rho"] == "0.1" and rows["SAM rho=0.1"]["sparsity"] == ""
    for label, values in finals.items():
        assert float(rows[label]["final_acc1_mean"]) == pytest.approx(statistics.mean(values))
    for label, values in density.items():
        assert float(rows[label]["mask_density_mean"]) == pytest.approx(statistics.mean(values))
    assert rows["SAM rho=0.05"]["mask_density_mean"] == ""
    md = (out / "results.md").read_text().split("## Runs")[0]
    sam_line = next(line for line in md.splitlines() if line.startswith("| SAM rho=0.05 |"))
    assert sam_line.endswith("| — | — | 0.05 |")  # mask density and sparsity do not apply to SAM
    sgd_line = next(line for line in md.splitlines() if line.startswith("| SGD |"))
    assert sgd_line.endswith("| — | — | — |")
    assert (out / "rho.png").stat().st_size > 5000 and not (out / "sparsity.png").exists()


def test_paired_difference_with_the_base_optimizer(tmp_path):
    # Every SAM run is compared with the SGD run of its own seed and label noise (rho does not apply to SGD);
    # the expected numbers come from the run names alone.
    rng = random.Random(3)
    out = tmp_path / "cmp"
    argv = ["--opts", "sgd,sam", "--seeds", "1,2,3", "--rho", "0.02,0.1", "--label_noise", "0,0.4"]
    argv += ["--output", str(out), "--no_hessian"]
    final = {}
    for r in plan(*argv):
        final[r.name] = rng.uniform(70, 90)
        unfinished = r.name == "sgd_noise0.4_seed3"  # its SAM runs of seed 3 have nothing to be paired with
        write_run(r.folder, final[r.name], final[r.name], 0.1, 1.0, [(80, 0.5)], finished=not unfinished)
    assert main(argv + ["--report_only"]) == 0
    with open(out / "results.csv") as f:
        rows = {row["optimizer"]: row for row in csv.DictReader(f)}
    for rho in ("0.02", "0.1"):
        for noise, seeds in (("0", (1, 2, 3)), ("0.4", (1, 2))):
            diffs = [final[f"sam_rho{rho}_noise{noise}_seed{s}"] - final[f"sgd_noise{noise}_seed{s}"] for s in seeds]
            row = rows[f"SAM rho={rho} noise={noise}"]
            assert int(row["vs_base_pairs"]) == len(seeds)
            assert int(row["vs_base_ahead"]) == sum(d > 0 for d in diffs)
            assert float(row["vs_base_final_acc1_mean"]) == pytest.approx(statistics.mean(diffs))
            assert float(row["vs_base_final_acc1_std"]) == pytest.approx(statistics.stdev(diffs))
    assert rows["SGD noise=0"]["vs_base_pairs"] == "0" and rows["SGD noise=0"]["vs_base_final_acc1_mean"] == ""
    md = (out / "results.md").read_text()
    section = md.split("## Against the base optimizer, seed by seed")[1].split("## Runs")[0]
    diffs = [final[f"sam_rho0.1_noise0_seed{s}"] - final[f"sgd_noise0_seed{s}"] for s in (1, 2, 3)]
    ahead = sum(d > 0 for d in diffs)
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    # Decimals: two significant digits of the column's smallest spread (here best = final, so both columns agree).
    spreads = [float(r["vs_base_final_acc1_std"]) for r in rows.values() if r["vs_base_final_acc1_std"]]
    d = min(4, max(0, 1 - math.floor(math.log10(min(spreads)))))
    cell = f"{mean:+.{d}f} ± {std:.{d}f}"
    assert f"| SAM rho=0.1 noise=0 | 3 | {cell} | {cell} | {ahead} of 3 |" in section
    assert "| SGD" not in section


def test_one_value_of_a_folders_sweep_is_warned(tmp_path, capsys):
    from ssam.compare.plan import record_grid

    base = ["--opts", "sam", "--seeds", "1,", "--output", str(tmp_path)]
    plan(*base, "--rho", "0.2")
    assert "warning" not in capsys.readouterr().err  # a fresh folder: one rho is a plain setting
    sweep = [*base, "--rho", "0.02,0.1"]
    record_grid(resolve(sweep), plan(*sweep))
    assert "warning" not in capsys.readouterr().err
    runs = plan(*base, "--rho", "0.2")
    assert [r.name for r in runs] == ["sam_seed1"]  # beside the sweep's sam_rho0.02_seed1, not in it
    err = capsys.readouterr().err
    assert "--rho 0.2 is one value" in err and "holds a rho sweep (0.02, 0.1)" in err and "--rho 0.02,0.2" in err
    assert [r.name for r in plan(*base, "--rho", "0.1,0.2")][-1] == "sam_rho0.2_seed1"
    assert "warning" not in capsys.readouterr().err


def test_no_paired_section_without_a_base_run(tmp_path):
    out = tmp_path / "cmp"
    argv = ["--opts", "sam,ssamf", "--seeds", "1,", "--output", str(out), "--no_hessian"]
    for r in plan(*argv):
        write_run(r.folder, 90, 89, 0.1, 1.0, [(89, 0.5)])
    assert main(argv + ["--report_only"]) == 0
    assert "seed by seed" not in (out / "results.md").read_text()


def test_masks_plot_draws_one_bar_per_tensor_and_row(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = [{"optimizer": name, "variant": name, "group": (name, ()), "sparsity": 0.5} for name in ("ssamf", "ssamd")]
    records = [
        {"group": ("ssamf", ()), "masks": [{"name": "a", "density": 0.2}, {"name": "b", "density": 0.6}]},
        {"group": ("ssamf", ()), "masks": [{"name": "a", "density": 0.4}, {"name": "b", "density": 0.8}]},
        {"group": ("ssamd", ()), "masks": [{"name": "b", "density": 0.5}]},
    ]
    assert plots.plot_masks(None, rows, records)
    bars = figures[0].axes[0].patches
    heights = [b.get_height() for b in bars]
    assert heights[:2] == pytest.approx([0.3, 0.7]) and heights[3] == 0.5  # means over seeds
    assert math.isnan(heights[2])  # ssamd has no tensor 'a': no bar, not a dead one
    assert not [line for line in figures[0].axes[0].lines if line.get_marker() not in ("None", None, "")]


@pytest.mark.slow
def test_dry_run_into_a_closed_pipe_ends_quietly(tmp_path):
    # 400 runs print about 120 KB, more than a pipe holds: the writes after the reader is gone hit EPIPE.
    cmd = [
        sys.executable,
        "-m",
        "ssam.compare",
        "--dry_run",
        "--opts",
        "sgd",
        "--num_seeds",
        "80",
        "--sweep",
        "momentum=0.1,0.2,0.3,0.4,0.5",
        "--output",
        str(tmp_path / "cmp"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert first.startswith(b"# 400 runs: sgd x seeds 1234, 4321")
    assert b"BrokenPipe" not in err and b"Exception" not in err, err

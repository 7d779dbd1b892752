"""`ssam compare`: grid planning, recipe parsing, skip/resume logic, aggregation, report files, end to end."""

import csv
import json
import math
import os
import random
import statistics
from pathlib import Path

import pytest
import yaml

from ssam import compare
from ssam.compare import PAPER_SEEDS, action_for, load_recipe, main, mean_std, plan_runs, resolve, seed_list
from ssam.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def plan(*argv):
    return plan_runs(resolve(list(argv)))


# ------------------------------------------------------------------------------------------------ settings


def test_seed_list_counts_and_lists():
    assert seed_list(3) == [1234, 4321, 6789]
    assert seed_list("4") == list(PAPER_SEEDS)
    assert seed_list(6) == [*PAPER_SEEDS, 10001, 10002]
    assert seed_list("1,2") == [1, 2]
    assert seed_list("7,") == [7]
    assert seed_list([5, 9]) == [5, 9]
    for bad in ("0", "x", "1,a", "1,1", [], [1.5], True, -1):
        with pytest.raises(UsageError):
            seed_list(bad)


def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])))
    m, s = mean_std([3.0])
    assert m == 3.0 and math.isnan(s)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_column_rule_two_significant_digits_of_the_smallest_spread():
    from ssam.compare.numbers import column_decimals, mean_pm

    # The example: mean 0.22999, std 0.00684 printed "0.23 ± 0.01"; two significant digits of the spread.
    d = column_decimals([0.00684], default=2)
    assert d == 4 and mean_pm(0.22999, 0.00684, d) == "0.2300 ± 0.0068"
    # One column, one rule: the smallest non-zero spread decides, every cell uses it.
    d = column_decimals([0.2412, 1.7, float("nan"), 0.0, None], default=2)
    assert d == 2
    assert [mean_pm(m, s, d) for m, s in ((86.434, 0.2412), (1.716, 1.7), (80.0, float("nan")))] == [
        "86.43 ± 0.24",
        "1.72 ± 1.70",
        "80.00",  # one seed: no spread
    ]
    # Whole numbers stay whole; never more than 4 decimals; no spread at all: the metric's default.
    d = column_decimals([122.4, 151.6], default=1)
    assert d == 0 and mean_pm(1159.3, 122.4, d) == "1159 ± 122"
    assert column_decimals([1e-9], default=2) == 4
    assert column_decimals([float("nan")], default=3) == 3
    assert mean_pm(1.25, 0.5, 1, sign=True) == "+1.2 ± 0.5"
    assert mean_pm(float("nan"), 0.1, 2) == "—"


def test_grid_names_opts_and_sparsities(tmp_path):
    runs = plan(
        "--opts",
        "sgd,sam,ssamf,ssamd",
        "--seeds",
        "1,2",
        "--sparsity",
        "0.5,0.9",
        "--output",
        str(tmp_path),
        "--epochs",
        "1",
    )
    names = [r.name for r in runs]
    assert names == [
        "sgd_seed1",
        "sam_seed1",
        "ssamf_s0.5_seed1",
        "ssamf_s0.9_seed1",
        "ssamd_s0.5_seed1",
        "ssamd_s0.9_seed1",
        "sgd_seed2",
        "sam_seed2",
        "ssamf_s0.5_seed2",
        "ssamf_s0.9_seed2",
        "ssamd_s0.5_seed2",
        "ssamd_s0.9_seed2",
    ]
    by = {r.name: r for r in runs}
    assert by["ssamd_s0.9_seed2"].config["opt"] == "ssamd-sgd"
    assert by["ssamd_s0.9_seed2"].config["sparsity"] == 0.9
    assert by["ssamd_s0.9_seed2"].config["seed"] == 2
    assert by["sam_seed1"].config["opt"] == "sam-sgd"
    assert "--sparsity" not in by["sam_seed1"].flags  # SGD and SAM have no sparsity to sweep
    assert by["sgd_seed1"].folder == tmp_path / "runs" / "sgd_seed1"
    assert by["sgd_seed1"].config["output_dir"] == str(tmp_path / "runs")
    assert all(r.config["epochs"] == 1 for r in runs)


def test_adamw_base(tmp_path):
    runs = plan("--seeds", "1", "--base", "adamw", "--output", str(tmp_path))
    assert [r.config["opt"] for r in runs] == ["adamw", "sam-adamw", "ssamf-adamw", "ssamd-adamw"]
    assert compare.group_label("ssamf", 0.5, "adamw") == "SSAM-F (AdamW) s=0.5"


def test_recipe_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "compare": {"opts": ["sgd", "sam"], "seeds": [3], "jobs": 1},
                "train": {
                    "dataset": "digits",
                    "lr": 0.1,
                    "weight_decay": 1e-3,
                    "epochs": 7,
                    "quiet": True,
                    "nesterov": False,
                },
                "per_opt": {"sgd": {"weight_decay": 5e-4}},
            }
        )
    )
    runs = plan("--config", str(recipe), "--output", str(tmp_path / "o"))
    by = {r.opt: r for r in runs}
    assert by["sgd"].config["weight_decay"] == 5e-4 and by["sam"].config["weight_decay"] == 1e-3
    assert by["sgd"].config["lr"] == 0.1 and by["sgd"].config["quiet"] is True
    assert by["sgd"].config["nesterov"] is False and "--nesterov" not in by["sgd"].flags
    # The command line beats both the recipe and the per-optimizer overrides.
    runs = plan(
        "--config",
        str(recipe),
        "--output",
        str(tmp_path / "o"),
        "--weight_decay",
        "0.002",
        "--lr",
        "0.3",
        "--opts",
        "sgd",
        "--seeds",
        "2",
    )
    assert [(r.name, r.config["weight_decay"], r.config["lr"]) for r in runs] == [
        ("sgd_seed1234", 0.002, 0.3),
        ("sgd_seed4321", 0.002, 0.3),
    ]


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"compare": {"optz": "sgd"}}, "optz"),
        ({"trian": {}}, "trian"),
        ({"train": {"learning_rate": 0.1}}, "learning_rate"),
        ({"train": {"seed": 1}}, "seed"),
        ({"train": {"sparsity": 0.5}}, "sparsity"),
        ({"per_opt": {"adam": {"lr": 0.1}}}, "adam"),
        ({"per_opt": {"sgd": {"lrr": 0.1}}}, "lrr"),
        ({"per_opt": {"sgd": 3}}, "sgd"),
        ([1, 2], "mapping"),
    ],
)
def test_recipe_errors(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(UsageError, match=needle):
        load_recipe(path)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seeds", "3"], "--output"),
        (["--output", "X", "--seed", "5"], "--seeds"),
        (["--output", "X", "--opt", "sam-sgd"], "--opts"),
        (["--output", "X", "--output_dir", "Y"], "--output"),
        (["--output", "X", "--resume"], "resumes"),
        (["--output", "X", "--opts", "sgd,adam"], "adam"),
        (["--output", "X", "--sparsity", "1.0"], "sparsity"),
        (["--output", "X", "--base", "rmsprop"], "rmsprop"),
        (["--output", "X", "--jobs", "0"], "jobs"),
        (["--output", "X", "--jobs", "two"], "jobs"),
        (["--output", "X", "stray"], "stray"),
        (["--output", "X", "--lr", "-1"], "--lr"),  # rejected by the train parser before anything runs
        (["--output", "X", "--no_such_flag", "1"], "no_such_flag"),
    ],
)
def test_command_line_errors(argv, needle):
    with pytest.raises(UsageError, match=needle):
        plan(*argv)


def test_every_recipe_plans(tmp_path):
    """Each shipped recipe parses, and each of its runs passes the train command's own validation."""
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        runs = plan("--config", str(path), "--output", str(tmp_path / path.stem), "--datadir", str(tmp_path))
        assert runs, path
        declared = yaml.safe_load(path.read_text()).get("variants")
        families = {r.opt for r in runs}
        if declared:  # a recipe that declares its variants runs exactly those
            assert {r.variant for r in runs} == set(declared), path
        else:
            assert families == {"sgd", "sam", "ssamf", "ssamd"}, path


def test_paper_recipe_values(tmp_path):
    runs = plan(
        "--config",
        str(ROOT / "recipes" / "cifar100_resnet18.yaml"),
        "--output",
        str(tmp_path),
        "--datadir",
        str(tmp_path),
    )
    by = {r.opt: r.config for r in runs if r.seed == 1234}
    assert by["sgd"]["weight_decay"] == 5e-4 and by["sam"]["weight_decay"] == 1e-3
    assert by["ssamf"]["rho"] == 0.2 and by["ssamf"]["num_samples"] == 16 and by["ssamf"]["update_freq"] == 1
    assert by["ssamf"]["sparsity"] == 0.5 and by["ssamd"]["drop_rate"] == 0.5
    assert by["sgd"]["dataset"] == "CIFAR100_cutout" and by["sgd"]["epochs"] == 200 and by["sgd"]["lr"] == 0.05
    assert sorted({r.seed for r in runs}) == sorted(PAPER_SEEDS)
    sweep = plan(
        "--config",
        str(ROOT / "recipes" / "cifar10_resnet18_sparsity.yaml"),
        "--output",
        str(tmp_path),
        "--datadir",
        str(tmp_path),
        "--seeds",
        "1",
    )
    assert sorted({r.sparsity for r in sweep if r.opt == "ssamf"}) == [0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
    imagenet = {
        r.opt: r.config
        for r in plan(
            "--config",
            str(ROOT / "recipes" / "imagenet_resnet50.yaml"),
            "--output",
            str(tmp_path),
            "--datadir",
            str(tmp_path),
            "--seeds",
            "1",
        )
    }
    assert imagenet["ssamf"]["rho"] == 0.7 and imagenet["ssamf"]["num_samples"] == 128
    assert imagenet["sgd"]["weight_decay"] == 1e-4 and imagenet["sgd"]["epochs"] == 90


# ------------------------------------------------------------------------------------ synthetic run folders


def write_run(folder: Path, best, final, loss, tpe, curve=(), masks=None, hessian=None, finished=True, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for e, (acc, tl) in enumerate(curve):
            f.write(json.dumps({"epoch": e, "test_acc1": acc, "train_loss": tl}) + "\n")
        f.write('{"epoch": 9, "test_ac')  # a torn line, as left by a killed run
    if finished:
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "finished": True,
                    "best_acc1": best,
                    "final_acc1": final,
                    "final_train_loss": loss,
                    "epochs": len(curve),
                    "wall_time": tpe * max(1, len(curve)),
                    "time_per_epoch": tpe,
                }
            )
        )
    if masks is not None:
        (folder / "masks.json").write_text(json.dumps(masks))
    if hessian is not None:
        (folder / "hessian.json").write_text(json.dumps(hessian))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_report_on_synthetic_runs(tmp_path, capsys):
    rng = random.Random(0)
    out = tmp_path / "cmp"
    argv = ["--opts", "sgd,sam,ssamf", "--seeds", "3", "--sparsity", "0.5,0.9", "--output", str(out), "--epochs", "3"]
    runs = plan(*argv)
    truth = {}
    for r in runs:
        if r.name == "sam_seed6789":
            write_run(r.folder, 0, 0, 0, 0, finished=False)  # an unfinished run must not enter the means
            continue
        best, final = rng.uniform(90, 95), rng.uniform(85, 90)
        loss, tpe = rng.uniform(0.01, 0.1), rng.uniform(1, 2)
        lam, tr = rng.uniform(1, 50), rng.uniform(10, 500)
        masks = None
        if r.opt == "ssamf":
            masks = [
                {"name": f"layer{i}.weight", "shape": [3, 3], "numel": 9, "density": rng.random()} for i in range(4)
            ]
        curve = [(rng.uniform(50, 95), rng.uniform(0.05, 2)) for _ in range(3)]
        write_run(r.folder, best, final, loss, tpe, curve, masks, {"lambda_max": lam, "trace": tr, "trace_stderr": 1.0})
        truth.setdefault((r.opt, r.sparsity), []).append(
            {
                "best_acc1": best,
                "final_acc1": final,
                "final_train_loss": loss,
                "time_per_epoch": tpe,
                "lambda_max": lam,
                "trace": tr,
                "seed": r.seed,
            }
        )
    assert main(argv + ["--report_only"]) == 0
    printed = capsys.readouterr().out
    assert "SSAM-F s=0.9" in printed and "best acc1" in printed

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["SGD", "SAM", "SSAM-F s=0.5", "SSAM-F s=0.9"]
    for row in rows:
        sp = float(row["sparsity"]) if row["sparsity"] else None
        recs = truth[(row["opt"], sp)]
        assert int(row["finished"]) == len(recs) and int(row["runs"]) == 3
        assert row["seeds"] == " ".join(str(r["seed"]) for r in recs)
        for key in ("best_acc1", "final_acc1", "final_train_loss", "time_per_epoch", "lambda_max", "trace"):
            values = [r[key] for r in recs]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.mean(values), rel=1e-9)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)

    md = (out / "results.md").read_text()
    sgd = truth[("sgd", None)]
    best = [r["best_acc1"] for r in sgd]
    # The column's decimals: two significant digits of its smallest spread over the rows with 2+ seeds.
    spreads = [statistics.stdev([r["best_acc1"] for r in recs]) for recs in truth.values() if len(recs) > 1]
    d = min(4, max(0, 1 - math.floor(math.log10(min(spreads)))))
    assert f"| SGD | sgd | 3/3 | {statistics.mean(best):.{d}f} ± {statistics.stdev(best):.{d}f} |" in md
    assert "| SAM | sam-sgd | 2/3 |" in md
    assert "sam_seed6789 (missing)" in md
    with open(out / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == len(runs)
    assert {r["name"]: r["finished"] for r in per_run}["sam_seed6789"] == "False"
    for name in ("curves.png", "sparsity.png", "masks.png"):
        assert (out / name).stat().st_size > 5000, name


def test_no_sparsity_plot_for_one_sparsity_and_no_masks_plot_without_ssam(tmp_path):
    out = tmp_path / "cmp"
    argv = ["--opts", "sgd,sam", "--seeds", "1", "--output", str(out), "--no_hessian"]
    for r in plan(*argv):
        write_run(r.folder, 90, 89, 0.1, 1.0, [(80, 1.0), (89, 0.5)])
    assert main(argv + ["--report_only"]) == 0
    assert (out / "curves.png").exists()
    assert not (out / "sparsity.png").exists() and not (out / "masks.png").exists()
    md = (out / "results.md").read_text()
    assert "λ_max" not in md.split("## Runs")[0]  # --no_hessian: no Hessian columns in the summary


def test_actions_skip_resume_restart(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--opts", "sgd,sam,ssamf,ssamd", "--seeds", "1", "--output", str(out), "--epochs", "2"]
    runs = {r.opt: r for r in plan(*argv)}
    write_run(runs["sgd"].folder, 90, 89, 0.1, 1.0, [(80, 1.0), (89, 0.5)], config=runs["sgd"].config)
    runs["sam"].folder.mkdir(parents=True)
    (runs["sam"].folder / "last.pt").write_bytes(b"x")
    write_run(runs["ssamf"].folder, 0, 0, 0, 0, [], finished=False)  # logs but no checkpoint
    status = {}
    assert action_for(runs["sgd"], status, False) == "done"
    assert action_for(runs["sam"], status, False) == "resume"
    assert action_for(runs["ssamf"], status, False) == "restart"
    assert action_for(runs["ssamd"], status, False) == "new"
    assert action_for(runs["ssamd"], {runs["ssamd"].name: "diverged"}, False) == "diverged"
    assert all(action_for(r, status, True) == "new" for r in runs.values())

    assert main(argv + ["--dry_run"]) == 0
    text = capsys.readouterr().out
    assert "# sgd_seed1234: done" in text and "--output_name sgd_seed1234" not in text
    assert "--output_name sam_seed1234 --resume" in text
    assert "--output_name ssamf_seed1234 --overwrite" in text
    assert "--output_name ssamd_seed1234\n" in text


def test_finished_run_of_another_comparison_is_refused(tmp_path):
    out = tmp_path / "cmp"
    argv = ["--opts", "sgd", "--seeds", "1", "--output", str(out), "--epochs", "2"]
    (run,) = plan(*argv)
    write_run(run.folder, 90, 89, 0.1, 1.0, [(80, 1.0), (89, 0.5)], config={**run.config, "epochs": 200})
    with pytest.raises(UsageError, match="epochs: 200 -> 2"):
        action_for(run, {}, False)
    assert action_for(run, {}, True) == "new"
    (run.folder / "summary.json").unlink()
    (run.folder / "last.pt").write_bytes(b"x")  # an unfinished run of other settings must not be resumed
    with pytest.raises(UsageError, match="another comparison"):
        action_for(run, {}, False)


def test_lock_refuses_a_second_comparison(tmp_path):
    (tmp_path / ".compare.lock").write_text(str(os.getpid()))  # a live pid: ours
    with pytest.raises(UsageError, match="in use"):
        with compare.Lock(tmp_path):
            pass
    (tmp_path / ".compare.lock").write_text("999999999")  # a dead pid: a stale lock is taken over
    with compare.Lock(tmp_path):
        assert (tmp_path / ".compare.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".compare.lock").exists()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_tiny_compare(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--opts",
        "sgd,ssamf",
        "--seeds",
        "1",
        "--sparsity",
        "0.5",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--limit_train_batches",
        "2",
        "--num_samples",
        "16",
        "--hessian_samples",
        "64",
        "--output",
        str(out),
        "--jobs",
        "2",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "done   sgd_seed1234" in text and "done   ssamf_s0.5_seed1234" in text
    for name in ("sgd_seed1234", "ssamf_s0.5_seed1234"):
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["finished"] is True
        hess = json.loads((out / "runs" / name / "hessian.json").read_text())
        assert hess["examples"] == 64 and math.isfinite(hess["lambda_max"]) and hess["trace_samples"] >= 2
    masks = json.loads((out / "runs" / "ssamf_s0.5_seed1234" / "masks.json").read_text())
    assert masks and all(0 <= m["density"] <= 1 for m in masks)
    with open(out / "results.csv") as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"SGD", "SSAM-F s=0.5"}
    assert float(rows["SGD"]["best_acc1_mean"]) == pytest.approx(
        json.loads((out / "runs" / "sgd_seed1234" / "summary.json").read_text())["best_acc1"]
    )
    assert float(rows["SGD"]["lambda_max_mean"]) == pytest.approx(
        json.loads((out / "runs" / "sgd_seed1234" / "hessian.json").read_text())["lambda_max"]
    )
    for name in ("results.md", "runs.csv", "curves.png", "masks.png", "compare.yaml"):
        assert (out / name).exists(), name

    # Rerunning the same command trains nothing and reuses the cached Hessians.
    before = (out / "runs" / "sgd_seed1234" / "last.pt").stat().st_mtime_ns
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "skip   sgd_seed1234" in text and "start" not in text
    assert (out / "runs" / "sgd_seed1234" / "last.pt").stat().st_mtime_ns == before

    # A run with a checkpoint but no summary (killed after its last epoch) is resumed, not restarted.
    (out / "runs" / "sgd_seed1234" / "summary.json").unlink()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "resume sgd_seed1234" in text and "done   sgd_seed1234" in text and "skip   ssamf_s0.5" in text
    assert json.loads((out / "runs" / "sgd_seed1234" / "summary.json").read_text())["finished"] is True


@pytest.mark.slow
def test_end_to_end_failing_run_aborts(tmp_path, capsys):
    # The data folder is given (so the flags parse) but empty: the child exits 2, which aborts the grid.
    out = tmp_path / "cmp"
    argv = [
        "--opts",
        "sgd,sam",
        "--seeds",
        "1",
        "--dataset",
        "CIFAR10_base",
        "--datadir",
        str(tmp_path / "nodata"),
        "--output",
        str(out),
        "--no_hessian",
    ]
    with pytest.raises(UsageError, match="exit 2"):
        main(argv)
    text = capsys.readouterr().out
    assert "FAILED sgd_seed1234 (exit 2)" in text and "start  sam_seed1234" not in text
    assert (out / "logs" / "sgd_seed1234.log").read_text().count("error") >= 1

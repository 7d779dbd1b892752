"""scripts/results_fashion.sh without training: the sweeps reuse the grid's finished runs, archive/restore keep the
small files, bad parts and seeds are one line with exit 2. `SSAM=echo` stands in for the ssam command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results_fashion.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, *args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path / "out"), "SSAM": "echo", "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def grid_run(tmp_path, name, finished=True):
    folder = tmp_path / "out" / "fashion_cpu" / "runs" / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"finished": finished, "final_acc1": 80.0}))
    (folder / "config.yaml").write_text("label_noise: 0.4\nrho: 0.05\nseed: 1\n")
    (folder / "last.pt").write_bytes(b"checkpoint")
    return folder


@pytest.mark.slow  # bash runs Python once per folder
def test_noise_sweep_copies_the_grids_runs_of_the_seed(tmp_path):
    for seed in (1, 2):
        for opt in ("sgd", "sam"):
            grid_run(tmp_path, f"{opt}_noise0.4_seed{seed}")
            grid_run(tmp_path, f"{opt}_noise0_seed{seed}")
    grid_run(tmp_path, "sam_noise0.4_seed3", finished=False)  # unfinished: not copied
    grid_run(tmp_path, "sgd_noise0.4_seed3")
    done = run(tmp_path, "cpu-noise-rho", "1")
    assert done.returncode == 0, done.stderr
    sweep = tmp_path / "out" / "fashion_cpu_noise_rho"
    assert sorted(p.name for p in (sweep / "runs").iterdir()) == ["sam_rho0.05_seed1", "sgd_seed1"]
    assert (sweep / "runs" / "sgd_seed1" / "last.pt").read_bytes() == b"checkpoint"
    src = tmp_path / "out" / "fashion_cpu" / "runs" / "sgd_noise0.4_seed1" / "last.pt"
    assert (sweep / "runs" / "sgd_seed1" / "last.pt").stat().st_mtime_ns == src.stat().st_mtime_ns
    log = (sweep / "parts.log").read_text()
    assert "runs/sgd_seed1 copied from fashion_cpu/runs/sgd_noise0.4_seed1" in log
    assert "compare --config recipes/fashion_mnist_cpu.yaml --seeds 1, --opts sgd,sam --rho 0.02,0.05,0.1" in log
    assert "--label_noise 0.4" in log and "== exit 0" in log
    # All seeds: seed 2 joins, seed 3's unfinished SAM run does not; a copy is never made twice.
    assert run(tmp_path, "cpu-noise-rho").returncode == 0
    names = sorted(p.name for p in (sweep / "runs").iterdir())
    assert names == ["sam_rho0.05_seed1", "sam_rho0.05_seed2", "sgd_seed1", "sgd_seed2", "sgd_seed3"]
    assert (sweep / "parts.log").read_text().count("runs/sgd_seed1 copied") == 1
    # The clean sweep takes the clean runs.
    assert run(tmp_path, "cpu-rho", "2").returncode == 0
    clean = tmp_path / "out" / "fashion_cpu_rho" / "runs"
    assert sorted(p.name for p in clean.iterdir()) == ["sam_rho0.05_seed2", "sgd_seed2"]


@pytest.mark.slow  # bash runs Python once per folder
def test_archive_keeps_small_files_and_tables(tmp_path):
    grid_run(tmp_path, "sgd_noise0_seed1")
    grid_run(tmp_path, "sam_noise0_seed1", finished=False)
    folder = tmp_path / "out" / "fashion_cpu"
    (folder / "results.md").write_text("table")
    (folder / "parts.log").write_text("log")
    archive = tmp_path / "archive"
    done = run(tmp_path, "archive", ARCHIVE=str(archive))
    assert done.returncode == 0, done.stderr
    kept = archive / "fashion_cpu"
    assert (kept / "results.md").read_text() == "table" and (kept / "parts.log").read_text() == "log"
    assert (kept / "runs" / "sgd_noise0_seed1" / "summary.json").exists()
    assert not (kept / "runs" / "sgd_noise0_seed1" / "last.pt").exists()  # no checkpoints
    assert not (kept / "runs" / "sam_noise0_seed1").exists()  # unfinished


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("sweep",), "unknown part 'sweep'; allowed: cpu, cpu-rho, cpu-noise-rho"),
        (("gpu", "x1"), "give a seed"),
        (("mem-full-rho-wide", "0.3"), "mem-full-rho-wide: got rho '0.3'; allowed: 0.4 or 0.5"),
        (("mem-full-rho-ssamd",), "mem-full-rho-ssamd: got rho ''; allowed: 0.6 or 0.7"),
        (("cheap", "sideways"), "cheap: got direction 'sideways'; allowed: subbatch:0.25 or subbatch:0.125"),
        (("cheap-clean", "previous", "0.4"), "cheap-clean: got rho '0.4'; allowed: 0.15 or 0.2 or 0.25 or 0.3 or 0.35"),
        (("noise", "0.3"), "noise: got noise rate '0.3'; allowed: 0 or 0.2 or 0.6"),
        (("cnn-more", "0.2", "0.3"), "cnn-more: got rho '0.3'; allowed: 0.1 or 0.2 or 0.4"),
    ],
)
def test_bad_part_or_seed_is_one_line_exit_2(tmp_path, args, needle):
    done = run(tmp_path, *args)
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_gain_share_against_hand_computed_shares(tmp_path):
    """scripts/gain_share.py: (X - SGD) / (SAM - SGD) seed by seed, from runs.csv files of two folders."""
    import csv

    cols = ["name", "variant", "seed", "finished", "final_acc1", "passes_per_example", "sam_schedule"]
    rows = {
        "a": [("sgd", "1", "70", "1", ""), ("sgd", "2", "72", "1", ""), ("sam", "1", "80", "2", "none"),
              ("sam", "2", "82", "2", "none")],
        "b": [("sam", "1", "79", "1.5", "every:2"), ("sam", "2", "78", "1.5", "every:2")],
    }  # fmt: skip
    for folder, items in rows.items():
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / "runs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for v, seed, acc, passes, sched in items:
                w.writerow([f"{v}_{seed}", v, seed, "True", acc, passes, sched])
    script = Path(__file__).resolve().parents[1] / "scripts" / "gain_share.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "every:2" in x)
    # seed 1: (79-70)/(80-70) = 90%; seed 2: (78-72)/(82-72) = 60%; mean 75%; Δ mean +7.50
    assert "| 1.50 | +7.50 | 60% / 75% | no |" in line
    plotted = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "f.png")],
        capture_output=True,
        text=True,
    )
    assert plotted.returncode == 0 and (tmp_path / "f.png").stat().st_size > 5000
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "runs.csv not found" in missing.stderr


def test_runfolder_rules_for_scripts(tmp_path, capsys):
    """What the script asks of ssam.runfolder: which runs are finished, which files an archive keeps."""
    from ssam.runfolder import main

    done = grid_run(tmp_path, "a")
    (done / "metrics.jsonl").write_text("{}\n")
    grid_run(tmp_path, "b", finished=False)
    torn = grid_run(tmp_path, "c")
    (torn / "summary.json").write_text('{"finished": tr')  # a killed write: not finished
    missing = tmp_path / "nothing"
    assert main(["finished", str(done), str(done.parent / "b"), str(torn), str(missing)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(done)]
    assert main(["archive-files", str(done)]) == 0
    names = [Path(p).name for p in capsys.readouterr().out.splitlines()]
    assert names == ["config.yaml", "metrics.jsonl", "summary.json"]  # last.pt is not kept
    assert main(["archive"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "got 'archive'; allowed: finished DIR..." in err


def _compare_folder(root, runs):
    """A folder as ssam compare leaves it: runs.csv and, per run, config.yaml, metrics.jsonl and summary.json."""
    root.mkdir(parents=True)
    header = ["name", "variant", "seed", "finished", "final_acc1", "early_stopped_acc1", "final_noisy_memorized"]
    lines = [",".join(header)]
    for name, variant, seed, rho, val, test, finished in runs:
        lines.append(f"{name},{variant},{seed},{finished},{test},{test - 1},0.25")
        run = root / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("" if rho is None else f"rho: {rho}\n")
        metrics = [{"epoch": 0, "val_acc1": 10.0}, {"epoch": 1, "val_acc1": val}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (run / "summary.json").write_text(json.dumps({"finished": finished}))
    (root / "runs.csv").write_text("\n".join(lines) + "\n")


def test_pick_rho_chooses_by_final_validation_accuracy_not_test(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pick_rho
    finally:
        sys.path.pop(0)
    a, b = tmp_path / "a", tmp_path / "b"
    _compare_folder(
        a,
        [
            ("sgd_seed1", "sgd", 1, None, 40.0, 70.0, True),
            ("sam_seed1", "sam", 1, 0.2, 50.0, 86.0, True),
            ("sam_seed2", "sam", 2, 0.2, 52.0, 86.0, True),
            ("ssamf_seed1", "ssamf", 1, 0.2, 50.0, 80.0, True),
        ],
    )
    _compare_folder(
        b,
        [
            ("sam_seed1", "sam", 1, 0.3, 53.0, 84.0, True),  # val mean 52 > 51: chosen, though its test is lower
            ("sam_seed2", "sam", 2, 0.3, 51.0, 84.0, True),
            ("sam_seed3", "sam", 3, 0.3, 10.0, 10.0, False),  # unfinished: not counted
            ("ssamf_seed1", "ssamf", 1, 0.3, 50.0, 83.0, True),  # a tie with 0.2: the smaller rho
        ],
    )
    groups = pick_rho.collect([str(a), str(b)])
    assert set(groups) == {("sam", 0.2), ("sam", 0.3), ("ssamf", 0.2), ("ssamf", 0.3)}
    assert sorted(groups[("sam", 0.3)]) == ["1", "2"] and groups[("sam", 0.3)]["1"]["final_val_acc1"] == 53.0
    assert pick_rho.chosen(groups) == {"sam": 0.3, "ssamf": 0.2}
    assert pick_rho.main([str(a), str(b)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("| yes |")]
    assert rows == [
        "| sam | 0.3 | 2 | 52.00 | 84.00 | 83.00 | 0.250 | yes |",
        "| ssamf | 0.2 | 1 | 50.00 | 80.00 | 79.00 | 0.250 | yes |",
    ]
    assert pick_rho.main([str(tmp_path / "none")]) == 2
    assert "runs.csv not found" in capsys.readouterr().err


@pytest.mark.parametrize("args", [("restore",), ("archive",), ("mem",)])
def test_a_python_without_ssam_stops_at_once_with_exit_2(tmp_path, args):
    done = run(tmp_path, *args, PY="false")  # a "Python" that cannot import ssam
    assert done.returncode == 2 and "cannot import ssam; run `make setup` first" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_gain_share_tells_directions_apart_and_chooses_rho_on_validation(tmp_path):
    """A folder per ascent direction (the direction only in each run's config.yaml), two radii each; --choose_rho keeps
    the radius of the higher mean final validation accuracy although the other one has the higher test accuracy."""
    import csv

    def folder(name, runs):
        (tmp_path / name / "runs").mkdir(parents=True)
        with open(tmp_path / name / "runs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "variant", "seed", "finished", "final_acc1", "passes_per_example", "rho"])
            for run, variant, seed, acc, passes, rho, ascent, val in runs:
                w.writerow([run, variant, seed, "True", acc, passes, rho])
                d = tmp_path / name / "runs" / run
                d.mkdir()
                cfg = f"rho: {rho or 0.2}\nsam_ascent: {ascent}\n"
                (d / "config.yaml").write_text(cfg)
                (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_acc1": val}) + "\n")

    folder(
        "base",
        [("sgd_1", "sgd", "1", "70", "1", "", "gradient", 40), ("sam_1", "sam", "1", "80", "2", "", "gradient", 50)],
    )
    folder("prev", [("sam_rho0.1_1", "sam", "1", "79", "1", "0.1", "previous", 45),
                    ("sam_rho0.2_1", "sam", "1", "75", "1", "0.2", "previous", 48)])  # fmt: skip
    folder("mom", [("sam_rho0.1_1", "sam", "1", "74", "1", "0.1", "momentum", 44)])
    script = Path(__file__).resolve().parents[1] / "scripts" / "gain_share.py"
    args = [sys.executable, str(script), *(str(tmp_path / f) for f in ("base", "prev", "mom")), "--ref", "sam rho=0.2"]
    out = subprocess.run([*args, "--choose_rho"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    prev = [x for x in lines if "sam_ascent=previous" in x]
    assert len(prev) == 1 and "rho=0.2" in prev[0] and "| +5.00 | 50% / 50% |" in prev[0]  # (75-70)/(80-70)
    assert any("sam_ascent=momentum" in x and "| +4.00 | 40% / 40% |" in x for x in lines)
    both = subprocess.run(args, capture_output=True, text=True).stdout
    assert "rho=0.1 sam_ascent=previous" in both and "rho=0.2 sam_ascent=previous" in both  # without the choice

"""The training command end to end: real data formats, run folder, resume, DDP, divergence, safe loading."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fakedata import make_cifar10, make_imagefolder
from ssam.checkpoint import load_checkpoint
from ssam.cli import main

QUICK = ["--epochs", "2", "--quiet", "--num_workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_dir(out, name="r"):
    return Path(out) / name


def train(tmp_path, *args, name="r"):
    return main(["train", "--output_dir", str(tmp_path), "--output_name", name, *args])


def test_digits_default_run_writes_the_run_folder(tmp_path, capsys):
    assert train(tmp_path, *QUICK, "--opt", "ssamd-sgd", "--sparsity", "0.5", "--update_freq", "1") == 0
    d = run_dir(tmp_path)
    for f in ("config.yaml", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "masks.json"):
        assert (d / f).exists(), f
    recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    for key in (
        "train_loss",
        "train_acc1",
        "train_acc5",
        "test_loss",
        "test_acc1",
        "test_acc5",
        "best_acc1",
        "lr",
        "mask_density",
        "epoch_time",
        "images_per_s",
    ):
        assert key in recs[0]
    assert abs(recs[0]["mask_density"] - 0.5) < 1e-3
    assert recs[1]["best_acc1"] == max(r["test_acc1"] for r in recs)
    # cosine, per epoch, from 0.05: epoch 1 of 2 is at the half-way point
    assert recs[0]["lr"] == pytest.approx(0.05) and recs[1]["lr"] == pytest.approx(0.025)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["finished"] and summary["best_acc1"] == recs[1]["best_acc1"]
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["opt"] == "ssamd-sgd" and cfg["dataset"] == "digits"
    ck = load_checkpoint(d / "last.pt")
    assert ck["epoch"] == 2 and ck["finished"]
    masks = [v["mask"] for v in ck["optimizer"]["state"].values()]
    assert all(m.dtype == torch.bool for m in masks)
    assert "momentum_buffer" in ck["optimizer"]["state"][0]


@pytest.mark.slow
def test_paper_commands_on_tiny_real_format_cifar(tmp_path):
    make_cifar10(tmp_path / "data", n=16)
    common = [
        "--datadir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--limit_train_batches",
        "1",
        "--limit_val_batches",
        "1",
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--quiet",
    ]
    # The official README's commands (minus --wandb, which needs the package), shrunk by the limit flags.
    cmds = [
        "--model resnet18 --dataset CIFAR10_cutout --opt sgd --lr 0.05 --weight_decay 5e-4 --seed 1234",
        "--model resnet18 --dataset CIFAR10_cutout --opt ssamf-sgd --rho 0.1 --weight_decay 1e-3 --sparsity 0.5 "
        "--num_samples 16 --update_freq 1 --seed 1234",
        "--model vgg11_bn --dataset CIFAR10_base --opt sam-adamw --lr 1e-3 --rho 0.05 --seed 1",
    ]
    for i, c in enumerate(cmds):
        assert train(tmp_path / "runs", *c.split(), *common, name=f"c{i}") == 0
    rec = json.loads((tmp_path / "runs" / "c1" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["mask_density"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.slow
def test_worker_count_does_not_change_the_run(tmp_path):
    # Augmentation is drawn from (seed, epoch, index), so DataLoader workers cannot change what is trained.
    make_cifar10(tmp_path / "data", n=16)
    args = [
        "--dataset",
        "CIFAR10_cutout",
        "--datadir",
        str(tmp_path / "data"),
        "--model",
        "resnet8",
        "--epochs",
        "2",
        "--batch_size",
        "16",
        "--opt",
        "ssamf-sgd",
        "--num_samples",
        "8",
        "--update_freq",
        "1",
        "--quiet",
    ]
    for workers in ("0", "2"):
        assert train(tmp_path / "runs", *args, "--num_workers", workers, name=f"w{workers}") == 0
    a = load_checkpoint(tmp_path / "runs" / "w0" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "runs" / "w2" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_folders(tmp_path):
    make_imagefolder(tmp_path / "in")
    assert (
        train(
            tmp_path / "runs",
            "--dataset",
            "ImageNet_base",
            "--datadir",
            str(tmp_path / "in"),
            "--model",
            "cnn_small",
            "--batch_size",
            "2",
            "--epochs",
            "1",
            "--quiet",
            "--num_workers",
            "0",
            "--opt",
            "sam-sgd",
        )
        == 0
    )
    ck = load_checkpoint(tmp_path / "runs" / "r" / "last.pt")
    assert ck["model_args"]["image_size"] == 224 and ck["model_args"]["num_classes"] == 2


def test_yaml_config_and_flags_override(tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("opt: sam-sgd\nrho: 0.2\nepochs: 1\nlr: 0.1\n")
    assert train(tmp_path, "--config", str(cfgfile), "--lr", "0.03", "--quiet", "--limit_train_batches", "2") == 0
    saved = yaml.safe_load((run_dir(tmp_path) / "config.yaml").read_text())
    assert saved["opt"] == "sam-sgd" and saved["rho"] == 0.2 and saved["lr"] == 0.03


def test_saved_config_reproduces_the_run(tmp_path):
    args = ["--epochs", "1", "--quiet", "--limit_train_batches", "2", "--opt", "ssamf-sgd", "--num_samples", "8"]
    assert train(tmp_path, *args, name="a") == 0
    assert train(tmp_path, "--config", str(run_dir(tmp_path, "a") / "config.yaml"), "--output_name", "b") == 0
    wa = load_checkpoint(run_dir(tmp_path, "a") / "last.pt")["model"]
    wb = load_checkpoint(run_dir(tmp_path, "b") / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finished_run_is_refused_resumed_or_overwritten(tmp_path, capsys):
    args = ["--epochs", "1", "--quiet", "--limit_train_batches", "2"]
    assert train(tmp_path, *args) == 0
    before = (run_dir(tmp_path) / "last.pt").read_bytes()
    assert train(tmp_path, *args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run_dir(tmp_path) / "last.pt").read_bytes() == before
    assert train(tmp_path, *args, "--resume") == 0  # nothing left to do
    assert (run_dir(tmp_path) / "last.pt").read_bytes() == before
    assert train(tmp_path, *args, "--overwrite") == 0


def test_eval_only(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--quiet", "--limit_train_batches", "2") == 0
    capsys.readouterr()
    assert train(tmp_path, "--epochs", "1", "--eval_only") == 0
    out = capsys.readouterr().out
    best = json.loads((run_dir(tmp_path) / "summary.json").read_text())["best_acc1"]
    assert f"acc1 {best:.2f}" in out


def test_grad_accum_and_bf16_run(tmp_path):
    assert (
        train(
            tmp_path,
            "--opt",
            "ssamf-sgd",
            "--num_samples",
            "8",
            "--grad_accum",
            "2",
            "--amp",
            "bf16",
            "--epochs",
            "1",
            "--quiet",
            "--limit_train_batches",
            "3",
            "--freeze_bn_second_pass",
        )
        == 0
    )


def test_unsafe_checkpoint_is_rejected(tmp_path, capsys):
    d = run_dir(tmp_path)
    d.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "evil": Evil()}, d / "last.pt")
    assert train(tmp_path, "--resume", "--epochs", "1", "--quiet") == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_checkpoint_from_another_model_names_both(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--quiet", "--limit_train_batches", "1", "--model", "cnn_small") == 0
    rc = train(tmp_path, "--epochs", "2", "--quiet", "--resume", "--model", "resnet8")
    assert rc == 2
    err = capsys.readouterr().err
    assert "cnn_small" in err and "resnet8" in err


def test_truncated_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--quiet", "--limit_train_batches", "1") == 0
    p = run_dir(tmp_path) / "last.pt"
    p.write_bytes(p.read_bytes()[:2000])
    assert train(tmp_path, "--epochs", "2", "--quiet", "--resume") == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_divergence_stops_with_exit_3_and_keeps_last_good_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "2", "--quiet", "--limit_train_batches", "2", "--opt", "sam-sgd") == 0
    # Poison the saved weights as a bad update would, keeping the file a valid checkpoint of epoch 1.
    p = run_dir(tmp_path) / "last.pt"
    ck = torch.load(p, weights_only=True)
    first = next(iter(ck["model"]))
    ck["model"][first].fill_(float("nan"))
    ck["epoch"], ck["finished"] = 1, False
    torch.save(ck, p)
    (run_dir(tmp_path) / "summary.json").unlink()
    before = p.read_bytes()
    assert (
        train(tmp_path, "--epochs", "2", "--quiet", "--limit_train_batches", "2", "--opt", "sam-sgd", "--resume") == 3
    )
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 1" in err
    assert p.read_bytes() == before


# ------------------------------------------------------------------------------------------ kill and resume
# Resume is tested in process: a run dies between two checkpoints, then a fresh Trainer (new model, optimizer and
# loaders) loads last.pt and trains the steps left; it must end where an uninterrupted run ends, bit for bit. One
# test further down does the same with a real SIGKILL and fresh interpreters (slow).
STEPS = 4  # per epoch (--limit_train_batches); two epochs, checkpoints every 2 steps and at each epoch's end
RESUME_ARGS = [
    *("--epochs", "2", "--limit_train_batches", str(STEPS), "--save_every_steps", "2"),
    *("--batch_size", "16", "--limit_val_batches", "1", "--num_workers", "0", "--quiet"),
]
SAM_ARGS = ["--rho", "0.1"]
SPARSE_ARGS = ["--sparsity", "0.5", "--num_samples", "16", "--update_freq", "1"]
# Where a run dies: (checkpoints written before it dies, the (epoch, step) that the last of them holds). Each run
# dies as it is about to write the next one, i.e. two steps after the last (and, mid-epoch, after the epoch's
# evaluation and metrics line too, which the resumed run must forget and redo).
KILL_POINTS = {"mid-epoch": (1, (0, 2)), "epoch-end": (2, (1, 0))}
# Every optimizer with its default (element) mask, then each structured granularity, killed mid-epoch (so that the
# resumed run uses the checkpoint's mask, then refreshes it at the next epoch from restored state: SSAM-D's
# drop-and-grow generator, the step count); two of them killed at an epoch's end as well.
RESUME_CASES = [
    ("sgd", (), "mid-epoch"),
    ("sam-sgd", (), "mid-epoch"),
    ("ssamf-sgd", (), "mid-epoch"),
    ("ssamd-sgd", (), "mid-epoch"),
    ("ssamf-sgd", ("--granularity", "channel"), "mid-epoch"),
    ("ssamf-sgd", ("--granularity", "tensor", "--skip_dead", "--cost_aware"), "mid-epoch"),
    ("ssamd-sgd", ("--granularity", "tensor", "--skip_dead"), "mid-epoch"),
    ("ssamd-sgd", ("--granularity", "2:4"), "mid-epoch"),
    ("ssamf-sgd", ("--granularity", "tensor", "--skip_dead", "--cost_aware"), "epoch-end"),
    ("ssamd-sgd", ("--granularity", "2:4"), "epoch-end"),
    # The ascent directions (a stored direction, a sub-batch) and the trajectory losses (SAF's table of logits,
    # MESA's teacher), killed mid-epoch: each state must come back from last.pt.
    ("sam-sgd", ("--sam_ascent", "previous"), "mid-epoch"),
    ("sam-sgd", ("--sam_ascent", "subbatch:0.5"), "mid-epoch"),
    ("ssamd-sgd", ("--sam_ascent", "momentum"), "mid-epoch"),
    ("sgd", ("--saf", "0.3", "--kl_start", "1", "--saf_lag", "1"), "mid-epoch"),
    ("sgd", ("--mesa", "0.8", "--kl_start", "0"), "mid-epoch"),
]
TIMING = {"elapsed", "epoch_time", "images_per_s", "wall_time", "time_per_epoch"}


def _resume_args(opt, flags):
    extra = (SAM_ARGS if opt != "sgd" else []) + (SPARSE_ARGS if opt.startswith("ssam") else [])
    return ["--opt", opt, *RESUME_ARGS, *extra, *flags]


class _Killed(BaseException):
    """SIGKILL in process: not an Exception, so the CLI's error handling lets it through and nothing is cleaned up."""


@pytest.fixture
def trainer_probe(monkeypatch):
    """Counts the steps the Trainer takes; ``probe(die_after=n)`` makes it die as it is about to make the (n+1)th
    checkpoint: last.pt is then the nth, and the steps since it are lost."""
    # The digits loader imports scikit-learn, whose first import draws from Python's global `random` (rich.style);
    # in the test process the first run would draw it after seeding and no later run would. Import it beforehand,
    # as the checkpoints compare every RNG state.
    import sklearn.datasets  # noqa: F401

    from ssam.train.loop import Trainer

    probe = {"steps": 0, "checkpoints": 0, "die_after": None}
    step, checkpoint = Trainer.train_step, Trainer.checkpoint

    def counted_step(self, *args, **kwargs):
        probe["steps"] += 1
        return step(self, *args, **kwargs)

    def mortal_checkpoint(self, *args, **kwargs):
        if probe["checkpoints"] == probe["die_after"]:
            raise _Killed
        probe["checkpoints"] += 1
        return checkpoint(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", counted_step)
    monkeypatch.setattr(Trainer, "checkpoint", mortal_checkpoint)

    def reset(die_after=None):
        probe.update(steps=0, checkpoints=0, die_after=die_after)
        return probe

    return reset


def assert_same(a, b, where="", skip=frozenset()):
    """Nested dicts / lists / tensors / numbers equal bit for bit (NaN equal to NaN), but for the keys in skip."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(set(a) ^ set(b), key=str))
        for k in a:
            if k not in skip:
                assert_same(a[k], b[k], f"{where}/{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", skip)
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def assert_same_run(want: Path, got: Path, global_torch_rng=True):
    """The final checkpoint (weights, optimizer state with masks, schedule, counters, RNG states) and every metrics
    record are the uninterrupted run's; only timings and the saved command line (--resume) differ."""
    a, b = load_checkpoint(want / "last.pt"), load_checkpoint(got / "last.pt")
    if not global_torch_rng:
        del a["rng"]["torch"], b["rng"]["torch"]
    assert_same(a, b, skip=TIMING | {"config"})
    records = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (want, got)]
    assert [r["epoch"] for r in records[1]] == [0, 1]
    assert_same(records[0], records[1], skip=TIMING)


def _kill_and_resume(out, args, trainer_probe, kill):
    """Train in ``out`` until the kill point, check where last.pt stands, resume, check the steps taken."""
    die_after, (epoch, step) = KILL_POINTS[kill]
    probe = trainer_probe(die_after)
    with pytest.raises(_Killed):
        train(out, *args)
    done = epoch * STEPS + step
    assert probe["steps"] == done + 2  # two steps taken after the last checkpoint: lost
    ck = load_checkpoint(out / "r" / "last.pt")
    assert (ck["epoch"], ck["step"], ck["finished"]) == (epoch, step, False)
    probe = trainer_probe()
    assert train(out, *args, "--resume") == 0
    assert probe["steps"] == 2 * STEPS - done  # continued from last.pt, not from the start


@pytest.mark.parametrize("opt,flags,kill", RESUME_CASES, ids=[" ".join((o, *f, k)) for o, f, k in RESUME_CASES])
def test_resume_after_a_kill_between_checkpoints_is_bit_identical(
    tmp_path, one_thread, trainer_probe, opt, flags, kill
):
    args = _resume_args(opt, flags)
    probe = trainer_probe()
    assert train(tmp_path / "ref", *args) == 0
    assert probe["steps"] == 2 * STEPS  # the probe sees every step
    _kill_and_resume(tmp_path / "killed", args, trainer_probe, kill)
    assert_same_run(tmp_path / "ref" / "r", tmp_path / "killed" / "r")


def test_mid_epoch_resume_restores_the_global_torch_rng_stream(tmp_path, one_thread, trainer_probe):
    args = _resume_args("sgd", ())
    assert train(tmp_path / "ref", *args) == 0
    _kill_and_resume(tmp_path / "killed", args, trainer_probe, "mid-epoch")
    assert_same_run(tmp_path / "ref" / "r", tmp_path / "killed" / "r")


def _cmd(out, opt, extra=()):
    return [
        sys.executable,
        "-m",
        "ssam.cli",
        "train",
        "--output_dir",
        str(out),
        "--output_name",
        "r",
        "--opt",
        opt,
        "--epochs",
        "3",
        "--limit_train_batches",
        "8",
        "--save_every_steps",
        "2",
        "--sparsity",
        "0.5",
        "--num_samples",
        "16",
        "--update_freq",
        "1",
        "--quiet",
        "--deterministic",
        "--rho",
        "0.1",
        *extra,
    ]


STEP_LINE = re.compile(r"^\s*epoch (\d+) step (\d+)/(\d+) ", re.M)


def _sigkill_at_line(cmd, line, log, timeout=180):
    """Start ``cmd``, read its output until a line starts with ``line``, and SIGKILL it the moment that line is read.

    The kill is certain to land mid-run when the line is printed well before the end: here (--log_freq 1, no --quiet)
    it is a step line with more than ten steps, two evaluations and their checkpoints still to go, while the kill is
    sent within the time this process takes to wake up and read the line. A run that ends any other way fails the
    test; its stderr is in ``log``."""
    pattern = re.compile(rb"^" + re.escape(line.encode()), re.M)
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while not pattern.search(seen):
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:  # the run closed its output or the deadline passed
                break
            seen += chunk
    finally:
        proc.kill()  # SIGKILL: at once when the line was read, and on every other way out
        proc.wait(timeout=60)
        proc.stdout.close()
    out = seen.decode(errors="replace")
    why = f"{out}\n{Path(log).read_text(errors='replace')[-2000:]}"
    assert pattern.search(seen), f"the run never printed {line!r}:\n{why}"
    assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before the kill landed:\n{why}"
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    """A real SIGKILL at a known step, in a fresh interpreter, then --resume in another: the atomic checkpoint file
    and the restored state (masks, SSAM-D's generator, RNG, loss sums) give the uninterrupted run's end exactly."""
    steps = 8
    args = [
        "--opt",
        "ssamd-sgd",
        "--sparsity",
        "0.5",
        "--rho",
        "0.1",
        "--epochs",
        "2",
        "--limit_train_batches",
        str(steps),
        "--batch_size",
        "16",
        "--save_every_steps",
        "1",
        "--log_freq",
        "1",
        "--deterministic",
        "--num_workers",
        "0",
    ]

    def cli(out, *extra):
        return [
            sys.executable,
            "-m",
            "ssam.cli",
            "train",
            "--output_dir",
            str(out),
            "--output_name",
            "r",
            *args,
            *extra,
        ]

    ref = subprocess.run(cli(tmp_path / "ref"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert len(STEP_LINE.findall(ref.stdout)) == 2 * steps  # the step lines the kill waits for are printed

    killed = tmp_path / "killed"
    out = _sigkill_at_line(cli(killed), f"  epoch 1 step 3/{steps} ", tmp_path / "killed.err")
    ck = load_checkpoint(killed / "r" / "last.pt")  # the save after step 3 may or may not have been reached
    done = ck["epoch"] * steps + ck["step"]
    assert not ck["finished"] and 2 <= done < 2 * steps, (ck["epoch"], ck["step"], out)

    resumed = subprocess.run(cli(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ran = [(int(e), int(s)) for e, s, _ in STEP_LINE.findall(resumed.stdout)]
    assert len(ran) == 2 * steps - done and ran[0] == (ck["epoch"] + 1, ck["step"] + 1), ran  # resumed, not restarted
    assert_same_run(tmp_path / "ref" / "r", killed / "r")


@pytest.mark.slow
def test_sigterm_finishes_the_step_and_says_how_to_resume(tmp_path):
    cmd = _cmd(tmp_path, "ssamd-sgd")
    cmd[cmd.index("--epochs") + 1] = "50"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "r" / "last.pt"
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    ck = load_checkpoint(last)
    assert not ck["finished"]


def _torchrun(out, name, opt, extra=(), restarts=0):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "-m",
        "ssam.cli",
        "train",
        "--output_dir",
        str(out),
        "--output_name",
        name,
        "--opt",
        opt,
        "--epochs",
        "2",
        "--limit_train_batches",
        "4",
        "--sparsity",
        "0.5",
        "--num_samples",
        "16",
        "--update_freq",
        "1",
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_ddp_two_gloo_ranks_agree_on_masks_and_weights(tmp_path):
    # SSAM-D with local first passes: the rank-death test below. With --skip_dead, dead tensors take no gradient
    # in the first pass, which DDP's reducer would wait for: the trainer runs that pass under no_sync.
    skip = ["--granularity", "tensor", "--sparsity", "0.9", "--skip_dead"]
    for name, extra in (("ssamf", []), ("ssamf_skip", skip)):
        r = subprocess.run(
            _torchrun(tmp_path, name, "ssamf-sgd", extra), env=ENV, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["ranks_agree"] is True
        # only rank 0 writes: one log line per epoch, not two
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_ddp_rank_death_stops_the_job_and_max_restarts_resumes(tmp_path):
    extra = ["--save_every_steps", "1", "--deterministic", "--sam_first_pass", "local"]
    ref = subprocess.run(
        _torchrun(tmp_path, "ref", "ssamd-sgd", extra), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert json.loads((tmp_path / "ref" / "summary.json").read_text())["ranks_agree"] is True
    proc = subprocess.Popen(
        _torchrun(tmp_path, "faulty", "ssamd-sgd", extra, restarts=1),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = tmp_path / "faulty" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; the agent must stop the other, then restart both
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "faulty" / "summary.json").read_text())
    assert summary["finished"] and summary["ranks_agree"]
    want = load_checkpoint(tmp_path / "ref" / "last.pt")["model"]
    got = load_checkpoint(last)["model"]
    for k in want:
        assert torch.equal(want[k], got[k]), k


def _mask_worker(rank, world, port, queue):
    import torch.distributed as dist

    from ssam import SSAMD
    from ssam.train.distributed import check_masks_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 5)
    opt = SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, seed=rank)  # ranks disagree on purpose
    try:
        check_masks_agree(opt, world, epoch=7)
        queue.put((rank, "agreed"))
    except RuntimeError as e:
        queue.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mask_mismatch_across_ranks_is_a_clear_error():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_mask_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all("masks differ across ranks after the update at epoch 7" in msg for msg in results.values()), results


# ------------------------------------------------------------------------------------------ flags and friction
def test_eps_reaches_adamw_under_every_wrapper():
    from ssam.train.builders import build_optimizer
    from ssam.train.config import parse_args

    model = torch.nn.Linear(4, 3)
    for opt in ("adamw", "sam-adamw", "ssamf-adamw", "ssamd-adamw"):
        built = build_optimizer(parse_args(["--opt", opt, "--eps", "1e-6", "--betas", "0.8", "0.99"]), model)
        adamw = getattr(built, "base_optimizer", built)
        assert isinstance(adamw, torch.optim.AdamW), opt
        assert adamw.param_groups[0]["eps"] == 1e-6 and adamw.param_groups[0]["betas"] == (0.8, 0.99), opt


def test_cli_keeps_the_paper_codes_ssam_defaults():
    from ssam.train.builders import build_optimizer
    from ssam.train.config import parse_args

    cfg = parse_args(["--opt", "ssamf-sgd"])
    assert (cfg.sparsity, cfg.update_freq, cfg.num_samples) == (0.2, 5, 1024)
    opt = build_optimizer(cfg, torch.nn.Linear(10, 10))
    assert (opt.sparsity, opt.update_freq, opt.num_samples) == (0.2, 5, 1024)
    assert opt.num_live == int(110 * 0.8)


def test_run_names_differ_for_every_setting_that_shapes_the_run():
    from ssam.train.config import parse_args

    def name(*flags):
        return parse_args(["--opt", "ssamf-sgd", *flags]).output_name

    base = name()
    shaping = [
        ["--freeze_bn_second_pass"],
        ["--nesterov"],
        ["--momentum", "0.5"],
        ["--lr_scheduler", "MultiStepLRscheduler"],
        ["--eta_min", "0.001"],
        ["--renormalize"],
        ["--label_noise", "0.2"],
        ["--granularity", "tensor"],
        ["--skip_dead"],
        ["--weight_decay", "0.001"],
        ["--batch_size", "32"],
    ]
    names = [name(*f) for f in shaping]
    assert len(set(names + [base])) == len(shaping) + 1, names
    # Not part of the identity: the epoch count (so that an extension finds its run) and how a run is watched.
    assert name("--epochs", "300") == name("--quiet", "--num_workers", "2", "--log_freq", "5") == base
    # Settings the optimizer does not use leave the name alone.
    assert parse_args(["--opt", "sgd", "--rho", "0.3"]).output_name == parse_args(["--opt", "sgd"]).output_name
    assert base.startswith("digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.2_seed1234_")


def test_extension_finds_its_run_and_changed_flags_are_refused_or_logged(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path), "--quiet", "--limit_train_batches", "2", "--opt", "sam-sgd"]
    assert main(["train", *out, "--epochs", "1"]) == 0
    (folder,) = list(tmp_path.iterdir())
    assert main(["train", *out, "--epochs", "2", "--resume"]) == 0  # same folder, one more epoch
    assert list(tmp_path.iterdir()) == [folder]
    assert [json.loads(ln)["epoch"] for ln in (folder / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert "resumed with changed flags: --epochs 1 -> 2" in (folder / "log.txt").read_text()

    named = [*out, "--output_name", folder.name]
    before = (folder / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *named, "--epochs", "3", "--resume", "--momentum", "0.5", "--nesterov"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--momentum 0.9 -> 0.5, --nesterov False -> True" in err, err
    assert (folder / "last.pt").read_bytes() == before
    assert main(["train", *named, "--epochs", "3", "--resume", "--momentum", "0.5", "--allow_changed_flags"]) == 0
    assert "resumed with changed flags: --momentum 0.9 -> 0.5, --epochs 2 -> 3" in (folder / "log.txt").read_text()
    assert yaml.safe_load((folder / "config.yaml").read_text())["momentum"] == 0.5


def test_quiet_keeps_epoch_lines_and_plain_sam_prints_no_mask(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--quiet", "--limit_train_batches", "2", "--opt", "sam-sgd") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 1 and "mask" not in lines[0]
    assert (
        train(
            tmp_path,
            "--epochs",
            "1",
            "--quiet",
            "--limit_train_batches",
            "2",
            "--opt",
            "ssamf-sgd",
            "--num_samples",
            "8",
            "--sparsity",
            "0.5",
            name="f",
        )
        == 0
    )
    assert "| mask 0.500 |" in capsys.readouterr().out


def test_help_names_every_flag_and_no_default_none(capsys):
    from ssam.train.config import build_parser

    parser = build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--lr LR" in text and "(default: 0.05)" in text


def test_docs_flags_md_is_generated_from_the_parser():
    from ssam.train.config import flags_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text()
    assert doc[doc.index("## ") :].rstrip() == flags_markdown().rstrip(), (
        "docs/flags.md is stale: regenerate the tables with ssam.train.config.flags_markdown()"
    )


def test_label_noise_is_recorded_and_changes_the_training_labels(tmp_path):
    args = ["--epochs", "1", "--quiet", "--limit_train_batches", "1"]
    assert train(tmp_path, *args, "--label_noise", "0.25", name="n") == 0
    d = run_dir(tmp_path, "n")
    assert yaml.safe_load((d / "config.yaml").read_text())["label_noise"] == 0.25
    assert "training labels replaced" in (d / "log.txt").read_text()


def test_granularity_flags_build_the_optimizer_they_name():
    from ssam.train.builders import build_optimizer
    from ssam.train.config import parse_args

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = build_optimizer(parse_args(["--opt", "ssamd-sgd", "--granularity", "channel", "--cost_aware"]), model)
    assert (opt.granularity, opt.cost_aware, opt.sparsity) == ("channel", True, 0.2)
    cfg = parse_args(["--opt", "ssamf-sgd", "--granularity", "2:4"])
    assert cfg.sparsity == 0.5  # implied by N:M, not the CLI's 0.2
    assert build_optimizer(cfg, model).granularity == "2:4"


def test_granularity_and_skip_dead_reach_the_optimizer(tmp_path):
    args = [
        "--epochs",
        "1",
        "--quiet",
        "--limit_train_batches",
        "2",
        "--opt",
        "ssamf-sgd",
        "--num_samples",
        "8",
        "--granularity",
        "tensor",
        "--sparsity",
        "0.9",
        "--skip_dead",
    ]
    assert train(tmp_path, *args) == 0
    d = run_dir(tmp_path)
    assert yaml.safe_load((d / "config.yaml").read_text())["granularity"] == "tensor"
    rec = json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
    masks = load_checkpoint(d / "last.pt")["optimizer"]["state"]
    per_tensor = [bool(v["mask"].all()) or not bool(v["mask"].any()) for v in masks.values()]
    assert all(per_tensor)  # whole tensors live or dead
    live = sum(int(v["mask"].sum()) for v in masks.values())
    total = sum(v["mask"].numel() for v in masks.values())
    assert rec["mask_density"] == pytest.approx(live / total) and live <= int(total * 0.1)


def _skip_dead_setup():
    """Linear-ReLU-Linear whose first layer has no live mask entry, and two ranks' batches."""
    from ssam import SSAMF

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.5, sparsity=0.6)
    n = sum(p.numel() for p in model.parameters())
    opt.set_flat_mask(torch.arange(n) >= n - opt.num_live)  # the last entries live: w1 and b1 are dead
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    return model, opt, batches


def _skip_dead_steps(net, model, opt, batches, **kw):
    from ssam.train.step import train_step

    first_grad_absent = []
    for _ in range(2):
        train_step(
            net,
            opt,
            batches,
            model=model,
            skip_dead=True,
            grads_to_none=False,
            after_first_backward=lambda: first_grad_absent.append(model[0].weight.grad is None),
            **kw,
        )
    # numpy, not tensors: a tensor put on a queue is shared through a file the exiting worker may remove first
    return first_grad_absent, [p.detach().numpy().copy() for p in model.parameters()]


def _skip_dead_worker(rank, world, port, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ssam.train.distributed import all_reduce_mean

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, opt, batches = _skip_dead_setup()
        ddp = DistributedDataParallel(model)  # no find_unused_parameters, as in the trainer
        queue.put(
            (
                rank,
                _skip_dead_steps(
                    ddp, model, opt, [batches[rank]], no_sync=ddp.no_sync, reduce_first_grads=all_reduce_mean
                ),
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_skip_dead_under_ddp_averages_the_first_pass_itself():
    """Two gloo ranks with --skip_dead take the step that one process takes on both ranks' examples at once."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_skip_dead_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    model, opt, batches = _skip_dead_setup()
    whole = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    absent, want = _skip_dead_steps(model, model, opt, [whole])
    assert absent == [True, True]
    for rank, (absent, got) in results.items():
        assert absent == [True, True], rank  # the dead layer took no gradient in the first pass
        for w, g in zip(want, got):
            torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(w), rtol=1e-5, atol=1e-6)


def test_epoch_time_counts_the_whole_epoch_across_mid_epoch_saves(tmp_path, one_thread, monkeypatch):
    """metrics.jsonl's epoch_time and images_per_s are of the epoch's steps, not of those since the last
    mid-epoch save (a clock that advances one second per training step makes it exact)."""
    import time as time_module

    from ssam.train.loop import Trainer

    clock = {"now": 1000.0}
    step = Trainer.train_step

    def timed_step(self, *args, **kwargs):
        clock["now"] += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(time_module, "time", lambda: clock["now"])
    assert train(tmp_path, "--opt", "sgd", *RESUME_ARGS) == 0  # 4 steps an epoch, a save every 2 steps
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch_time"] for r in records] == [float(STEPS)] * 2
    assert [r["images_per_s"] for r in records] == [16.0] * 2  # a batch of 16 a second


def test_a_train_yaml_typo_gets_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sam_shedule: every:2\n")
    assert main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sam_shedule' (did you mean 'sam_schedule'?)" in err and not (tmp_path / "o").exists()


def test_a_flag_left_unset_is_shown_as_unset_not_none():
    from ssam.train.identity import changed_flags

    base = {"opt": "sam-sgd", "rho": 0.05, "lr_scheduler": "CosineLRscheduler", "warmup_epoch": 0}
    lines = changed_flags({**base, "sam_micro_batch": None}, {**base, "sam_micro_batch": 8})
    assert lines == ["--sam_micro_batch (unset) -> 8"]


@pytest.mark.slow
def test_training_goes_on_when_the_reader_of_stdout_goes_away(tmp_path):
    """`ssam train ... | head -1`: the pipe closes after the first line; the run still finishes (exit 0)."""
    cmd = [sys.executable, "-m", "ssam.cli", "train", *QUICK, "--opt", "sgd", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    proc.stdout.readline()
    proc.stdout.close()  # the reader is gone
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    summaries = list(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["finished"] is True


@pytest.mark.slow
@pytest.mark.parametrize("ascent", ["previous", "subbatch:0.5", "msam"])
def test_ddp_two_gloo_ranks_agree_with_each_ascent_direction(tmp_path, ascent):
    """A stored direction is the averaged gradient (or the base's momentum) of every rank, and a sub-batch's gradient
    is all-reduced like pass one's: the ranks end with the same weights and masks, bit for bit."""
    r = subprocess.run(
        _torchrun(tmp_path, "r", "ssamd-sgd", ["--sam_ascent", ascent]), env=ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ranks_agree"] is True and summary["train_loss_pass"] == "two (at w + e)"

"""Run identity: the names of runs stay stable across versions, one rule decides what --resume refuses and what
``ssam compare`` counts as done, and the optimizer registry is the one list of families."""

import pytest
import yaml

from ssam.cli import main
from ssam.train.config import parse_args

# Names computed by the version that wrote the archived results (docs/results/data): they must keep resolving.
PINNED = [
    ([], "digits_cnn_small_sgd_lr0.05_seed1234_b05e2d0c"),
    (["--opt", "sam-sgd"], "digits_cnn_small_sam-sgd_lr0.05_rho0.05_seed1234_20fc2d2a"),
    (["--opt", "ssamf-sgd", "--sparsity", "0.5"], "digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.5_seed1234_46fe3027"),
    (["--opt", "ssamd-adamw", "--rho", "0.1"], "digits_cnn_small_ssamd-adamw_lr0.05_rho0.1_sp0.2_seed1234_824581a0"),
    (
        ["--dataset", "FashionMNIST", "--model", "cnn_small", "--epochs", "15", "--opt", "sam-sgd"]
        + ["--label_noise", "0.4", "--gpu_data"],
        "FashionMNIST_cnn_small_sam-sgd_lr0.05_rho0.05_noise0.4_seed1234_51b239a8",
    ),
    (
        ["--opt", "ssamf-sgd", "--granularity", "tensor", "--sparsity", "0.9", "--cost_aware", "--skip_dead"],
        "digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.9-tensor_seed1234_e1d2defd",
    ),
    (["--opt", "sgd", "--rho", "0.2", "--amp", "bf16"], "digits_cnn_small_sgd_lr0.05_seed1234_483d79b1"),
    # The hash of an N:M run is unchanged; only the colon of its readable part became "of".
    (
        ["--opt", "ssamf-sgd", "--granularity", "2:4"],
        "digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.5-2of4_seed1234_aa5677a3",
    ),
]


@pytest.mark.parametrize("flags,name", PINNED)
def test_run_names_are_stable(flags, name):
    assert parse_args([*flags, "--output_dir", "/nonexistent"]).output_name == name


def test_spellings_of_one_optimizer_are_one_run():
    names = {parse_args(["--opt", o, "--output_dir", "/x"]).output_name for o in ("ssamf", "SSAMF-SGD", "ssamf-sgd")}
    assert len(names) == 1
    # Threads change the speed, not the run.
    assert parse_args(["--threads", "1"]).output_name == parse_args([]).output_name


def _train(out, name, *flags):
    return main(["train", "--output_dir", str(out), "--output_name", name, "--quiet", *flags])


def test_resume_finds_a_run_named_by_an_older_version(tmp_path, one_thread, capsys):
    common = ["--output_dir", str(tmp_path), "--epochs", "1", "--limit_train_batches", "1", "--quiet"]
    new = parse_args(["--opt", "ssamf-sgd", "--granularity", "2:4", *common]).output_name
    old = new.replace("2of4", "2:4")
    assert main(["train", "--opt", "ssamf-sgd", "--granularity", "2:4", *common, "--output_name", old]) == 0
    capsys.readouterr()
    assert main(["train", "--opt", "ssamf-sgd", "--granularity", "2:4", *common, "--epochs", "2", "--resume"]) == 0
    assert not (tmp_path / new).exists() and "epoch   2/2" in (tmp_path / old / "log.txt").read_text()


def test_resume_of_an_old_default_model_run(tmp_path, fashion_files, one_thread, capsys):
    """FashionMNIST's default model became cnn_small; a run made with the old default (resnet18) still resumes."""
    flags = ["--dataset", "FashionMNIST", "--datadir", str(fashion_files), "--limit_train_batches", "1"]
    flags += ["--output_dir", str(tmp_path), "--quiet", "--batch_size", "8"]
    old = parse_args([*flags, "--model", "resnet18", "--epochs", "1"]).output_name
    assert main(["train", *flags, "--model", "resnet18", "--epochs", "1", "--output_name", old]) == 0
    cfg = parse_args([*flags, "--epochs", "2", "--resume"])
    assert cfg.output_name == old and cfg.model == "resnet18"
    assert "trained with --model resnet18" in capsys.readouterr().err
    assert parse_args([*flags, "--epochs", "2"]).model == "cnn_small"  # a new run takes the new default


@pytest.fixture
def fashion_files(tmp_path):
    from fakedata import make_idx

    make_idx(tmp_path / "fm", n_train=16, n_test=8)
    return tmp_path / "fm"


def test_compare_and_resume_refuse_the_same_changed_flag(tmp_path, one_thread, capsys):
    """The bug: compare counted a finished run made with another --amp (or grad_accum, ...) as done."""
    from ssam.compare.plan import action_for
    from ssam.errors import UsageError
    from test_compare import plan

    argv = ["--opts", "sgd", "--seeds", "1,", "--output", str(tmp_path / "c"), "--epochs", "1"]
    argv += ["--limit_train_batches", "1"]
    (run,) = plan(*argv)
    assert main(["train", *run.flags, "--quiet", "--grad_accum", "2"]) == 0
    for key, had, wanted in (("grad_accum", 2, 1),):
        with pytest.raises(UsageError, match=f"{key}: {had} -> {wanted}"):
            action_for(run, {}, overwrite=False)
        capsys.readouterr()
        assert main(["train", *run.flags, "--quiet", "--resume"]) == 2
        assert f"--{key} {had} -> {wanted}" in capsys.readouterr().err
    # The epoch count: a comparison fixes it, a resume may extend it.
    cfg = yaml.safe_load((run.folder / "config.yaml").read_text())
    cfg["grad_accum"] = 1
    cfg["epochs"] = 3
    (run.folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match="epochs: 3 -> 1"):
        action_for(run, {}, overwrite=False)


def test_registry_is_the_one_list_of_families():
    from ssam.compare.recipe import FLAG_FAMILIES, LABELS, OPTS, SPARSE_OPTS
    from ssam.optim import SAM, SSAMD, SSAMF
    from ssam.optim.factory import WRAPPERS, create_optimizer
    from ssam.optim.registry import WRAPPERS as INFO
    from ssam.optim.registry import applies

    assert OPTS == ("sgd", "sam", "ssamf", "ssamd") and SPARSE_OPTS == ("ssamf", "ssamd")
    assert WRAPPERS == {"sam": SAM, "ssamf": SSAMF, "ssamd": SSAMD} and LABELS["ssamd"] == "SSAM-D"
    assert INFO["ssamf"].mask_refresh == "before_epoch" and INFO["ssamd"].mask_refresh == "first_backward"
    assert FLAG_FAMILIES["rho"] == ("sam", "ssamf", "ssamd") and FLAG_FAMILIES["num_samples"] == ("ssamf",)
    assert not applies("momentum", "sam", "adamw") and applies("lr", None)
    # A bare wrapper name builds it over SGD (the documented default of create_optimizer and the CLI).
    import torch

    opt = create_optimizer(torch.nn.Linear(2, 2), "ssamf", lr=0.1)
    assert isinstance(opt, SSAMF) and isinstance(opt.base_optimizer, torch.optim.SGD)


def test_timm_model_on_the_command_line(tmp_path, one_thread, capsys):
    pytest.importorskip("timm")
    assert _train(tmp_path, "t", "--model", "timm:resnet10t", "--epochs", "1", "--limit_train_batches", "1") == 0
    capsys.readouterr()
    assert _train(tmp_path, "u", "--model", "timm:") == 2
    err = capsys.readouterr().err
    assert "unknown --model 'timm:'" in err and "did you mean" not in err and "timm:NAME" in err
    assert "timm-resnet10t" in parse_args(["--model", "timm:resnet10t"]).output_name


def test_progress_line_at_least_every_interval_off_a_terminal(tmp_path, one_thread, capsys, monkeypatch):
    import ssam.train.report as report

    monkeypatch.setattr(report, "PROGRESS_EVERY_S", 0.0)
    assert main(["train", "--output_dir", str(tmp_path), "--epochs", "1", "--limit_train_batches", "3"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  epoch 1 step")]
    assert len(lines) == 3  # --log_freq 200 would print none

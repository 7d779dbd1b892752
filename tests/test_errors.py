"""Every row of docs/errors.md: one line on stderr, exit code 2, nothing written."""

import re
import shlex
from pathlib import Path

import pytest

from fakedata import IDX_SETUPS, make_cifar10, make_imagefolder
from ssam.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| (\d+) \| (.+?) \| (.+?) \| `(.+?)` \| `(.+?)` \|$")
CASES = [m.groups() for m in map(ROW.match, DOC.read_text().splitlines()) if m]


def _setup(kind, tmp):
    data = tmp / "data"
    if kind == "empty_dir":
        data.mkdir()
    elif kind == "partial_cifar":
        make_cifar10(data)
        (data / "cifar-10-batches-py" / "data_batch_3").unlink()
    elif kind == "corrupt_cifar":
        make_cifar10(data)
        (data / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02not a pickle at all")
    elif kind == "empty_imagefolder":
        (data / "train" / "cat").mkdir(parents=True)
        (data / "val" / "cat").mkdir(parents=True)
    elif kind == "mismatched_imagefolder":
        make_imagefolder(data, train_classes=("cat", "dog"), val_classes=("cat", "bird"))
    elif kind == "truncated_ckpt":
        assert (
            main(
                [
                    "train",
                    "--output_dir",
                    str(tmp / "src"),
                    "--output_name",
                    "r",
                    "--epochs",
                    "1",
                    "--quiet",
                    "--limit_train_batches",
                    "1",
                ]
            )
            == 0
        )
        (tmp / "bad.pt").write_bytes((tmp / "src" / "r" / "last.pt").read_bytes()[:1500])
    elif kind == "yaml_unknown":
        (tmp / "c.yaml").write_text("learning_rate: 0.1\n")
    elif kind == "yaml_type":
        (tmp / "c.yaml").write_text("epochs: ten\n")
    elif kind == "finished_run":
        assert (
            main(
                [
                    "train",
                    "--output_dir",
                    str(tmp / "out"),
                    "--output_name",
                    "r",
                    "--epochs",
                    "1",
                    "--quiet",
                    "--limit_train_batches",
                    "1",
                ]
            )
            == 0
        )
    elif kind in IDX_SETUPS:  # broken MNIST / Fashion-MNIST folders, one per row
        IDX_SETUPS[kind](data)
    else:
        assert kind == "-", kind


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def test_catalogue_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("num,case,setup,flags,expect", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input(num, case, setup, flags, expect, tmp_path, capsys):
    _setup(setup, tmp_path)
    out = tmp_path / "out"
    before = _snapshot(out)
    capsys.readouterr()
    args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(flags)]
    rc = main(["train", "--output_dir", str(out), "--output_name", "r", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expect.replace("{tmp}", str(tmp_path)) in err
    assert _snapshot(out) == before  # nothing written, nothing overwritten


def test_sparsity_with_dense_optimizer_warns_and_trains(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--output_dir",
            str(tmp_path),
            "--output_name",
            "r",
            "--opt",
            "sam-sgd",
            "--sparsity",
            "0.5",
            "--epochs",
            "1",
            "--quiet",
            "--limit_train_batches",
            "1",
        ]
    )
    assert rc == 0
    assert "--sparsity 0.5 has no effect with --opt sam-sgd" in capsys.readouterr().err


def test_debug_shows_the_traceback(capsys):
    assert main(["train", "--model", "nope", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_wandb_missing_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    rc = main(["train", "--output_dir", str(tmp_path), "--output_name", "r", "--wandb", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith(
        "needs the wandb package: pip install 'sparse-sam[wandb]' (from a clone: pip install -e '.[wandb]')"
    )
    assert not (tmp_path / "r" / "last.pt").exists()

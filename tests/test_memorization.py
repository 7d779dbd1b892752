"""The memorization regime: training subsets, validation split, memorization measures, the MLP, pass counts, and
the comparison's tables and plots for them."""

import json
import re

import numpy as np
import pytest
import torch

from fakedata import make_idx
from ssam.cli import main
from ssam.data import GPULoader, build_datasets, build_training_data
from ssam.train.cost import pass_cost
from ssam.train.memorization import memorization

QUICK = ["--quiet", "--num_workers", "0"]


@pytest.fixture
def fashion(tmp_path):
    """Fake Fashion-MNIST in the real IDX format: 200 training images of 28 x 28, 10 classes."""
    folder = tmp_path / "fmnist"
    arrays = make_idx(folder, n_train=200, n_test=30, seed=3)
    return folder, arrays


def _ids(ds):
    """Each example as its raw bytes (image and label), for set comparisons across loaders."""
    return [bytes(np.asarray(ds.data[i]).tobytes()) for i in range(len(ds))]


# ------------------------------------------------------------------------------------------ subsets
def test_subset_is_fixed_by_the_seed_and_noise_falls_inside_it(fashion):
    folder, arrays = fashion
    images = [bytes(a.tobytes()) for a in arrays["train_images"]]
    a = build_training_data("FashionMNIST", str(folder), augment=False, train_subset=50, label_noise=0.4, seed=1)
    b = build_training_data("FashionMNIST", str(folder), augment=False, train_subset=50, label_noise=0.4, seed=1)
    c = build_training_data("FashionMNIST", str(folder), augment=False, train_subset=50, label_noise=0.4, seed=2)
    assert _ids(a.train) == _ids(b.train) and torch.equal(a.train.targets, b.train.targets)
    assert set(_ids(a.train)) != set(_ids(c.train))
    assert len(a.train) == 50 and len(set(_ids(a.train))) == 50
    # Every chosen example is a training image with its own true label kept as clean_targets.
    for i, key in enumerate(_ids(a.train)):
        j = images.index(key)
        assert a.train.clean_targets[i] == arrays["train_labels"][j]
    # Noise inside the subset: exactly 40% of its 50 labels changed, each to another class.
    changed = np.flatnonzero(a.train.targets.numpy() != a.train.clean_targets)
    assert len(changed) == 20 and list(changed) == list(a.train.noisy_indices)
    # The subset does not depend on the noise: same examples with and without it.
    clean = build_training_data("FashionMNIST", str(folder), augment=False, train_subset=50, seed=1)
    assert _ids(clean.train) == _ids(a.train)


def test_validation_split_is_held_out_with_its_noisy_labels(fashion):
    folder, _ = fashion
    full = build_training_data("FashionMNIST", str(folder), augment=True, train_subset=80, label_noise=0.5, seed=4)
    d = build_training_data(
        "FashionMNIST", str(folder), augment=True, train_subset=80, label_noise=0.5, val_split=20, seed=4
    )
    assert len(d.train) == 60 and len(d.val) == 20 and len(d.train_plain) == 60
    pairs = dict(zip(_ids(full.train), full.train.targets.tolist()))
    # Disjoint, together the subset, each with the (noisy) label it had before the split.
    assert set(_ids(d.train)).isdisjoint(_ids(d.val)) and set(_ids(d.train)) | set(_ids(d.val)) == set(pairs)
    for ds in (d.train, d.val, d.train_plain):
        assert [pairs[k] for k in _ids(ds)] == ds.targets.tolist()
    # The plain copy is the training examples in the same order, without augmentation.
    assert _ids(d.train_plain) == _ids(d.train) and d.train_plain.augmentation is None and d.train.augmentation
    assert sorted(d.train_plain.noisy_indices) == sorted(
        np.flatnonzero(d.train.targets.numpy() != d.train.clean_targets)
    )


def test_the_same_examples_through_both_loaders(fashion):
    folder, _ = fashion
    d = build_training_data("FashionMNIST", str(folder), augment=False, train_subset=64, label_noise=0.3, seed=5)
    loader = GPULoader.from_dataset(d.train, 16, augment=True, shuffle=True, seed=5)
    batches = list(loader)  # one epoch
    seen = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    direct = torch.stack([d.train[i][0] for i in range(len(d.train))]), d.train.targets
    order = lambda xs: sorted(range(len(xs)), key=lambda i: xs[i].numpy().tobytes())  # noqa: E731
    a, b = order(seen[0]), order(direct[0])
    assert torch.allclose(seen[0][a], direct[0][b], atol=1e-6)
    assert torch.equal(seen[1][a], direct[1][b])


def test_augment_none_gives_the_test_transform(fashion):
    folder, _ = fashion
    train, test, _ = build_datasets("FashionMNIST", str(folder), augment=False)
    aug, _, _ = build_datasets("FashionMNIST", str(folder), augment=True)
    # The test transform of a training image: scaled, normalised, no shift or flip, the same on every call.
    x = train.data[7].float().div(255)
    want = (x - torch.tensor(test.mean).view(-1, 1, 1)) / torch.tensor(test.std).view(-1, 1, 1)
    torch.manual_seed(0)
    assert all(torch.allclose(train[7][0], want) for _ in range(5))
    assert train.augmentation is None and aug.augmentation == {"padding": 4, "flip": True, "cutout": 0}


# ------------------------------------------------------------------------------------------ measures
def test_memorization_fractions_against_a_hand_count():
    clean = [0, 1, 2, 3, 4, 5, 6, 7]
    noisy = [0, 9, 2, 8, 4, 7, 6, 1]  # examples 1, 3, 5, 7 corrupted
    pred = [0, 9, 2, 3, 1, 2, 6, 1]
    # corrupted: 1 -> fit (9), 3 -> true (3), 5 -> neither (2), 7 -> fit (1): 2/4 fit, 1/4 true
    # clean ones 0, 2, 4, 6: right, right, wrong (1 vs 4), right -> 75%
    m = memorization(torch.tensor(pred), torch.tensor(noisy), np.array(clean), [1, 3, 5, 7])
    assert m == {"noisy_memorized": 0.5, "noisy_true": 0.25, "clean_train_acc": 75.0}
    with pytest.raises(ValueError, match="predictions"):
        memorization([0, 1], [0], [0], [])


def test_pass_cost_of_a_skipping_first_pass():
    params = [torch.zeros(100), torch.zeros(10), torch.zeros(50), torch.zeros(5)]
    assert pass_cost(params, [True] * 4) == pytest.approx(1.0)
    # By hand: full = 1 + (10+50+5)/165 + 1; live = the last two: forward 1, input grads of tensors after the first
    # live one (5), weight grads of the live ones (55).
    full = 1 + 65 / 165 + 1
    assert pass_cost(params, [False, False, True, True]) == pytest.approx((1 + 5 / 165 + 55 / 165) / full)
    # A live tensor at the bottom makes backward run through everything above it.
    assert pass_cost(params, [False, True, False, False]) == pytest.approx((1 + 55 / 165 + 10 / 165) / full)


# ------------------------------------------------------------------------------------------ training
def _train(tmp_path, name, *flags):
    args = ["train", "--dataset", "digits", "--model", "mlp", "--mlp_width", "24", "--augment", "none"]
    return main([*args, "--output_dir", str(tmp_path), "--output_name", name, *QUICK, *flags])


def _records(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_early_stopped_accuracy_is_the_test_accuracy_at_the_best_validation_epoch(tmp_path, one_thread):
    flags = ["--train_subset", "400", "--val_split", "100", "--label_noise", "0.4", "--epochs", "6", "--lr", "0.2"]
    assert _train(tmp_path, "r", *flags, "--gpu_data") == 0
    folder = tmp_path / "r"
    recs = _records(folder)
    summary = json.loads((folder / "summary.json").read_text())
    vals = [r["val_acc1"] for r in recs]
    best = vals.index(max(vals))  # the first epoch of the best validation accuracy
    assert summary["best_val_epoch"] == best and summary["best_val_acc1"] == max(vals)
    assert summary["early_stopped_acc1"] == recs[best]["test_acc1"]
    for r in recs:
        assert 0 <= r["noisy_memorized"] <= 1 and 0 <= r["noisy_true"] <= 1
        assert r["noisy_memorized"] + r["noisy_true"] <= 1 + 1e-12
    assert summary["passes_per_example"] == 1.0 and summary["final_noisy_memorized"] == recs[-1]["noisy_memorized"]
    # The per-example loader trains on the same examples (its own shuffling stream): the same noisy examples,
    # so the first epoch's memorization is measured over the same set.
    assert _train(tmp_path, "dl", *flags) == 0
    log = (tmp_path / "dl" / "log.txt").read_text()
    assert "160 training labels replaced" in log and "160 training labels replaced" in (folder / "log.txt").read_text()


def test_mlp_width_round_trips_through_the_checkpoint(tmp_path, one_thread):
    from ssam.checkpoint import load_checkpoint, model_from_checkpoint

    assert _train(tmp_path, "w", "--epochs", "1", "--opt", "sam-sgd", "--limit_train_batches", "3") == 0
    ckpt = load_checkpoint(tmp_path / "w" / "last.pt")
    assert ckpt["model_args"]["width"] == 24
    model = model_from_checkpoint(ckpt, "last.pt")
    assert model.fc1.out_features == 24 and model.fc1.in_features == 64
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["passes_per_example"] == 2.0
    out = tmp_path / "sharp"
    assert (
        main(
            [
                "sharpness",
                "--checkpoint",
                str(tmp_path / "w"),
                "--output",
                str(out),
                "--quiet",
                "--num_samples",
                "64",
                "--n_directions",
                "2",
                "--max_iter",
                "5",
                "--trace_max_iter",
                "4",
            ]
        )
        == 0
    )


def test_new_flags_shape_the_run(tmp_path, one_thread, capsys):
    assert _train(tmp_path, "s", "--epochs", "1", "--train_subset", "300", "--limit_train_batches", "2") == 0
    capsys.readouterr()
    assert _train(tmp_path, "s", "--epochs", "1", "--train_subset", "301", "--resume") == 2
    assert "--train_subset 300 -> 301" in capsys.readouterr().err


def test_compare_refuses_a_finished_run_with_another_subset(tmp_path):
    from ssam.compare.plan import action_for
    from ssam.errors import UsageError
    from test_compare import plan, write_run

    argv = ["--opts", "sgd", "--seeds", "1,", "--output", str(tmp_path / "c"), "--train_subset", "100"]
    (run,) = plan(*argv)
    write_run(run.folder, 90, 89, 0.1, 1.0, [(80, 1.0)])
    (run.folder / "config.yaml").write_text("train_subset: 200\n")
    with pytest.raises(UsageError, match="train_subset: 200 -> 100"):
        action_for(run, {}, overwrite=False)


# ------------------------------------------------------------------------------------------ report
def test_tables_and_plots_carry_every_optimizer(tmp_path, monkeypatch):
    from ssam.compare import frontier
    from test_compare import plan, write_run

    out = tmp_path / "cmp"
    argv = ["--opts", "sgd,sam,ssamf", "--seeds", "1,2", "--output", str(out), "--no_hessian"]
    rng = np.random.default_rng(0)
    for r in plan(*argv):
        write_run(r.folder, 80, 70 + rng.uniform(0, 5), 0.1, 1.0, [(60, 1.0), (70, 0.5)])
        summary = json.loads((r.folder / "summary.json").read_text())
        summary.update(early_stopped_acc1=75.0 + r.seed, passes_per_example=1.0 if r.opt == "sgd" else 2.0)
        summary.update(final_noisy_memorized=0.5, wall_time=10.0)
        (r.folder / "summary.json").write_text(json.dumps(summary))
        lines = [json.dumps({"epoch": e, "test_acc1": 60 + e, "noisy_memorized": 0.1 * e}) for e in range(3)]
        (r.folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    labels = {}
    for name in ("plot_memorization", "plot_cost"):
        real = getattr(frontier, name)

        def spy(*a, _real=real, _name=name):
            drawn = _real(*a)
            labels[_name] = drawn
            return drawn

        monkeypatch.setattr(frontier, name, spy)
    assert main(["compare", *argv, "--report_only"]) == 0
    assert labels["plot_memorization"] == labels["plot_cost"] == ["SGD", "SAM", "SSAM-F"]
    for png in ("memorization.png", "cost.png"):
        assert (out / png).stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "early-stopped acc1 (%)" in md and "wrong labels fit" in md and "passes/example" in md
    # Early-stopped: 76 and 77 for every optimizer, so every paired difference is exactly zero.
    section = md.split("seed by seed")[1]
    assert "Δ early-stopped acc1 (points)" in section
    assert re.search(r"\| SAM \| 2 \| [^|]+ \| [^|]+ \| \+0\.00 ± 0\.00 \| [0-2] of 2 \|", section)

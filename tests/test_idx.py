"""MNIST / Fashion-MNIST from IDX files, and label noise: tested on small files written here (plain and gzip)."""

import gzip

import numpy as np
import pytest
import torch

from fakedata import IDX_SETUPS, IDX_STEMS, idx_file, make_cifar10, make_idx, make_imagefolder
from ssam.data import DATASETS, DataInfo, GPULoader, apply_label_noise, build_datasets, mnist, noise_count, noisy_labels
from ssam.data.idx import IMAGES_MAGIC, LABELS_MAGIC, idx_bytes, parse_idx, read_idx
from ssam.errors import UsageError
from ssam.models import build_model


def _error(name, datadir):
    with pytest.raises(UsageError) as info:
        build_datasets(name, None if datadir is None else str(datadir))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_plain_and_gzip(tmp_path, gz):
    written = make_idx(tmp_path, gz=gz)
    train, test, info = build_datasets("FashionMNIST", str(tmp_path), augment=False)
    assert train.data.shape == (40, 1, 28, 28) and train.data.dtype == torch.uint8
    np.testing.assert_array_equal(train.data[:, 0].numpy(), written["train_images"])
    np.testing.assert_array_equal(test.data[:, 0].numpy(), written["test_images"])
    assert train.targets.dtype == torch.int64 and train.targets.tolist() == written["train_labels"].tolist()
    assert test.targets.tolist() == written["test_labels"].tolist()
    # Normalised with the mean / std of the training pixels, computed independently here in float64.
    pixels = torch.from_numpy(written["train_images"]).double() / 255
    mean, std = pixels.mean().item(), pixels.std(unbiased=False).item()
    assert info == DataInfo(10, 1, 28, info.mean, info.std)
    assert info.mean[0] == pytest.approx(mean, abs=1e-12) and info.std[0] == pytest.approx(std, abs=1e-12)
    x, y = test[5]
    expected = (torch.from_numpy(written["test_images"][5]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=0)
    assert y == int(written["test_labels"][5])


@pytest.mark.parametrize("name,sub", [("FashionMNIST", "FashionMNIST/raw"), ("MNIST", "MNIST/raw"), ("MNIST", "MNIST")])
def test_torchvision_layout_is_found(tmp_path, name, sub):
    written = make_idx(tmp_path / sub, gz=True, seed=3)
    train, _, _ = build_datasets(name, str(tmp_path))
    np.testing.assert_array_equal(train.data[:, 0].numpy(), written["train_images"])


def test_plain_file_wins_over_gzip_next_to_it(tmp_path):
    make_idx(tmp_path, gz=True, seed=1)
    plain = make_idx(tmp_path, gz=False, seed=2)  # torchvision keeps both after extracting
    train, _, _ = build_datasets("MNIST", str(tmp_path))
    np.testing.assert_array_equal(train.data[:, 0].numpy(), plain["train_images"])


def test_parse_idx_matches_an_independent_writer(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    raw = idx_file(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", IMAGES_MAGIC), arr)
    assert idx_bytes(arr) == raw  # ssam's writer and the hand-written one agree byte for byte
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr[0, 0]), LABELS_MAGIC, "x", "fix"), arr[0, 0])


@pytest.mark.parametrize(
    "setup,expect",
    [
        ("idx_bad_magic", "magic number 0x00000801, expected 0x00000803"),
        ("idx_short_file", "the header says 12 x 28 x 28 (9424 bytes with the header) but the file holds 9324 bytes"),
        ("idx_count_mismatch", "holds 40 images but"),
        ("idx_label_10", "has label 10 at index 7; allowed: 0-9"),
        ("idx_truncated_gzip", "is truncated: the gzip stream ends early"),
        ("idx_missing_file", "is incomplete: missing t10k-labels-idx1-ubyte"),
    ],
)
def test_malformed_files_are_one_line(tmp_path, setup, expect):
    IDX_SETUPS[setup](tmp_path)
    msg = _error("FashionMNIST", tmp_path)
    assert expect in msg and "dataset-fashion-mnist" in msg


def test_not_gzip_and_tiny_files(tmp_path):
    make_idx(tmp_path)
    (tmp_path / IDX_STEMS["train_labels"]).unlink()
    (tmp_path / (IDX_STEMS["train_labels"] + ".gz")).write_bytes(b"plain bytes, not gzip")
    assert "is not a valid gzip file" in _error("MNIST", tmp_path)
    (tmp_path / (IDX_STEMS["train_labels"] + ".gz")).write_bytes(gzip.compress(b"\x00\x00"))
    assert "shorter than the 8-byte header" in _error("MNIST", tmp_path)
    idx_file(tmp_path / IDX_STEMS["test_images"], np.zeros((12, 20, 20), np.uint8))
    (tmp_path / (IDX_STEMS["train_labels"] + ".gz")).unlink()
    idx_file(tmp_path / IDX_STEMS["train_labels"], np.zeros(40, np.uint8))
    assert "holds 20 x 20 images; expected 28 x 28" in _error("MNIST", tmp_path)


def test_missing_folders_say_how_to_get_the_files(tmp_path, monkeypatch):
    assert "not found under" in _error("FashionMNIST", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "FashionMNIST/raw" in _error("FashionMNIST", tmp_path / "empty")
    monkeypatch.setitem(mnist.DEFAULT_DIRS, "FashionMNIST", str(tmp_path / "empty"))
    msg = _error("FashionMNIST", None)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    assert "pass --datadir" in _error("MNIST", None)
    make_idx(tmp_path / "empty")  # the default folder, once filled, is used without a data folder
    assert len(build_datasets("FashionMNIST", None)[0]) == 40
    assert not DATASETS["FashionMNIST"].needs_datadir and DATASETS["MNIST"].needs_datadir


# ---------------------------------------------------------------- augmentation and models


def _crops(img, mean, std, pad, flips):
    padded = torch.nn.functional.pad(img.float() / 255, (pad,) * 4)
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + 28, dx : dx + 28]
            for flip in flips:
                out[(dy, dx, flip)] = ((crop.flip(-1) if flip else crop) - mean) / std
    return out


@pytest.mark.parametrize("name,flips", [("FashionMNIST", (False, True)), ("MNIST", (False,))])
def test_augmentation_is_a_4_pixel_crop_with_flips_only_for_clothes(tmp_path, name, flips):
    make_idx(tmp_path)
    train, test, info = build_datasets(name, str(tmp_path))
    assert train.augmentation == {"padding": 4, "flip": name == "FashionMNIST", "cutout": 0}
    assert test.augmentation is None
    # Compare against every crop AND every mirrored crop: MNIST outputs must never be a mirrored one.
    ref = _crops(train.data[3], info.mean[0], info.std[0], 4, (False, True))
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        x, _ = train[3]
        hits = {k for k, r in ref.items() if torch.allclose(x, r, atol=1e-6)}
        assert hits
        seen |= hits
    assert {f for *_, f in seen} == set(flips)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_gpu_loader_replays_the_augmentation(tmp_path):
    make_idx(tmp_path, gz=True)
    train, test, _ = build_datasets("FashionMNIST", str(tmp_path))
    aug = GPULoader.from_dataset(train, 8)
    assert (aug.padding, aug.flip, aug.cutout) == (4, True, 0) and next(iter(aug))[0].shape == (8, 1, 28, 28)
    plain = GPULoader.from_dataset(test, 5, shuffle=False)
    xb, yb = next(iter(plain))
    torch.testing.assert_close(xb, torch.stack([test[i][0] for i in range(5)]), atol=1e-5, rtol=0)
    assert yb.tolist() == [test[i][1] for i in range(5)]


@pytest.mark.parametrize("model", ["resnet18", "cnn_small"])
def test_models_take_one_channel_28x28(tmp_path, model, one_thread):
    make_idx(tmp_path)
    train, _, info = build_datasets("FashionMNIST", str(tmp_path))
    net = build_model(model, info.num_classes, info.in_channels, info.image_size)
    out = net(torch.stack([train[i][0] for i in range(3)]))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("gz,extra", [(False, []), (True, ["--gpu_data", "--device", "cpu"])])
def test_train_cli_runs_a_few_steps(tmp_path, gz, extra, one_thread):
    from ssam.cli import main

    make_idx(tmp_path / "data", n_train=64, n_test=20, gz=gz)
    rc = main(
        [
            "train",
            "--dataset",
            "FashionMNIST",
            "--datadir",
            str(tmp_path / "data"),
            "--model",
            "cnn_small",
            "--opt",
            "sam-sgd",
            "--epochs",
            "1",
            "--batch_size",
            "16",
            "--num_workers",
            "0",
            "--quiet",
            "--output_dir",
            str(tmp_path / "out"),
            "--output_name",
            "r",
            *extra,
        ]
    )
    assert rc == 0
    assert (tmp_path / "out" / "r" / "last.pt").is_file()


# ---------------------------------------------------------------- label noise


@pytest.mark.parametrize(
    "p,n,k",
    [
        (0.15, 10, 2),
        (0.25, 10, 3),
        (0.05, 10, 1),
        (0.1, 7, 1),
        (0.4, 60000, 24000),
        (0.0, 9, 0),
        (0.3, 1, 0),
        (0.999, 3, 3),
    ],
)
def test_noise_count_is_p_times_n_rounded_half_up(p, n, k):
    assert noise_count(p, n) == k


def test_noisy_labels_exact_count_other_class_and_fixed_by_seed():
    labels = np.arange(1000) % 7
    new, changed = noisy_labels(labels, 7, 0.3, seed=5)
    assert len(changed) == 300 and len(set(changed.tolist())) == 300
    diff = np.flatnonzero(new != labels)
    np.testing.assert_array_equal(diff, changed)  # exactly the listed ones changed, each to another class
    again, _ = noisy_labels(labels, 7, 0.3, seed=5)
    np.testing.assert_array_equal(new, again)
    other, other_changed = noisy_labels(labels, 7, 0.3, seed=6)
    assert not np.array_equal(changed, other_changed)
    # Nested: for one seed the 10% set lies inside the 30% set, with the same wrong labels.
    low, low_changed = noisy_labels(labels, 7, 0.1, seed=5)
    assert set(low_changed.tolist()) <= set(changed.tolist())
    np.testing.assert_array_equal(low[low_changed], new[low_changed])
    # The global RNGs are untouched.
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    noisy_labels(labels, 7, 0.3, seed=5)
    assert torch.equal(state, torch.get_rng_state()) and np.array_equal(np_state, np.random.get_state()[1])


def test_noisy_labels_are_uniform_over_the_other_classes():
    labels = np.zeros(40000, dtype=np.int64)
    new, changed = noisy_labels(labels, 5, 0.5, seed=0)
    counts = np.bincount(new[changed], minlength=5)
    assert counts[0] == 0
    # 20000 draws over 4 classes: 5000 each, standard deviation ~61; 6 sigma is far beyond chance.
    assert np.all(np.abs(counts[1:] - 5000) < 370), counts
    # and the chosen examples are spread over the whole set, not a block
    assert np.abs(np.mean(changed) - 20000) < 500


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.2", True])
def test_bad_rates_are_value_errors(p):
    with pytest.raises(ValueError, match="label noise p: got"):
        noisy_labels(np.zeros(4, dtype=np.int64), 10, p, 0)


def test_bad_labels_or_classes_are_value_errors():
    with pytest.raises(ValueError, match="allowed: 0..9"):
        noisy_labels(np.array([0, 10]), 10, 0.5, 0)
    with pytest.raises(ValueError, match="num_classes: got 1"):
        noisy_labels(np.array([0, 0]), 1, 0.5, 0)


def test_apply_label_noise_on_every_kind_of_data_set(tmp_path):
    make_idx(tmp_path / "idx", n_train=50)
    make_cifar10(tmp_path / "cifar")
    make_imagefolder(tmp_path / "folder", train_classes=("cat", "dog", "emu"), val_classes=("cat", "dog", "emu"))
    sets = {"FashionMNIST": "idx", "CIFAR10_base": "cifar", "ImageNet_base": "folder", "digits": None}
    for name, sub in sets.items():
        train, test, _ = build_datasets(name, None if sub is None else str(tmp_path / sub))
        n = len(train)
        clean = [train[i][1] for i in range(n)]
        test_before = [test[i][1] for i in range(len(test))]
        kind = type(train.targets)
        assert apply_label_noise(train, 0.4, seed=11) is train
        after = [train[i][1] for i in range(n)]  # what a DataLoader will see
        changed = [i for i in range(n) if after[i] != clean[i]]
        assert len(changed) == noise_count(0.4, n), name
        assert changed == train.noisy_indices.tolist() and list(train.clean_targets) == clean
        assert type(train.targets) is kind and [int(t) for t in train.targets] == after
        assert [test[i][1] for i in range(len(test))] == test_before
        with pytest.raises(ValueError, match="already carry noise"):
            apply_label_noise(train, 0.4, seed=11)
    # Same seed, same corrupted set, whichever optimizer the run uses: rebuilding gives the same labels.
    a = apply_label_noise(build_datasets("digits", None)[0], 0.4, 3)
    b = apply_label_noise(build_datasets("digits", None)[0], 0.4, 3)
    assert torch.equal(a.targets, b.targets)


def test_apply_label_noise_feeds_the_gpu_loader():
    train = apply_label_noise(build_datasets("digits", None)[0], 0.5, 0)
    loader = GPULoader.from_dataset(train, 2000, shuffle=False, augment=False)
    assert torch.equal(next(iter(loader))[1], train.targets)


@pytest.mark.parametrize("setup", ["idx_truncated_gzip", "idx_missing_file"])
def test_bad_files_through_the_command_line_have_no_stray_flag_prefix(tmp_path, capsys, setup):
    from ssam.cli import main

    IDX_SETUPS[setup](tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--dataset", "FashionMNIST", "--datadir", str(tmp_path), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssam train: error: ") and "--'" not in err and "--FashionMNIST" not in err
    assert len(err.splitlines()) == 1 and not out.exists()

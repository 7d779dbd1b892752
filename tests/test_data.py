import os
import pickle

import numpy as np
import pytest
import torch

from fakedata import C10_FILES, N_PER_BATCH, _dump, _png, make_cifar10, make_cifar100, make_imagefolder
from ssam.data import CIFAR_MEAN, CIFAR_STD, DATASETS, Cutout, DataInfo, GPULoader, build_datasets, cutout
from ssam.data.digits import split_indices
from ssam.data.transforms import cutout_box
from ssam.errors import UsageError


def closed_form(chw_uint8):
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    return (torch.from_numpy(chw_uint8).float() / 255 - mean) / std


# ---------------------------------------------------------------- CIFAR


def test_cifar10_round_trip_and_order(tmp_path):
    written = make_cifar10(tmp_path)
    train, test, info = build_datasets("CIFAR10_base", str(tmp_path))
    assert info == DataInfo(10, 3, 32, CIFAR_MEAN, CIFAR_STD)
    assert len(train) == 5 * N_PER_BATCH and len(test) == N_PER_BATCH
    assert train.data.shape == (50, 32, 32, 3) and train.data.dtype == np.uint8
    # Batch 3, image 7, red/green/blue at row 5, column 9 must land at HWC [27, 5, 9, :].
    imgs, labels = written["data_batch_3"]
    assert list(train.data[27, 5, 9]) == [imgs[7, 0, 5, 9], imgs[7, 1, 5, 9], imgs[7, 2, 5, 9]]
    assert int(train.targets[27]) == labels[7]
    expected = np.concatenate([written[f][0] for f in C10_FILES[:5]]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(train.data, expected)
    np.testing.assert_array_equal(test.data, written["test_batch"][0].transpose(0, 2, 3, 1))


def test_cifar10_accepts_the_batches_folder_itself(tmp_path):
    make_cifar10(tmp_path)
    train, test, _ = build_datasets("CIFAR10_base", str(tmp_path / "cifar-10-batches-py"))
    assert len(train) == 50 and len(test) == 10


def test_cifar_test_transform_is_closed_form_normalisation(tmp_path):
    written = make_cifar10(tmp_path)
    _, test, _ = build_datasets("CIFAR10_base", str(tmp_path))
    x, y = test[4]
    assert isinstance(y, int) and y == written["test_batch"][1][4]
    torch.testing.assert_close(x, closed_form(written["test_batch"][0][4]), atol=1e-5, rtol=0)


def test_augment_false_gives_train_set_with_test_transform(tmp_path):
    written = make_cifar10(tmp_path)
    train, _, _ = build_datasets("CIFAR10_cutout", str(tmp_path), augment=False)
    x, _ = train[12]
    torch.testing.assert_close(x, closed_form(written["data_batch_2"][0][2]), atol=1e-5, rtol=0)
    assert train.augmentation is None


def test_cifar_train_transform_is_a_shift_or_flip_of_the_image(tmp_path):
    written = make_cifar10(tmp_path)
    train, _, _ = build_datasets("CIFAR10_base", str(tmp_path))
    ref = closed_form(written["data_batch_1"][0][0])
    pad_value = closed_form(np.zeros((3, 1, 1), np.uint8))
    padded = pad_value.expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = ref
    candidates = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    candidates += [c.flip(2) for c in candidates]
    torch.manual_seed(0)
    for _ in range(5):
        x, _ = train[0]
        assert x.shape == (3, 32, 32)
        assert any(torch.allclose(x, c, atol=1e-5) for c in candidates)


def test_cifar100_uses_fine_labels(tmp_path):
    written = make_cifar100(tmp_path)
    train, test, info = build_datasets("CIFAR100_cutout", str(tmp_path))
    assert info.num_classes == 100 and train.num_classes == 100
    assert list(train.targets) == written["train"][1]
    assert list(test.targets) == written["test"][1]
    assert train[3][0].shape == (3, 32, 32)
    assert train.augmentation["cutout"] == 16


def test_dataset_pickles_for_workers(tmp_path):
    make_cifar10(tmp_path)
    _, test, _ = build_datasets("CIFAR10_cutout", str(tmp_path))
    clone = pickle.loads(pickle.dumps(test))
    torch.testing.assert_close(clone[3][0], test[3][0])
    train, _, _ = build_datasets("CIFAR10_cutout", str(tmp_path))
    assert len(pickle.loads(pickle.dumps(train))) == 50


def _usage_error(*args, **kw):
    with pytest.raises(UsageError) as e:
        build_datasets(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_cifar_missing_datadir_argument():
    msg = _usage_error("CIFAR10_base", None)
    assert "cifar-10-batches-py" in msg


def test_cifar_nonexistent_folder(tmp_path):
    where = str(tmp_path / "nope")
    msg = _usage_error("CIFAR10_base", where)
    assert where in msg and "cifar-10-batches-py" in msg and "--download" in msg


def test_cifar_empty_folder(tmp_path):
    msg = _usage_error("CIFAR100_base", str(tmp_path))
    assert str(tmp_path) in msg and "cifar-100-python" in msg


def test_cifar_partial_folder_names_missing_batch(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    msg = _usage_error("CIFAR10_base", str(tmp_path))
    assert "data_batch_3" in msg and "data_batch_2" not in msg


def test_cifar_reads_numpy1_era_pickles(tmp_path):
    # The published archives name numpy.core.multiarray, which numpy 2 moved to numpy._core.
    written = make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    blob = path.read_bytes()
    if b"numpy._core.multiarray" in blob:
        path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    _, test, _ = build_datasets("CIFAR10_base", str(tmp_path))
    np.testing.assert_array_equal(test.data, written["test_batch"][0].transpose(0, 2, 3, 1))


def test_cifar_garbage_file_names_it(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02not a pickle")
    msg = _usage_error("CIFAR10_base", str(tmp_path))
    assert "data_batch_2" in msg and "corrupt" in msg


def test_cifar_wrong_shape_names_file(tmp_path):
    make_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": np.zeros((10, 100), np.uint8), "labels": [0] * 10})
    msg = _usage_error("CIFAR10_base", str(tmp_path))
    assert "test_batch" in msg and "(10, 100)" in msg


def test_cifar_label_count_mismatch(tmp_path):
    make_cifar10(tmp_path)
    _dump(
        tmp_path / "cifar-10-batches-py" / "data_batch_5", {"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9}
    )
    assert "data_batch_5" in _usage_error("CIFAR10_base", str(tmp_path))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_1", {"data": _Exploit(str(marker)), "labels": [0] * 10})
    assert "data_batch_1" in _usage_error("CIFAR10_base", str(tmp_path))
    assert not marker.exists()


def test_download_only_when_asked(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_cifar10(root, train=True, download=False, **kw):
        calls.append((root, download))
        from pathlib import Path

        make_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    _usage_error("CIFAR10_base", str(tmp_path / "d"))
    assert calls == []
    train, _, _ = build_datasets("CIFAR10_base", str(tmp_path / "d"), download=True)
    assert calls == [(str(tmp_path / "d"), True)] and len(train) == 50


def test_unknown_dataset_lists_choices():
    msg = _usage_error("cifar10_base", None)
    assert "'cifar10_base'" in msg and all(n in msg for n in DATASETS)


# ---------------------------------------------------------------- Cutout


def test_cutout_zeroes_a_clipped_square():
    img = torch.ones(3, 32, 32)
    out = cutout(img, 16, 16, 16)
    assert (out[:, 8:24, 8:24] == 0).all()
    assert (out == 0).sum() == 3 * 16 * 16
    corner = cutout(img, 3, 30, 16)
    # Rows 3-8 .. 3+7 clip to 0..10, columns 30-8 .. 30+7 clip to 22..31.
    assert (corner[:, 0:11, 22:32] == 0).all()
    assert (corner == 0).sum() == 3 * 11 * 10
    assert torch.equal(img, torch.ones(3, 32, 32))
    assert cutout_box(0, 0, 16, 32, 32) == (0, 8, 0, 8)


def test_cutout_transform_probability_and_shape():
    torch.manual_seed(0)
    t = Cutout(16, p=0.5)
    img = torch.randn(3, 32, 32).abs() + 1
    hits = 0
    for _ in range(400):
        out = t(img)
        zero = (out == 0).all(0)
        if zero.any():
            hits += 1
            rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
            # A solid rectangle of at most 16x16 and at least 8x8 (centre in a corner).
            assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            assert zero.sum() == len(rows) * len(cols)
            assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
    assert 160 < hits < 240
    assert torch.equal(Cutout(16, p=0.0)(img), img)


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_builds(tmp_path):
    make_imagefolder(tmp_path)
    train, val, info = build_datasets("ImageNet_base", str(tmp_path))
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, 224)
    assert len(train) == 4 and len(val) == 4
    x, y = val[3]
    assert x.shape == (3, 224, 224) and y == 1
    assert train[0][0].shape == (3, 224, 224)


def test_imagefolder_missing_val(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", (0, 0, 0))
    msg = _usage_error("ImageNet_base", str(tmp_path))
    assert str(tmp_path) in msg and "val" in msg


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    msg = _usage_error("ImageNet_base", str(tmp_path))
    assert str(tmp_path / "train") in msg


def test_imagefolder_empty_root(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert str(tmp_path / "train") in _usage_error("ImageNet_base", str(tmp_path))


def test_imagefolder_class_mismatch_named(tmp_path):
    make_imagefolder(tmp_path, val_classes=("bird", "cat"))
    msg = _usage_error("ImageNet_base", str(tmp_path))
    assert "only in train: [dog]" in msg and "only in val: [bird]" in msg


# ---------------------------------------------------------------- digits


def test_digits_sizes_values_and_info():
    train, test, info = build_datasets("digits", None, augment=False)
    assert (len(train), len(test)) == (1442, 355)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert train.data.shape == (1442, 1, 8, 8) and train.data.dtype == torch.float32
    assert train.data.min() == 0 and train.data.max() == 1
    assert set(train.targets.tolist()) == set(range(10))
    # Normalised with the train statistics, the un-augmented train set is standardised.
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 1e-3
    x, y = test[0]
    assert x.shape == (1, 8, 8) and isinstance(y, int)


def test_digits_split_is_fixed_stratified_and_disjoint():
    a_train, a_test, _ = build_datasets("digits", None)
    b_train, b_test, _ = build_datasets("digits", None)
    assert torch.equal(a_train.data, b_train.data) and torch.equal(a_test.targets, b_test.targets)
    labels = np.repeat(np.arange(3), [7, 5, 10])
    tr, te = split_indices(labels)
    assert list(te) == [4, 11, 16, 21]
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
    counts = torch.bincount(a_test.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37


def test_digits_augmentation_is_a_one_pixel_shift():
    train, _, info = build_datasets("digits", None, augment=True)
    raw = train.data[5, 0]
    padded = torch.nn.functional.pad(raw, (1, 1, 1, 1))
    shifts = [(padded[dy : dy + 8, dx : dx + 8] - info.mean[0]) / info.std[0] for dy in range(3) for dx in range(3)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x, _ = train[5]
        match = [k for k, s in enumerate(shifts) if torch.allclose(x[0], s, atol=1e-6)]
        assert match
        seen.update(match)
    assert len(seen) > 3


# ---------------------------------------------------------------- GPULoader


def _tiny(n=10, c=3, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.arange(n)


def test_gpuloader_batches_and_len():
    x, y = _tiny()
    loader = GPULoader(x, y, 4, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert len(loader) == 3
    shapes = [tuple(b.shape) for b, _ in loader]
    assert shapes == [(4, 3, 6, 6), (4, 3, 6, 6), (2, 3, 6, 6)]
    dropping = GPULoader(x, y, 4, mean=(0.5,) * 3, std=(0.25,) * 3, drop_last=True)
    assert len(dropping) == 2 and [len(l) for _, l in dropping] == [4, 4]


def test_gpuloader_every_example_once_and_deterministic_order():
    x, y = _tiny(n=37)
    make = lambda seed: GPULoader(x, y, 8, mean=(0.5,) * 3, std=(0.25,) * 3, seed=seed, padding=2, flip=True, cutout=3)
    a, b = make(7), make(7)
    for epoch in range(3):
        labels = torch.cat([l for _, l in a])
        assert sorted(labels.tolist()) == list(range(37))
    a.set_epoch(2)
    b.set_epoch(2)
    batches_a, batches_b = list(a), list(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches_a, batches_b))
    order = lambda loader, e: (loader.set_epoch(e), torch.cat([l for _, l in loader]))[1]
    assert not torch.equal(order(a, 1), order(a, 2))
    assert not torch.equal(order(make(7), 0), order(make(8), 0))
    # Without set_epoch, consecutive passes reshuffle.
    c = make(7)
    assert not torch.equal(torch.cat([l for _, l in c]), torch.cat([l for _, l in c]))


def test_gpuloader_crop_flip_match_slow_reference():
    x, y = _tiny(n=24, h=5, w=7)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    loader = GPULoader(x, y, 5, mean=mean, std=std, padding=2, flip=True, seed=3)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    seen = set()
    for epoch in range(2):
        for batch, labels in loader:
            for out, i in zip(batch, labels.tolist()):
                img = x[i].float() / 255
                matches = []
                for dy in range(5):
                    for dx in range(5):
                        padded = torch.zeros(3, 9, 11)
                        padded[:, 2:7, 2:9] = img
                        crop = padded[:, dy : dy + 5, dx : dx + 7]
                        for flip in (False, True):
                            ref = ((crop.flip(2) if flip else crop) - m) / s
                            if torch.allclose(out, ref, atol=1e-6):
                                matches.append((dy, dx, flip))
                assert matches, f"image {i} is not a padded crop / flip of the original"
                seen.update(matches)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5 and {f for *_, f in seen} == {False, True}


def test_gpuloader_cutout_matches_reference_box():
    x, y = _tiny(n=40, h=8, w=8)
    x = x.clamp(min=1)  # no pixel is exactly the mean, so every zero comes from cutout
    loader = GPULoader(x, y, 8, mean=(0.0,) * 3, std=(1.0,) * 3, cutout=4, cutout_p=0.5)
    cut = kept = 0
    for batch, labels in loader:
        for out, i in zip(batch, labels.tolist()):
            ref = x[i].float() / 255
            if torch.equal(out, ref):
                kept += 1
                continue
            assert any(torch.equal(out, cutout(ref, cy, cx, 4)) for cy in range(8) for cx in range(8))
            cut += 1
    assert cut > 5 and kept > 5


def test_gpuloader_from_cifar_matches_cpu_pipeline(tmp_path):
    make_cifar10(tmp_path)
    train, test, _ = build_datasets("CIFAR10_cutout", str(tmp_path))
    plain = GPULoader.from_dataset(test, 4, shuffle=False)
    xb, yb = next(iter(plain))
    torch.testing.assert_close(xb, torch.stack([test[i][0] for i in range(4)]), atol=1e-5, rtol=0)
    assert yb.tolist() == [test[i][1] for i in range(4)]
    aug = GPULoader.from_dataset(train, 16)
    assert (aug.padding, aug.flip, aug.cutout, aug.cutout_p) == (4, True, 16, 0.5)
    assert len(aug) == 4 and next(iter(aug))[0].shape == (16, 3, 32, 32)
    assert GPULoader.from_dataset(train, 16, augment=False).padding == 0


def test_gpuloader_from_digits_and_rejects_imagefolder(tmp_path):
    train, _, info = build_datasets("digits", None)
    loader = GPULoader.from_dataset(train, 256)
    assert (loader.padding, loader.flip, loader.cutout) == (1, False, 0)
    assert sum(len(l) for _, l in loader) == 1442
    make_imagefolder(tmp_path)
    folder_train, _, _ = build_datasets("ImageNet_base", str(tmp_path))
    with pytest.raises(UsageError):
        GPULoader.from_dataset(folder_train, 2)

"""Tiny data sets in the real on-disk formats (CIFAR python pickles, ImageFolder PNGs) for tests."""

import pickle

import numpy as np
from PIL import Image

N_PER_BATCH = 10
C10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root, seed=0, n=None):
    """Fake cifar-10-batches-py in the authors' format; returns {file: (chw_images, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for k, name in enumerate(C10_FILES):
        imgs = rng.integers(0, 256, (n or N_PER_BATCH, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n or N_PER_BATCH)]
        _dump(
            folder / name,
            {
                "batch_label": f"batch {k}",
                "labels": labels,
                "data": imgs.reshape(len(imgs), -1),
                "filenames": [f"img{i}.png" for i in range(len(imgs))],
            },
        )
        written[name] = (imgs, labels)
    return written


def make_cifar100(root, seed=1):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in ("train", "test"):
        imgs = rng.integers(0, 256, (N_PER_BATCH, 3, 32, 32), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(20, 100, N_PER_BATCH)]
        _dump(
            folder / name,
            {"data": imgs.reshape(N_PER_BATCH, -1), "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]},
        )
        written[name] = (imgs, fine)
    return written


def _png(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_imagefolder(root, train_classes=("cat", "dog"), val_classes=("cat", "dog")):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for k, c in enumerate(classes):
            for i in range(2):
                _png(root / split / c / f"{i}.png", (40 * k, 100, 7 * i))


# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST)

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_file(path, array):
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when the name ends in .gz. Written by hand here
    (not with ssam's own writer) so that the reader is tested against an independent encoding."""
    import gzip
    import struct

    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return raw


def make_idx(folder, n_train=40, n_test=12, gz=False, seed=0, size=28):
    """The four IDX files in ``folder``; returns {key: array}. Every class appears in both splits."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    rng.shuffle(arrays["train_labels"])
    for key, array in arrays.items():
        idx_file(folder / (IDX_STEMS[key] + (".gz" if gz else "")), array)
    return arrays


def _idx_path(folder, key):
    return next(folder / (IDX_STEMS[key] + ext) for ext in ("", ".gz") if (folder / (IDX_STEMS[key] + ext)).exists())


def _bad_magic(folder):
    make_idx(folder)  # the label file where the images should be: magic 0x801, not 0x803
    _idx_path(folder, "train_labels").replace(_idx_path(folder, "train_images"))
    idx_file(folder / IDX_STEMS["train_labels"], np.zeros(40, np.uint8))


def _short_file(folder):
    make_idx(folder)
    path = _idx_path(folder, "test_images")
    path.write_bytes(path.read_bytes()[:-100])


def _count_mismatch(folder):
    make_idx(folder)
    idx_file(folder / IDX_STEMS["train_labels"], np.zeros(39, np.uint8))


def _label_out_of_range(folder):
    make_idx(folder)
    labels = np.zeros(12, np.uint8)
    labels[7] = 10
    idx_file(folder / IDX_STEMS["test_labels"], labels)


def _truncated_gzip(folder):
    make_idx(folder, gz=True)
    path = folder / (IDX_STEMS["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:-500])


def _missing_labels(folder):
    make_idx(folder, gz=True)
    (folder / (IDX_STEMS["test_labels"] + ".gz")).unlink()


# setup name (column 3 of docs/errors.md) -> writes a broken Fashion-MNIST folder at the given path
IDX_SETUPS = {
    "idx_bad_magic": _bad_magic,
    "idx_short_file": _short_file,
    "idx_count_mismatch": _count_mismatch,
    "idx_label_10": _label_out_of_range,
    "idx_truncated_gzip": _truncated_gzip,
    "idx_missing_file": _missing_labels,
}

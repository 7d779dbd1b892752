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
        _dump(folder / name, {"batch_label": f"batch {k}", "labels": labels,
                              "data": imgs.reshape(len(imgs), -1),
                              "filenames": [f"img{i}.png" for i in range(len(imgs))]})
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
        _dump(folder / name, {"data": imgs.reshape(N_PER_BATCH, -1), "fine_labels": fine,
                              "coarse_labels": [f // 5 for f in fine]})
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



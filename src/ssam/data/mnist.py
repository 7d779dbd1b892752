"""MNIST and Fashion-MNIST from their four original IDX files (plain or .gz), read without torchvision.

Files: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
each optionally ending in .gz, in the data folder itself or in DATA/<Name>/raw (torchvision's layout,
which ``--download`` produces). Fashion-MNIST without a data folder is looked for where Debian's package
``dataset-fashion-mnist`` installs it.

Augmentation: a random 28 x 28 crop of the image zero-padded by 4 pixels, as for CIFAR. 4 pixels is a
translation of at most 4/28 = 14% of the side, close to CIFAR's 4/32 = 12.5%; the objects of both sets
are centred with a margin of a few pixels, so nearly every crop still shows the whole object. Fashion-MNIST
is also mirrored left-right (a mirrored shoe or shirt is still a shoe or shirt); MNIST never (a mirrored
2, 3 or 7 is no longer that digit). Normalisation: the mean and standard deviation of the training images,
computed from the files at load time (so they are right for whatever files are given; the published
Fashion-MNIST values are about 0.286 and 0.353).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .tensors import TensorImages

NUM_CLASSES = 10
IMAGE_SIZE = 28
PADDING = 4

# key -> file name without .gz, in the order they are read
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Where each data set is looked for when no data folder is given (a dict so tests can point it elsewhere).
DEFAULT_DIRS = {"FashionMNIST": "/usr/share/datasets/fashion-mnist"}


@dataclass(frozen=True)
class IdxSpec:
    name: str  # also torchvision's folder name: DATA/<name>/raw
    flip: bool  # whether a mirrored image keeps its class
    get: str  # how to obtain the files, ends the not-found messages

    @property
    def default_dir(self) -> str | None:
        return DEFAULT_DIRS.get(self.name)


FASHION_MNIST = IdxSpec(
    "FashionMNIST",
    flip=True,
    get="install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or pass --download with --datadir DATA on a machine with internet",
)
MNIST = IdxSpec("MNIST", flip=False, get="pass --download with --datadir DATA on a machine with internet to fetch them")

_LAYOUT = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


def _candidates(datadir: str, spec: IdxSpec) -> list[str]:
    return [
        datadir,
        os.path.join(datadir, spec.name, "raw"),
        os.path.join(datadir, spec.name),
        os.path.join(datadir, "raw"),
    ]


def _present(folder: str) -> dict[str, str]:
    """key -> path of the files in ``folder`` (plain preferred: torchvision keeps both after extracting)."""
    found = {}
    for key, stem in FILES.items():
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                found[key] = os.path.join(folder, name)
                break
    return found


def find_files(spec: IdxSpec, datadir: str | None) -> dict[str, str]:
    """key -> path of the four files, from ``datadir`` or, without one, the data set's default folder."""
    if datadir is None:
        default = spec.default_dir
        if default is None:
            raise UsageError(
                f"{spec.name} needs a data folder holding {_LAYOUT} (each plain or .gz); "
                f"pass --datadir DATA, or {spec.get}"
            )
        if not _present(default):
            raise UsageError(
                f"{spec.name} not found: no --datadir given and {default} does not hold its files; {spec.get}"
            )
        datadir = default
    datadir = os.fspath(datadir)
    for folder in _candidates(datadir, spec):
        found = _present(folder)
        if found:
            missing = [FILES[k] for k in FILES if k not in found]
            if missing:
                raise UsageError(
                    f"{spec.name} folder {folder!r} is incomplete: missing {', '.join(missing)} "
                    f"(plain or .gz); {spec.get}"
                )
            return found
    raise UsageError(
        f"{spec.name} not found under {datadir!r}: expected {_LAYOUT} (each plain or .gz) "
        f"there or in {os.path.join(datadir, spec.name, 'raw')}; {spec.get}"
    )


def download_idx(spec: IdxSpec, datadir: str | None) -> None:
    """Fetch the four files into DATA/<name>/raw with torchvision (only when asked for)."""
    if datadir is None:
        raise UsageError(f"--download needs a data folder to put {spec.name} in; pass --datadir DATA")
    import torchvision

    os.makedirs(datadir, exist_ok=True)
    cls = getattr(torchvision.datasets, spec.name)
    try:
        cls(root=os.fspath(datadir), train=True, download=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"downloading {spec.name} into {os.fspath(datadir)!r} failed: {first}") from exc


def _read_split(spec: IdxSpec, images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    fix = f"replace the {spec.name} files ({spec.get})"
    images = read_idx(images_path, IMAGES_MAGIC, fix)
    labels = read_idx(labels_path, LABELS_MAGIC, fix)
    if len(images) != len(labels):
        raise UsageError(
            f"{spec.name}: {images_path!r} holds {len(images)} images but {labels_path!r} "
            f"holds {len(labels)} labels; {fix}"
        )
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UsageError(
            f"{spec.name}: {images_path!r} holds {images.shape[1]} x {images.shape[2]} images; "
            f"expected {IMAGE_SIZE} x {IMAGE_SIZE}; {fix}"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        at = int(np.argmax(labels >= NUM_CLASSES))
        raise UsageError(
            f"{spec.name}: {labels_path!r} has label {int(labels[at])} at index {at}; "
            f"allowed: 0-{NUM_CLASSES - 1}; {fix}"
        )
    if not len(labels):
        raise UsageError(f"{spec.name}: {images_path!r} holds no images; {fix}")
    return images, labels


def pixel_mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of uint8 pixels scaled to [0, 1], exactly, from a histogram:
    60,000 x 784 pixels in float64 would need 376 MB for a number that 256 counts give."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / n)
    return mean, var**0.5


def load_idx_set(spec: IdxSpec, datadir: str | None, download: bool = False):
    """(train_images, train_labels, test_images, test_labels) as uint8 (N, 28, 28) and uint8 (N,) arrays."""
    if download:
        download_idx(spec, datadir)
    paths = find_files(spec, datadir)
    train = _read_split(spec, paths["train_images"], paths["train_labels"])
    test = _read_split(spec, paths["test_images"], paths["test_labels"])
    return train[0], train[1], test[0], test[1]


def build_idx_datasets(spec: IdxSpec, datadir: str | None, download: bool = False, augment: bool = True):
    """(train, test, mean, std): TensorImages over (N, 1, 28, 28) uint8 images and int64 labels."""
    train_x, train_y, test_x, test_y = load_idx_set(spec, datadir, download)
    mean, std = pixel_mean_std(train_x)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # np.array copies: the arrays view read-only bytes, which torch.from_numpy would warn about.
        return torch.from_numpy(np.array(x)).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    train = TensorImages(
        *tensors(train_x, train_y),
        mean=(mean,),
        std=(std,),
        num_classes=NUM_CLASSES,
        padding=PADDING if augment else 0,
        flip=spec.flip and augment,
    )
    test = TensorImages(*tensors(test_x, test_y), mean=(mean,), std=(std,), num_classes=NUM_CLASSES)
    return train, test, (mean,), (std,)

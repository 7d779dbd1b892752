"""CIFAR-10 / CIFAR-100 from the authors' python pickle archives, read without torchvision.

Layout expected (either DATA or DATA/<folder> may be passed as the data folder):
    DATA/cifar-10-batches-py/{data_batch_1..5, test_batch}   keys 'data', 'labels'
    DATA/cifar-100-python/{train, test}                      keys 'data', 'fine_labels'
'data' is uint8 (N, 3072): each row is the red plane, then green, then blue, each 32x32
row-major. Images are kept as one uint8 (N, 32, 32, 3) array, 150 MB for CIFAR-10 train, which
is both what PIL wants per sample and what GPULoader moves to the device in one go.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UsageError


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    layout: str  # how the file list is written in messages

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


CIFAR10 = CifarSpec(
    "CIFAR10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "labels",
    10,
    "{data_batch_1..5,test_batch}",
)
CIFAR100 = CifarSpec("CIFAR100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100, "{train,test}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only.

    The CIFAR batches are pickles; a file dropped into the data folder must not be able to run
    code just because training was started. numpy's array reconstruction is all they need.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"): a pure function.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # numpy 2 renamed the package; the old name still imports but warns.
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _not_found(spec: CifarSpec, datadir: str) -> UsageError:
    return UsageError(
        f"{spec.name} not found under {datadir!r}: expected "
        f"{os.path.join(datadir, spec.folder)}/{spec.layout} (or pass --download)"
    )


def find_root(spec: CifarSpec, datadir: str | None) -> str:
    """The folder that holds the batch files, accepting DATA or DATA/<folder>."""
    if datadir is None:
        raise UsageError(
            f"{spec.name} needs a data folder: expected DATA/{spec.folder}/{spec.layout}, "
            f"pass DATA (or --download with a DATA folder to fetch it)"
        )
    datadir = os.fspath(datadir)
    if not os.path.isdir(datadir):
        raise _not_found(spec, datadir)
    nested = os.path.join(datadir, spec.folder)
    if os.path.isdir(nested):
        root = nested
    elif os.path.basename(os.path.normpath(datadir)) == spec.folder or any(
        os.path.exists(os.path.join(datadir, f)) for f in spec.files
    ):
        root = datadir
    else:
        raise _not_found(spec, datadir)
    missing = [f for f in spec.files if not os.path.isfile(os.path.join(root, f))]
    if len(missing) == len(spec.files):
        raise _not_found(spec, datadir)
    if missing:
        raise UsageError(
            f"{spec.name} folder {root!r} is incomplete: missing {', '.join(missing)} "
            f"(expected {spec.layout}; re-extract the archive or pass --download)"
        )
    return root


def read_batch(path: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 32, 32, 3), int64 labels (N,))."""

    def corrupt(why: str) -> UsageError:
        return UsageError(
            f"{spec.name} batch file {path!r} is corrupt ({why}); re-extract the archive or pass --download"
        )

    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # any failure to decode means the same thing to the user
        raise corrupt(f"cannot unpickle: {type(exc).__name__}") from exc
    if not isinstance(batch, dict) or "data" not in batch or spec.label_key not in batch:
        raise corrupt(f"expected a dict with 'data' and {spec.label_key!r}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[spec.label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(f"'data' has shape {data.shape}, expected (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise corrupt(f"{len(labels)} labels for {data.shape[0]} images")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.size and (data.min() < 0 or data.max() > 255):
            raise corrupt(f"'data' has dtype {data.dtype}, expected uint8")
        data = data.astype(np.uint8)
    if (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.size
        and (labels.min() < 0 or labels.max() >= spec.num_classes)
    ):
        raise corrupt(f"labels outside 0..{spec.num_classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_files(root: str, files, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_batch(os.path.join(root, f), spec) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def download_cifar(spec: CifarSpec, datadir: str | None) -> None:
    """Fetch and extract the archive into DATA with torchvision (only when asked for)."""
    if datadir is None:
        raise UsageError(f"--download needs a data folder to put {spec.name} in")
    import torchvision

    os.makedirs(datadir, exist_ok=True)
    cls = torchvision.datasets.CIFAR10 if spec is CIFAR10 else torchvision.datasets.CIFAR100
    try:
        cls(root=os.fspath(datadir), train=True, download=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"downloading {spec.name} into {os.fspath(datadir)!r} failed: {first}") from exc


def load_cifar(spec: CifarSpec, datadir: str | None, download: bool = False):
    """(train_images, train_labels, test_images, test_labels) as numpy arrays."""
    if download:
        download_cifar(spec, datadir)
    root = find_root(spec, datadir)
    train = _read_files(root, spec.train_files, spec)
    test = _read_files(root, spec.test_files, spec)
    return train[0], train[1], test[0], test[1]


class CIFARDataset(Dataset):
    """Index -> (transformed image tensor, int label) over in-memory uint8 NHWC images.

    ``data`` / ``targets`` / ``mean`` / ``std`` / ``augmentation`` are public so GPULoader can
    take the raw arrays and replay the same augmentation in batches on the device.
    """

    data_layout = "NHWC"

    def __init__(
        self,
        data: np.ndarray,
        targets: np.ndarray,
        transform,
        *,
        mean,
        std,
        num_classes: int,
        augmentation: dict | None = None,
    ):
        self.data = data
        self.targets = targets
        self.transform = transform
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.num_classes = num_classes
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

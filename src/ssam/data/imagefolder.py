"""ImageNet-style class folders: DATA/train/<class>/<image> and DATA/val/<class>/<image>.

The val images must be sorted into class folders too (the raw ILSVRC val tarball is flat; it has
to be rearranged with the devkit's ground-truth labels first).
"""

from __future__ import annotations

import os

from ..errors import UsageError
from .transforms import imagenet_test_transform, imagenet_train_transform


def _layout(datadir: str) -> str:
    return (
        f"expected {os.path.join(datadir, 'train')}/<class>/<image> and {os.path.join(datadir, 'val')}/<class>/<image>"
    )


def _load_folder(path: str, transform, datadir: str, name: str):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path, transform=transform)
    except FileNotFoundError as exc:
        # torchvision raises this both for "no class folders" and "class folders without images".
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no class folders"
        raise UsageError(f"{name}: no images found under {path!r} ({detail}); {_layout(datadir)}") from exc


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def build_imagefolder(datadir: str | None, augment: bool = True, name: str = "ImageNet"):
    """(train, val) torchvision ImageFolder data sets with the standard ImageNet transforms."""
    if datadir is None:
        raise UsageError(
            f"{name} needs a data folder: expected DATA/train/<class>/<image> and DATA/val/<class>/<image>, pass DATA"
        )
    datadir = os.fspath(datadir)
    train_dir, val_dir = os.path.join(datadir, "train"), os.path.join(datadir, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise UsageError(f"{name} not found under {datadir!r}: {_layout(datadir)}")
    train = _load_folder(train_dir, imagenet_train_transform() if augment else imagenet_test_transform(), datadir, name)
    val = _load_folder(val_dir, imagenet_test_transform(), datadir, name)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"{name} train and val class folders differ under {datadir!r}: "
            f"only in train: [{_names(only_train)}]; only in val: [{_names(only_val)}]"
        )
    return train, val

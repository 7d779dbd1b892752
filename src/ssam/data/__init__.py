"""Data sets by name: ``build_datasets(name, datadir, download=False, augment=True)``.

Nothing is ever downloaded unless ``download=True`` (the ``--download`` flag).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .cifar import CIFAR10, CIFAR100, CIFARDataset, load_cifar
from .digits import DigitsDataset, build_digits
from .gpu import GPULoader
from .imagefolder import build_imagefolder
from .transforms import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, Cutout,
                         cifar_test_transform, cifar_train_transform, cutout)

DATASETS = ("CIFAR10_base", "CIFAR10_cutout", "CIFAR100_base", "CIFAR100_cutout",
            "ImageNet_base", "digits")

CUTOUT_SIZE = 16
CUTOUT_P = 0.5


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple


def _cifar(spec, datadir, download: bool, augment: bool, use_cutout: bool):
    train_x, train_y, test_x, test_y = load_cifar(spec, datadir, download)
    cut = CUTOUT_SIZE if use_cutout else 0
    if augment:
        train_tf = cifar_train_transform(cut, CUTOUT_P)
        train_aug = {"padding": 4, "flip": True, "cutout": cut, "cutout_p": CUTOUT_P}
    else:
        train_tf, train_aug = cifar_test_transform(), None
    common = dict(mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=spec.num_classes)
    train = CIFARDataset(train_x, train_y, train_tf, augmentation=train_aug, **common)
    test = CIFARDataset(test_x, test_y, cifar_test_transform(), augmentation=None, **common)
    return train, test, DataInfo(spec.num_classes, 3, 32, CIFAR_MEAN, CIFAR_STD)


def build_datasets(name: str, datadir: str | None, download: bool = False, augment: bool = True):
    """(train, test, DataInfo). ``augment=False`` gives the training set with the test transform."""
    if name not in DATASETS:
        raise UsageError(f"unknown --dataset {name!r}; choose from: {', '.join(DATASETS)}")
    if name.startswith("CIFAR"):
        spec = CIFAR10 if name.startswith("CIFAR10_") else CIFAR100
        return _cifar(spec, datadir, download, augment, name.endswith("_cutout"))
    if name == "ImageNet_base":
        if download:
            raise UsageError("--download is not available for ImageNet_base: it has no public "
                             "archive; prepare DATA/train and DATA/val class folders")
        train, val = build_imagefolder(datadir, augment)
        return train, val, DataInfo(len(train.classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD)
    train, test, mean, std = build_digits(augment)
    return train, test, DataInfo(10, 1, 8, mean, std)


__all__ = [
    "DATASETS", "DataInfo", "build_datasets", "GPULoader", "Cutout", "cutout",
    "CIFARDataset", "DigitsDataset", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]

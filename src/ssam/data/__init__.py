"""Data sets by name: ``build_datasets(name, datadir, download=False, augment=True)``.

``DATASETS`` (name -> DatasetSpec) is the one list of data sets: the train command's ``--dataset``
choices come from it. Nothing is ever downloaded unless ``download=True`` (the ``--download`` flag).
``apply_label_noise(train, p, seed)`` corrupts a share of a training set's labels (see ``noise``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError, did_you_mean
from .cifar import CIFAR10, CIFAR100, CIFARDataset, load_cifar
from .digits import DigitsDataset, build_digits
from .gpu import GPULoader
from .imagefolder import build_imagefolder
from .mnist import FASHION_MNIST, MNIST, IdxSpec, build_idx_datasets
from .noise import apply_label_noise, noise_count, noisy_labels
from .subset import select_examples, subset_indices, val_indices
from .tensors import TensorImages
from .transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cutout,
    cifar_test_transform,
    cifar_train_transform,
    cutout,
)

CUTOUT_SIZE = 16
CUTOUT_P = 0.5


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple


def _cifar(spec, use_cutout: bool):
    def build(datadir, download: bool, augment: bool):
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

    return build


def _imagenet(datadir, download: bool, augment: bool):
    if download:
        raise UsageError(
            "--download is not available for ImageNet_base: it has no public "
            "archive; prepare DATA/train and DATA/val class folders"
        )
    train, val = build_imagefolder(datadir, augment)
    return train, val, DataInfo(len(train.classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD)


def _digits(datadir, download: bool, augment: bool):
    train, test, mean, std = build_digits(augment)
    return train, test, DataInfo(10, 1, 8, mean, std)


def _idx(spec: IdxSpec):
    def build(datadir, download: bool, augment: bool):
        train, test, mean, std = build_idx_datasets(spec, datadir, download, augment)
        return train, test, DataInfo(10, 1, 28, mean, std)

    return build


@dataclass(frozen=True)
class DatasetSpec:
    build: Callable  # (datadir, download, augment) -> (train, test, DataInfo)
    needs_datadir: bool  # False: ships with ssam (digits) or has a default folder (FashionMNIST)
    in_memory: bool  # held as arrays, so --gpu_data can keep it on the device
    train_size: int | None  # training examples of the standard files (None: known once read), for --train_subset
    augments: bool = False  # its name asks for augmentation (the _cutout sets): --augment none contradicts it


DATASETS: dict[str, DatasetSpec] = {
    "CIFAR10_base": DatasetSpec(_cifar(CIFAR10, False), needs_datadir=True, in_memory=True, train_size=50_000),
    "CIFAR10_cutout": DatasetSpec(
        _cifar(CIFAR10, True), needs_datadir=True, in_memory=True, train_size=50_000, augments=True
    ),
    "CIFAR100_base": DatasetSpec(_cifar(CIFAR100, False), needs_datadir=True, in_memory=True, train_size=50_000),
    "CIFAR100_cutout": DatasetSpec(
        _cifar(CIFAR100, True), needs_datadir=True, in_memory=True, train_size=50_000, augments=True
    ),
    "ImageNet_base": DatasetSpec(_imagenet, needs_datadir=True, in_memory=False, train_size=None),
    "digits": DatasetSpec(_digits, needs_datadir=False, in_memory=True, train_size=1442),
    "FashionMNIST": DatasetSpec(_idx(FASHION_MNIST), needs_datadir=False, in_memory=True, train_size=60_000),
    "MNIST": DatasetSpec(_idx(MNIST), needs_datadir=True, in_memory=True, train_size=60_000),
}


def build_datasets(name: str, datadir: str | None, download: bool = False, augment: bool = True):
    """(train, test, DataInfo). ``augment=False`` gives the training set with the test transform."""
    if name not in DATASETS:
        raise UsageError(
            f"unknown --dataset {name!r}; choose from: {', '.join(DATASETS)}{did_you_mean(name, DATASETS)}"
        )
    return DATASETS[name].build(datadir, download, augment)


@dataclass
class TrainingData:
    """The data of a run. ``train``: the examples trained on (augmented unless ``augment=False``); ``train_plain``:
    the same examples with the test transform and the same (noisy) labels, to measure memorization (None when
    neither noise nor a validation split asks for it); ``val``: the held-out examples, test transform, noisy labels
    included (None without ``val_split``); ``test``: the clean test set."""

    train: Any
    train_plain: Any
    val: Any
    test: Any
    info: DataInfo


def build_training_data(
    name: str,
    datadir: str | None,
    download: bool = False,
    *,
    augment: bool = True,
    train_subset: int | None = None,
    label_noise: float = 0.0,
    val_split: int = 0,
    seed: int = 0,
) -> TrainingData:
    """The data sets of a run, in the order of ``ssam.data.subset``: subset, then label noise inside it, then the
    validation examples held out of it. ``train_subset=None``: every training example."""
    train, test, info = build_datasets(name, datadir, download, augment)
    plain = None
    if val_split or label_noise:
        plain = build_datasets(name, datadir, False, augment=False)[0] if augment else train
    sets = [train] if plain is None or plain is train else [train, plain]
    if train_subset:
        idx = subset_indices(len(train), train_subset, seed)
        for ds in sets:
            select_examples(ds, idx)
    if label_noise:  # before any loader or the Fisher reads the labels; the test set stays clean
        for ds in sets:
            apply_label_noise(ds, label_noise, seed)
    val = None
    if val_split:
        keep, held = val_indices(len(train), val_split, seed)
        val = select_examples(copy.copy(plain), held)
        for ds in sets:
            select_examples(ds, keep)
    return TrainingData(train, plain, val, test, info)


__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DataInfo",
    "build_datasets",
    "build_training_data",
    "TrainingData",
    "select_examples",
    "subset_indices",
    "val_indices",
    "apply_label_noise",
    "noise_count",
    "noisy_labels",
    "GPULoader",
    "Cutout",
    "cutout",
    "CIFARDataset",
    "DigitsDataset",
    "TensorImages",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

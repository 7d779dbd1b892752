"""The command line of ``ssam bench``: its flags, their defaults, and the checks that turn bad values into one line."""

from __future__ import annotations

import argparse
import os

import torch

from ..errors import ArgumentParser, UsageError
from ..models import MODEL_FORMS, check_model_name
from ..optim.fisher import FISHER_METHODS

# (channels, image size, classes) for random inputs of each data set's shape.
SHAPES = {
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "imagenet": (3, 224, 1000),
    "digits": (1, 8, 10),
    "fashionmnist": (1, 28, 10),
    "mnist": (1, 28, 10),
}
# The timed optimizers, as shown in the tables, and their names in the optimizer factory.
OPT_OF = {"SGD": "sgd", "SAM": "sam-sgd", "SSAM-F": "ssamf-sgd", "SSAM-D": "ssamd-sgd"}
OPTIMIZERS = tuple(OPT_OF)
# "auto" is a choice among the others, timed as what it picks.
TIMED_FISHER_METHODS = tuple(m for m in FISHER_METHODS if m != "auto")
DEFAULTS = dict(model="resnet18", batch_size=64, steps=5, warmup=1, num_samples=128)
QUICK = dict(model="resnet18", batch_size=16, steps=2, warmup=1, num_samples=16)
# Hyper-parameters of the CIFAR recipes; they do not change the cost of a step.
LR, MOMENTUM, WEIGHT_DECAY, RHO, SPARSITY = 0.05, 0.9, 5e-4, 0.05, 0.5
LOADER_IMAGES = 10_000
SECTIONS = ("main", "skip", "cheap")


def build_parser(description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ssam bench", description=description)
    p.add_argument("--model", default=None, help=f"{MODEL_FORMS} (default resnet18)")
    p.add_argument(
        "--dataset",
        default="CIFAR10",
        help="input shape: CIFAR10, CIFAR100 (3x32x32), ImageNet (3x224x224), digits (1x8x8), FashionMNIST, "
        "MNIST (1x28x28)",
    )
    p.add_argument("--batch_size", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 5, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--num_samples", type=int, default=None, help="examples per SSAM-F mask (default 128, 16 quick)")
    p.add_argument(
        "--fisher_methods",
        default=",".join(TIMED_FISHER_METHODS),
        help=f"Fisher methods to time, comma-separated (default {','.join(TIMED_FISHER_METHODS)})",
    )
    p.add_argument(
        "--section",
        default="main",
        help="what to time, comma-separated: main (the four optimizers side by side) and/or skip "
        "(SSAM-F steps whose first pass skips the dead tensors, per mask granularity and sparsity, "
        "against the SAM step) and/or cheap (ascent schedules and m-sharpness against SGD and SAM); default main",
    )
    p.add_argument(
        "--micro_batches",
        default="32,8,1",
        help="cheap section: the m of its m-sharpness rows, comma-separated ('' for none: a loop over 1-example "
        "chunks of a ResNet takes minutes a step on a CPU); default 32,8,1",
    )
    p.add_argument("--quick", action="store_true", help="tiny run: batch 16, 2 steps, 16 Fisher examples")
    p.add_argument("--output", default="runs/bench", help="directory for bench.json (default runs/bench)")
    p.add_argument("--amp", action="store_true", help="time the main steps under bf16 autocast")
    p.add_argument("--channels_last", action="store_true", help="time the main steps in channels_last layout")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (main steps, and a compiled row in the CUDA throughput table)",
    )
    p.add_argument(
        "--data_loader",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time GPULoader against a DataLoader (default: on with CUDA)",
    )
    p.add_argument(
        "--throughput",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="images/s table over precision/layout/compile variants (default: on with CUDA)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes for the loader comparison",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _names(value: str, allowed: tuple[str, ...], flag: str, allow_empty: bool) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad or not (names or allow_empty):
        raise UsageError(f"{flag}: unknown {', '.join(bad) or repr(value)}; choose from: {', '.join(allowed)}")
    return names


def parse_args(argv: list[str], description: str = "") -> argparse.Namespace:
    args = build_parser(description).parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_model_name(args.model)
    key = args.dataset.lower().removesuffix("_base").removesuffix("_cutout")
    if key not in SHAPES:
        raise UsageError(
            f"unknown --dataset {args.dataset!r}; choose from: CIFAR10, CIFAR100, ImageNet, digits, FashionMNIST, MNIST"
        )
    args.shape_key = key
    for name in ("batch_size", "steps", "num_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")
    args.fisher_methods = _names(args.fisher_methods, TIMED_FISHER_METHODS, "--fisher_methods", allow_empty=True)
    args.section = _names(args.section, SECTIONS, "--section", allow_empty=False)
    try:
        args.micro_batches = tuple(int(m) for m in args.micro_batches.split(",") if m.strip())
    except ValueError:
        raise UsageError(f"--micro_batches {args.micro_batches!r}: allowed: integers >= 1, comma-separated") from None
    if any(m < 1 for m in args.micro_batches):
        raise UsageError(f"--micro_batches {args.micro_batches}: allowed: integers >= 1, comma-separated")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu or auto")
    on_cuda = args.device == "cuda"
    args.data_loader = on_cuda if args.data_loader is None else args.data_loader
    args.throughput = on_cuda if args.throughput is None else args.throughput
    return args

"""What the analysis commands share: the model-and-data flags, checkpoints and run names, the data subset.

All three analyse the same kind of data: a fixed, un-augmented subset of the TRAINING set, namely the
first ``--num_samples`` examples of a permutation seeded by ``--data_seed``.  Sharpness is a property of
the training objective, and a fixed subset makes numbers comparable across runs and re-runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import UsageError
from ...runfolder import RunFolder
from ..data import subset_batches

# Which file of a run folder an analysis takes when given the folder: the best model, else the latest.
RUN_FOLDER_CHECKPOINTS = (RunFolder.BEST, RunFolder.LAST)

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def parse_range(value: str, flag: str = "--xrange") -> np.ndarray:
    """``"START:STOP:NUM"`` -> ``NUM`` evenly spaced points from START to STOP inclusive, parsed strictly."""
    form = "expected START:STOP:NUM, e.g. -1:1:41 (numbers with START < STOP, NUM an integer >= 2)"
    parts = str(value).split(":")
    if (
        len(parts) != 3
        or not re.fullmatch(_NUM, parts[0])
        or not re.fullmatch(_NUM, parts[1])
        or not re.fullmatch(r"\d+", parts[2])
    ):
        raise UsageError(f"{flag} {value!r}: {form}")
    a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
    if not (math.isfinite(a) and math.isfinite(b)) or a >= b or n < 2:
        raise UsageError(f"{flag} {value!r}: {form}")
    xs = np.linspace(a, b, n)
    # The origin must be exactly 0 so that the grid holds the unperturbed model bit for bit.
    xs[np.abs(xs) < 1e-12 * (b - a)] = 0.0
    return xs


def add_common_args(p: argparse.ArgumentParser, many: bool) -> None:
    g = p.add_argument_group("model and data")
    what = "checkpoint written by ssam train, or its run folder (then best.pt, else last.pt)"
    if many:
        g.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help=what + "; one or more")
    else:
        g.add_argument("--checkpoint", required=True, metavar="CKPT", help=what)
    g.add_argument("--dataset", default=None, help="default: the dataset in the checkpoint's saved config")
    g.add_argument("--datadir", default=None, help="default: the datadir in the checkpoint's saved config")
    g.add_argument("--model", default=None, help="default: the architecture recorded in the checkpoint")
    g.add_argument(
        "--num_samples",
        type=int,
        default=4096,
        help="training examples analysed: the first N of a fixed permutation, without augmentation",
    )
    g.add_argument("--batch_size", type=int, default=256, help="examples per forward pass")
    g.add_argument("--data_seed", type=int, default=0, help="seed of the permutation that picks the examples")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the random vectors / directions")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to compute")
    g.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="output folder (default: 'analysis' next to the checkpoint; ./analysis for several)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is None or v < 1:
            raise UsageError(f"--{n} {v!r} is out of range; allowed: an integer >= 1")


def check_tolerances(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        if not getattr(args, n) > 0:
            raise UsageError(f"--{n} {getattr(args, n)!r} is out of range; allowed: a number > 0")


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(spec)


def checkpoint_file(path: str, flag: str = "--checkpoint") -> str:
    """``path`` itself, or for a run folder its best.pt (else last.pt), saying on stderr which it took."""
    p = Path(path)
    if not p.is_dir():
        return path
    chosen = RunFolder(p).checkpoint()
    if chosen.is_file():
        print(f"ssam: {flag} {path}: a run folder; using {chosen}", file=sys.stderr)
        return str(chosen)
    raise UsageError(
        f"{flag} {path!r} is a folder without {' or '.join(RUN_FOLDER_CHECKPOINTS)}; "
        f"allowed: a checkpoint file or a run folder written by ssam train"
    )


def output_dir(args: argparse.Namespace, paths: list[str]) -> Path:
    """Where results go; checked here but not created: the first file written creates it (``ssam.io``), so a
    command that stops with an error before it has a result leaves nothing behind."""
    if args.output:
        out = Path(args.output)
    elif len(paths) == 1:
        out = Path(paths[0]).parent / "analysis"
    else:
        out = Path("analysis")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} exists and is not a folder")
    return out


def run_names(paths: list[str]) -> list[str]:
    """The run folder's name (RUN/best.pt -> RUN); longer forms only where that would be ambiguous."""
    for form in (lambda p: p.parent.name or p.stem, lambda p: f"{p.parent.name}/{p.stem}", lambda p: str(p)):
        names = [form(Path(p).resolve()) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]


class Loader:
    """Checkpoints -> models, and (dataset, datadir) -> analysis batches, each data set built once.

    ``args`` needs ``dataset``, ``datadir``, ``model``, ``num_samples``, ``batch_size`` and ``data_seed``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._data: dict[tuple, tuple] = {}

    def datasets(self, dataset: str, datadir: str | None):
        key = (dataset, datadir)
        if key not in self._data:
            from ...data import build_datasets

            self._data[key] = build_datasets(dataset, datadir, augment=False)
        return self._data[key]

    def spec(self, ckpt: dict, path: str) -> tuple[str, str | None]:
        cfg = ckpt.get("config") or {}
        dataset = self.args.dataset or cfg.get("dataset")
        if not dataset:
            raise UsageError(f"{path}: its saved config names no dataset; pass --dataset")
        datadir = self.args.datadir if self.args.datadir is not None else cfg.get("datadir")
        return dataset, datadir

    def load(self, path: str) -> tuple[nn.Module, dict, tuple[str, str | None]]:
        from ...checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        dataset, datadir = self.spec(ckpt, path)
        margs = ckpt.get("model_args") or {}
        fallback = None
        if not all(k in margs for k in ("num_classes", "in_channels", "image_size")):
            info = self.datasets(dataset, datadir)[2]
            fallback = {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size}
        return model_from_checkpoint(ckpt, path, name=self.args.model, fallback=fallback), ckpt, (dataset, datadir)

    def check(self, paths: list[str]) -> None:
        """Read every checkpoint once and build its model, so that a missing or corrupt one among several stops
        the command before any work is done (and before anything is written)."""
        for path in paths:
            self.load(path)

    def batches(self, dataset: str, datadir: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (dataset, datadir, "batches")
        if key in self._data:
            return self._data[key]
        train = self.datasets(dataset, datadir)[0]
        if len(train) < self.args.num_samples:
            print(
                f"ssam: note: --num_samples {self.args.num_samples} exceeds the {len(train)} training examples "
                f"of {dataset}; using all of them",
                file=sys.stderr,
            )
        self._data[key] = subset_batches(train, self.args.num_samples, self.args.batch_size, self.args.data_seed)
        return self._data[key]


def progress_bar(args: argparse.Namespace, desc: str, total: int | None = None, unit: str = "hvp"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=True if args.quiet else None, leave=False, file=sys.stderr)


def settings_of(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The flags that shape a result, for its JSON record."""
    return {
        k: v
        for k, v in sorted(vars(args).items())
        if k not in ("func", "quiet", "output", "device", *skip) and not callable(v)
    }

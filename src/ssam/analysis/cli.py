"""``ssam hessian``, ``ssam landscape`` and ``ssam sharpness``: argument sets and runners.

Each command exposes ``add_<cmd>_args(parser)`` and ``run_<cmd>(args) -> int``; user mistakes raise
``UsageError`` (one line, exit code 2 in ``ssam.cli``).

All three analyse the same kind of data: a fixed, un-augmented subset of the TRAINING set, namely the
first ``--num_samples`` examples of a permutation seeded by ``--data_seed``.  Sharpness is a property of
the training objective, and a fixed subset makes numbers comparable across runs and re-runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..io import to_plain as _plain
from ..io import write_atomic, write_csv as _write_csv, write_json as _write_json
from .data import subset_batches
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace, per_layer, resolve_params
from .landscape import evaluate_grid, interpolation_direction, random_direction
from .sharpness import TABLE_COLUMNS, markdown_table, summarize_run

__all__ = [
    "add_hessian_args", "add_landscape_args", "add_sharpness_args", "parse_range",
    "run_hessian", "run_landscape", "run_sharpness",
]

# ------------------------------------------------------------------------------------------------ shared

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def parse_range(value: str, flag: str = "--xrange") -> np.ndarray:
    """``"START:STOP:NUM"`` -> ``NUM`` evenly spaced points from START to STOP inclusive, parsed strictly."""
    form = "expected START:STOP:NUM, e.g. -1:1:41 (numbers with START < STOP, NUM an integer >= 2)"
    parts = str(value).split(":")
    if len(parts) != 3 or not re.fullmatch(_NUM, parts[0]) or not re.fullmatch(_NUM, parts[1]) \
            or not re.fullmatch(r"\d+", parts[2]):
        raise UsageError(f"{flag} {value!r}: {form}")
    a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
    if not (math.isfinite(a) and math.isfinite(b)) or a >= b or n < 2:
        raise UsageError(f"{flag} {value!r}: {form}")
    xs = np.linspace(a, b, n)
    # The origin must be exactly 0 so that the grid holds the unperturbed model bit for bit.
    xs[np.abs(xs) < 1e-12 * (b - a)] = 0.0
    return xs


def _add_common(p: argparse.ArgumentParser, many: bool) -> None:
    g = p.add_argument_group("model and data")
    if many:
        g.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                       help="checkpoint file(s) written by ssam train (e.g. RUN/best.pt)")
    else:
        g.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint written by ssam train")
    g.add_argument("--dataset", default=None, help="default: the dataset in the checkpoint's saved config")
    g.add_argument("--datadir", default=None, help="default: the datadir in the checkpoint's saved config")
    g.add_argument("--model", default=None, help="default: the architecture recorded in the checkpoint")
    g.add_argument("--num_samples", type=int, default=4096,
                   help="training examples analysed: the first N of a fixed permutation, without augmentation")
    g.add_argument("--batch_size", type=int, default=256)
    g.add_argument("--data_seed", type=int, default=0, help="seed of the permutation that picks the examples")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the random vectors / directions")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--output", default=None, metavar="DIR",
                   help="output folder (default: 'analysis' next to the checkpoint; ./analysis for several)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is None or v < 1:
            raise UsageError(f"--{n} {v!r} is out of range; allowed: an integer >= 1")


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(spec)


def _output_dir(args: argparse.Namespace, paths: list[str]) -> Path:
    if args.output:
        out = Path(args.output)
    elif len(paths) == 1:
        out = Path(paths[0]).parent / "analysis"
    else:
        out = Path("analysis")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_names(paths: list[str]) -> list[str]:
    """The run folder's name (RUN/best.pt -> RUN); longer forms only where that would be ambiguous."""
    for form in (lambda p: p.parent.name or p.stem, lambda p: f"{p.parent.name}/{p.stem}", lambda p: str(p)):
        names = [form(Path(p).resolve()) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]


class _Loader:
    """Checkpoints -> models, and (dataset, datadir) -> analysis batches, each data set built once."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._data: dict[tuple, tuple] = {}

    def datasets(self, dataset: str, datadir: str | None):
        key = (dataset, datadir)
        if key not in self._data:
            from ..data import build_datasets
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
        from ..checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        dataset, datadir = self.spec(ckpt, path)
        margs = ckpt.get("model_args") or {}
        fallback = None
        if not all(k in margs for k in ("num_classes", "in_channels", "image_size")):
            info = self.datasets(dataset, datadir)[2]
            fallback = {"num_classes": info.num_classes, "in_channels": info.in_channels,
                        "image_size": info.image_size}
        return model_from_checkpoint(ckpt, path, name=self.args.model, fallback=fallback), ckpt, (dataset, datadir)

    def batches(self, dataset: str, datadir: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (dataset, datadir, "batches")
        if key in self._data:
            return self._data[key]
        train = self.datasets(dataset, datadir)[0]
        if len(train) < self.args.num_samples:
            print(f"ssam: note: --num_samples {self.args.num_samples} exceeds the {len(train)} training examples "
                  f"of {dataset}; using all of them", file=sys.stderr)
        self._data[key] = subset_batches(train, self.args.num_samples, self.args.batch_size, self.args.data_seed)
        return self._data[key]


def _bar(args: argparse.Namespace, desc: str, total: int | None = None, unit: str = "hvp"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=True if args.quiet else None, leave=False,
                file=sys.stderr)


def _settings(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in sorted(vars(args).items())
            if k not in ("func", "quiet", "output", "device", *skip) and not callable(v)}


# ----------------------------------------------------------------------------------------------- hessian

def add_hessian_args(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, many=False)
    g = parser.add_argument_group("hessian")
    g.add_argument("--top_k", type=int, default=5, help="number of top eigenvalues (Lanczos)")
    g.add_argument("--max_iter", type=int, default=100, help="at most this many Hessian-vector products for them")
    g.add_argument("--tol", type=float, default=1e-4, help="relative residual at which a top eigenvalue is done")
    g.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    g.add_argument("--trace_max_iter", type=int, default=200, help="at most this many Hutchinson samples")
    g.add_argument("--trace_tol", type=float, default=1e-2, help="stop when stderr <= tol * |trace|")
    g.add_argument("--density", action="store_true", help="also estimate the eigenvalue density (SLQ) -> esd.png")
    g.add_argument("--density_iter", type=int, default=100, help="Lanczos steps per SLQ run")
    g.add_argument("--density_runs", type=int, default=1, help="SLQ runs (random start vectors)")
    g.add_argument("--density_sigma", type=float, default=None,
                   help="Gaussian broadening in eigenvalue units (default: 1%% of the spectral range)")
    g.add_argument("--params", default=None, metavar="REGEX",
                   help="analyse only the parameters whose names match (re.search), e.g. 'layer4|fc'")
    g.add_argument("--per_layer", action="store_true",
                   help="also top eigenvalue and trace of each parameter tensor's diagonal block")


def run_hessian(args: argparse.Namespace) -> int:
    _positive(args, "num_samples", "batch_size", "top_k", "max_iter", "trace_max_iter", "density_iter", "density_runs")
    for flag in ("tol", "trace_tol"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag} {getattr(args, flag)!r} is out of range; allowed: a number > 0")
    if args.density_sigma is not None and not args.density_sigma > 0:
        raise UsageError(f"--density_sigma {args.density_sigma!r} is out of range; allowed: a number > 0")
    device = _device(args.device)
    out = _output_dir(args, [args.checkpoint])
    loader = _Loader(args)
    model, ckpt, (dataset, datadir) = loader.load(args.checkpoint)
    model.to(device)
    params = resolve_params(model, args.params) if args.params else None
    n_params = sum(p.numel() for _, p in (params or resolve_params(model)))
    batches = loader.batches(dataset, datadir)
    loss_fn = nn.CrossEntropyLoss()
    common = dict(params=params, seed=args.seed, device=device)
    result: dict[str, Any] = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "run": _run_names([args.checkpoint])[0],
        "dataset": dataset, "model": type(model).__name__, "num_params": n_params,
        "num_examples": sum(len(y) for _, y in batches), "seed": args.seed, "loss": "cross_entropy (mean)",
        "settings": _settings(args), "eigenvalues": None, "trace": None, "density": None, "per_layer": None,
        "seconds": {},
    }
    bar = _bar(args, "hessian")
    try:
        t0 = time.time()
        bar.set_description("top eigenvalues")
        result["eigenvalues"] = hessian_eigenvalues(model, loss_fn, batches, top_k=args.top_k, max_iter=args.max_iter,
                                                    tol=args.tol, progress=bar.update, **common)
        result["seconds"]["eigenvalues"] = time.time() - t0
        print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in result["eigenvalues"]))
        if args.trace:
            t0 = time.time()
            bar.set_description("trace")
            tr, se, ns = hessian_trace(model, loss_fn, batches, max_iter=args.trace_max_iter, tol=args.trace_tol,
                                       progress=bar.update, **common)
            result["trace"] = {"mean": tr, "stderr": se, "n_samples": ns}
            result["seconds"]["trace"] = time.time() - t0
            print(f"trace: {tr:.6g} ± {se:.3g} ({ns} Hutchinson samples)")
        if args.density:
            t0 = time.time()
            bar.set_description("density")
            grid, dens, nodes, weights = hessian_density(
                model, loss_fn, batches, n_iter=args.density_iter, n_v=args.density_runs, sigma=args.density_sigma,
                return_nodes=True, progress=bar.update, **common)
            result["density"] = {"grid": grid, "density": dens, "nodes": nodes, "weights": weights,
                                 "sigma": args.density_sigma if args.density_sigma is not None
                                 else 0.01 * float(np.nanmax(nodes) - np.nanmin(nodes)),
                                 "n_iter": args.density_iter, "n_v": args.density_runs}
            result["seconds"]["density"] = time.time() - t0
        if args.per_layer:
            t0 = time.time()
            bar.set_description("per layer")
            rows = per_layer(model, loss_fn, batches, max_iter=args.max_iter, tol=args.tol,
                             trace_max_iter=args.trace_max_iter, trace_tol=args.trace_tol, progress=bar.update,
                             **common)
            result["per_layer"] = rows
            result["seconds"]["per_layer"] = time.time() - t0
    finally:
        bar.close()
    _write_json(out / "hessian.json", result)
    if result["per_layer"] is not None:
        cols = ["name", "numel", "lambda_max", "trace", "trace_stderr", "trace_samples"]
        print(markdown_table(result["per_layer"], cols))
        _write_csv(out / "per_layer.csv", result["per_layer"], cols)
    if result["density"] is not None:
        from .plots import plot_esd
        plot_esd(grid, dens, out / "esd.png", eigenvalues=result["eigenvalues"],
                 title=f"Hessian eigenvalue density: {result['run']}")
    print(f"wrote {out / 'hessian.json'}")
    return 0


# --------------------------------------------------------------------------------------------- landscape

def add_landscape_args(parser: argparse.ArgumentParser) -> None:
    # argparse takes "-1:1:41" for an option (it only knows plain negative numbers); let values that start
    # like a negative number through, as Python 3.13 does by itself.
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-\.?\d")
    _add_common(parser, many=True)
    g = parser.add_argument_group("landscape")
    g.add_argument("--dims", type=int, default=1, choices=(1, 2))
    g.add_argument("--xrange", default="-1:1:41", metavar="START:STOP:NUM")
    g.add_argument("--yrange", default=None, metavar="START:STOP:NUM", help="2-D only (default: as --xrange)")
    g.add_argument("--ignore", default="biasbn", choices=("biasbn", "none"),
                   help="biasbn: biases and BN parameters stay fixed; none: they move too (normalised per tensor)")
    g.add_argument("--to", default=None, metavar="CKPT",
                   help="first direction = the straight line to this checkpoint (x=0: the model, x=1: CKPT)")
    g.add_argument("--resume", action="store_true", help="continue the grid in --output's landscape.npz")


def _save_npz(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def run_landscape(args: argparse.Namespace) -> int:
    xs = parse_range(args.xrange, "--xrange")
    if args.dims == 2:
        ys = parse_range(args.yrange if args.yrange is not None else args.xrange, "--yrange")
    elif args.yrange is not None:
        raise UsageError(f"--yrange {args.yrange!r} is only used with --dims 2")
    else:
        ys = None
    _positive(args, "num_samples", "batch_size")
    device = _device(args.device)
    paths = list(args.checkpoint)
    names = _run_names(paths)
    out = _output_dir(args, paths)
    ignore = None if args.ignore == "none" else args.ignore
    # Exactly what determines the grid's values: a resumed grid must not mix two different landscapes.
    settings = {
        "checkpoint": [str(Path(p).resolve()) for p in paths], "to": str(Path(args.to).resolve()) if args.to else None,
        "dims": args.dims, "xs": xs.tolist(), "ys": None if ys is None else ys.tolist(), "ignore": args.ignore,
        "norm": "filter", "seed": args.seed, "dataset": args.dataset, "datadir": args.datadir, "model": args.model,
        "num_samples": args.num_samples, "data_seed": args.data_seed,
    }  # not --batch_size: in eval mode with size weighting it changes nothing but rounding
    shape = (len(paths), len(xs)) + ((len(ys),) if ys is not None else ())
    npz_path = out / "landscape.npz"
    loss = np.full(shape, np.nan)
    acc = np.full(shape, np.nan)
    if npz_path.exists():
        if not args.resume:
            raise UsageError(f"{npz_path} exists; pass --resume to continue that grid, or choose another --output")
        with np.load(npz_path, allow_pickle=False) as z:
            saved = json.loads(str(z["settings"]))
            for k in sorted(set(saved) | set(settings)):
                if _plain(saved.get(k)) != _plain(settings.get(k)):
                    raise UsageError(f"--resume: {k} is {settings.get(k)!r} now but {saved.get(k)!r} in {npz_path}; "
                                     f"rerun with the same settings or another --output")
            loss, acc = z["loss"].copy(), z["acc"].copy()
        print(f"resuming {npz_path}: {int(np.isnan(loss).sum())} of {loss.size} points left")

    def save() -> None:
        arrays = dict(xs=xs, loss=loss, acc=acc, names=np.array(names), settings=np.array(json.dumps(_plain(settings))))
        if ys is not None:
            arrays["ys"] = ys
        _save_npz(npz_path, **arrays)

    loader = _Loader(args)
    loss_fn = nn.CrossEntropyLoss()
    other = None
    if args.to:
        from ..checkpoint import load_checkpoint
        other = load_checkpoint(args.to)["model"]
    bar = _bar(args, "landscape", total=int(np.isnan(loss).sum()), unit="pt")
    try:
        for i, path in enumerate(paths):
            if not np.isnan(loss[i]).any():
                continue
            model, _, (dataset, datadir) = loader.load(path)
            model.to(device)
            dirs = [interpolation_direction(model.state_dict(), other) if other is not None
                    else random_direction(model, seed=args.seed, ignore=ignore)]
            if ys is not None:
                dirs.append(random_direction(model, seed=args.seed + 1, ignore=ignore))
            last = [time.time()]

            def callback(partial: dict, i: int = i) -> None:
                loss[i], acc[i] = partial["loss"], partial["acc"]
                bar.update(1)
                # Throttled: a kill loses at most about a second of work, and tiny grids do not fsync per point.
                if time.time() - last[0] >= 1.0 or partial["done"] == partial["total"]:
                    save()
                    last[0] = time.time()

            bar.set_description(names[i])
            evaluate_grid(model, loss_fn, loader.batches(dataset, datadir), dirs, xs, ys, callback=callback,
                          resume={"loss": loss[i], "acc": acc[i]}, device=device)
    finally:
        bar.close()
    save()
    _write_json(out / "landscape.json", {"settings": settings, "names": names, "xs": xs, "ys": ys,
                                         "loss": loss, "acc": acc,
                                         "axes": ["checkpoint", "x"] + (["y"] if ys is not None else [])})
    from .plots import plot_landscape_1d, plot_landscape_2d
    written = []
    if ys is None:
        xlabel = "interpolation coefficient (0: checkpoint, 1: --to)" if args.to else "filter-normalised direction"
        plot_landscape_1d(xs, {n: {"loss": loss[i], "acc": acc[i]} for i, n in enumerate(names)},
                          out / "landscape_loss.png", out / "landscape_acc.png", xlabel=xlabel)
        written += ["landscape_loss.png", "landscape_acc.png"]
    else:
        for i, n in enumerate(names):
            suffix = "" if len(names) == 1 else "_" + re.sub(r"[^A-Za-z0-9._-]+", "_", n)
            plot_landscape_2d(xs, ys, loss[i], out / f"landscape_contour{suffix}.png",
                              out / f"landscape_surface{suffix}.png", title=n)
            written += [f"landscape_contour{suffix}.png", f"landscape_surface{suffix}.png"]
    for i, n in enumerate(names):
        finite = loss[i][np.isfinite(loss[i])]
        if finite.size:
            print(f"{n}: loss min {finite.min():.4g}, max {finite.max():.4g}")
    print(f"wrote {out / 'landscape.npz'}, landscape.json, " + ", ".join(written))
    return 0


# --------------------------------------------------------------------------------------------- sharpness

def add_sharpness_args(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, many=True)
    g = parser.add_argument_group("sharpness")
    g.add_argument("--radius", type=float, default=0.05,
                   help="loss increase at w + r*d, d filter-normalised (each filter moves by r times its norm)")
    g.add_argument("--n_directions", type=int, default=5, help="random directions averaged for the loss increase")
    g.add_argument("--max_iter", type=int, default=100, help="Hessian-vector products for the top eigenvalue")
    g.add_argument("--tol", type=float, default=1e-4)
    g.add_argument("--trace_max_iter", type=int, default=200)
    g.add_argument("--trace_tol", type=float, default=1e-2)


def _recorded_acc(ckpt: dict, path: str) -> tuple[float | None, str]:
    best = ckpt.get("best_acc1")
    # A checkpoint written before any evaluation carries a placeholder 0 (or none at all).
    if isinstance(best, (int, float)) and math.isfinite(best) and best > 0:
        return float(best), "checkpoint"
    metrics = Path(path).parent / "metrics.jsonl"
    if metrics.is_file():
        found = []
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                for key in ("test_acc1", "acc1", "val_acc1"):
                    v = rec.get(key)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        found.append(float(v))
                        break
        if found:
            return max(found), "metrics.jsonl"
    return None, "evaluated"


def _test_accuracy(model: nn.Module, test_ds, batch_size: int, device: torch.device) -> float:
    from torch.utils.data import DataLoader

    was = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=0):
                x, y = x.to(device), y.to(device)
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
    finally:
        model.train(was)
    return 100.0 * correct / max(total, 1)


def run_sharpness(args: argparse.Namespace) -> int:
    _positive(args, "num_samples", "batch_size", "n_directions", "max_iter", "trace_max_iter")
    if not (math.isfinite(args.radius) and args.radius > 0):
        raise UsageError(f"--radius {args.radius!r} is out of range; allowed: a number > 0")
    for flag in ("tol", "trace_tol"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag} {getattr(args, flag)!r} is out of range; allowed: a number > 0")
    device = _device(args.device)
    paths = list(args.checkpoint)
    names = _run_names(paths)
    out = _output_dir(args, paths)
    loader = _Loader(args)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    bar = _bar(args, "sharpness")
    try:
        for path, name in zip(paths, names):
            model, ckpt, (dataset, datadir) = loader.load(path)
            model.to(device)
            acc, source = _recorded_acc(ckpt, path)
            if acc is None:
                acc = _test_accuracy(model, loader.datasets(dataset, datadir)[1], args.batch_size, device)
            bar.set_description(name)
            row = summarize_run(model, loss_fn, loader.batches(dataset, datadir), name=name, test_acc1=acc,
                                radius=args.radius, n_directions=args.n_directions, seed=args.seed,
                                max_iter=args.max_iter, tol=args.tol, trace_max_iter=args.trace_max_iter,
                                trace_tol=args.trace_tol, device=device, progress=bar.update)
            row["acc_source"] = source
            row["checkpoint"] = str(Path(path).resolve())
            rows.append(row)
    finally:
        bar.close()
    columns = TABLE_COLUMNS
    table = markdown_table(rows, columns)
    print(f"loss increase at radius {args.radius:g} (filter-normalised), mean over {args.n_directions} directions")
    print(table)
    extra = ["trace_samples", "radius", "acc_source", "checkpoint"]
    _write_csv(out / "sharpness.csv", rows, columns + extra)
    _write_json(out / "sharpness.json", {"settings": _settings(args), "rows": rows})
    write_atomic(out / "sharpness.md", (table + "\n").encode())
    print(f"wrote {out / 'sharpness.csv'}, sharpness.json, sharpness.md")
    return 0

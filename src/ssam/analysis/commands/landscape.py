"""``ssam landscape``: loss and accuracy on a 1-D or 2-D grid around checkpoints, resumable point by point."""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ...errors import UsageError
from ...io import to_plain, write_atomic, write_json
from ..landscape import evaluate_grid, interpolation_direction, random_direction
from .common import (
    Loader,
    add_common_args,
    check_positive,
    checkpoint_file,
    output_dir,
    parse_range,
    pick_device,
    progress_bar,
    run_names,
)


def add_landscape_args(parser: argparse.ArgumentParser) -> None:
    # argparse takes "-1:1:41" for an option (it only knows plain negative numbers); let values that start
    # like a negative number through, as Python 3.13 does by itself.
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-\.?\d")
    add_common_args(parser, many=True)
    g = parser.add_argument_group("landscape")
    g.add_argument("--dims", type=int, default=1, choices=(1, 2), help="1: curves; 2: contour and surface")
    g.add_argument("--xrange", default="-1:1:41", metavar="START:STOP:NUM", help="steps along the first direction")
    g.add_argument("--yrange", default=None, metavar="START:STOP:NUM", help="2-D only (default: as --xrange)")
    g.add_argument(
        "--ignore",
        default="biasbn",
        choices=("biasbn", "none"),
        help="biasbn: biases and BN parameters stay fixed; none: they move too (normalised per tensor)",
    )
    g.add_argument(
        "--to",
        default=None,
        metavar="CKPT",
        help="first direction = the straight line to this checkpoint (x=0: the model, x=1: CKPT)",
    )
    g.add_argument("--resume", action="store_true", help="continue the grid in --output's landscape.npz")


def _save_npz(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def _axes(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    xs = parse_range(args.xrange, "--xrange")
    if args.dims == 2:
        return xs, parse_range(args.yrange if args.yrange is not None else args.xrange, "--yrange")
    if args.yrange is not None:
        raise UsageError(f"--yrange {args.yrange!r} is only used with --dims 2")
    return xs, None


def _start_grid(npz_path: Path, resume: bool, settings: dict, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Empty (NaN) loss and accuracy grids, or those of ``npz_path`` when resuming the same settings."""
    if not npz_path.exists():
        return np.full(shape, np.nan), np.full(shape, np.nan)
    if not resume:
        raise UsageError(f"{npz_path} exists; pass --resume to continue that grid, or choose another --output")
    with np.load(npz_path, allow_pickle=False) as z:
        saved = json.loads(str(z["settings"]))
        for k in sorted(set(saved) | set(settings)):
            if to_plain(saved.get(k)) != to_plain(settings.get(k)):
                raise UsageError(
                    f"--resume: {k} is {settings.get(k)!r} now but {saved.get(k)!r} in {npz_path}; "
                    f"rerun with the same settings or another --output"
                )
        loss, acc = z["loss"].copy(), z["acc"].copy()
    print(f"resuming {npz_path}: {int(np.isnan(loss).sum())} of {loss.size} points left")
    return loss, acc


def _plot(args: argparse.Namespace, out: Path, names: list[str], xs, ys, loss, acc) -> list[str]:
    from ..plots import file_slug, plot_landscape_1d, plot_landscape_2d

    if ys is None:
        target = run_names([args.to])[0] if args.to else None
        xlabel = (
            f"interpolation coefficient (0: checkpoint, 1: {target})"
            if target
            else "step along a filter-normalised direction"
        )
        plot_landscape_1d(
            xs,
            {n: {"loss": loss[i], "acc": acc[i]} for i, n in enumerate(names)},
            out / "landscape_loss.png",
            out / "landscape_acc.png",
            xlabel=xlabel,
            title=f"towards {target}" if target else None,
        )
        return ["landscape_loss.png", "landscape_acc.png"]
    written = []
    for i, n in enumerate(names):
        # Several checkpoints: the position and a short slug keep file names short and distinct.
        suffix = "" if len(names) == 1 else f"_{i + 1}_{file_slug(n)}"
        xlabel = f"towards {run_names([args.to])[0]}" if args.to else "direction 1"
        plot_landscape_2d(
            xs,
            ys,
            loss[i],
            out / f"landscape_contour{suffix}.png",
            out / f"landscape_surface{suffix}.png",
            title=n,
            xlabel=xlabel,
        )
        written += [f"landscape_contour{suffix}.png", f"landscape_surface{suffix}.png"]
    return written


def run_landscape(args: argparse.Namespace) -> int:
    xs, ys = _axes(args)
    check_positive(args, "num_samples", "batch_size")
    device = pick_device(args.device)
    paths = [checkpoint_file(p) for p in args.checkpoint]
    if args.to:
        args.to = checkpoint_file(args.to, "--to")
    names = run_names(paths)
    out = output_dir(args, paths)
    loader = Loader(args)
    if len(paths) > 1:
        loader.check(paths)
    # Exactly what determines the grid's values: a resumed grid must not mix two different landscapes.
    settings = {
        "checkpoint": [str(Path(p).resolve()) for p in paths],
        "to": str(Path(args.to).resolve()) if args.to else None,
        "dims": args.dims,
        "xs": xs.tolist(),
        "ys": None if ys is None else ys.tolist(),
        "ignore": args.ignore,
        "norm": "filter",
        "seed": args.seed,
        "dataset": args.dataset,
        "datadir": args.datadir,
        "model": args.model,
        "num_samples": args.num_samples,
        "data_seed": args.data_seed,
    }  # not --batch_size: in eval mode with size weighting it changes nothing but rounding
    npz_path = out / "landscape.npz"
    loss, acc = _start_grid(
        npz_path, args.resume, settings, (len(paths), len(xs)) + ((len(ys),) if ys is not None else ())
    )

    def save() -> None:
        arrays = dict(
            xs=xs, loss=loss, acc=acc, names=np.array(names), settings=np.array(json.dumps(to_plain(settings)))
        )
        if ys is not None:
            arrays["ys"] = ys
        _save_npz(npz_path, **arrays)

    bar = progress_bar(args, "landscape", total=int(np.isnan(loss).sum()), unit="pt")
    try:
        _evaluate_all(args, loader, paths, names, xs, ys, loss, acc, save, bar, device)
    finally:
        bar.close()
    save()
    write_json(
        out / "landscape.json",
        {
            "settings": settings,
            "names": names,
            "xs": xs,
            "ys": ys,
            "loss": loss,
            "acc": acc,
            "axes": ["checkpoint", "x"] + (["y"] if ys is not None else []),
        },
    )
    written = _plot(args, out, names, xs, ys, loss, acc)
    for i, n in enumerate(names):
        finite = loss[i][np.isfinite(loss[i])]
        if finite.size:
            print(f"{n}: loss min {finite.min():.4g}, max {finite.max():.4g}")
    print(f"wrote {out / 'landscape.npz'}, landscape.json, " + ", ".join(written))
    return 0


def _evaluate_all(args, loader, paths, names, xs, ys, loss, acc, save, bar, device) -> None:
    """Fill the NaN points of ``loss``/``acc``, checkpoint by checkpoint, saving about once a second."""
    other = None
    if args.to:
        from ...checkpoint import load_checkpoint

        other = load_checkpoint(args.to)["model"]
    ignore = None if args.ignore == "none" else args.ignore
    for i, path in enumerate(paths):
        if not np.isnan(loss[i]).any():
            continue
        model, _, (dataset, datadir) = loader.load(path)
        model.to(device)
        dirs = [
            interpolation_direction(model.state_dict(), other)
            if other is not None
            else random_direction(model, seed=args.seed, ignore=ignore)
        ]
        if ys is not None:
            dirs.append(random_direction(model, seed=args.seed + 1, ignore=ignore))
        last = [time.time()]

        def callback(partial: dict, i: int = i, last: list = last) -> None:
            loss[i], acc[i] = partial["loss"], partial["acc"]
            bar.update(1)
            # Throttled: a kill loses at most about a second of work, and tiny grids do not fsync per point.
            if time.time() - last[0] >= 1.0 or partial["done"] == partial["total"]:
                save()
                last[0] = time.time()

        bar.set_description(names[i])
        evaluate_grid(
            model,
            nn.CrossEntropyLoss(),
            loader.batches(dataset, datadir),
            dirs,
            xs,
            ys,
            callback=callback,
            resume={"loss": loss[i], "acc": acc[i]},
            device=device,
        )

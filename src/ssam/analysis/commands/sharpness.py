"""``ssam sharpness``: one table of accuracy, λ_max, trace and loss increase for several checkpoints."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from ...errors import UsageError
from ...io import write_atomic, write_csv, write_json
from ..sharpness import TABLE_COLUMNS, markdown_table, summarize_run
from .common import (
    Loader,
    add_common_args,
    check_positive,
    check_tolerances,
    checkpoint_file,
    output_dir,
    pick_device,
    progress_bar,
    run_names,
    settings_of,
)


def add_sharpness_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, many=True)
    g = parser.add_argument_group("sharpness")
    g.add_argument(
        "--radius",
        type=float,
        default=0.05,
        help="loss increase at w + r*d, d filter-normalised (each filter moves by r times its norm)",
    )
    g.add_argument("--n_directions", type=int, default=5, help="random directions averaged for the loss increase")
    g.add_argument("--max_iter", type=int, default=100, help="Hessian-vector products for the top eigenvalue")
    g.add_argument(
        "--tol", type=float, default=1e-4, help="relative accuracy at which lambda_max is done (Lanczos error bound)"
    )
    g.add_argument("--trace_max_iter", type=int, default=200, help="at most this many Hutchinson samples")
    g.add_argument("--trace_tol", type=float, default=1e-2, help="stop when stderr <= tol * |trace|")


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
    check_positive(args, "num_samples", "batch_size", "n_directions", "max_iter", "trace_max_iter")
    if not (math.isfinite(args.radius) and args.radius > 0):
        raise UsageError(f"--radius {args.radius!r} is out of range; allowed: a number > 0")
    check_tolerances(args, "tol", "trace_tol")
    device = pick_device(args.device)
    paths = [checkpoint_file(p) for p in args.checkpoint]
    names = run_names(paths)
    out = output_dir(args, paths)
    loader = Loader(args)
    if len(paths) > 1:
        loader.check(paths)
    rows = []
    bar = progress_bar(args, "sharpness")
    try:
        for path, name in zip(paths, names):
            model, ckpt, (dataset, datadir) = loader.load(path)
            model.to(device)
            acc, source = _recorded_acc(ckpt, path)
            if acc is None:
                acc = _test_accuracy(model, loader.datasets(dataset, datadir)[1], args.batch_size, device)
            bar.set_description(name)
            row = summarize_run(
                model,
                nn.CrossEntropyLoss(),
                loader.batches(dataset, datadir),
                name=name,
                test_acc1=acc,
                radius=args.radius,
                n_directions=args.n_directions,
                seed=args.seed,
                max_iter=args.max_iter,
                tol=args.tol,
                trace_max_iter=args.trace_max_iter,
                trace_tol=args.trace_tol,
                device=device,
                progress=bar.update,
            )
            row["acc_source"] = source
            row["checkpoint"] = str(Path(path).resolve())
            rows.append(row)
    finally:
        bar.close()
    table = markdown_table(rows, TABLE_COLUMNS)
    print(f"loss increase at radius {args.radius:g} (filter-normalised), mean over {args.n_directions} directions")
    print(table)
    extra = ["trace_samples", "radius", "acc_source", "checkpoint"]
    write_csv(out / "sharpness.csv", rows, TABLE_COLUMNS + extra)
    write_json(out / "sharpness.json", {"settings": settings_of(args), "rows": rows})
    write_atomic(out / "sharpness.md", (table + "\n").encode())
    print(f"wrote {out / 'sharpness.csv'}, sharpness.json, sharpness.md")
    return 0

"""``ssam hessian``: top eigenvalues, trace, density and per-layer table of one checkpoint.

Its ``--profile`` flags (ssam against PyHessian on the same work) belong to ``ssam.bench.hessian``; ``ssam.cli``
adds them to this parser, so that the analysis layer does not import the bench above it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UsageError
from ...io import write_csv, write_json
from ..density import hessian_density
from ..eigen import hessian_eigenvalues
from ..params import resolve_params
from ..per_layer import PER_LAYER_COLUMNS, per_layer
from ..sharpness import markdown_table
from ..trace import TRACE_METHODS, hessian_trace
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


def add_hessian_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, many=False)
    g = parser.add_argument_group("hessian")
    g.add_argument("--top_k", type=int, default=5, help="number of top eigenvalues (Lanczos)")
    g.add_argument("--max_iter", type=int, default=100, help="at most this many Hessian-vector products for them")
    g.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="relative accuracy at which a top eigenvalue is done (Lanczos error bound)",
    )
    g.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    g.add_argument("--trace_max_iter", type=int, default=200, help="at most this many Hutchinson samples")
    g.add_argument("--trace_tol", type=float, default=1e-2, help="stop when stderr <= tol * |trace|")
    g.add_argument(
        "--trace_method",
        default="auto",
        choices=TRACE_METHODS,
        help="each sample by Taylor mode (one second-order forward pass), by a Hessian-vector product, or auto: "
        "Taylor mode where the model is covered",
    )
    g.add_argument("--density", action="store_true", help="also estimate the eigenvalue density (SLQ) -> esd.png")
    g.add_argument("--density_iter", type=int, default=100, help="Lanczos steps per SLQ run")
    g.add_argument("--density_runs", type=int, default=1, help="SLQ runs (random start vectors)")
    g.add_argument(
        "--density_sigma",
        type=float,
        default=None,
        help="Gaussian broadening in eigenvalue units (default: 1%% of the spectral range)",
    )
    g.add_argument(
        "--params",
        default=None,
        metavar="REGEX",
        help="analyse only the parameters whose names match (re.search), e.g. 'layer4|fc'",
    )
    g.add_argument(
        "--per_layer",
        action="store_true",
        help="also top eigenvalue and trace of each parameter tensor's diagonal block",
    )
    g.add_argument(
        "--graph_memory",
        default="auto",
        metavar="GIB",
        help="GiB of batch gradient graphs kept between Hessian-vector products; beyond it a batch's "
        "graph is rebuilt at every product; 0: never kept; auto: half the free memory",
    )


def parse_graph_memory(value: str) -> int | None:
    """``--graph_memory``: bytes, or None for auto (half the free memory)."""
    if value == "auto":
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not gib >= 0 or gib == float("inf"):
        raise UsageError(f"--graph_memory {value!r} is out of range; allowed: auto or a number of GiB >= 0")
    return int(gib * 2**30)


def check_and_locate(args: argparse.Namespace) -> tuple[int | None, torch.device, Path]:
    """The command's flags checked (one line and exit 2 for a bad one), then the graph memory in bytes, the device,
    and the output folder of the checkpoint (``args.checkpoint`` becomes the file); also what ``--profile`` runs on."""
    check_positive(
        args,
        "num_samples",
        "batch_size",
        "top_k",
        "max_iter",
        "trace_max_iter",
        "density_iter",
        "density_runs",
    )
    check_tolerances(args, "tol", "trace_tol")
    if args.density_sigma is not None and not args.density_sigma > 0:
        raise UsageError(f"--density_sigma {args.density_sigma!r} is out of range; allowed: a number > 0")
    graph_memory = parse_graph_memory(args.graph_memory)
    device = pick_device(args.device)
    args.checkpoint = checkpoint_file(args.checkpoint)
    return graph_memory, device, output_dir(args, [args.checkpoint])


def run_hessian(args: argparse.Namespace) -> int:
    graph_memory, device, out = check_and_locate(args)
    loader = Loader(args)
    model, ckpt, (dataset, datadir) = loader.load(args.checkpoint)
    model.to(device)
    params = resolve_params(model, args.params) if args.params else None
    n_params = sum(p.numel() for _, p in (params or resolve_params(model)))
    batches = loader.batches(dataset, datadir)
    loss_fn = nn.CrossEntropyLoss()
    common = dict(params=params, seed=args.seed, device=device, graph_memory=graph_memory)
    result: dict[str, Any] = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "run": run_names([args.checkpoint])[0],
        "dataset": dataset,
        "model": type(model).__name__,
        "num_params": n_params,
        "num_examples": sum(len(y) for _, y in batches),
        "seed": args.seed,
        "loss": "cross_entropy (mean)",
        "settings": settings_of(args),
        "eigenvalues": None,
        "trace": None,
        "density": None,
        "per_layer": None,
        "seconds": {},
    }
    bar = progress_bar(args, "hessian")

    def timed(part: str, fn, *a, **kw):
        bar.set_description(part.replace("_", " "))
        t0 = time.time()
        value = fn(model, loss_fn, batches, *a, progress=bar.update, **common, **kw)
        result["seconds"][part] = time.time() - t0
        return value

    try:
        result["eigenvalues"] = timed(
            "eigenvalues", hessian_eigenvalues, top_k=args.top_k, max_iter=args.max_iter, tol=args.tol
        )
        print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in result["eigenvalues"]))
        if args.trace:
            tr, se, ns = timed(
                "trace", hessian_trace, max_iter=args.trace_max_iter, tol=args.trace_tol, method=args.trace_method
            )
            result["trace"] = {"mean": tr, "stderr": se, "n_samples": ns}
            print(f"trace: {tr:.6g} ± {se:.3g} ({ns} Hutchinson samples)")
        if args.density:
            grid, dens, nodes, weights = timed(
                "density",
                hessian_density,
                n_iter=args.density_iter,
                n_v=args.density_runs,
                sigma=args.density_sigma,
                return_nodes=True,
            )
            result["density"] = {
                "grid": grid,
                "density": dens,
                "nodes": nodes,
                "weights": weights,
                "sigma": args.density_sigma
                if args.density_sigma is not None
                else 0.01 * float(np.nanmax(nodes) - np.nanmin(nodes)),
                "n_iter": args.density_iter,
                "n_v": args.density_runs,
            }
        if args.per_layer:
            result["per_layer"] = timed(
                "per_layer",
                per_layer,
                max_iter=args.max_iter,
                tol=args.tol,
                trace_max_iter=args.trace_max_iter,
                trace_tol=args.trace_tol,
            )
    finally:
        bar.close()
    write_json(out / "hessian.json", result)
    written = [out / "hessian.json"]
    if result["per_layer"] is not None:
        print(markdown_table(result["per_layer"], PER_LAYER_COLUMNS))
        write_csv(out / "per_layer.csv", result["per_layer"], PER_LAYER_COLUMNS)
        written.append(out / "per_layer.csv")
    if result["density"] is not None:
        from ..plots import plot_esd

        plot_esd(grid, dens, out / "esd.png", eigenvalues=result["eigenvalues"], subtitle=result["run"])
        written.append(out / "esd.png")
    print("wrote " + ", ".join(str(f) for f in written))
    return 0

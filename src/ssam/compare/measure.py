"""Sharpness of each final model: λ_max (Lanczos) and the Hessian trace (Hutchinson), cached per run folder."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from ..errors import UsageError
from ..io import write_json
from ..runfolder import RunFolder
from .console import say
from .plan import Run, is_finished, read_json_or_none

HESSIAN_BATCH = 128
LANCZOS_MAX_ITER = 40
LANCZOS_TOL = 1e-3
TRACE_MAX_ITER = 64
TRACE_TOL = 0.02
SMALL_MODEL = 1_000_000


def _hessian_batches(config: dict, samples: int) -> list:
    from ..analysis.data import subset_batches
    from ..data import build_training_data

    # A fixed seed and no augmentation: every run of the comparison is measured on the same examples (with their
    # true labels: a run trained under label noise is measured on the clean training loss). A run on a subset
    # (--train_subset) is measured on examples of its own subset, the validation split left out.
    data = build_training_data(
        config["dataset"],
        config.get("datadir"),
        augment=False,
        train_subset=config.get("train_subset") or None,
        val_split=int(config.get("val_split") or 0),
        seed=int(config.get("seed", 0)),
    )
    return subset_batches(data.train, samples, HESSIAN_BATCH, seed=0)


def _data_key(config: dict) -> tuple:
    own = (config.get("train_subset") or 0, config.get("val_split") or 0)
    return (config["dataset"], config.get("datadir"), *((*own, config.get("seed")) if any(own) else ()))


def hessian_of_run(run_folder: Path, samples: int, data_cache: dict, device: str) -> dict:
    """λ_max and Hutchinson trace of the final model (``last.pt``), cached in ``hessian.json`` of the run."""
    import torch
    from torch import nn

    from ..analysis import hessian_eigenvalues, hessian_trace
    from ..checkpoint import load_checkpoint, model_from_checkpoint

    ckpt_path = run_folder / RunFolder.LAST
    st = ckpt_path.stat()
    key = {
        "checkpoint_size": st.st_size,
        "checkpoint_mtime_ns": st.st_mtime_ns,
        "samples": samples,
        "lanczos_max_iter": LANCZOS_MAX_ITER,
        "trace_max_iter": TRACE_MAX_ITER,
    }
    cache_path = run_folder / RunFolder.HESSIAN
    cached = read_json_or_none(cache_path)
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
        return cached
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("config") or {}
    if "dataset" not in config:
        raise UsageError(f"{ckpt_path} lacks config.dataset; cannot pick the data for its Hessian")
    model = model_from_checkpoint(ckpt, ckpt_path)
    data_key = _data_key(config)
    if data_key not in data_cache:
        data_cache[data_key] = _hessian_batches(config, samples)
    batches = data_cache[data_key]
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    threads = torch.get_num_threads()
    if device == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # Double backward through a tiny network is all dispatch overhead: extra threads only add
        # synchronisation (measured 20x slower with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # Lanczos warns when it stops at max_iter: for a comparison of sharpness 1e-3 relative accuracy is plenty.
            warnings.simplefilter("ignore", RuntimeWarning)
            lam = hessian_eigenvalues(
                model, loss_fn, batches, top_k=1, max_iter=LANCZOS_MAX_ITER, tol=LANCZOS_TOL, seed=0, device=device
            )[0]
            tr, se, ns = hessian_trace(
                model, loss_fn, batches, max_iter=TRACE_MAX_ITER, tol=TRACE_TOL, seed=0, device=device
            )
    finally:
        torch.set_num_threads(threads)
    out = {
        **key,
        "lambda_max": float(lam),
        "trace": float(tr),
        "trace_stderr": float(se),
        "trace_samples": int(ns),
        "examples": sum(len(y) for _, y in batches),
        "seconds": round(time.time() - t0, 2),
    }
    write_json(cache_path, out)
    return out


def measure_runs(runs: list[Run], samples: int) -> None:
    """The Hessian of every finished run (cached ones are read back, not recomputed)."""
    import torch

    device = "cuda" if torch.cuda.is_available() and runs[0].config.get("device") != "cpu" else "cpu"
    data_cache: dict = {}
    for r in runs:
        if is_finished(r.folder) and RunFolder(r.folder).last.is_file():
            h = hessian_of_run(r.folder, samples, data_cache, device)
            say(f"hessian {r.name}: λ_max {h['lambda_max']:.4g}  trace {h['trace']:.4g} ± {h['trace_stderr']:.2g}")

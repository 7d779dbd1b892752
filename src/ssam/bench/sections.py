"""The main section's measurements, each on a ``SideBySide``: steps, optimizer only, mask updates, memory, and on
CUDA the images/s variants and the data loaders."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Iterator

import torch

from ..optim import SSAMD, SSAMF
from ..optim.fisher import auto_method, hook_plan
from .args import LOADER_IMAGES
from .memory import PeakMemory, state_bytes
from .side_by_side import SideBySide, optimizer_only_fn
from .timing import median, ratio, round_robin, summary, sync, timed


def time_steps(setup: SideBySide, args: argparse.Namespace, device: torch.device) -> dict:
    times = round_robin(setup.steps, args.steps, 0, device)
    out = {}
    for name, ts in times.items():
        row = summary(ts)
        row["images_per_s"] = args.batch_size / row["median_s"] if row["median_s"] > 0 else None
        out[name] = row
    return out


def time_optimizer_only(setup: SideBySide, args: argparse.Namespace, device: torch.device, sam_step: float) -> dict:
    for name, opt in setup.opts.items():
        opt.zero_grad(set_to_none=True)
        setup.loss_at[name]().backward()
    fns = {name: optimizer_only_fn(opt) for name, opt in setup.opts.items()}
    # Cheap next to a step, and made of many small operations that a busy neighbour delays: more rounds.
    times = round_robin(fns, max(2 * args.steps, 10), 1, device)
    for opt in setup.opts.values():
        opt.zero_grad(set_to_none=True)
    return {name: {**summary(ts), "pct_of_sam_step": 100 * ratio(median(ts), sam_step)} for name, ts in times.items()}


def time_fisher(setup: SideBySide, args: argparse.Namespace, device: torch.device) -> dict:
    """One SSAM-F mask update per Fisher method (``sgd_steps`` is filled in once SGD's step is known)."""
    opt: SSAMF = setup.opts["SSAM-F"]
    model = setup.raw["SSAM-F"]
    plan, why = hook_plan(model, opt.mask_params(), opt.fisher_mode)
    out: dict = {"num_samples": args.num_samples, "fisher_mode": opt.fisher_mode}
    # The untimed first call takes the first-call costs (vmap tracing, allocator growth; on CUDA, cuDNN's search
    # for the fastest kernels of each new shape, so there with the timed call's own shapes).
    warm = (
        setup.fisher_data
        if device.type == "cuda"
        else [(x[: min(4, len(x))], y[: min(4, len(y))]) for x, y in setup.fisher_data]
    )
    saved = opt.num_samples
    for method in args.fisher_methods:
        if method == "hooks" and plan is None:
            out[method] = {"skipped": why}
            continue
        opt.fisher_method = method
        opt.num_samples = min(sum(len(y) for _, y in warm), saved)
        opt.update_mask(model, warm)
        opt.num_samples = saved
        t = timed(lambda: opt.update_mask(model, setup.fisher_data), device)
        out[method] = {"seconds": t, "sgd_steps": float("nan")}
    opt.fisher_method = "auto"
    out["auto"] = auto_method(model, opt.mask_params(), opt.fisher_mode)
    opt.update_mask(model, setup.fisher_data)  # the mask the timed steps use comes from method="auto"
    return out


def time_ssamd_update(setup: SideBySide, args: argparse.Namespace, device: torch.device, sgd_step: float) -> dict:
    """SSAM-D's update_mask, scoring by the gradient of one backward; the first call is not timed."""
    opt: SSAMD = setup.opts["SSAM-D"]
    opt.zero_grad(set_to_none=True)
    setup.loss_at["SSAM-D"]().backward()
    reps = max(args.steps, 3)
    times = []
    for i in range(1 + reps):
        t = timed(lambda i=i: opt.update_mask(i), device)
        if i:
            times.append(t)
    opt.zero_grad(set_to_none=True)
    med = median(times)
    return {
        "median_s": med,
        "times_s": times,
        "sgd_steps": ratio(med, sgd_step),
        "drop_strategy": opt.drop_strategy,
        "growth_strategy": opt.growth_strategy,
    }


def memory(setup: SideBySide, device: torch.device) -> dict:
    meter = PeakMemory(device)
    out: dict = {"kind": meter.kind}
    for name, step in setup.steps.items():
        row = meter.measure(step)
        total, extra = state_bytes(setup.opts[name])
        row["state_bytes_per_param"] = total / setup.num_params
        row["extra_state_bytes_per_param"] = extra / setup.num_params
        out[name] = row
    return out


def throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """images/s of every optimizer for fp32, bf16 autocast, bf16 + channels_last and (with --compile) compiled."""
    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+channels_last", True, True, False)]
    if args.compile:
        variants.append(("bf16+channels_last+compile", True, True, True))
    out: dict = {}
    for label, amp, cl, comp in variants:
        setup = SideBySide(args, device, amp=amp, channels_last=cl, compile=comp)
        setup.prepare_masks()
        setup.first_steps(args.warmup)
        if comp and setup.compile_error:
            out[label] = {"skipped": f"torch.compile failed: {setup.compile_error}"}
            continue
        rows = time_steps(setup, args, device)
        out[label] = {n: r["images_per_s"] for n, r in rows.items()}
        del setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _loader_rate(batches: Iterator, n_batches: int, device: torch.device) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    images = 0
    for i, (xb, yb) in enumerate(batches):
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        images += xb.shape[0]
        if i + 1 >= n_batches:
            break
    sync(device)
    return images / (time.perf_counter() - start), images


def data_loaders(args: argparse.Namespace, device: torch.device) -> dict:
    """GPULoader against torch's DataLoader on the same in-memory uint8 CIFAR-shaped images and augmentation."""
    import numpy as np

    from ..data import CIFAR_MEAN, CIFAR_STD, CIFARDataset, GPULoader
    from ..data.transforms import cifar_train_transform

    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (LOADER_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, LOADER_IMAGES).astype(np.int64)
    ds = CIFARDataset(
        images,
        labels,
        cifar_train_transform(),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        num_classes=10,
        augmentation={"padding": 4, "flip": True, "cutout": 0, "cutout_p": 0.5},
    )
    n_batches = LOADER_IMAGES // args.batch_size
    workers = max(0, args.workers)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    gl = GPULoader.from_dataset(ds, args.batch_size, device=device, augment=True, shuffle=True, drop_last=True)
    out: dict = {
        "images": LOADER_IMAGES,
        "batch_size": args.batch_size,
        "workers": workers,
        "transforms": "RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize",
    }
    for label, loader in (("DataLoader", dl), ("GPULoader", gl)):
        _loader_rate(iter(loader), n_batches, device)  # worker start-up and first-touch costs stay out
        rate, images = _loader_rate(iter(loader), n_batches, device)
        out[label] = {"images_per_s": rate, "images_timed": images}
    out["speedup"] = ratio(out["GPULoader"]["images_per_s"], out["DataLoader"]["images_per_s"])
    del dl
    return out

"""`ssam bench`: speed and memory of SGD, SAM, SSAM-F and SSAM-D side by side, on random inputs of a data set's shape.

What is measured (all wall-clock medians; see BENCHMARKS.md for results and how to read them):

- a full training step of each optimizer (forward + backward + update; SAM-type: both passes, the second with frozen
  BatchNorm statistics); SSAM mask refreshes are not part of a step. The optimizers' steps are interleaved
  round-robin, in a rotating order, so drift on a noisy machine hits all of them alike;
- the optimizer alone (SGD: ``step``; SAM-type: ``first_step`` + ``second_step``, no forward/backward);
- one SSAM-F mask update (``--num_samples`` examples) per Fisher method, and one SSAM-D mask update;
- peak memory per optimizer step and the optimizer state per parameter;
- on CUDA: images/s with and without bf16 autocast, channels_last and torch.compile; and the on-device GPULoader
  against a torch DataLoader over the same in-memory uint8 images (``--data_loader``).

Writes ``OUTPUT/bench.json`` and prints a table. ``python -m ssam.bench --help`` lists the flags.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentParser, UsageError
from .models import MODELS, build_model
from .optim import SAM, SSAMD, SSAMF, frozen_bn_stats
from .optim.fisher import auto_method, hook_plan

__all__ = ["main", "run", "SHAPES", "OPTIMIZERS"]

# (channels, image size, classes) for random inputs of each data set's shape.
SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "imagenet": (3, 224, 1000), "digits": (1, 8, 10)}
OPTIMIZERS = ("SGD", "SAM", "SSAM-F", "SSAM-D")
SAM_LIKE = OPTIMIZERS[1:]
FISHER_METHODS = ("loop", "vmap", "hooks")
DEFAULTS = dict(model="resnet18", batch_size=64, steps=5, warmup=1, num_samples=128)
QUICK = dict(model="resnet18", batch_size=16, steps=2, warmup=1, num_samples=16)
# Hyper-parameters of the CIFAR recipes; they do not change the cost of a step.
LR, MOMENTUM, WEIGHT_DECAY, RHO, SPARSITY = 0.05, 0.9, 5e-4, 0.05, 0.5
LOADER_IMAGES = 10_000


# ---------------------------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ssam bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default resnet18)")
    p.add_argument("--dataset", default="CIFAR10",
                   help="input shape: CIFAR10, CIFAR100 (3x32x32), ImageNet (3x224x224), digits (1x8x8)")
    p.add_argument("--batch_size", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 5, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--num_samples", type=int, default=None, help="examples per SSAM-F mask (default 128, 16 quick)")
    p.add_argument("--fisher_methods", default=",".join(FISHER_METHODS),
                   help="Fisher methods to time, comma-separated (default loop,vmap,hooks)")
    p.add_argument("--quick", action="store_true", help="tiny run: batch 16, 2 steps, 16 Fisher examples")
    p.add_argument("--output", default="runs/bench", help="directory for bench.json (default runs/bench)")
    p.add_argument("--amp", action="store_true", help="time the main steps under bf16 autocast")
    p.add_argument("--channels_last", action="store_true", help="time the main steps in channels_last layout")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (main steps, and a compiled row in the CUDA throughput table)")
    p.add_argument("--data_loader", action=argparse.BooleanOptionalAction, default=None,
                   help="time GPULoader against a DataLoader (default: on with CUDA)")
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                   help="images/s table over precision/layout/compile variants (default: on with CUDA)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes for the loader comparison")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; choose from: {', '.join(MODELS)}")
    key = args.dataset.lower().removesuffix("_base").removesuffix("_cutout")
    if key not in SHAPES:
        raise UsageError(f"unknown --dataset {args.dataset!r}; choose from: CIFAR10, CIFAR100, ImageNet, digits")
    args.shape_key = key
    for name in ("batch_size", "steps", "num_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")
    methods = [m.strip() for m in args.fisher_methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in FISHER_METHODS]
    if bad:
        raise UsageError(f"--fisher_methods: unknown {', '.join(bad)}; choose from: {', '.join(FISHER_METHODS)}")
    args.fisher_methods = methods
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu or auto")
    on_cuda = args.device == "cuda"
    args.data_loader = on_cuda if args.data_loader is None else args.data_loader
    args.throughput = on_cuda if args.throughput is None else args.throughput
    return args


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _round_robin(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Time each function once per round, in an order that rotates every round; drop the first ``warmup`` rounds."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = _timed(fns[name], device)
            if r >= warmup:
                times[name].append(t)
    return times


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory around one step. CUDA: allocator peak. CPU: the process's resident high-water mark (VmHWM, reset
    through /proc/self/clear_refs where allowed); RSS counts the whole process, so every model resident shows."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif _proc_status("VmHWM") is not None:
            self.kind = "cpu_vmhwm_process" if self._can_reset() else "cpu_vmhwm_process_unreset"
        else:
            self.kind = "cpu_ru_maxrss_process"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _proc_status("VmRSS")
        return rss if rss is not None else 0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_vmhwm_process":
            self._can_reset()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _proc_status("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def measure(self, fn: Callable[[], object]) -> dict:
        gc.collect()
        _sync(self.device)
        if self.device.type == "cpu":
            # Memory the allocator kept after earlier frees would absorb this step's allocations and hide them.
            _malloc_trim()
        self._reset()
        before = self._now()
        fn()
        _sync(self.device)
        peak = self._peak()
        return {"peak_bytes": peak, "step_extra_bytes": max(0, peak - before)}


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(states) -> tuple[int, set[int]]:
    total, ids = 0, set()
    for st in states:
        for t in st.values():
            if torch.is_tensor(t) and id(t) not in ids:
                ids.add(id(t))
                total += t.numel() * t.element_size()
    return total, ids


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(all optimizer state, state beyond the base optimizer's) in bytes; SGD has no base, so its extra is 0."""
    base = getattr(opt, "base_optimizer", None)
    if base is None:
        total, _ = _tensor_bytes(opt.state.values())
        return total, 0
    base_total, base_ids = _tensor_bytes(base.state.values())
    own = 0
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and id(t) not in base_ids:
                own += t.numel() * t.element_size()
    return base_total + own, own


# ---------------------------------------------------------------------------------------------- the setup
def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _make_optimizer(name: str, model: nn.Module, num_samples: int) -> torch.optim.Optimizer:
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    params = model.named_parameters()
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), **kw)
    if name == "SAM":
        return SAM(params, torch.optim.SGD, rho=RHO, **kw)
    if name == "SSAM-F":
        return SSAMF(params, torch.optim.SGD, rho=RHO, sparsity=SPARSITY, num_samples=num_samples, **kw)
    return SSAMD(params, torch.optim.SGD, rho=RHO, sparsity=SPARSITY, **kw)


def _step_fn(name: str, model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, amp) -> Callable[[], None]:
    def loss() -> torch.Tensor:
        with amp():
            return F.cross_entropy(model(x), y)

    # As the trainer does: on a CPU, zero gradients in place, since freeing them means fresh pages to fault in on
    # the next backward (two per SAM step).
    to_none = x.device.type != "cpu"
    if name == "SGD":
        def step() -> None:
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=to_none)
    else:
        def step() -> None:
            loss().backward()
            opt.first_step()
            opt.zero_grad(set_to_none=to_none)
            # The second pass is at w + e: its batch statistics are not the model's (see frozen_bn_stats).
            with frozen_bn_stats(model):
                loss().backward()
            opt.second_step()
            opt.zero_grad(set_to_none=to_none)
    return step


def _optimizer_only_fn(name: str, opt) -> Callable[[], None]:
    if name == "SGD":
        return opt.step

    def both() -> None:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return both


class _Setup:
    """One model copy and optimizer per optimizer name, all from the same initial weights."""

    def __init__(self, args, device: torch.device, *, amp: bool, channels_last: bool, compile: bool,
                 names=OPTIMIZERS):
        channels, size, classes = SHAPES[args.shape_key]
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        base = build_model(args.model, classes, in_channels=channels, image_size=size).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            base = base.to(memory_format=fmt)
        self.x = torch.randn(args.batch_size, channels, size, size, generator=gen).to(device, memory_format=fmt)
        self.y = torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)
        self.fisher_data = [(torch.randn(args.num_samples, channels, size, size, generator=gen).to(device),
                             torch.randint(0, classes, (args.num_samples,), generator=gen).to(device))]
        self.num_params = sum(p.numel() for p in base.parameters())
        self.raw: dict[str, nn.Module] = {}
        self.models: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.compile_error: str | None = None
        amp_ctx = _autocast(device, amp)
        for name in names:
            raw = copy.deepcopy(base)
            self.raw[name] = raw
            self.models[name] = raw
            self.opts[name] = _make_optimizer(name, raw, args.num_samples)
        if compile:
            try:
                for name in names:
                    self.models[name] = torch.compile(self.raw[name])
            except Exception as e:  # noqa: BLE001 - any compiler failure means "no compiled numbers"
                self.compile_error = f"{type(e).__name__}: {e}"
                self.models = dict(self.raw)
        self._amp = amp_ctx
        self._build_fns()

    def _build_fns(self) -> None:
        self.steps = {n: _step_fn(n, m, self.opts[n], self.x, self.y, self._amp) for n, m in self.models.items()}
        self.loss_at = {n: (lambda m=m: F.cross_entropy(m(self.x), self.y)) for n, m in self.models.items()}

    def prepare_masks(self) -> None:
        """Masks the timed steps need: SSAM-F's from the Fisher (unless already set), SSAM-D's exists already."""
        if "SSAM-F" in self.opts and not self.opts["SSAM-F"].has_masks():
            self.opts["SSAM-F"].update_mask(self.raw["SSAM-F"], self.fisher_data)

    def first_steps(self, warmup: int) -> Exception | None:
        """Run the warmup steps (compiling, if asked); a compiler failure falls back to eager, said in the report."""
        try:
            for _ in range(max(1, warmup)):
                for fn in self.steps.values():
                    fn()
        except Exception as e:  # noqa: BLE001
            if self.models is self.raw or all(self.models[n] is self.raw[n] for n in self.models):
                raise
            self.compile_error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            for name in self.opts:
                opt = self.opts[name]
                if isinstance(opt, SAM):
                    opt.restore()
                opt.zero_grad(set_to_none=True)
                self.models[name] = self.raw[name]
            self._build_fns()
            return e
        return None


# ---------------------------------------------------------------------------------------------- sections
def _time_steps(setup: _Setup, args, device) -> dict:
    times = _round_robin(setup.steps, args.steps, 0, device)
    out = {}
    for name, ts in times.items():
        med = _median(ts)
        out[name] = {"median_s": med, "min_s": min(ts), "times_s": ts,
                     "images_per_s": args.batch_size / med if med > 0 else None}
    return out


def _time_optimizer_only(setup: _Setup, args, device, sam_step: float) -> dict:
    for name, opt in setup.opts.items():
        opt.zero_grad(set_to_none=True)
        setup.loss_at[name]().backward()
    fns = {name: _optimizer_only_fn(name, opt) for name, opt in setup.opts.items()}
    # Cheap next to a step, and made of many small operations that a busy neighbour delays: more rounds.
    times = _round_robin(fns, max(2 * args.steps, 10), 1, device)
    for opt in setup.opts.values():
        opt.zero_grad(set_to_none=True)
    return {name: {"median_s": _median(ts), "min_s": min(ts), "times_s": ts,
                   "pct_of_sam_step": 100 * _ratio(_median(ts), sam_step)} for name, ts in times.items()}


def _time_fisher(setup: _Setup, args, device) -> dict:
    """One SSAM-F mask update per Fisher method (``sgd_steps`` is filled in once SGD's step is known)."""
    opt: SSAMF = setup.opts["SSAM-F"]
    model = setup.raw["SSAM-F"]
    plan, why = hook_plan(model, opt.mask_params(), opt.fisher_mode)
    out: dict = {"num_samples": args.num_samples, "fisher_mode": opt.fisher_mode}
    # The untimed first call takes the first-call costs (vmap tracing, allocator growth; on CUDA, cuDNN's search
    # for the fastest kernels of each new shape, so there with the timed call's own shapes).
    warm = setup.fisher_data if device.type == "cuda" else [(x[: min(4, len(x))], y[: min(4, len(y))])
                                                            for x, y in setup.fisher_data]
    saved = opt.num_samples
    for method in args.fisher_methods:
        if method == "hooks" and plan is None:
            out[method] = {"skipped": why}
            continue
        opt.fisher_method = method
        opt.num_samples = min(sum(len(y) for _, y in warm), saved)
        opt.update_mask(model, warm)
        opt.num_samples = saved
        t = _timed(lambda: opt.update_mask(model, setup.fisher_data), device)
        out[method] = {"seconds": t, "sgd_steps": float("nan")}
    opt.fisher_method = "auto"
    out["auto"] = auto_method(model, opt.mask_params(), opt.fisher_mode)
    opt.update_mask(model, setup.fisher_data)  # the mask the timed steps use comes from method="auto"
    return out


def _time_ssamd_update(setup: _Setup, args, device, sgd_step: float) -> dict:
    """SSAM-D's update_mask, scoring by the gradient of one backward; the first call is not timed."""
    opt: SSAMD = setup.opts["SSAM-D"]
    opt.zero_grad(set_to_none=True)
    setup.loss_at["SSAM-D"]().backward()
    reps = max(args.steps, 3)
    times = []
    for i in range(1 + reps):
        t = _timed(lambda: opt.update_mask(i), device)
        if i:
            times.append(t)
    opt.zero_grad(set_to_none=True)
    med = _median(times)
    return {"median_s": med, "times_s": times, "sgd_steps": _ratio(med, sgd_step),
            "drop_strategy": opt.drop_strategy, "growth_strategy": opt.growth_strategy}


def _memory(setup: _Setup, device) -> dict:
    meter = _PeakMemory(device)
    out: dict = {"kind": meter.kind}
    for name, step in setup.steps.items():
        row = meter.measure(step)
        total, extra = state_bytes(setup.opts[name])
        row["state_bytes_per_param"] = total / setup.num_params
        row["extra_state_bytes_per_param"] = extra / setup.num_params
        out[name] = row
    return out


def _throughput(args, device) -> dict:
    """images/s of every optimizer for fp32, bf16 autocast, bf16 + channels_last and (with --compile) compiled."""
    variants = [("fp32", False, False, False), ("bf16", True, False, False),
                ("bf16+channels_last", True, True, False)]
    if args.compile:
        variants.append(("bf16+channels_last+compile", True, True, True))
    out: dict = {}
    for label, amp, cl, comp in variants:
        setup = _Setup(args, device, amp=amp, channels_last=cl, compile=comp)
        setup.prepare_masks()
        setup.first_steps(args.warmup)
        if comp and setup.compile_error:
            out[label] = {"skipped": f"torch.compile failed: {setup.compile_error}"}
            continue
        rows = _time_steps(setup, args, device)
        out[label] = {n: r["images_per_s"] for n, r in rows.items()}
        del setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _loader_rate(batches: Iterator, n_batches: int, device) -> tuple[float, int]:
    _sync(device)
    start = time.perf_counter()
    images = 0
    for i, (xb, yb) in enumerate(batches):
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        images += xb.shape[0]
        if i + 1 >= n_batches:
            break
    _sync(device)
    return images / (time.perf_counter() - start), images


def _data_loaders(args, device) -> dict:
    """GPULoader against torch's DataLoader on the same in-memory uint8 CIFAR-shaped images and augmentation."""
    import numpy as np

    from .data import CIFAR_MEAN, CIFAR_STD, CIFARDataset, GPULoader
    from .data.transforms import cifar_train_transform

    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (LOADER_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, LOADER_IMAGES).astype(np.int64)
    ds = CIFARDataset(images, labels, cifar_train_transform(), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10,
                      augmentation={"padding": 4, "flip": True, "cutout": 0, "cutout_p": 0.5})
    n_batches = LOADER_IMAGES // args.batch_size
    workers = max(0, args.workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=workers, pin_memory=device.type == "cuda",
                                     persistent_workers=workers > 0)
    gl = GPULoader.from_dataset(ds, args.batch_size, device=device, augment=True, shuffle=True, drop_last=True)
    out: dict = {"images": LOADER_IMAGES, "batch_size": args.batch_size, "workers": workers,
                 "transforms": "RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize"}
    for label, loader in (("DataLoader", dl), ("GPULoader", gl)):
        _loader_rate(iter(loader), n_batches, device)  # worker start-up and first-touch costs stay out
        rate, images = _loader_rate(iter(loader), n_batches, device)
        out[label] = {"images_per_s": rate, "images_timed": images}
    out["speedup"] = _ratio(out["GPULoader"]["images_per_s"], out["DataLoader"]["images_per_s"])
    del dl
    return out


# ---------------------------------------------------------------------------------------------- driver
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        # As a training run would: let cuDNN pick the fastest kernels for these fixed shapes (in the warmup).
        torch.backends.cudnn.benchmark = True
    report: dict = {"environment": _environment(device), "notes": []}
    started = time.perf_counter()
    setup = _Setup(args, device, amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    report["config"] = {
        "model": args.model, "dataset": args.dataset, "input_shape": list(setup.x.shape[1:]),
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "num_samples": args.num_samples,
        "amp_bf16": args.amp, "channels_last": args.channels_last, "compile": args.compile, "quick": args.quick,
        "num_params": setup.num_params, "sparsity": SPARSITY, "rho": RHO,
    }

    # Fisher first: its last update (method "auto") gives SSAM-F the mask its timed steps use.
    report["mask_update"] = {"SSAM-F": _time_fisher(setup, args, device)}
    setup.first_steps(args.warmup)
    if setup.compile_error:
        report["notes"].append(f"torch.compile failed, main steps ran eager: {setup.compile_error}")
    report["steps"] = _time_steps(setup, args, device)
    sgd = report["steps"]["SGD"]["median_s"]
    sam = report["steps"]["SAM"]["median_s"]
    for row in report["mask_update"]["SSAM-F"].values():
        if isinstance(row, dict) and "seconds" in row:
            row["sgd_steps"] = _ratio(row["seconds"], sgd)
    report["mask_update"]["SSAM-D"] = _time_ssamd_update(setup, args, device, sgd)
    report["ratios"] = {
        "SAM/SGD": _ratio(sam, sgd),
        "SSAM-F/SAM": _ratio(report["steps"]["SSAM-F"]["median_s"], sam),
        "SSAM-D/SAM": _ratio(report["steps"]["SSAM-D"]["median_s"], sam),
    }
    # Noise only ever adds time: the ratio of the fastest steps is a second, noise-resistant reading.
    fastest = {n: report["steps"][n]["min_s"] for n in OPTIMIZERS}
    report["ratios_of_min"] = {
        "SAM/SGD": _ratio(fastest["SAM"], fastest["SGD"]),
        "SSAM-F/SAM": _ratio(fastest["SSAM-F"], fastest["SAM"]),
        "SSAM-D/SAM": _ratio(fastest["SSAM-D"], fastest["SAM"]),
    }
    report["optimizer_only"] = _time_optimizer_only(setup, args, device, sam)
    report["memory"] = _memory(setup, device)
    if report["memory"]["kind"].startswith("cpu"):
        report["notes"].append("CPU peak MiB is the whole process's resident set (all four model copies are in "
                               "it); step MiB is how far one step raised it")
    del setup
    gc.collect()

    if args.throughput:
        report["throughput"] = _throughput(args, device)
    else:
        report["throughput"] = {"skipped": "CUDA only by default; --throughput to force"}
    if args.data_loader:
        report["data_loader"] = _data_loaders(args, device)
    else:
        report["data_loader"] = {"skipped": "CUDA only by default; --data_loader to force"}
    if hasattr(os, "getloadavg"):
        report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["environment"]["wall_s"] = time.perf_counter() - started
    return report


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:9.1f} ms" if t == t else "      n/a"


def format_table(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [
        f"ssam bench: {cfg['model']} on {cfg['dataset']} {tuple(cfg['input_shape'])}, batch {cfg['batch_size']}, "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, {env['cpu_count']} CPUs",
        "",
        f"{'optimizer':10s} {'step':>12s} {'img/s':>9s} {'opt only':>12s} {'% SAM':>7s} "
        f"{'peak MiB':>9s} {'step MiB':>8s} {'extra B/param':>14s}",
    ]
    for name in OPTIMIZERS:
        st, oo, mem = report["steps"][name], report["optimizer_only"][name], report["memory"][name]
        lines.append(f"{name:10s} {_fmt_s(st['median_s']):>12s} {st['images_per_s'] or 0:9.1f} "
                     f"{_fmt_s(oo['median_s']):>12s} {oo['pct_of_sam_step']:6.2f}% "
                     f"{mem['peak_bytes'] / 2**20:9.1f} {mem['step_extra_bytes'] / 2**20:8.1f} "
                     f"{mem['extra_state_bytes_per_param']:14.2f}")
    r = report["ratios"]
    q = report["ratios_of_min"]
    lines += ["", f"medians:  SAM/SGD {r['SAM/SGD']:.3f}   SSAM-F/SAM {r['SSAM-F/SAM']:.3f}   "
                  f"SSAM-D/SAM {r['SSAM-D/SAM']:.3f}",
              f"fastest:  SAM/SGD {q['SAM/SGD']:.3f}   SSAM-F/SAM {q['SSAM-F/SAM']:.3f}   SSAM-D/SAM {q['SSAM-D/SAM']:.3f}",
              "", "mask updates (x one SGD step):"]
    fisher = report["mask_update"]["SSAM-F"]
    for method in FISHER_METHODS:
        row = fisher.get(method)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"  SSAM-F {method:5s} skipped: {row['skipped']}")
        else:
            lines.append(f"  SSAM-F {method:5s} {fisher['num_samples']} examples {_fmt_s(row['seconds'])}"
                         f"  {row['sgd_steps']:6.2f}x")
    lines.append(f"  SSAM-F auto = {fisher['auto']}")
    d = report["mask_update"]["SSAM-D"]
    lines.append(f"  SSAM-D       {_fmt_s(d['median_s'])}  {d['sgd_steps']:6.3f}x")
    tp = report.get("throughput", {})
    if "skipped" not in tp:
        lines += ["", "images/s: " + "  ".join(f"{n:>8s}" for n in OPTIMIZERS)]
        for label, row in tp.items():
            if "skipped" in row:
                lines.append(f"  {label}: skipped ({row['skipped'][:120]})")
            else:
                lines.append(f"  {label:28s} " + "  ".join(f"{row[n]:8.0f}" for n in OPTIMIZERS))
    dl = report.get("data_loader", {})
    if "skipped" not in dl:
        lines += ["", f"loaders ({dl['workers']} workers): DataLoader {dl['DataLoader']['images_per_s']:.0f} img/s, "
                      f"GPULoader {dl['GPULoader']['images_per_s']:.0f} img/s ({dl['speedup']:.1f}x)"]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    report = run(args)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":  # `python -m ssam.bench`: the same error handling and exit codes as `ssam bench`
    from .cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))

"""`ssam bench`: speed and memory of SGD, SAM, SSAM-F and SSAM-D side by side, on random inputs of a data set's shape.

What is measured (all wall-clock medians; see BENCHMARKS.md for results and how to read them):

- a full training step of each optimizer, as the trainer runs it (``ssam.train.step.train_step``: forward +
  backward + update; SAM-type: both passes, the second with frozen BatchNorm statistics); SSAM mask refreshes are
  not part of a step. The optimizers' steps are interleaved round-robin, in a rotating order, so drift on a noisy
  machine hits all of them alike;
- the optimizer alone (SGD: ``step``; SAM-type: ``first_step`` + ``second_step``, no forward/backward);
- one SSAM-F mask update (``--num_samples`` examples) per Fisher method, and one SSAM-D mask update;
- peak memory per optimizer step and the optimizer state per parameter;
- on CUDA: images/s with and without bf16 autocast, channels_last and torch.compile; and the on-device GPULoader
  against a torch DataLoader over the same in-memory uint8 images (``--data_loader``);
- with ``--section skip``: SSAM-F steps whose first pass skips the parameters without a live mask entry
  (``opt.first_pass()``), per mask granularity, sparsity and ``cost_aware``, against the SAM step in one run.

Writes ``OUTPUT/bench.json`` and prints a table. ``python -m ssam.bench --help`` lists the flags.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

from ..io import write_json
from . import args as _args
from . import sections
from .args import OPTIMIZERS, RHO, SHAPES, SPARSITY
from .cheap import format_cheap, run_cheap
from .memory import state_bytes
from .report import environment, format_main, header
from .side_by_side import SideBySide
from .skip import format_skip, run_skip
from .timing import ratio

__all__ = ["main", "run", "parse_args", "format_table", "state_bytes", "SHAPES", "OPTIMIZERS"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    return _args.parse_args(argv, description=__doc__.split("\n\n")[0])


def _run_main(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    """The four optimizers side by side: steps, optimizer only, mask updates, memory, and the CUDA extras."""
    setup = SideBySide(args, device, amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    report["config"]["num_params"] = setup.num_params

    # Fisher first: its last update (method "auto") gives SSAM-F the mask its timed steps use.
    report["mask_update"] = {"SSAM-F": sections.time_fisher(setup, args, device)}
    setup.first_steps(args.warmup)
    if setup.compile_error:
        report["notes"].append(f"torch.compile failed, main steps ran eager: {setup.compile_error}")
    report["steps"] = sections.time_steps(setup, args, device)
    sgd = report["steps"]["SGD"]["median_s"]
    sam = report["steps"]["SAM"]["median_s"]
    for row in report["mask_update"]["SSAM-F"].values():
        if isinstance(row, dict) and "seconds" in row:
            row["sgd_steps"] = ratio(row["seconds"], sgd)
    report["mask_update"]["SSAM-D"] = sections.time_ssamd_update(setup, args, device, sgd)
    report["ratios"] = {
        "SAM/SGD": ratio(sam, sgd),
        "SSAM-F/SAM": ratio(report["steps"]["SSAM-F"]["median_s"], sam),
        "SSAM-D/SAM": ratio(report["steps"]["SSAM-D"]["median_s"], sam),
    }
    # Noise only ever adds time: the ratio of the fastest steps is a second, noise-resistant reading.
    fastest = {n: report["steps"][n]["min_s"] for n in OPTIMIZERS}
    report["ratios_of_min"] = {
        "SAM/SGD": ratio(fastest["SAM"], fastest["SGD"]),
        "SSAM-F/SAM": ratio(fastest["SSAM-F"], fastest["SAM"]),
        "SSAM-D/SAM": ratio(fastest["SSAM-D"], fastest["SAM"]),
    }
    report["optimizer_only"] = sections.time_optimizer_only(setup, args, device, sam)
    report["memory"] = sections.memory(setup, device)
    if report["memory"]["kind"].startswith("cpu"):
        report["notes"].append(
            "CPU peak MiB is the whole process's resident set (all four model copies are in "
            "it); step MiB is how far one step raised it"
        )
    del setup
    gc.collect()

    if args.throughput:
        report["throughput"] = sections.throughput(args, device)
    else:
        report["throughput"] = {"skipped": "CUDA only by default; --throughput to force"}
    if args.data_loader:
        report["data_loader"] = sections.data_loaders(args, device)
    else:
        report["data_loader"] = {"skipped": "CUDA only by default; --data_loader to force"}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        # As a training run would: let cuDNN pick the fastest kernels for these fixed shapes (in the warmup).
        torch.backends.cudnn.benchmark = True
    report: dict = {"environment": environment(device), "notes": []}
    started = time.perf_counter()
    channels, size, _ = SHAPES[args.shape_key]
    report["config"] = {
        "model": args.model,
        "dataset": args.dataset,
        "input_shape": [channels, size, size],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "num_samples": args.num_samples,
        "amp_bf16": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "quick": args.quick,
        "num_params": None,
        "sparsity": SPARSITY,
        "rho": RHO,
        "sections": list(args.section),
    }
    if "main" in args.section:
        _run_main(args, device, report)
    if "cheap" in args.section:
        report["cheap"] = run_cheap(args, device)
    if "skip" in args.section:
        report["skip"] = run_skip(args, device)
        report["config"]["num_params"] = report["skip"]["num_params"]
    if hasattr(os, "getloadavg"):
        report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["environment"]["wall_s"] = time.perf_counter() - started
    return report


def format_table(report: dict) -> str:
    lines = [header(report)]
    if "steps" in report:
        lines += [""] + format_main(report)
    if "skip" in report:
        lines += [""] + format_skip(report["skip"])
    if "cheap" in report:
        lines += [""] + format_cheap(report["cheap"])
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    report = run(args)
    path = Path(args.output) / "bench.json"
    write_json(path, report)
    print(format_table(report))
    print(f"\nwrote {path}")
    return 0

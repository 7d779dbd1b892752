"""The ``cheap`` section: what SAM's cheaper forms cost per step, against the SGD and SAM steps of the same run.

Ascent schedules (``ssam.optim.schedule``): a plain step of a schedule is the base optimizer with one pass (timed as
``plain``, LookSAM's with its stored direction added); a schedule that ascends on a share a of the steps costs
``a * SAM + (1 - a) * plain`` per step, shown for each form at its expected share. m-sharpness
(``ssam.optim.msharp``): one ascent per chunk of m examples, for m = batch, 32, 8 and 1, by the trainer's step
(``micro_batch_step``; vectorised for stacks of Linear layers, a loop over the chunks otherwise). Every step is
interleaved round-robin in one run and reported as a ratio to the SAM step and to the SGD step. Ascent directions
(``ssam.optim.ascent``): SAM with its ascent from a sub-batch (``subbatch:F``, 1 + F passes) or from a stored
direction (``previous``, ``momentum``, ``msam``: one pass, the perturbation's norm, axpy and restore on top of an SGD
step), each timed after a first step, so that its direction exists; with the optimizer state each keeps, in bytes per
parameter (the base optimizer's momentum included).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from ..models import build_model
from ..optim.msharp import vectorise_refusal
from ..train.step import micro_batch_step, train_step
from .args import SHAPES
from .side_by_side import make_optimizer, random_batches
from .timing import ratio, round_robin, summary

MICRO_BATCHES = (32, 8, 1)
DIRECTIONS = ("subbatch:0.25", "subbatch:0.125", "previous", "momentum", "msam")
# Each schedule form at the settings of the memorization recipe, with the share of steps that ascend.
SCHEDULES = {"every:2": 1 / 2, "every:5": 1 / 5, "looksam:5": 1 / 5, "late:0.25": 0.25}


def run_cheap(args: argparse.Namespace, device: torch.device) -> dict:
    channels, size, classes = SHAPES[args.shape_key]
    gen = torch.Generator().manual_seed(args.seed)
    x, y, _ = random_batches(args, device, gen)
    torch.manual_seed(args.seed)
    base = build_model(args.model, classes, in_channels=channels, image_size=size).to(device)
    fns, notes = {}, []

    def sam_step(opt, model):
        return lambda: train_step(model, opt, [(x, y)], model=model)

    for name, kw in (("SGD", {}), ("SAM", {}), ("plain", {"schedule": "every:1000000"})):
        model = copy.deepcopy(base)
        opt = make_optimizer("SGD" if name == "SGD" else "SAM", model, args.num_samples, **kw)
        if name == "plain":  # step 0 ascends; every later one is a plain step
            train_step(model, opt, [(x, y)], model=model, ascend=True)
            fns[name] = lambda o=opt, m=model: train_step(m, o, [(x, y)], model=m, ascend=False)
        else:
            fns[name] = sam_step(opt, model)
    state_bytes = {}
    for name in ("SGD", "SAM", *DIRECTIONS):
        model = copy.deepcopy(base)
        opt = make_optimizer("SGD" if name == "SGD" else "SAM", model, args.num_samples,
                             **({"ascent": name} if name in DIRECTIONS else {}))  # fmt: skip
        for _ in range(2):  # after the first step a direction exists; after the second, every buffer
            train_step(model, opt, [(x, y)], model=model)
        state_bytes[name] = _state_bytes(opt, model)
        if name in DIRECTIONS:
            fns[name] = sam_step(opt, model)
    model = copy.deepcopy(base)
    look = make_optimizer("SAM", model, args.num_samples, schedule="looksam:1000000")
    train_step(model, look, [(x, y)], model=model, ascend=True)  # stores g_v; every later step adds it
    fns["plain looksam"] = lambda: train_step(model, look, [(x, y)], model=model, ascend=False)
    for m in getattr(args, "micro_batches", MICRO_BATCHES):
        if m >= args.batch_size or args.batch_size % m:
            continue
        mod = copy.deepcopy(base)
        opt = make_optimizer("SAM", mod, args.num_samples)
        why = vectorise_refusal(mod, args.batch_size, list(mod.parameters()))
        fns[f"m={m}"] = lambda o=opt, md=mod, mm=m, v=why is None: micro_batch_step(
            md, o, x, y, mm, F.cross_entropy, vectorised=v
        )
        notes.append(f"m={m}: " + ("vectorised" if why is None else f"a loop over the chunks ({why})"))
    times = round_robin(fns, args.steps, args.warmup, device)
    stats = {k: summary(v) for k, v in times.items()}
    sam, sgd = stats["SAM"]["median_s"], stats["SGD"]["median_s"]
    rows = {
        k: {**v, "vs_sam": ratio(v["median_s"], sam), "vs_sgd": ratio(v["median_s"], sgd), "state_bytes_per_param":
            state_bytes.get(k)}
        for k, v in stats.items()
    }  # fmt: skip
    expected = {}
    for form, share in SCHEDULES.items():
        plain = stats["plain looksam" if form.startswith("looksam") else "plain"]["median_s"]
        expected[form] = {"ascent_share": share, "vs_sam": ratio(share * sam + (1 - share) * plain, sam)}
    return {"steps": rows, "schedules": expected, "notes": notes}


def _state_bytes(opt: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    """Bytes of optimizer state per parameter: every tensor the optimizer keeps per parameter (the base optimizer's
    and ssam's, the saved copy of w between the passes included)."""
    held = getattr(opt, "_own", {})
    base = getattr(opt, "base_optimizer", opt)
    total = 0
    for p in model.parameters():
        for entry in (base.state.get(p, {}), held.get(p, {})):
            total += sum(
                t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor) and t.dim()
            )
    return total / max(1, sum(p.numel() for p in model.parameters()))


def format_cheap(rep: dict) -> list[str]:
    lines = ["cheaper SAM, per step (median; x the SAM step, x the SGD step; optimizer state in bytes per parameter):"]
    for name, row in rep["steps"].items():
        state = row.get("state_bytes_per_param")
        lines.append(
            f"  {name:<14} {row['median_s'] * 1e3:9.1f} ms   {row['vs_sam']:.3f}x SAM   {row['vs_sgd']:.3f}x SGD"
            + ("" if state is None else f"   {state:.1f} B/param")
        )
    lines.append("schedules at their ascent share (share x SAM + rest x plain step):")
    for form, row in rep["schedules"].items():
        lines.append(f"  {form:<14} share {row['ascent_share']:.2f}   {row['vs_sam']:.3f}x SAM")
    return lines + [f"note: {n}" for n in rep["notes"]]

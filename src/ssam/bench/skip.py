"""The ``skip`` section: what a first pass that skips the dead saves.

Every variant is an SSAM-F optimizer whose mask comes from its own Fisher (``update_mask`` on the random examples
of the data set's shape), stepped by the trainer's step with ``skip_dead=True``: the first forward and backward run
inside ``opt.first_pass()``, so parameters without a live mask entry take no weight gradient and the backward stops
below the lowest live one. Each variant has its own model copy from the same initial weights; all steps, the SAM
step included, are interleaved round-robin in one run, and every time is reported as a ratio to the SAM step.

Two hand-made masks (whole tensors, no Fisher) repeat earlier measurements with tensors frozen by hand: the last
tensors that fit in 10% of the parameters, and the normalisation layers with the classifier.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from ..optim.groups import GRANULARITY_WORDS, parse_granularity
from .args import SHAPES
from .side_by_side import autocast, make_optimizer, random_batches, step_fn
from .timing import ratio, round_robin, summary

SPARSITIES = (0.5, 0.9, 0.99)
HAND_BUDGET = 0.10  # share of the parameters the hand-made "last tensors" reference may keep live
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def fisher_variants() -> dict[str, dict]:
    """Key -> SSAM-F settings: every granularity at every sparsity, cost_aware on and off where it applies, 2:4."""
    out: dict[str, dict] = {}
    for granularity in GRANULARITY_WORDS:
        for sparsity in SPARSITIES:
            out[f"{granularity} {sparsity}"] = {"granularity": granularity, "sparsity": sparsity}
            if parse_granularity(granularity).grouped:
                settings = {"granularity": granularity, "sparsity": sparsity, "cost_aware": True}
                out[f"{granularity} {sparsity} cost-aware"] = settings
    out["2:4"] = {"granularity": "2:4", "sparsity": None}  # its own: 1 - N/M of the weights, 1-D tensors all live
    return out


def last_tensors(model: nn.Module, budget: float) -> set[str]:
    """From the classifier backwards in the model's order, every tensor that still fits under ``budget`` of all
    parameters (a tensor too big is passed over, smaller ones before it may still fit)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    room = int(budget * sum(p.numel() for _, p in named))
    chosen = set()
    for name, p in reversed(named):
        if p.numel() <= room:
            chosen.add(name)
            room -= p.numel()
    return chosen


def norms_and_classifier(model: nn.Module) -> set[str]:
    """The parameters of every normalisation layer and of the last Linear layer (SAM-ON's choice plus the head)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, _NORMS) or (linears and mod_name == linears[-1]):
            chosen.update(f"{mod_name}.{n}" if mod_name else n for n, _ in m.named_parameters(recurse=False))
    return chosen


HAND_MASKS: dict[str, Callable[[nn.Module], set[str]]] = {
    f"hand: last tensors in {HAND_BUDGET:.0%}": lambda m: last_tensors(m, HAND_BUDGET),
    "hand: norms + classifier": norms_and_classifier,
}


def set_whole_tensor_mask(opt, model: nn.Module, live_names: set[str]) -> None:
    """Every entry of the named tensors live, every other entry dead."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    flat = torch.cat(
        [
            torch.full((p.numel(),), name_of[id(p)] in live_names, dtype=torch.bool, device=p.device)
            for p in opt.mask_params()
        ]
    )
    opt.set_flat_mask(flat)


def live_summary(opt, model: nn.Module) -> dict:
    """Which tensors a mask keeps live: their count and share of the parameters, the mask's density, and the lowest
    live tensor in the model's order (the backward of the first pass must reach it)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    masks = {id(p): opt.state[p].get("mask") for p in params} if hasattr(opt, "mask_params") else {}
    live = [p for p in params if masks.get(id(p)) is None or bool(masks[id(p)].any())]
    total = sum(p.numel() for p in params)
    entries = sum(int(masks[id(p)].sum()) if masks.get(id(p)) is not None else p.numel() for p in params)
    return {
        "live_tensors": len(live),
        "tensors": len(params),
        "live_params_fraction": sum(p.numel() for p in live) / total,
        "density": entries / total,
        "lowest_live": name_of[id(live[0])] if live else None,
    }


def first_pass_fn(
    net: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, amp, *, skip: bool, to_none: bool
) -> Callable[[], None]:
    """The first forward and backward alone (inside ``first_pass()`` when skipping), then the gradient reset the
    step would do."""

    def first() -> None:
        with opt.first_pass() if skip else contextlib.nullcontext():
            with amp():
                loss = F.cross_entropy(net(x), y)
            loss.backward()
        opt.zero_grad(set_to_none=to_none)

    return first


def _build(args: argparse.Namespace, device: torch.device):
    channels, size, classes = SHAPES[args.shape_key]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    base = build_model(args.model, classes, in_channels=channels, image_size=size).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        base = base.to(memory_format=fmt)
    x, y, fisher_data = random_batches(args, device, gen, fmt)
    return base, x, y, fisher_data


def run_skip(args: argparse.Namespace, device: torch.device) -> dict:
    """Time the SAM step and every SSAM-F variant with skipping, interleaved; the first passes alone likewise."""
    base, x, y, fisher_data = _build(args, device)
    amp = autocast(device, args.amp)
    out: dict = {
        "num_params": sum(p.numel() for p in base.parameters()),
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "sparsities": list(SPARSITIES),
        "hand_budget": HAND_BUDGET,
        "variants": {},
        "notes": [],
    }
    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    models["SAM"] = copy.deepcopy(base)
    opts["SAM"] = make_optimizer("SAM", models["SAM"], args.num_samples)
    rows = out["variants"]
    rows["SAM"] = {"settings": {}, "live": live_summary(opts["SAM"], models["SAM"])}
    for key, settings in fisher_variants().items():
        model = copy.deepcopy(base)
        try:
            opt = make_optimizer("SSAM-F", model, args.num_samples, **settings)
            opt.update_mask(model, fisher_data)
        except (TypeError, ValueError) as e:  # a granularity this version of SSAM-F does not take
            rows[key] = {"settings": settings, "skipped": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        models[key], opts[key] = model, opt
        rows[key] = {"settings": settings, "live": live_summary(opt, model)}
    for key, rule in HAND_MASKS.items():
        model = copy.deepcopy(base)
        opt = make_optimizer("SSAM-F", model, args.num_samples)
        set_whole_tensor_mask(opt, model, rule(model))
        models[key], opts[key] = model, opt
        rows[key] = {"settings": {"mask": "whole tensors chosen by hand"}, "live": live_summary(opt, model)}
    del base
    gc.collect()

    on_cpu = device.type == "cpu"
    steps = {k: step_fn(m, opts[k], x, y, amp, skip_dead=k != "SAM") for k, m in models.items()}
    firsts = {
        k: first_pass_fn(m, opts[k], x, y, amp, skip=k != "SAM", to_none=k != "SAM" or not on_cpu)
        for k, m in models.items()
    }
    step_times = round_robin(steps, args.steps, max(1, args.warmup), device)
    first_times = round_robin(firsts, args.steps, 1, device)
    sam, sam_first = summary(step_times["SAM"]), summary(first_times["SAM"])
    for key in models:
        row = rows[key]
        row["step"], row["first_pass"] = summary(step_times[key]), summary(first_times[key])
        row["step_vs_sam"] = ratio(row["step"]["median_s"], sam["median_s"])
        row["step_vs_sam_fastest"] = ratio(row["step"]["min_s"], sam["min_s"])
        row["first_pass_vs_sam"] = ratio(row["first_pass"]["median_s"], sam_first["median_s"])
        row["first_pass_vs_sam_step"] = ratio(row["first_pass"]["median_s"], sam["median_s"])
    return out


def format_skip(section: dict) -> list[str]:
    lines = [
        "skip section: SSAM-F steps whose first pass skips the dead tensors, against the SAM step "
        "(medians; fastest steps in brackets)"
    ]
    if "skipped" in section:
        return lines + [f"  skipped: {section['skipped']}"]
    lines.append(
        f"  {'variant':30s} {'density':>7s} {'live tensors':>12s} {'of params':>9s} {'step':>10s} "
        f"{'x SAM':>6s} {'(fastest)':>9s} {'1st pass':>10s} {'x SAM':>6s}"
    )
    for key, row in section["variants"].items():
        if "skipped" in row:
            lines.append(f"  {key:30s} skipped: {row['skipped'][:100]}")
            continue
        live = row["live"]
        lines.append(
            f"  {key:30s} {live['density']:7.3f} {live['live_tensors']:>5d} of {live['tensors']:<4d} "
            f"{100 * live['live_params_fraction']:8.1f}% {1e3 * row['step']['median_s']:7.0f} ms "
            f"{row['step_vs_sam']:6.3f} ({row['step_vs_sam_fastest']:6.3f}) "
            f"{1e3 * row['first_pass']['median_s']:7.0f} ms {row['first_pass_vs_sam']:6.3f}"
        )
    return lines

"""Every range check of ``ssam train``'s configuration, each failing with one line that names the value and the
rule (``UsageError``: exit 2, nothing written)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..data import DATASETS
from ..errors import UsageError, did_you_mean
from ..models import WIDTH_FLAGS, check_model_name
from ..optim import registry
from ..optim.ascent import check_composes, parse_ascent
from ..optim.factory import parse_opt  # resolve() has already turned a bad --opt into one line
from ..optim.schedule import parse_schedule
from ..optim.sparse import STRATEGIES
from .flags import SCHEDULERS

__all__ = ["validate"]


def _show_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def validate(cfg: argparse.Namespace) -> None:
    """Every range check of the command line, each failing with one line that names the value and the rule."""

    need(
        cfg.dataset in DATASETS,
        f"unknown --dataset {cfg.dataset!r}; choose from: {', '.join(DATASETS)}" + did_you_mean(cfg.dataset, DATASETS),
    )
    check_model_name(cfg.model)
    wrapper, base = parse_opt(cfg.opt)
    need(
        cfg.lr_scheduler in SCHEDULERS,
        f"unknown --lr_scheduler {cfg.lr_scheduler!r}; choose from: {', '.join(SCHEDULERS)}",
    )
    for flag in ("drop_strategy", "growth_strategy"):
        v = getattr(cfg, flag)
        need(v in STRATEGIES, f"unknown --{flag} {v!r}; choose from: {', '.join(STRATEGIES)}")
    finite = lambda x: x == x and abs(x) != float("inf")  # noqa: E731
    need(finite(cfg.lr) and cfg.lr > 0, f"--lr {cfg.lr!r} is out of range; allowed: a number > 0")
    need(
        finite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight_decay {cfg.weight_decay!r} is out of range; allowed: a number >= 0",
    )
    need(
        finite(cfg.momentum) and 0 <= cfg.momentum < 1, f"--momentum {cfg.momentum!r} is out of range; allowed: [0, 1)"
    )
    need(finite(cfg.rho) and cfg.rho >= 0, f"--rho {cfg.rho!r} is out of range; allowed: a number >= 0")
    need(
        finite(cfg.sparsity) and 0 <= cfg.sparsity < 1,
        f"--sparsity {cfg.sparsity!r} is out of range; allowed: [0, 1) (fraction of weights not perturbed)",
    )
    need(
        finite(cfg.label_noise) and 0 <= cfg.label_noise < 1,
        f"--label_noise {cfg.label_noise!r} is out of range; allowed: [0, 1) (fraction of training labels replaced)",
    )
    spec = DATASETS[cfg.dataset]
    need(
        not (cfg.augment == "none" and spec.augments),
        f"--augment none contradicts --dataset {cfg.dataset}, whose name asks for augmentation; "
        f"use {cfg.dataset.replace('_cutout', '_base')} or --augment standard",
    )
    total = spec.train_size
    need(
        cfg.train_subset is None or (cfg.train_subset >= 1 and (total is None or cfg.train_subset <= total)),
        f"--train_subset {cfg.train_subset} is out of range; allowed: "
        + (f"1 to {total} (the training examples of {cfg.dataset})" if total else "an integer >= 1"),
    )
    pool = cfg.train_subset or total
    need(
        cfg.val_split >= 0 and (pool is None or cfg.val_split < pool),
        f"--val_split {cfg.val_split} is out of range; allowed: 0 <= N < "
        + (
            f"{pool} (the training examples{' of --train_subset' if cfg.train_subset else ''})"
            if pool
            else "the number of training examples"
        ),
    )
    for model, (flag, _) in WIDTH_FLAGS.items():
        width = getattr(cfg, flag)
        need(width is None or width >= 1, f"--{flag} {width} is out of range; allowed: an integer >= 1")
        need(
            width is None or cfg.model == model,
            f"--{flag} {width} was given with --model {cfg.model}; allowed: --{flag} with --model {model} only",
        )
    need(0 <= cfg.drop_rate <= 1, f"--drop_rate {cfg.drop_rate!r} is out of range; allowed: [0, 1]")
    need(cfg.num_samples >= 1, f"--num_samples {cfg.num_samples} is out of range; allowed: an integer >= 1")
    need(cfg.update_freq >= 1, f"--update_freq {cfg.update_freq} is out of range; allowed: an integer >= 1 (epochs)")
    need(cfg.epochs >= 1, f"--epochs {cfg.epochs} is out of range; allowed: an integer >= 1")
    need(
        0 <= cfg.start_epoch < cfg.epochs,
        f"--start_epoch {cfg.start_epoch} is out of range; allowed: 0 <= start_epoch < epochs ({cfg.epochs})",
    )
    need(cfg.batch_size >= 1, f"--batch_size {cfg.batch_size} is out of range; allowed: an integer >= 1")
    need(cfg.grad_accum >= 1, f"--grad_accum {cfg.grad_accum} is out of range; allowed: an integer >= 1")
    need(
        cfg.batch_size % cfg.grad_accum == 0,
        f"--grad_accum {cfg.grad_accum} does not divide --batch_size {cfg.batch_size}; allowed: a divisor",
    )
    need(cfg.num_workers >= 0, f"--num_workers {cfg.num_workers} is out of range; allowed: >= 0")
    need(
        0 <= cfg.warmup_epoch < cfg.epochs,
        f"--warmup_epoch {cfg.warmup_epoch} is out of range; allowed: 0 <= warmup_epoch < epochs ({cfg.epochs})",
    )
    need(cfg.warmup_init_lr >= 0, f"--warmup_init_lr {cfg.warmup_init_lr!r} is out of range; allowed: >= 0")
    need(cfg.eta_min >= 0, f"--eta_min {cfg.eta_min!r} is out of range; allowed: >= 0")
    need(cfg.gamma > 0, f"--gamma {cfg.gamma!r} is out of range; allowed: > 0")
    need(cfg.eps > 0, f"--eps {cfg.eps!r} is out of range; allowed: > 0")
    need(all(0 <= b < 1 for b in cfg.betas), f"--betas {cfg.betas} is out of range; allowed: two numbers in [0, 1)")
    need(cfg.save_every_steps >= 0, f"--save_every_steps {cfg.save_every_steps} is out of range; allowed: >= 0")
    need(
        cfg.limit_train_batches >= 0 and cfg.limit_val_batches >= 0,
        "--limit_train_batches/--limit_val_batches must be >= 0 (0: no limit)",
    )
    need(
        cfg.threads is None or cfg.threads >= 1,
        f"--threads {cfg.threads} is out of range; allowed: an integer >= 1",
    )
    need(cfg.log_freq >= 1, f"--log_freq {cfg.log_freq} is out of range; allowed: >= 1")
    need(
        not DATASETS[cfg.dataset].needs_datadir or cfg.datadir is not None,
        f"--dataset {cfg.dataset} needs --datadir (the folder holding the data)",
    )
    need(not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0")
    need(
        os.sep not in cfg.output_name and cfg.output_name not in ("", ".", ".."),
        f"--output_name {cfg.output_name!r} must be a plain folder name (no '{os.sep}')",
    )
    if not registry.family(wrapper).sam:  # a SAM setting given to a plain optimizer: said, not silently ignored
        for flag, on in (
            ("sam_ascent", cfg.sam_ascent != "gradient"),
            ("sam_schedule", cfg.sam_schedule != "none"),
            ("sam_micro_batch", cfg.sam_micro_batch is not None),
        ):
            if on:
                print(
                    f"ssam: warning: --{flag} {getattr(cfg, flag)} has no effect with --opt {cfg.opt} (only "
                    + ", ".join(f"{n}-*" for n in registry.WRAPPERS)
                    + " use it)",
                    file=sys.stderr,
                )
    sparse = registry.family(wrapper).sparse
    for flag, on in (
        ("sparsity", cfg.sparsity_given),
        ("granularity", cfg.granularity != "element"),
        ("cost_aware", cfg.cost_aware),
        ("skip_dead", cfg.skip_dead),
    ):
        if on and not sparse:
            value = "" if isinstance(getattr(cfg, flag), bool) else f" {_show_value(getattr(cfg, flag))}"
            print(
                f"ssam: warning: --{flag}{value} has no effect with --opt {cfg.opt} (only "
                + ", ".join(f"{n}-*" for n, f in registry.WRAPPERS.items() if f.sparse)
                + " use it)",
                file=sys.stderr,
            )
    need(
        not (cfg.sam_schedule.startswith("aesam") and cfg.sam_first_pass == "local"),
        f"--sam_schedule {cfg.sam_schedule} with --sam_first_pass local: each rank would judge its own gradient "
        "norm and the ranks could disagree on which steps ascend; allowed: --sam_first_pass sync",
    )
    try:  # the optimizer's own rule, in the flags' names
        check_composes(
            parse_ascent(cfg.sam_ascent),
            parse_schedule(cfg.sam_schedule).kind,
            cfg.sam_micro_batch,
            ("--sam_ascent", "--sam_schedule", "--sam_micro_batch"),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    need(
        not (parse_ascent(cfg.sam_ascent).kind in ("momentum", "msam") and base == "sgd" and cfg.momentum == 0),
        f"--sam_ascent {cfg.sam_ascent} with --momentum 0: SGD keeps no momentum to read; allowed: --momentum > 0, "
        "or an Adam-type base (--opt sam-adamw)",
    )
    need(
        not (cfg.skip_dead and parse_ascent(cfg.sam_ascent).one_pass),
        f"--skip_dead with --sam_ascent {cfg.sam_ascent}: a one-pass direction has no first pass to skip; allowed: "
        "--skip_dead with --sam_ascent gradient or subbatch:F",
    )
    _check_trajectory(cfg, wrapper)
    m = cfg.sam_micro_batch
    if m is not None:
        micro = cfg.batch_size // cfg.grad_accum
        need(m >= 1, f"--sam_micro_batch {m} is out of range; allowed: an integer >= 1")
        need(
            micro % m == 0,
            f"--sam_micro_batch {m} does not divide the "
            + (f"micro-batch {micro} (--batch_size {cfg.batch_size} / --grad_accum {cfg.grad_accum})"
               if cfg.grad_accum > 1 else f"--batch_size {cfg.batch_size}")
            + "; allowed: a divisor",
        )  # fmt: skip
        need(
            not cfg.sam_schedule.startswith(("looksam", "aesam")),
            f"--sam_micro_batch {m} with --sam_schedule {cfg.sam_schedule}: LookSAM's direction and AE-SAM's norm are "
            "defined for one perturbation per step; allowed: every:K or late:F",
        )
        need(
            cfg.amp != "fp16",
            f"--sam_micro_batch {m} with --amp fp16 is not supported (loss scaling per chunk); "
            "allowed: --amp bf16 or none",
        )
    if cfg.amp == "fp16" and cfg.device == "cpu":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none")


def _check_trajectory(cfg: argparse.Namespace, wrapper: str | None) -> None:
    """SAF and MESA (ssam.train.trajectory): their settings, and the runs they can be part of."""
    for flag in ("saf", "mesa"):
        lam = getattr(cfg, flag)
        need(lam is None or lam >= 0, f"--{flag} {lam} is out of range; allowed: a number >= 0 (the KL's weight)")
    if cfg.saf is None and cfg.mesa is None:
        return
    need(cfg.saf is None or cfg.mesa is None, "--saf and --mesa together; allowed: one trajectory loss per run")
    flag = "saf" if cfg.saf is not None else "mesa"
    need(
        not registry.family(wrapper).sam,
        f"--{flag} with --opt {cfg.opt}: the trajectory loss replaces SAM's ascent; allowed: --opt sgd or adamw",
    )
    need(cfg.kl_temperature > 0, f"--kl_temperature {cfg.kl_temperature} is out of range; allowed: a number > 0")
    need(cfg.kl_start >= 0, f"--kl_start {cfg.kl_start} is out of range; allowed: an integer >= 0 (an epoch)")
    need(cfg.saf_lag >= 1, f"--saf_lag {cfg.saf_lag} is out of range; allowed: an integer >= 1 (epochs)")
    need(0 <= cfg.mesa_decay < 1, f"--mesa_decay {cfg.mesa_decay} is out of range; allowed: 0 <= decay < 1")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    need(
        world == 1,
        f"--{flag} under torchrun ({world} processes): each rank sees other examples each epoch and the "
        "trajectory state is kept per process; allowed: one process",
    )

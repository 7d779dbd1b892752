"""The training command line: the official code's flags (same names, meanings and defaults) plus modern ones.

One ``argparse.Namespace`` is the configuration: parsed here, checked here, saved with the run, passed down.
``--config FILE.yaml`` supplies values for any flag (keys = flag names without dashes); the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from ..data import DATASETS
from ..errors import ArgumentParser, UsageError, did_you_mean
from ..optim.factory import parse_opt as _parse_opt
from ..optim.fisher import FISHER_METHODS
from ..optim.groups import parse_granularity
from ..optim.ssam import STRATEGIES
from .identity import run_name

SCHEDULERS = ("CosineLRscheduler", "MultiStepLRscheduler")

# Defaults that depend on the data set: the embedded digits set must train in about a minute on a laptop.
DIGITS_DEFAULTS = {"model": "cnn_small", "epochs": 15, "batch_size": 64}
DEFAULTS = {"model": "resnet18", "epochs": 200, "batch_size": 128}
# The paper code's SSAM defaults; the library's own (sparsity 0.5, update_freq 1, num_samples 128) suit a loop
# that a user writes, the CLI reproduces the paper's runs.
CLI_SPARSITY = 0.2


def build_parser(prog: str = "ssam train") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train an image classifier with SGD/AdamW, SAM, SSAM-F or SSAM-D.")
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        default=None,
        help=f"one of {', '.join(DATASETS)}; default CIFAR10_cutout with --datadir, else digits",
    )
    g.add_argument("--datadir", default=None, help="folder holding the data set (see README for layouts)")
    g.add_argument(
        "--download",
        action="store_true",
        help="allow torchvision to download CIFAR, MNIST or FashionMNIST into --datadir",
    )
    g.add_argument("--model", default=None, help="model name (default resnet18, cnn_small on digits)")
    g.add_argument(
        "--mlp_width",
        type=int,
        default=None,
        metavar="W",
        help="--model mlp: width of its two hidden layers (default 512)",
    )
    g.add_argument(
        "--augment",
        default="standard",
        choices=("standard", "none"),
        help="training augmentation: the data set's own (crop/flip; cutout for *_cutout) or none (the test transform)",
    )
    g.add_argument(
        "--train_subset",
        type=int,
        default=None,
        metavar="N",
        help="train on N training examples drawn uniformly, fixed by --seed (drawn before --label_noise; default: all)",
    )
    g.add_argument(
        "--val_split",
        type=int,
        default=0,
        metavar="N",
        help="hold out N training examples (noisy labels included) as a validation set evaluated every epoch; "
        "the early-stopped accuracy is the test accuracy at the epoch of best validation accuracy",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader workers (default 0 for digits, MNIST, FashionMNIST; else min(4, cpus))",
    )
    g.add_argument(
        "--gpu_data",
        action="store_true",
        help="keep an in-memory data set (CIFAR*, digits, MNIST, FashionMNIST) on the device and augment "
        "there in batches",
    )
    g.add_argument(
        "--label_noise",
        type=float,
        default=0.0,
        metavar="P",
        help="replace a fraction P in [0, 1) of the training labels by a random other class, fixed by "
        "--seed (the test set stays clean)",
    )

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="sgd", help="sgd, adamw, or sam-/ssamf-/ssamd- in front of either, e.g. ssamf-sgd")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate (peak, after any warm-up)")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="L2 penalty (SGD) / decoupled decay (AdamW)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="SGD: Nesterov momentum")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon (reaches AdamW under SAM/SSAM too)")
    g.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    g.add_argument("--adaptive", action="store_true", help="ASAM: scale the perturbation by |w|")
    g.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"SSAM: fraction of weights NOT perturbed (default {CLI_SPARSITY}, the paper code's; "
        "1 - N/M with --granularity N:M)",
    )
    g.add_argument("--renormalize", action="store_true", help="SSAM: rescale the masked perturbation to norm rho")
    g.add_argument("--update_freq", type=int, default=5, help="SSAM: epochs between mask updates")
    g.add_argument("--num_samples", type=int, default=1024, help="SSAM-F: examples for the Fisher")
    g.add_argument(
        "--fisher_mode", default="train", choices=("train", "eval"), help="SSAM-F: model mode for the Fisher"
    )
    g.add_argument(
        "--fisher_method",
        default="auto",
        choices=FISHER_METHODS,
        help="SSAM-F: per-example gradients for the Fisher (same values; auto = fastest for the device)",
    )
    g.add_argument("--drop_rate", type=float, default=0.5, help="SSAM-D: initial death rate")
    g.add_argument("--drop_strategy", default="gradient", help=f"SSAM-D death score: {', '.join(STRATEGIES)}")
    g.add_argument("--growth_strategy", default="random", help=f"SSAM-D growth score: {', '.join(STRATEGIES)}")
    g.add_argument(
        "--granularity",
        default="element",
        help="SSAM: what lives and dies together in the mask: element, channel, tensor or N:M (e.g. 2:4)",
    )
    g.add_argument(
        "--cost_aware",
        action="store_true",
        help="SSAM, channel/tensor granularity: weigh each group's score against the first-pass work it keeps alive",
    )
    g.add_argument(
        "--skip_dead",
        action="store_true",
        help="SSAM: the first pass computes no gradient for parameters without a live mask entry",
    )
    g.add_argument(
        "--sam_first_pass",
        default="sync",
        choices=("sync", "local"),
        help="DDP: all-reduce the first gradient (sync) or perturb per device (local, under no_sync)",
    )
    g.add_argument(
        "--freeze_bn_second_pass",
        action="store_true",
        help="do not update BatchNorm running statistics in SAM's second forward pass",
    )

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 200, 15 on digits)")
    g.add_argument("--start_epoch", type=int, default=0, help="epoch to start at (the schedule starts there)")
    g.add_argument("--batch_size", type=int, default=None, help="per-process batch size (default 128, 64 on digits)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (both SAM passes)")
    g.add_argument("--lr_scheduler", default="CosineLRscheduler", help=" or ".join(SCHEDULERS))
    g.add_argument("--eta_min", type=float, default=0.0, help="cosine: the final learning rate")
    g.add_argument(
        "--milestone",
        type=int,
        nargs="+",
        default=[60, 120, 160],
        help="multi-step: epochs at which the learning rate is multiplied by --gamma",
    )
    g.add_argument("--gamma", type=float, default=0.2, help="multi-step: learning-rate factor at each milestone")
    g.add_argument("--warmup_epoch", type=int, default=0, help="epochs of linear warm-up")
    g.add_argument("--warmup_init_lr", type=float, default=0.0, help="learning rate at the start of the warm-up")
    g.add_argument("--seed", type=int, default=1234, help="seed of weights, data order, augmentation, masks")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")

    g = p.add_argument_group("run, logs, checkpoints")
    g.add_argument("--output_dir", default="logs", help="folder holding the run folders")
    g.add_argument(
        "--output_name",
        default=None,
        help="run folder name (default: a readable prefix and a hash of the settings that shape the run)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    g.add_argument("--resume_path", default=None, help="checkpoint to continue from")
    g.add_argument(
        "--allow_changed_flags",
        action="store_true",
        help="--resume even though flags that shape the run differ from the checkpoint's (logged)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    g.add_argument("--save_every_steps", type=int, default=0, help="also write last.pt every N steps (0: off)")
    g.add_argument("--log_freq", type=int, default=200, help="steps between progress lines when not on a terminal")
    g.add_argument("--quiet", action="store_true", help="no progress bar or step lines (the epoch lines stay)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (pip install 'sparse-sam[wandb]')")
    g.add_argument("--wandb_project", default="ssam", help="wandb project")
    g.add_argument("--wandb_name", default=None, help="wandb run name (default: the run folder name)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to RUN/tensorboard")
    g.add_argument(
        "--eval_only", action="store_true", help="evaluate the checkpoint (--resume_path or best.pt) and exit"
    )
    g.add_argument("--limit_train_batches", type=int, default=0, help="at most N training steps per epoch (0: all)")
    g.add_argument("--limit_val_batches", type=int, default=0, help="at most N evaluation batches (0: all)")

    g = p.add_argument_group("devices and speed")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    g.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="mixed precision (fp16 with loss scaling over both SAM passes; CUDA only)",
    )
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dist_url", default="env://", help="torch.distributed init method under torchrun")
    g.add_argument("--distributed_val", action="store_true", help="every rank evaluates a shard (else rank 0 all)")
    p.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line override it")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r}: file not found")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of flag names to values, got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in raw.items():
        if key not in actions:
            raise UsageError(
                f"--config {path!r}: unknown key {key!r}; allowed keys are the flag names, e.g. "
                f"{', '.join(sorted(actions)[:8])}, ..."
            )
        act = actions[key]
        out[key] = _check_type(path, key, act, value)
    return out


def _check_type(path: str, key: str, act: argparse.Action, value: Any) -> Any:
    bad = f"--config {path!r}: key {key!r} has {type(value).__name__} {value!r}; expected "
    if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(bad + "true or false")
        return value
    if value is None:
        return None
    if act.nargs in ("+", 2):
        items = value if isinstance(value, list) else [value]
        if act.nargs == 2 and len(items) != 2:
            raise UsageError(bad + "a list of 2 values")
        return [_check_scalar(bad, act, v) for v in items]
    return _check_scalar(bad, act, value)


def _check_scalar(bad: str, act: argparse.Action, value: Any) -> Any:
    if act.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(bad + "an integer")
    if act.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(bad + "a number")
        value = float(value)
    if act.type is None and not isinstance(value, str):
        raise UsageError(bad + "a string")
    if act.choices and value not in act.choices:
        raise UsageError(bad + "one of " + ", ".join(map(str, act.choices)))
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    cfg = parser.parse_args(argv)
    resolve(cfg)
    validate(cfg)
    return cfg


def parse_opt(opt: str) -> tuple[str | None, str]:
    """``--opt`` split into (wrapper, base); a bad form is one line naming the flag (with a "did you mean")."""
    try:
        return _parse_opt(opt)
    except ValueError as e:
        raise UsageError(f"--{e}" if str(e).startswith("opt ") else f"--opt {opt!r}: {e}") from None


def granularity(cfg: argparse.Namespace) -> str:
    """``--granularity`` in its canonical spelling; a malformed value is one line naming the flag."""
    try:
        return str(parse_granularity(cfg.granularity))
    except ValueError as e:
        raise UsageError(f"--{e}") from None


MLP_MODEL = "mlp"
MLP_DEFAULT_WIDTH = 512

# Data sets of tensors: worker processes only add start-up time and contention.
IN_PROCESS_DATASETS = ("digits", "MNIST", "FashionMNIST")


def resolve(cfg: argparse.Namespace) -> None:
    """Fill the data-set-dependent defaults and the run name."""
    if cfg.dataset is None:
        cfg.dataset = "digits" if cfg.datadir is None else "CIFAR10_cutout"
    defaults = DIGITS_DEFAULTS if cfg.dataset == "digits" else DEFAULTS
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.num_workers is None:
        cfg.num_workers = 0 if cfg.dataset in IN_PROCESS_DATASETS else min(4, os.cpu_count() or 1)
    if cfg.model == MLP_MODEL and cfg.mlp_width is None:
        cfg.mlp_width = MLP_DEFAULT_WIDTH
    cfg.opt = cfg.opt.lower()
    parse_opt(cfg.opt)
    cfg.granularity = granularity(cfg)
    implied = parse_granularity(cfg.granularity).implied_sparsity
    cfg.sparsity_given = cfg.sparsity is not None
    if cfg.sparsity is None:
        cfg.sparsity = CLI_SPARSITY if implied is None else implied
    elif implied is not None and abs(cfg.sparsity - implied) > 1e-12:
        n, m = cfg.granularity.split(":")
        raise UsageError(
            f"--sparsity {cfg.sparsity!r} contradicts --granularity {cfg.granularity} ({n} of every {m} "
            f"weights perturbed: sparsity {implied:g}); leave --sparsity out"
        )
    cfg.name_from_settings = cfg.output_name is None
    if cfg.output_name is None:
        cfg.output_name = run_name(to_plain(cfg), to_plain(build_parser().parse_args([])))


def _show_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def validate(cfg: argparse.Namespace) -> None:
    """Every range check of the command line, each failing with one line that names the value and the rule."""
    from ..models import MODELS

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UsageError(msg)

    need(
        cfg.dataset in DATASETS,
        f"unknown --dataset {cfg.dataset!r}; choose from: {', '.join(DATASETS)}" + did_you_mean(cfg.dataset, DATASETS),
    )
    need(
        cfg.model in MODELS,
        f"unknown --model {cfg.model!r}; choose from: {', '.join(MODELS)}" + did_you_mean(cfg.model, MODELS),
    )
    wrapper, _ = parse_opt(cfg.opt)
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
    need(
        cfg.mlp_width is None or cfg.mlp_width >= 1,
        f"--mlp_width {cfg.mlp_width} is out of range; allowed: an integer >= 1",
    )
    if cfg.mlp_width is not None and cfg.model != MLP_MODEL:
        print(
            f"ssam: warning: --mlp_width {cfg.mlp_width} has no effect with --model {cfg.model} (only mlp uses it)",
            file=sys.stderr,
        )
        cfg.mlp_width = None
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
    need(
        not cfg.cost_aware or cfg.granularity in ("channel", "tensor"),
        f"--cost_aware needs --granularity channel or tensor (got {cfg.granularity})",
    )
    sparse = wrapper in ("ssamf", "ssamd")
    for flag, on in (
        ("sparsity", cfg.sparsity_given),
        ("granularity", cfg.granularity != "element"),
        ("cost_aware", cfg.cost_aware),
        ("skip_dead", cfg.skip_dead),
    ):
        if on and not sparse:
            value = "" if isinstance(getattr(cfg, flag), bool) else f" {_show_value(getattr(cfg, flag))}"
            print(
                f"ssam: warning: --{flag}{value} has no effect with --opt {cfg.opt} (only ssamf-*/ssamd-* use it)",
                file=sys.stderr,
            )
    if cfg.amp == "fp16" and cfg.device == "cpu":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none")


# Attributes resolve() adds that are not flags (the saved config must load back with --config).
INTERNAL = ("sparsity_given", "name_from_settings", "config")


def to_plain(cfg: argparse.Namespace) -> dict[str, Any]:
    """The configuration as YAML/JSON-safe values (what the run folder saves)."""
    # Only flags: the saved file must load back with --config.
    return {k: _plain(v) for k, v in sorted(vars(cfg).items()) if k not in INTERNAL}


def flags_markdown() -> str:
    """The flag table of docs/flags.md, generated from the parser (a test keeps the file in step)."""
    parser = build_parser()
    lines = []
    # argparse's own group (--config, --debug) first holds the general options: they read best last.
    for group in [*parser._action_groups[2:], parser._action_groups[1]]:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "general" if group is parser._action_groups[1] else group.title
        lines += [f"## {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        for a in actions:
            flag = a.option_strings[0] + ("" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}")
            default = "" if a.default is None or a.default is False else f"`{_show(a.default)}`"
            text = (a.help or "").replace("|", "\\|")
            if a.choices:
                text += f" (one of: {', '.join(map(str, a.choices))})"
            lines.append(f"| `{flag}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)

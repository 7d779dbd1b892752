"""``ssam train``'s configuration: parsed (``flags``), filled in with the defaults that depend on the data set and
named (``resolve``), checked (``validate``). One ``argparse.Namespace`` is the configuration: saved with the run,
passed down, never changed by the loop. ``--config FILE.yaml`` supplies values for any flag (keys = flag names
without dashes); the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError, flag_error
from ..models import WIDTH_FLAGS
from ..optim import groups
from ..optim.factory import canonical_opt
from ..optim.factory import parse_opt as _parse_opt
from .flags import CLI_SPARSITY, SCHEDULERS, build_parser, flags_markdown
from .identity import legacy_run_names, run_name
from .validate import validate
from .yaml_config import yaml_defaults

__all__ = [
    "build_parser",
    "parse_args",
    "resolve",
    "validate",
    "to_plain",
    "flags_markdown",
    "parse_opt",
    "granularity",
    "SCHEDULERS",
    "CLI_SPARSITY",
    "INTERNAL",
]

# Defaults that depend on the data set (never on the machine: a run's identity must not). The embedded digits set
# must train in about a minute on a laptop; MNIST and Fashion-MNIST take the small CNN, which trains on a CPU.
DATASET_DEFAULTS = {
    "digits": {"model": "cnn_small", "epochs": 15, "batch_size": 64},
    "MNIST": {"model": "cnn_small", "epochs": 200, "batch_size": 128},
    "FashionMNIST": {"model": "cnn_small", "epochs": 200, "batch_size": 128},
}
DEFAULTS = {"model": "resnet18", "epochs": 200, "batch_size": 128}
# The default model before it depended on the data set: --resume of a run named with it still finds it.
LEGACY_DEFAULT_MODEL = "resnet18"
DIGITS_DEFAULTS = DATASET_DEFAULTS["digits"]  # the name older code imported


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**yaml_defaults(parser, pre.config))
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
    """``--granularity`` in its canonical spelling (the parser's type has already checked it)."""
    return str(groups.parse_granularity(cfg.granularity))


# Data sets of tensors: worker processes only add start-up time and contention.
IN_PROCESS_DATASETS = ("digits", "MNIST", "FashionMNIST")


def resolve(cfg: argparse.Namespace) -> None:
    """Fill the data-set-dependent defaults and the run name."""
    if cfg.dataset is None:
        cfg.dataset = "digits" if cfg.datadir is None else "CIFAR10_cutout"
    model_given = cfg.model is not None
    for key, value in DATASET_DEFAULTS.get(cfg.dataset, DEFAULTS).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.num_workers is None:
        cfg.num_workers = 0 if cfg.dataset in IN_PROCESS_DATASETS else min(4, os.cpu_count() or 1)
    if cfg.model in WIDTH_FLAGS:
        flag, default = WIDTH_FLAGS[cfg.model]
        if getattr(cfg, flag) is None:
            setattr(cfg, flag, default)
    parse_opt(cfg.opt)
    cfg.opt = canonical_opt(cfg.opt)  # "SSAMF" and "ssamf" are "ssamf-sgd": one spelling, one run identity
    cfg.sparsity_given = cfg.sparsity is not None
    # The granularity rules (cost-aware only for channel/tensor, N:M implies the sparsity) are the optimizer's,
    # checked once, in ssam.optim.groups; here they become a line that names the flag.
    try:
        gran, cfg.sparsity = groups.resolve(cfg.granularity, cfg.sparsity, cfg.cost_aware, CLI_SPARSITY)
    except ValueError as e:
        raise UsageError(flag_error(e)) from None
    cfg.granularity = str(gran)
    cfg.name_from_settings = cfg.output_name is None
    if cfg.output_name is None:
        defaults = to_plain(build_parser().parse_args([]))
        cfg.output_name = run_name(to_plain(cfg), defaults)
        if cfg.resume and not (Path(cfg.output_dir) / cfg.output_name).exists():
            _find_legacy_run(cfg, defaults, model_given)


def _find_legacy_run(cfg: argparse.Namespace, defaults: dict, model_given: bool) -> None:
    """--resume of a run named by an older version: a colon in an N:M name, or the default model before it
    depended on the data set. Switches to that folder (and that model) when it exists."""
    plain = to_plain(cfg)
    candidates: list[tuple[str | None, str]] = [(None, name) for name in legacy_run_names(plain, defaults)]
    default_model = DATASET_DEFAULTS.get(cfg.dataset, DEFAULTS)["model"]
    if not model_given and default_model != LEGACY_DEFAULT_MODEL and cfg.dataset in DATASET_DEFAULTS:
        old = {**plain, "model": LEGACY_DEFAULT_MODEL}
        candidates += [(LEGACY_DEFAULT_MODEL, n) for n in [run_name(old, defaults), *legacy_run_names(old, defaults)]]
    for model, name in candidates:
        if (Path(cfg.output_dir) / name).exists():
            cfg.output_name = name
            if model is not None:
                cfg.model = model
                print(
                    f"ssam: note: resuming {name}, trained with --model {model} (the default for "
                    f"{cfg.dataset} before it became {default_model})",
                    file=sys.stderr,
                )
            return


# Attributes resolve() adds that are not flags (the saved config must load back with --config).
INTERNAL = ("sparsity_given", "name_from_settings", "config")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def to_plain(cfg: argparse.Namespace) -> dict[str, Any]:
    """The configuration as YAML/JSON-safe values (what the run folder saves)."""
    # Only flags: the saved file must load back with --config.
    return {k: _plain(v) for k, v in sorted(vars(cfg).items()) if k not in INTERNAL}

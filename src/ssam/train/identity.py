"""What makes two runs the same run: the settings that shape it, its folder name, and what may change on resume.

Everything here works on the saved form of a configuration (``config.to_plain``: flag name -> plain value), so a
checkpoint's config and the command line compare the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..optim.factory import parse_opt

__all__ = ["NOT_SHAPING", "RESUME_MAY_CHANGE", "run_settings", "run_name", "changed_flags"]

# Flags that change neither what is trained nor how it is computed: where the run lives, what is logged and how
# fast it goes. They are left out of the run name's hash and may change when a run is resumed.
# fisher_method: every method computes the same Fisher (tested), only its speed differs.
NOT_SHAPING = frozenset({
    "output_dir", "output_name", "resume", "resume_path", "allow_changed_flags", "overwrite", "save_every_steps",
    "log_freq", "quiet", "wandb", "wandb_project", "wandb_name", "tensorboard", "eval_only", "limit_val_batches",
    "distributed_val", "num_workers", "datadir", "download", "device", "dist_url", "compile", "channels_last",
    "deterministic", "fisher_method", "config", "debug",
})  # fmt: skip
# May change on --resume besides those: the epoch count, so that a finished run can be extended. It is also left
# out of the run name, so `--epochs 300 --resume` finds the 200-epoch run's folder.
RESUME_MAY_CHANGE = frozenset({"epochs"})


def _only_when(cfg: dict[str, Any]) -> dict[str, bool]:
    """Settings that shape only some runs (rho only a SAM run's); elsewhere they are not part of its identity."""
    wrapper, base = parse_opt(cfg["opt"])
    sam, sparse, ssamf, ssamd = (
        wrapper is not None,
        wrapper in ("ssamf", "ssamd"),
        wrapper == "ssamf",
        wrapper == "ssamd",
    )
    cosine = cfg["lr_scheduler"] == "CosineLRscheduler"
    return {
        "rho": sam, "adaptive": sam, "sam_first_pass": sam, "freeze_bn_second_pass": sam,
        "sparsity": sparse, "update_freq": sparse, "renormalize": sparse, "granularity": sparse,
        "cost_aware": sparse, "skip_dead": sparse,
        "num_samples": ssamf, "fisher_mode": ssamf,
        "drop_rate": ssamd, "drop_strategy": ssamd, "growth_strategy": ssamd,
        "momentum": base == "sgd", "nesterov": base == "sgd", "betas": base == "adamw", "eps": base == "adamw",
        "mlp_width": cfg.get("model") == "mlp",
        "eta_min": cosine, "milestone": not cosine, "gamma": not cosine, "warmup_init_lr": cfg["warmup_epoch"] > 0,
    }  # fmt: skip


def run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the run: every flag but NOT_SHAPING, the epoch count and those its optimizer and
    schedule do not use."""
    relevant = _only_when(cfg)
    return {
        k: v for k, v in cfg.items() if k not in NOT_SHAPING and k not in RESUME_MAY_CHANGE and relevant.get(k, True)
    }


def run_name(cfg: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.2_seed1234_1a2b3c4d``: a readable prefix and a hash of every
    setting that shapes the run, so that runs with different settings never share a folder.

    Settings at their parser default (``defaults``) are left out of the hash: a flag added in a later version, at its
    default, keeps the names of older runs.
    """
    wrapper, _ = parse_opt(cfg["opt"])
    parts = [cfg["dataset"], cfg["model"], cfg["opt"], f"lr{cfg['lr']:g}"]
    if wrapper:
        parts.append(f"rho{cfg['rho']:g}")
    if wrapper in ("ssamf", "ssamd"):
        grain = "" if cfg["granularity"] == "element" else f"-{cfg['granularity']}"
        parts.append(f"sp{cfg['sparsity']:g}{grain}")
    if cfg.get("train_subset"):
        parts.append(f"n{cfg['train_subset']}")
    if cfg["label_noise"]:
        parts.append(f"noise{cfg['label_noise']:g}")
    parts.append(f"seed{cfg['seed']}")
    settings = {k: v for k, v in run_settings(cfg).items() if k not in defaults or v != defaults[k]}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return "_".join(parts) + "_" + digest


def changed_flags(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag OLD -> NEW`` for every setting that shapes the run and differs between a checkpoint's config and
    this one (settings the checkpoint does not record, from older versions, are not compared)."""
    then_settings = run_settings({**now, **saved})
    now_settings = run_settings(now)
    keys = sorted(k for k in now_settings.keys() | then_settings.keys() if k in saved and k in now)
    return [
        f"--{k} {_show(then_settings.get(k))} -> {_show(now_settings.get(k))}"
        for k in keys
        if now_settings.get(k) != then_settings.get(k)
    ]


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)

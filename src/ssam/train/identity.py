"""What makes two runs the same run: the settings that shape it, its folder name, and what may change on resume.

Everything here works on the saved form of a configuration (``config.to_plain``: flag name -> plain value), so a
checkpoint's config and the command line compare the same way.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from typing import Any

from ..models import WIDTH_FLAGS
from ..optim import registry
from ..optim.factory import parse_opt

__all__ = [
    "NOT_SHAPING",
    "RESUME_MAY_CHANGE",
    "run_settings",
    "run_name",
    "legacy_run_names",
    "changed_flags",
    "differing_settings",
]

# Flags that change neither what is trained nor how it is computed: where the run lives, what is logged and how
# fast it goes. They are left out of the run name's hash and may change when a run is resumed.
# fisher_method: every method computes the same Fisher (tested), only its speed differs.
NOT_SHAPING = frozenset({
    "output_dir", "output_name", "resume", "resume_path", "allow_changed_flags", "overwrite", "save_every_steps",
    "log_freq", "quiet", "wandb", "wandb_project", "wandb_name", "tensorboard", "eval_only", "limit_val_batches",
    "distributed_val", "num_workers", "datadir", "download", "device", "dist_url", "compile", "channels_last",
    "deterministic", "fisher_method", "config", "debug", "threads",
})  # fmt: skip
# May change on --resume besides those: the epoch count, so that a finished run can be extended. It is also left
# out of the run name, so `--epochs 300 --resume` finds the 200-epoch run's folder.
RESUME_MAY_CHANGE = frozenset({"epochs"})
# Values a run's name leaves out beside the parser's defaults: --fisher_mode auto resolves to 'train' for every
# model the old default 'train' could train, and those runs keep their names.
NAME_OMITS = {"fisher_mode": ("auto", "train")}


def _only_when(cfg: dict[str, Any]) -> dict[str, bool]:
    """Settings that shape only some runs (rho only a SAM run's); elsewhere they are not part of its identity. The
    optimizer's settings are the registry's (``ssam.optim.registry``); the schedule's and the model's are here."""
    wrapper, base = parse_opt(cfg["opt"])
    cosine = cfg["lr_scheduler"] == "CosineLRscheduler"
    relevant = {k: registry.applies(k, wrapper, base) for k in cfg if k in registry.owned_settings()}
    return {
        **relevant,
        **{flag: cfg.get("model") == model for model, (flag, _) in WIDTH_FLAGS.items()},
        "kl_temperature": cfg.get("saf") is not None or cfg.get("mesa") is not None,
        "kl_start": cfg.get("saf") is not None or cfg.get("mesa") is not None,
        "saf_lag": cfg.get("saf") is not None,
        "mesa_decay": cfg.get("mesa") is not None,
        "eta_min": cosine, "milestone": not cosine, "gamma": not cosine, "warmup_init_lr": cfg["warmup_epoch"] > 0,
    }  # fmt: skip


def run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the run: every flag but NOT_SHAPING, the epoch count and those its optimizer and
    schedule do not use."""
    relevant = _only_when(cfg)
    return {
        k: v for k, v in cfg.items() if k not in NOT_SHAPING and k not in RESUME_MAY_CHANGE and relevant.get(k, True)
    }


def run_name(cfg: dict[str, Any], defaults: dict[str, Any], _colon: bool = False) -> str:
    """``digits_cnn_small_ssamf-sgd_lr0.05_rho0.05_sp0.2_seed1234_1a2b3c4d``: a readable prefix and a hash of every
    setting that shapes the run, so that runs with different settings never share a folder.

    Settings at their parser default (``defaults``) are left out of the hash: a flag added in a later version, at its
    default, keeps the names of older runs.
    """
    wrapper, _ = parse_opt(cfg["opt"])
    # "timm:resnet10t" -> "timm-resnet10t": a file name on every file system
    parts = [cfg["dataset"], cfg["model"].replace(":", "-"), cfg["opt"], f"lr{cfg['lr']:g}"]
    if wrapper:
        parts.append(f"rho{cfg['rho']:g}")
    if registry.family(wrapper).sparse:
        grain = "" if cfg["granularity"] == "element" else f"-{cfg['granularity']}"
        if not _colon:  # "2:4" -> "2of4": a colon is not a file name on every file system, nor easy in a shell
            grain = grain.replace(":", "of")
        parts.append(f"sp{cfg['sparsity']:g}{grain}")
    if wrapper and cfg.get("sam_schedule", "none") != "none":
        parts.append(cfg["sam_schedule"].replace(":-", "-m").replace(":", "-"))  # aesam:-1 -> aesam-m1
    if wrapper and cfg.get("sam_ascent", "gradient") != "gradient":
        parts.append(cfg["sam_ascent"].replace(":", "-"))
    if wrapper and cfg.get("sam_micro_batch"):
        parts.append(f"m{cfg['sam_micro_batch']}")
    for loss in ("saf", "mesa"):
        if cfg.get(loss) is not None:
            parts.append(f"{loss}{cfg[loss]:g}")
    if cfg.get("train_subset"):
        parts.append(f"n{cfg['train_subset']}")
    if cfg["label_noise"]:
        parts.append(f"noise{cfg['label_noise']:g}")
    parts.append(f"seed{cfg['seed']}")
    settings = {
        k: v
        for k, v in run_settings(cfg).items()
        if (k not in defaults or v != defaults[k]) and v not in NAME_OMITS.get(k, ())
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return "_".join(parts) + "_" + digest


def legacy_run_names(cfg: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Names older versions gave the same run (N:M granularity with a colon), for ``--resume`` to find."""
    old = run_name(cfg, defaults, _colon=True)
    return [old] if old != run_name(cfg, defaults) else []


def differing_settings(
    saved: dict[str, Any], now: dict[str, Any], same: Callable[[Any, Any], bool] = operator.eq
) -> list[tuple[str, Any, Any]]:
    """``(flag, old, new)`` for every setting that shapes the run and differs between a saved config and this one
    (settings the saved config does not record, from older versions, are not compared). ``same``: the equality
    (``ssam compare`` reads configs back from YAML)."""
    then_settings = run_settings({**now, **saved})
    now_settings = run_settings(now)
    if now_settings.get("fisher_mode") == "auto" and "fisher_mode" in then_settings:  # auto is what the run picked
        now_settings["fisher_mode"] = then_settings["fisher_mode"]
    keys = sorted(k for k in now_settings.keys() | then_settings.keys() if k in saved and k in now)
    return [
        (k, then_settings.get(k), now_settings.get(k))
        for k in keys
        if not same(now_settings.get(k), then_settings.get(k))
    ]


def changed_flags(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag OLD -> NEW`` for every setting that shapes the run and differs (what ``--resume`` refuses)."""
    return [f"--{k} {_show(old)} -> {_show(new)}" for k, old, new in differing_settings(saved, now)]


def _show(value: Any) -> str:
    if value is None:  # a flag left unset, not Python's None
        return "(unset)"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)

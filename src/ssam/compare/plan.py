"""The grid of runs (variants x seeds x axes) and what each run folder needs: train, resume, skip.

Each run's flags go through the train command's own parser here, so that a bad flag or value is reported before
anything trains, and so that ``Run.config`` holds the values the run will really use (defaults included) for the
check of finished runs.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from ..io import read_json
from ..runfolder import RunFolder
from .console import say
from .recipe import (
    AXIS_SHORT,
    FLAG_FAMILIES,
    LABELS,
    OPTS,
    SPARSE_OPTS,
    Axis,
    Variant,
    applies,
    builtin_variant,
    flag_tokens,
)
from .settings import Settings


@dataclass
class Run:
    name: str
    opt: str  # the family: sgd | sam | ssamf | ssamd
    train_opt: str
    seed: int
    sparsity: float | None  # the sparsity it trains with (SSAM runs), else None
    folder: Path
    flags: list[str]
    config: dict = field(default_factory=dict)
    variant: str = ""
    label: str = ""  # the table row it belongs to: variant label and named axis values
    axes: dict = field(default_factory=dict)  # the named axis values of this run

    @property
    def group(self) -> tuple:
        return (self.variant, tuple(self.axes.items()))


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _name_part(flag: str, value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9.+-]", "-", value_text(value))  # "2:4" -> "2-4": a portable folder name
    if flag in AXIS_SHORT:
        return AXIS_SHORT[flag] + text
    return f"{flag}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{flag}-{text}"


def grid_folder_name(variant: str, axes: dict, seed: int) -> str:
    """A comparison's name for a run folder, ``ssamf_s0.5_seed1``, ``sam_rho0.05_noise0.4_seed1`` (not the hashed
    name ``ssam train`` gives a run by itself, ``train.identity.run_name``)."""
    return "_".join([variant, *(_name_part(f, v) for f, v in axes.items()), f"seed{seed}"])


def row_label(label: str, axes: dict) -> str:
    return " ".join([label, *(f"{AXIS_SHORT.get(f, f)}={value_text(v)}" for f, v in axes.items())])


def group_label(opt: str, sparsity: float | None, base: str = "sgd") -> str:
    """The table label of a built-in variant: ``SSAM-F (AdamW) s=0.5``."""
    return row_label(
        builtin_variant(opt, base).label if opt in LABELS else opt, {} if sparsity is None else {"sparsity": sparsity}
    )


def _combos(variant: Variant, axes: list[Axis]) -> list[dict]:
    """Each setting of the axes that apply to the variant: not to a family the flag means nothing to (SGD under a
    rho sweep runs once), nor to a variant that sets the flag itself (``ssamf_tensor: {sparsity: 0.9}``)."""
    mine = [a for a in axes if applies(a.flag, variant.family) and a.flag not in variant.flags]
    return [dict(zip([a.flag for a in mine], values)) for values in itertools.product(*(a.values for a in mine))]


def _warn_single_value_of_a_sweep(s: Settings) -> None:
    """One value of a flag that this folder swept before names no run folder (``sam_seed1``, not
    ``sam_rho0.2_seed1``): the run would land beside the sweep instead of in it, so say how to add it."""
    try:
        recorded = yaml.safe_load((s.output / "compare.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return
    swept = recorded.get("axes") if isinstance(recorded, dict) else None
    if not isinstance(swept, dict):
        return
    for a in s.axes:
        before = swept.get(a.flag)
        if a.named or not isinstance(before, list) or len(before) < 2:
            continue
        value = value_text(a.values[0])
        say(
            f"ssam compare: warning: --{a.flag} {value} is one value, so its run folders are named without it, but "
            f"{s.output} holds a {a.flag} sweep ({', '.join(map(value_text, before))}); to add {value} to that sweep "
            f"give a list, e.g. --{a.flag} {value_text(before[0])},{value} (finished runs are skipped)",
            err=True,
        )


def plan_runs(s: Settings) -> list[Run]:
    """The grid, seed-major so that a partly finished comparison already covers every variant."""
    from ..train.config import parse_args

    for a in s.axes:
        if len(a.values) > 1 and not any(_combos(v, [a]) != [{}] for v in s.variants):
            say(
                f"ssam compare: warning: the {a.flag} sweep applies to none of {', '.join(s.opts)} (it means something "
                f"to {', '.join(FLAG_FAMILIES.get(a.flag, OPTS))} only, and a variant that sets it is not swept)",
                err=True,
            )
    _warn_single_value_of_a_sweep(s)
    runs, seen = [], {}
    for seed in s.seeds:
        for v in s.variants:
            for values in _combos(v, s.axes):
                named = {f: x for f, x in values.items() if s.axis(f).named}
                name = grid_folder_name(v.name, named, seed)
                fixed = {
                    "opt": v.flags["opt"],
                    **values,
                    "seed": seed,
                    "output_dir": str(s.output / "runs"),
                    "output_name": name,
                }
                # Recipe, per-family then per-variant overrides, the variant's flags, the command line, then
                # what the grid sets: argparse keeps the last occurrence of a flag, so this order is the precedence.
                per_opt = {**s.per_opt.get(v.family, {}), **(s.per_opt.get(v.name, {}) if v.name != v.family else {})}
                own = {k: x for k, x in v.flags.items() if k != "opt"}
                flags = (
                    flag_tokens(s.train_values)
                    + flag_tokens(per_opt)
                    + flag_tokens(own)
                    + s.passthrough
                    + flag_tokens(fixed)
                )
                config = vars(parse_args(flags))
                sparsity = float(config["sparsity"]) if v.family in SPARSE_OPTS and "sparsity" in config else None
                run = Run(
                    name,
                    v.family,
                    v.flags["opt"],
                    seed,
                    sparsity,
                    s.output / "runs" / name,
                    flags,
                    config,
                    v.name,
                    row_label(v.label, named),
                    named,
                )
                key = _identity(run)
                if key in seen:
                    raise UsageError(
                        f"runs {seen[key]} and {name} would train the same settings; give the variants "
                        f"different flags (the command line overrides a variant's own flags)"
                    )
                seen[key] = name
                runs.append(run)
    return runs


def _identity(run: Run) -> str:
    return repr(sorted((k, repr(v)) for k, v in run.config.items() if k not in ("output_name", "sparsity_given")))


# ----------------------------------------------------------------------------------------------- staleness


def read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    return RunFolder(folder).finished()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a = list(a) if isinstance(a, (list, tuple)) else [a]
        b = list(b) if isinstance(b, (list, tuple)) else [b]
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        fa, fb = float(a), float(b)
        return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def stale_keys(run: Run) -> list[str]:
    """``key: had -> wanted`` for each setting of the run folder's config that shapes a run and disagrees with this
    comparison's: the rule of ``ssam train --resume`` (``train.identity``), plus the epoch count, which a resume may
    extend but a comparison fixes."""
    from ..train.identity import differing_settings

    config = RunFolder(run.folder).config()
    if config is None:
        return []
    bad = [f"{k}: {old!r} -> {new!r}" for k, old, new in differing_settings(config, run.config, same=_same)]
    if "epochs" in config and not _same(config["epochs"], run.config.get("epochs")):
        bad.append(f"epochs: {config['epochs']!r} -> {run.config.get('epochs')!r}")
    return bad


def action_for(run: Run, status: dict, overwrite: bool) -> str:
    """``done``, ``diverged`` (skipped: a deterministic rerun would diverge again), ``resume``, ``restart``
    (a folder with logs but no checkpoint: the run died in its first epoch) or ``new``."""
    if overwrite:
        return "new"
    bad = stale_keys(run)
    if bad:
        raise UsageError(
            f"{run.folder} holds a run of another comparison ({'; '.join(bad)}); "
            f"use another --output, or --overwrite to retrain it"
        )
    if is_finished(run.folder):
        return "done"
    if status.get(run.name) == "diverged":
        return "diverged"
    if RunFolder(run.folder).last.is_file():
        return "resume"
    if RunFolder(run.folder).holds_run():
        return "restart"
    return "new"


def read_status(output: Path) -> dict:
    """``status.json``: the runs that diverged (a rerun skips them)."""
    status = read_json_or_none(output / "status.json")
    return status if isinstance(status, dict) else {}


def record_grid(s: Settings, runs: list[Run]) -> None:
    """``compare.yaml``: the resolved grid, for the record (each run's exact train command)."""
    from ..io import write_atomic

    write_atomic(
        s.output / "compare.yaml",
        yaml.safe_dump(
            {
                "command": s.command,
                "variants": {v.name: {"label": v.label, **v.flags} for v in s.variants},
                "seeds": s.seeds,
                "axes": {a.flag: list(a.values) for a in s.axes},
                "base": s.base,
                "train": s.train_values,
                "per_opt": s.per_opt,
                "passthrough": s.passthrough,
                "runs": {r.name: ["ssam", "train", *r.flags] for r in runs},
            },
            sort_keys=False,
        ).encode(),
    )

"""The words of a comparison and their validation: optimizer families, variants, axes, seeds, the recipe file.

A *variant* is one optimizer setting of the grid: a name, a label for the tables, and its own train flags (``opt``
first). The built-in variants ``sgd``, ``sam``, ``ssamf`` and ``ssamd`` are what ``--opts`` has always named; a
recipe's ``variants:`` section declares more (``ssamf_tensor: {opt: ssamf, granularity: tensor, sparsity: 0.9}``).
An *axis* is a train flag swept over a list of values (``--sparsity``, ``--rho``, ``--label_noise``, ``--sweep``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError, did_you_mean
from ..optim import registry

PAPER_SEEDS = (1234, 4321, 6789, 9876)
# A single number up to this is read as a count of seeds; from here on it reads like a seed, so it is refused.
MAX_SEED_COUNT_BARE = 9
# The families, from the optimizer registry: "sgd" is the base optimizer alone (whatever --base is).
OPTS = (registry.PLAIN.name, *registry.WRAPPERS)
SAM_OPTS = tuple(registry.WRAPPERS)
SPARSE_OPTS = tuple(n for n, f in registry.WRAPPERS.items() if f.sparse)
BASES = tuple(registry.BASES)
LABELS = {registry.PLAIN.name: registry.PLAIN.label, **{n: f.label for n, f in registry.WRAPPERS.items()}}

# The families a train flag means something to (the registry's rule). A swept flag runs only for these (SGD once
# per seed under a rho sweep), and the tables print "—" for the others. Flags not listed apply to every family.
FLAG_FAMILIES: dict[str, tuple[str, ...]] = {
    flag: tuple(f for f in OPTS if registry.applies(flag, f))
    for flag in sorted(registry.owned_settings())
    if flag not in (s for b in registry.BASES.values() for s in b.settings)
}
# How an axis value reads in a run folder name (``ssamf_s0.5_seed1``) and in a table label (``SSAM-F s=0.5``).
AXIS_SHORT = {"sparsity": "s", "rho": "rho", "label_noise": "noise"}

COMPARE_KEYS = (
    "opts",
    "seeds",
    "num_seeds",
    "sparsity",
    "rho",
    "label_noise",
    "sweep",
    "base",
    "jobs",
    "no_hessian",
    "hessian_samples",
    "output",
)
RECIPE_KEYS = ("description", "compare", "train", "per_opt", "variants")
# Train flags that the comparison itself sets per run; accepting them from the user would silently
# collapse the grid (every run with the same seed) or scatter the run folders.
RESERVED = {
    "opt": "use --opts (sgd, sam, ssamf, ssamd), --base, or a recipe's variants:",
    "seed": "use --seeds (a list such as 1,2) or --num_seeds (a count)",
    "output_dir": "use --output",
    "output_name": "run folders are named <variant>[_<axis><value>...]_seed<seed> under OUTPUT/runs",
    "resume": "an interrupted comparison resumes when the same command is run again",
    "config": "a recipe's train: section holds the train flags",
}
VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def applies(flag: str, family: str) -> bool:
    return family in FLAG_FAMILIES.get(flag, OPTS)


# ------------------------------------------------------------------------------------------------- seeds


def seed_count(n: Any) -> list[int]:
    """The first ``n`` fixed seeds: the paper's four, then 10001, 10002, ..."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"num_seeds={n!r}; allowed: an integer >= 1")
    return list(PAPER_SEEDS[:n]) + [10000 + k for k in range(1, n - len(PAPER_SEEDS) + 1)]


def seed_list(spec: Any) -> list[int]:
    """``3`` -> the first 3 fixed seeds; ``"1,2"`` / ``[1, 2]`` -> exactly those seeds.

    A bare number is a count only up to 9: ``--seeds 42`` reads as "seed 42" as easily as "42 seeds", so it is
    refused with the two unambiguous spellings (``--num_seeds 42``, ``--seeds 42,``).
    """
    if isinstance(spec, (list, tuple)):
        items = list(spec)
        if not items or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in items):
            raise UsageError(f"seeds={spec!r}; allowed: a non-empty list of integers >= 0")
        return unique(items, "seeds")
    if isinstance(spec, str) and "," in spec:
        parts = [t.strip() for t in spec.split(",") if t.strip()]
        if not parts or not all(re.fullmatch(r"\d+", t) for t in parts):
            raise UsageError(f"--seeds {spec!r}; allowed: a comma list such as 1,2 (one seed: '7,')")
        return unique([int(t) for t in parts], "seeds")
    if isinstance(spec, str) and re.fullmatch(r"\s*\d+\s*", spec):
        spec = int(spec)
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise UsageError(f"seeds={spec!r}; allowed: a list such as 1,2 or a count from 1 to {MAX_SEED_COUNT_BARE}")
    if spec > MAX_SEED_COUNT_BARE:
        raise UsageError(
            f"--seeds {spec} is ambiguous: use --num_seeds {spec} for {spec} seeds, or --seeds {spec}, "
            f"for the one seed {spec} (in a recipe: num_seeds: {spec} or seeds: [{spec}])"
        )
    return seed_count(spec)


def unique(items: list, what: str) -> list:
    seen: set = set()
    dup = [x for x in items if x in seen or seen.add(x)]
    if dup:
        raise UsageError(f"{what} lists {dup[0]!r} twice")
    return items


# ------------------------------------------------------------------------------------------ values and keys


def as_list(spec: Any) -> list:
    """A comma string or a YAML list (a single scalar is a list of one)."""
    if isinstance(spec, str):
        return [t.strip() for t in spec.split(",") if t.strip()]
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def number_list(flag: str, spec: Any, lo: float, hi: float | None, allowed: str) -> list[float]:
    """Numbers in ``[lo, hi)`` (``hi`` None: no upper bound), each once."""
    out = []
    for s in as_list(spec):
        try:
            v = float(s)
        except (TypeError, ValueError):
            v = float("nan")
        if isinstance(s, bool) or not (lo <= v and (hi is None or v < hi) and v != float("inf")):
            raise UsageError(f"{flag} {s!r}; allowed: {allowed}")
        out.append(v)
    if not out:
        raise UsageError(f"{flag}={spec!r}; allowed: one or more of {allowed}")
    return unique(out, flag)


def scalar(text: Any) -> Any:
    """A value of ``--sweep flag=a,b``: true/false, an int, a float, or the string itself."""
    if not isinstance(text, str):
        return text
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def train_flag_names() -> set[str]:
    from ..train.config import build_parser as train_parser

    return {a.dest for a in train_parser()._actions if a.dest != "help"}


def check_key(key: Any, where: str, allow: tuple[str, ...] = ()) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise UsageError(f"{where}: key {key!r} is not a train flag name (flag names without the dashes)")
    if key in allow:
        return key
    if key in RESERVED:
        raise UsageError(f"{where}: {key!r} is set by the comparison itself; {RESERVED[key]}")
    if key == "sparsity":
        raise UsageError(f"{where}: put sparsity under compare: (swept over the SSAM runs) or in a variant")
    flags = train_flag_names()
    if key not in flags:
        raise UsageError(
            f"{where}: {key!r} is not a flag of ssam train{did_you_mean(key, flags)} (see ssam train --help)"
        )
    return key


def flag_tokens(values: dict) -> list[str]:
    """Train flags from a mapping: True -> ``--key``, False/None -> nothing, lists -> ``--key a b``."""
    tokens: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        if value is True:
            tokens.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            tokens += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            raise UsageError(f"train flag {key!r} has a mapping as value; allowed: a number, string, bool or list")
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


# ---------------------------------------------------------------------------------------- variants, axes


@dataclass(frozen=True)
class Variant:
    name: str  # run folder prefix and the key of per_opt:
    label: str  # how the tables and plots call it
    family: str  # sgd | sam | ssamf | ssamd: decides which flags and axes apply
    flags: dict  # its own train flags; flags["opt"] is the full train --opt


@dataclass(frozen=True)
class Axis:
    flag: str
    values: tuple

    @property
    def named(self) -> bool:
        # One value is a setting, not a sweep: it stays out of folder names, so that `--rho 0.1` finds the folders
        # it found when it was a plain train flag. Sparsity is named even alone, as run folders always were.
        return len(self.values) > 1 or self.flag == "sparsity"


def family_of(opt: str) -> str:
    from ..optim.factory import parse_opt

    try:
        wrapper, _ = parse_opt(opt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return wrapper or "sgd"


def train_opt(family_or_opt: str, base: str) -> str:
    """A family name takes ``base`` (``ssamf`` -> ``ssamf-adamw``; ``sgd`` -> ``adamw``); a full name stays."""
    if family_or_opt == "sgd":
        return base
    return f"{family_or_opt}-{base}" if family_or_opt in SAM_OPTS else family_or_opt


def builtin_variant(name: str, base: str) -> Variant:
    label = LABELS[name] if base == "sgd" else ("AdamW" if name == "sgd" else f"{LABELS[name]} (AdamW)")
    return Variant(name, label, name, {"opt": train_opt(name, base)})


def declared_variant(name: Any, spec: Any, base: str, where: str) -> Variant:
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        raise UsageError(f"{where}: variant name {name!r}; allowed: a letter, then letters, digits, _ . -")
    if not isinstance(spec, dict) or not isinstance(spec.get("opt"), str):
        raise UsageError(
            f"{where}: {name}: must be a mapping of train flags with opt: (sgd, sam, ssamf, ssamd, "
            f"or a full --opt such as ssamf-adamw)"
        )
    flags = dict(spec)
    # A declared sgd/sam/ssamf/ssamd keeps the built-in label (SGD, SAM-F ...); any other name labels itself.
    label = flags.pop("label", builtin_variant(name, base).label if name in OPTS else name)
    for key in flags:
        check_key(key, f"{where}: {name}:", allow=("opt", "sparsity"))
    flags["opt"] = train_opt(flags["opt"].lower(), base)
    return Variant(name, str(label), family_of(flags["opt"]), flags)


# --------------------------------------------------------------------------------------------------- file


def load_recipe(path: str | os.PathLike) -> dict:
    """The recipe as ``{"compare", "train", "per_opt", "variants"}`` mappings, validated (variants: raw specs)."""
    path = Path(path)
    where = f"--config {str(path)!r}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{where} is not valid YAML: {first}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping with sections {', '.join(RECIPE_KEYS)}")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise UsageError(
            f"{where}: unknown section(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(RECIPE_KEYS)}"
        )
    out: dict[str, Any] = {}
    for section in ("compare", "train", "per_opt", "variants"):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise UsageError(f"{where}: section {section}: must be a mapping")
        out[section] = value
    unknown = [k for k in out["compare"] if k not in COMPARE_KEYS]
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in compare:; allowed: {', '.join(COMPARE_KEYS)}"
        )
    for key in out["train"]:
        check_key(key, f"{where} train:")
    for name, spec in out["variants"].items():
        declared_variant(name, spec, "sgd", f"{where} variants:")  # validation only; the base is known later
    for opt, overrides in out["per_opt"].items():
        if opt not in OPTS and opt not in out["variants"]:
            raise UsageError(
                f"{where}: per_opt: unknown optimizer {opt!r}; allowed: {', '.join([*OPTS, *out['variants']])}"
            )
        if not isinstance(overrides, dict):
            raise UsageError(f"{where}: per_opt: {opt}: must be a mapping of train flags")
        for key in overrides:
            check_key(key, f"{where} per_opt: {opt}:")
    return out

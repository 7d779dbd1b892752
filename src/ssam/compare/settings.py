"""``ssam compare``'s own flags, merged with a recipe into one ``Settings``: what to train and where."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, UsageError, did_you_mean
from .recipe import (
    BASES,
    OPTS,
    RESERVED,
    Axis,
    Variant,
    as_list,
    builtin_variant,
    check_key,
    declared_variant,
    load_recipe,
    number_list,
    scalar,
    seed_count,
    seed_list,
    unique,
)

# The axes with a flag of their own, in the order they nest in the grid and appear in run names:
# flag -> (lower bound, upper bound (exclusive; None: none), the allowed values in words, --help).
AXIS_FLAGS = {
    "sparsity": (
        0.0,
        1.0,
        "numbers in [0, 1) (the fraction NOT perturbed)",
        "comma list of SSAM sparsities, e.g. 0.5,0.9 (SSAM-F/SSAM-D variants only)",
    ),
    "rho": (
        0.0,
        None,
        "finite numbers >= 0",
        "comma list of SAM radii, e.g. 0.02,0.05,0.1,0.2: each SAM-family variant runs at each, SGD once; rho.png",
    ),
    "label_noise": (
        0.0,
        1.0,
        "numbers in [0, 1)",
        "comma list of fractions of training labels replaced by another class, e.g. 0,0.4 (every variant)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: otherwise the train flag --seed would be taken as an abbreviation of --seeds.
    p = ArgumentParser(
        prog="ssam compare",
        allow_abbrev=False,
        description="Train optimizer variants x seeds x swept train flags and compare them. "
        "Flags not listed here are passed to every `ssam train` run.",
    )
    p.add_argument(
        "--opts",
        help="comma list of variants: sgd, sam, ssamf, ssamd, and those a recipe declares "
        "(default: the recipe's variants, else all four)",
    )
    p.add_argument(
        "--seeds",
        help="explicit seeds, a comma list such as 1,2 (one seed: '42,'); a bare number "
        "from 1 to 9 is a count (as --num_seeds), a larger one is refused as ambiguous",
    )
    p.add_argument(
        "--num_seeds", type=int, help="N seeds: the paper's 1234, 4321, 6789, 9876, then 10001, 10002, ... (default 3)"
    )
    for flag, (*_, help_text) in AXIS_FLAGS.items():
        p.add_argument(f"--{flag}", help=help_text + "; a single value sets the flag without sweeping it")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="FLAG=V1,V2",
        help="sweep any other train flag, e.g. --sweep granularity=element,tensor (repeatable)",
    )
    p.add_argument("--base", help="base optimizer of the sgd/sam/ssamf/ssamd variants: sgd (default) or adamw")
    p.add_argument("--output", help="comparison folder (runs, logs, results, plots)")
    p.add_argument("--jobs", type=int, help="runs trained at once (default: 1, or one per GPU with several GPUs)")
    p.add_argument(
        "--no_hessian", action="store_true", default=None, help="skip lambda_max and trace of the final models"
    )
    p.add_argument(
        "--hessian_samples", type=int, help="fixed un-augmented training examples for the Hessian (default 512)"
    )
    p.add_argument(
        "--config", help="recipe YAML with compare:, train:, per_opt: and variants: sections; flags override it"
    )
    p.add_argument("--overwrite", action="store_true", help="retrain every run from scratch")
    p.add_argument("--report_only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--dry_run", action="store_true", help="print the train commands and exit")
    return p


@dataclass
class Settings:
    variants: list[Variant]
    seeds: list[int]
    axes: list[Axis]
    base: str
    output: Path
    jobs: int | None
    hessian: bool
    hessian_samples: int
    train_values: dict
    per_opt: dict
    passthrough: list[str]
    overwrite: bool
    report_only: bool
    dry_run: bool
    command: str

    @property
    def opts(self) -> list[str]:
        return [v.name for v in self.variants]

    def axis(self, flag: str) -> Axis | None:
        return next((a for a in self.axes if a.flag == flag), None)

    @property
    def sparsities(self) -> list[float] | None:
        a = self.axis("sparsity")
        return list(a.values) if a else None


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name}={value!r}; allowed: an integer >= 1")
    return value


def _seeds(args: argparse.Namespace, conf: dict) -> list[int]:
    # The command line beats the recipe; within one of them, a list and a count together are a contradiction.
    for seeds, count, where in (
        (args.seeds, args.num_seeds, "--seeds and --num_seeds"),
        (conf.get("seeds"), conf.get("num_seeds"), "seeds: and num_seeds: in the recipe"),
    ):
        if seeds is not None and count is not None:
            raise UsageError(f"{where} both given; give one (a list of seeds or a count)")
        if seeds is not None:
            return seed_list(seeds)
        if count is not None:
            return seed_count(count)
    return seed_count(3)


def _variants(spec: Any, declared: dict, base: str) -> list[Variant]:
    builtins = {n: builtin_variant(n, base) for n in OPTS}
    found = {**builtins, **{n: declared_variant(n, v, base, "variants:") for n, v in declared.items()}}
    names = as_list(spec) if spec is not None else (list(declared) or list(OPTS))
    names = [str(n).strip() for n in names if str(n).strip()]
    bad = [n for n in names if n not in found]
    if bad or not names:
        hint = did_you_mean(bad[0], found) if bad else ""
        raise UsageError(
            f"opts={spec!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}{hint}; allowed: {', '.join(found)}"
        )
    return [found[n] for n in unique(names, "opts")]


def _axes(args: argparse.Namespace, conf: dict) -> list[Axis]:
    specs: dict[str, Any] = {}
    sweep = conf.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise UsageError(f"compare: sweep: must be a mapping of train flags to lists, got {sweep!r}")
    specs.update({flag: conf[flag] for flag in AXIS_FLAGS if conf.get(flag) is not None})
    specs.update(sweep)
    for item in args.sweep or []:
        flag, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise UsageError(f"--sweep {item!r}; allowed: FLAG=V1,V2 such as granularity=element,tensor")
        specs[flag.strip()] = [scalar(v) for v in as_list(values)]
    specs.update({flag: getattr(args, flag) for flag in AXIS_FLAGS if getattr(args, flag) is not None})
    axes = []
    for flag in [*[f for f in AXIS_FLAGS if f in specs], *[f for f in specs if f not in AXIS_FLAGS]]:
        if flag in AXIS_FLAGS:
            lo, hi, allowed, _ = AXIS_FLAGS[flag]
            values: list = number_list(flag, specs[flag], lo, hi, allowed)
        else:
            check_key(flag, "sweep")
            values = unique(as_list(specs[flag]), flag)
            if not values:
                raise UsageError(f"sweep {flag}: no values; allowed: one or more")
        axes.append(Axis(flag, tuple(values)))
    return axes


def resolve(argv: Sequence[str]) -> Settings:
    args, passthrough = build_parser().parse_known_args(list(argv))
    recipe = load_recipe(args.config) if args.config else {"compare": {}, "train": {}, "per_opt": {}, "variants": {}}
    conf = recipe["compare"]

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else conf.get(name, default)

    for tok in passthrough:
        key = tok[2:].split("=", 1)[0] if tok.startswith("--") else None
        if key in RESERVED:
            raise UsageError(f"--{key} is set by the comparison itself; {RESERVED[key]}")
    if passthrough and not passthrough[0].startswith("-"):
        raise UsageError(f"unexpected argument {passthrough[0]!r}; ssam compare takes only --flags")

    base = str(pick("base", "sgd")).lower()
    if base not in BASES:
        raise UsageError(f"--base {base!r}; allowed: {', '.join(BASES)}")
    variants = _variants(pick("opts", None), recipe["variants"], base)
    seeds = _seeds(args, conf)
    axes = _axes(args, conf)
    output = pick("output", None)
    if not output:
        raise UsageError("--output DIR is required (the folder for runs, results and plots)")
    jobs = pick("jobs", None)
    if jobs is not None:
        jobs = _positive_int("--jobs", jobs)
    hessian_samples = _positive_int("--hessian_samples", pick("hessian_samples", 512))
    no_hessian = pick("no_hessian", False)
    if not isinstance(no_hessian, bool):
        raise UsageError(f"no_hessian={no_hessian!r}; allowed: true or false")
    return Settings(
        variants=variants,
        seeds=seeds,
        axes=axes,
        base=base,
        output=Path(output),
        jobs=jobs,
        hessian=not no_hessian,
        hessian_samples=hessian_samples,
        train_values=dict(recipe["train"]),
        per_opt={k: dict(v) for k, v in recipe["per_opt"].items()},
        passthrough=list(passthrough),
        overwrite=args.overwrite,
        report_only=args.report_only,
        dry_run=args.dry_run,
        command="ssam compare " + shlex.join(list(argv)),
    )

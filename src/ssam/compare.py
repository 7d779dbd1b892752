"""``ssam compare``: train SGD / SAM / SSAM-F / SSAM-D over seeds (and sparsities), then tabulate and plot.

Every run is an ordinary ``ssam train`` run folder under ``OUTPUT/runs/<opt>[_s<sparsity>]_seed<seed>``, trained
in a child process so that a crash, a divergence or a CUDA error in one run cannot take the comparison down,
and so that rerunning the same command resumes an interrupted comparison: finished runs are skipped, runs with
a ``last.pt`` but no finished ``summary.json`` are resumed.

Outputs in OUTPUT: ``results.md`` / ``results.csv`` (one row per optimizer and sparsity, mean ± sample std over
seeds), ``runs.csv`` (one row per run), ``curves.png``, ``sparsity.png`` (sparsity sweeps), ``masks.png`` (SSAM
runs), ``compare.yaml`` (the resolved grid, for the record), ``logs/<run>.log`` (each child's output).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import ArgumentParser, UsageError
from .io import write_csv, write_json as _write_json

__all__ = ["main", "build_parser", "plan_runs", "load_run", "aggregate", "mean_std", "seed_list"]

PAPER_SEEDS = (1234, 4321, 6789, 9876)
OPTS = ("sgd", "sam", "ssamf", "ssamd")
SPARSE_OPTS = ("ssamf", "ssamd")
BASES = ("sgd", "adamw")
LABELS = {"sgd": "SGD", "sam": "SAM", "ssamf": "SSAM-F", "ssamd": "SSAM-D"}
COLORS = {"sgd": "#555555", "sam": "#1f77b4", "ssamf": "#d62728", "ssamd": "#2ca02c"}
CMAPS = {"ssamf": "Reds", "ssamd": "Greens"}

COMPARE_KEYS = ("opts", "seeds", "sparsity", "base", "jobs", "no_hessian", "hessian_samples", "output")
RECIPE_KEYS = ("description", "compare", "train", "per_opt")
# Train flags that the comparison itself sets per run; accepting them from the user would silently
# collapse the grid (every run with the same seed) or scatter the run folders.
RESERVED = {
    "opt": "use --opts (sgd, sam, ssamf, ssamd) and --base",
    "seed": "use --seeds (a count, or a comma list such as 1,2)",
    "output_dir": "use --output",
    "output_name": "run folders are named <opt>[_s<sparsity>]_seed<seed> under OUTPUT/runs",
    "resume": "an interrupted comparison resumes when the same command is run again",
    "config": "a recipe's train: section holds the train flags",
}
# Config entries that decide a run's result: a finished run whose config.yaml disagrees on one of these
# was trained for another comparison and must not be counted as this one's.
CHECKED_KEYS = ("dataset", "model", "opt", "seed", "sparsity", "lr", "weight_decay", "momentum", "rho", "epochs",
                "batch_size", "num_samples", "update_freq", "drop_rate", "drop_strategy", "growth_strategy",
                "limit_train_batches")

HESSIAN_BATCH = 128
LANCZOS_MAX_ITER = 40
LANCZOS_TOL = 1e-3
TRACE_MAX_ITER = 64
TRACE_TOL = 0.02
SMALL_MODEL = 1_000_000

STD_NOTE = "sample standard deviation over seeds (n-1 in the denominator)"


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: otherwise the train flag --seed would be taken as an abbreviation of --seeds.
    p = ArgumentParser(prog="ssam compare", allow_abbrev=False,
                description="Train several optimizers over seeds (and SSAM sparsities) and compare them. "
                            "Flags not listed here are passed to every `ssam train` run.")
    p.add_argument("--opts", help="comma list of sgd, sam, ssamf, ssamd (default: all four)")
    p.add_argument("--seeds", help="a count N (the paper's seeds 1234, 4321, 6789, 9876, then 10001, 10002, ...) "
                                   "or a comma list such as 1,2 (one explicit seed: '7,'); default 3")
    p.add_argument("--sparsity", help="comma list of SSAM sparsities, e.g. 0.5,0.9 (default: train's default)")
    p.add_argument("--base", help="base optimizer: sgd (default) or adamw")
    p.add_argument("--output", help="comparison folder (runs, logs, results, plots)")
    p.add_argument("--jobs", type=int, help="runs trained at once (default: 1, or one per GPU with several GPUs)")
    p.add_argument("--no_hessian", action="store_true", default=None,
                   help="skip lambda_max and trace of the final models")
    p.add_argument("--hessian_samples", type=int,
                   help="fixed un-augmented training examples for the Hessian (default 512)")
    p.add_argument("--config", help="recipe YAML with compare:, train: and per_opt: sections; flags override it")
    p.add_argument("--overwrite", action="store_true", help="retrain every run from scratch")
    p.add_argument("--report_only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--dry_run", action="store_true", help="print the train commands and exit")
    return p


# ------------------------------------------------------------------------------------------------ settings

def seed_list(spec: Any) -> list[int]:
    """``3`` -> the first 3 fixed seeds; ``"1,2"`` / ``[1, 2]`` -> exactly those seeds."""
    if isinstance(spec, bool):
        raise UsageError(f"seeds={spec!r}; allowed: a count such as 3 or a list such as 1,2")
    if isinstance(spec, int):
        count = spec
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
        if not items or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in items):
            raise UsageError(f"seeds={spec!r}; allowed: a non-empty list of integers >= 0")
        return _unique(items, "seeds")
    elif isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            parts = [t.strip() for t in text.split(",") if t.strip()]
            if not parts or not all(re.fullmatch(r"\d+", t) for t in parts):
                raise UsageError(f"--seeds {spec!r}; allowed: a count such as 3 or a comma list such as 1,2")
            return _unique([int(t) for t in parts], "seeds")
        if not re.fullmatch(r"\d+", text):
            raise UsageError(f"--seeds {spec!r}; allowed: a count such as 3 or a comma list such as 1,2")
        count = int(text)
    else:
        raise UsageError(f"seeds={spec!r}; allowed: a count such as 3 or a list such as 1,2")
    if count < 1:
        raise UsageError(f"seeds={spec!r}; the count must be at least 1")
    extra = [10000 + k for k in range(1, count - len(PAPER_SEEDS) + 1)]
    return list(PAPER_SEEDS[:count]) + extra


def _unique(items: list, what: str) -> list:
    seen = set()
    dup = [x for x in items if x in seen or seen.add(x)]
    if dup:
        raise UsageError(f"{what} lists {dup[0]!r} twice")
    return items


def _opt_list(spec: Any) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else spec
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"opts={spec!r}; allowed: a list of {', '.join(OPTS)}")
    names = [str(s).strip().lower() for s in items if str(s).strip()]
    bad = [n for n in names if n not in OPTS]
    if bad or not names:
        raise UsageError(f"opts={spec!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                         f"allowed: {', '.join(OPTS)}")
    return _unique(names, "opts")


def _sparsity_list(spec: Any) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else (spec if isinstance(spec, (list, tuple)) else [spec])
    out = []
    for s in items:
        if isinstance(s, str) and not s.strip():
            continue
        try:
            v = float(s)
        except (TypeError, ValueError):
            v = float("nan")
        if isinstance(s, bool) or not (0 <= v < 1):
            raise UsageError(f"sparsity {s!r}; allowed: numbers in [0, 1) (the fraction NOT perturbed)")
        out.append(v)
    if not out:
        raise UsageError(f"sparsity={spec!r}; allowed: one or more numbers in [0, 1)")
    return _unique(out, "sparsity")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name}={value!r}; allowed: an integer >= 1")
    return value


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise UsageError(f"{where}: key {key!r} is not a train flag name (flag names without the dashes)")
    if key in RESERVED:
        raise UsageError(f"{where}: {key!r} is set by the comparison itself; {RESERVED[key]}")
    if key == "sparsity":
        raise UsageError(f"{where}: put sparsity under compare: (it is swept over the SSAM runs only)")
    flags = _train_flag_names()
    if key not in flags:
        raise UsageError(f"{where}: {key!r} is not a flag of ssam train (see ssam train --help)")
    return key


def _train_flag_names() -> set[str]:
    from .train.config import build_parser as train_parser

    return {a.dest for a in train_parser()._actions if a.dest != "help"}


def load_recipe(path: str | os.PathLike) -> dict:
    """The recipe as ``{"compare": {...}, "train": {...}, "per_opt": {opt: {...}}}``, validated."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--config {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {str(path)!r} must be a mapping with sections {', '.join(RECIPE_KEYS)}")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise UsageError(f"--config {str(path)!r}: unknown section(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(RECIPE_KEYS)}")
    out: dict[str, Any] = {"compare": {}, "train": {}, "per_opt": {}}
    for section in ("compare", "train", "per_opt"):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise UsageError(f"--config {str(path)!r}: section {section}: must be a mapping")
        out[section] = value
    unknown = [k for k in out["compare"] if k not in COMPARE_KEYS]
    if unknown:
        raise UsageError(f"--config {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))} in compare:; "
                         f"allowed: {', '.join(COMPARE_KEYS)}")
    for key in out["train"]:
        _check_key(key, f"--config {str(path)!r} train:")
    for opt, overrides in out["per_opt"].items():
        if opt not in OPTS:
            raise UsageError(f"--config {str(path)!r}: per_opt: unknown optimizer {opt!r}; allowed: {', '.join(OPTS)}")
        if not isinstance(overrides, dict):
            raise UsageError(f"--config {str(path)!r}: per_opt: {opt}: must be a mapping of train flags")
        for key in overrides:
            _check_key(key, f"--config {str(path)!r} per_opt: {opt}:")
    return out


def _flag_tokens(values: dict) -> list[str]:
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


@dataclass
class Settings:
    opts: list[str]
    seeds: list[int]
    sparsities: list[float] | None
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


def resolve(argv: Sequence[str]) -> Settings:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(list(argv))
    recipe = load_recipe(args.config) if args.config else {"compare": {}, "train": {}, "per_opt": {}}
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

    opts = _opt_list(pick("opts", list(OPTS)))
    seeds = seed_list(pick("seeds", 3))
    sp = pick("sparsity", None)
    sparsities = None if sp is None else _sparsity_list(sp)
    base = str(pick("base", "sgd")).lower()
    if base not in BASES:
        raise UsageError(f"--base {base!r}; allowed: {', '.join(BASES)}")
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
    return Settings(opts=opts, seeds=seeds, sparsities=sparsities, base=base, output=Path(output), jobs=jobs,
                    hessian=not no_hessian, hessian_samples=hessian_samples, train_values=dict(recipe["train"]),
                    per_opt={k: dict(v) for k, v in recipe["per_opt"].items()}, passthrough=list(passthrough),
                    overwrite=args.overwrite, report_only=args.report_only, dry_run=args.dry_run,
                    command="ssam compare " + shlex.join(list(argv)))


# ---------------------------------------------------------------------------------------------------- grid

@dataclass
class Run:
    name: str
    opt: str
    train_opt: str
    seed: int
    sparsity: float | None
    folder: Path
    flags: list[str]
    config: dict = field(default_factory=dict)


def train_opt_name(opt: str, base: str) -> str:
    return base if opt == "sgd" else f"{opt}-{base}"


def run_name(opt: str, sparsity: float | None, seed: int) -> str:
    return f"{opt}{'' if sparsity is None else f'_s{sparsity:g}'}_seed{seed}"


def group_label(opt: str, sparsity: float | None, base: str = "sgd") -> str:
    if base == "adamw":
        label = "AdamW" if opt == "sgd" else f"{LABELS[opt]} (AdamW)"
    else:
        label = LABELS[opt]
    return label if sparsity is None else f"{label} s={sparsity:g}"


def plan_runs(s: Settings) -> list[Run]:
    """The grid, seed-major so that a partly finished comparison already covers every optimizer.

    Each run's flags go through the train command's own parser here, so that a bad flag or value is reported
    before anything trains, and so that ``Run.config`` holds the values the run will really use (defaults
    included) for the check of finished runs.
    """
    from .train.config import parse_args

    runs = []
    for seed in s.seeds:
        for opt in s.opts:
            sps = s.sparsities if (opt in SPARSE_OPTS and s.sparsities) else [None]
            for sp in sps:
                name = run_name(opt, sp, seed)
                fixed = {"opt": train_opt_name(opt, s.base), "seed": seed}
                if sp is not None:
                    fixed["sparsity"] = sp
                fixed["output_dir"] = str(s.output / "runs")
                fixed["output_name"] = name
                # Recipe first, then per-optimizer overrides, then the command line: argparse keeps the
                # last occurrence of a flag, so this order is the precedence.
                flags = (_flag_tokens(s.train_values) + _flag_tokens(s.per_opt.get(opt, {})) + s.passthrough
                         + _flag_tokens(fixed))
                config = vars(parse_args(flags))
                runs.append(Run(name, opt, fixed["opt"], seed, sp, s.output / "runs" / name, flags, config))
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    summary = _read_json(folder / "summary.json")
    return isinstance(summary, dict) and summary.get("finished") is True


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
    """``key: had -> wanted`` for each result-deciding config entry of the run folder that disagrees."""
    try:
        config = yaml.safe_load((run.folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(config, dict):
        return []
    return [f"{k}: {config[k]!r} -> {run.config[k]!r}" for k in CHECKED_KEYS
            if k in config and k in run.config and not _same(config[k], run.config[k])]


def action_for(run: Run, status: dict, overwrite: bool) -> str:
    """``done``, ``diverged`` (skipped: a deterministic rerun would diverge again), ``resume``, ``restart``
    (a folder with logs but no checkpoint: the run died in its first epoch) or ``new``."""
    if overwrite:
        return "new"
    bad = stale_keys(run)
    if bad:
        raise UsageError(f"{run.folder} holds a run of another comparison ({'; '.join(bad)}); "
                         f"use another --output, or --overwrite to retrain it")
    if is_finished(run.folder):
        return "done"
    if status.get(run.name) == "diverged":
        return "diverged"
    if (run.folder / "last.pt").is_file():
        return "resume"
    if any((run.folder / f).exists() for f in ("summary.json", "metrics.jsonl")):
        return "restart"
    return "new"


# ----------------------------------------------------------------------------------------------- execution

def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_ids(device: str) -> list[str]:
    if device == "cpu":
        return []
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible[:count] if visible else [str(i) for i in range(count)]) if count > 1 else []


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Progress bars rewrite their line with carriage returns; only the last state of each line is useful.
    rows = [r.split("\r")[-1] for r in text.splitlines() if r.strip()]
    return "\n".join("    " + r for r in rows[-lines:])


def _result_text(folder: Path) -> str:
    s = _read_json(folder / "summary.json") or {}

    def num(key: str, fmt: str) -> str:
        v = s.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "?"

    return (f"best {num('best_acc1', '.2f')}  final {num('final_acc1', '.2f')}  "
            f"loss {num('final_train_loss', '.4f')}  {num('time_per_epoch', '.3g')} s/epoch")


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def execute(todo: list[tuple[Run, str]], jobs: int, gpus: list[str], logs: Path, status: dict,
            status_path: Path, overwrite: bool) -> dict[str, int]:
    """Train ``todo`` with at most ``jobs`` children at once; returns each run's exit code."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, _cpu_count() // max(1, min(jobs, len(todo))))
    pending = list(enumerate(todo, 1))
    active: dict[int, tuple[subprocess.Popen, Run, int, float, Any]] = {}
    free_slots = list(range(jobs))
    codes: dict[str, int] = {}
    durations: list[float] = []
    total = len(todo)
    abort = False
    try:
        while (pending and not abort) or active:
            while pending and free_slots and not abort:
                index, (run, action) = pending.pop(0)
                slot = free_slots.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           PYTHONUNBUFFERED="1")
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                extra = ["--resume"] if action == "resume" else (["--overwrite"] if overwrite or action == "restart"
                                                                 else [])
                cmd = [sys.executable, "-m", "ssam.cli", "train", *run.flags, *extra]
                log_path = logs / f"{run.name}.log"
                log = open(log_path, "a")
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                # A session of its own: Ctrl-C reaches only this process, which passes exactly one SIGINT on
                # (train treats a second one as "stop now" and would lose the epoch in progress).
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                print(f"[{index}/{total}] {'resume' if action == 'resume' else 'start '} {run.name}{where}",
                      flush=True)
                active[slot] = (proc, run, index, time.time(), log)
            time.sleep(0.2)
            for slot in list(active):
                proc, run, index, started, log = active[slot]
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[slot]
                free_slots.append(slot)
                elapsed = time.time() - started
                codes[run.name] = rc
                if rc == 0:
                    durations.append(elapsed)
                    left = len(pending) + len(active)
                    eta = (f", about {_fmt_duration(np.mean(durations) * left / jobs)} left"
                           if left and not abort else "")
                    print(f"[{index}/{total}] done   {run.name}  {_result_text(run.folder)}  "
                          f"({_fmt_duration(elapsed)}{eta})", flush=True)
                    status.pop(run.name, None)
                elif rc == 130:
                    print(f"[{index}/{total}] stopped {run.name}; last.pt kept, it resumes on the next run",
                          flush=True)
                elif rc == 3:
                    print(f"[{index}/{total}] DIVERGED {run.name} after {_fmt_duration(elapsed)} (exit 3); "
                          f"see {logs / (run.name + '.log')}", flush=True)
                    status[run.name] = "diverged"
                else:
                    print(f"[{index}/{total}] FAILED {run.name} (exit {rc}); last lines of "
                          f"{logs / (run.name + '.log')}:\n{_tail(logs / (run.name + '.log'))}", flush=True)
                    if rc == 2 and not abort:
                        # Bad input fails every run the same way: stop instead of failing them one by one.
                        abort = True
                        for other, *_ in active.values():
                            other.terminate()
                _write_json(status_path, status)
    except KeyboardInterrupt:
        procs = [proc for proc, *_ in active.values()]
        if procs:
            print("\nstopping: each running run finishes its step and writes last.pt (Ctrl-C again: at once)",
                  file=sys.stderr, flush=True)
        _stop(procs)
        raise
    if abort:
        raise UsageError("a train run rejected its arguments (exit 2, shown above); fix the flags or recipe "
                         "and rerun: finished runs are kept")
    return codes


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        for proc in procs:
            proc.wait(timeout=600)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the second signal: train stops without finishing the step
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _Lock:
    """One comparison per output folder: two would start the same run folders twice."""

    def __init__(self, folder: Path):
        self.path = folder / ".compare.lock"
        self.held = False

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise UsageError(f"--output {self.path.parent} is in use by another ssam compare (pid {pid})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise UsageError(f"could not lock --output {self.path.parent} ({self.path} keeps reappearing)")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------- Hessian

def _hessian_batches(dataset: str, datadir: str | None, samples: int) -> list:
    from .analysis.data import subset_batches
    from .data import build_datasets

    # A fixed seed and no augmentation: every run of the comparison is measured on the same examples.
    train, _, _ = build_datasets(dataset, datadir, download=False, augment=False)
    return subset_batches(train, samples, HESSIAN_BATCH, seed=0)


def hessian_of_run(run_folder: Path, samples: int, data_cache: dict, device: str) -> dict:
    """λ_max and Hutchinson trace of the final model (``last.pt``), cached in ``hessian.json`` of the run."""
    import torch
    from torch import nn

    from .analysis import hessian_eigenvalues, hessian_trace
    from .checkpoint import load_checkpoint, model_from_checkpoint

    ckpt_path = run_folder / "last.pt"
    st = ckpt_path.stat()
    key = {"checkpoint_size": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns, "samples": samples,
           "lanczos_max_iter": LANCZOS_MAX_ITER, "trace_max_iter": TRACE_MAX_ITER}
    cache_path = run_folder / "hessian.json"
    cached = _read_json(cache_path)
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
        return cached
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("config") or {}
    if "dataset" not in config:
        raise UsageError(f"{ckpt_path} lacks config.dataset; cannot pick the data for its Hessian")
    model = model_from_checkpoint(ckpt, ckpt_path)
    data_key = (config["dataset"], config.get("datadir"))
    if data_key not in data_cache:
        data_cache[data_key] = _hessian_batches(config["dataset"], config.get("datadir"), samples)
    batches = data_cache[data_key]
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    threads = torch.get_num_threads()
    if device == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # Double backward through a tiny network is all dispatch overhead: extra threads only add
        # synchronisation (measured 20x slower with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        with _quiet_warnings():
            lam = hessian_eigenvalues(model, loss_fn, batches, top_k=1, max_iter=LANCZOS_MAX_ITER, tol=LANCZOS_TOL,
                                      seed=0, device=device)[0]
            tr, se, ns = hessian_trace(model, loss_fn, batches, max_iter=TRACE_MAX_ITER, tol=TRACE_TOL, seed=0,
                                       device=device)
    finally:
        torch.set_num_threads(threads)
    out = {**key, "lambda_max": float(lam), "trace": float(tr), "trace_stderr": float(se), "trace_samples": int(ns),
           "examples": sum(len(y) for _, y in batches), "seconds": round(time.time() - t0, 2)}
    _write_json(cache_path, out)
    return out


class _quiet_warnings:
    # Lanczos warns when it stops at max_iter: for a comparison of sharpness 1e-3 relative accuracy is plenty.
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ results

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _read_metrics(path: Path) -> list[dict]:
    """Per-epoch records; a torn last line (a killed run) is dropped, a re-logged epoch keeps its last record."""
    by_epoch: dict[int, dict] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), (int, float)):
            by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_run(run: Run) -> dict:
    """Everything the report needs from one run folder (``finished`` False when it has no finished summary)."""
    summary = _read_json(run.folder / "summary.json")
    finished = isinstance(summary, dict) and summary.get("finished") is True
    rec = {"name": run.name, "opt": run.opt, "train_opt": run.train_opt, "seed": run.seed,
           "sparsity": run.sparsity, "finished": finished, "metrics": _read_metrics(run.folder / "metrics.jsonl")}
    for key in ("best_acc1", "final_acc1", "final_train_loss", "time_per_epoch", "wall_time", "epochs"):
        v = summary.get(key) if finished else None
        rec[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    masks = _read_json(run.folder / "masks.json")
    rec["masks"] = masks if isinstance(masks, list) else None
    hess = _read_json(run.folder / "hessian.json") if finished else None
    for key in ("lambda_max", "trace", "trace_stderr"):
        rec[key] = float(hess[key]) if isinstance(hess, dict) and isinstance(hess.get(key), (int, float)) else None
    return rec


METRICS = (("best_acc1", "best acc1 (%)"), ("final_acc1", "final acc1 (%)"),
           ("final_train_loss", "final train loss"), ("time_per_epoch", "s/epoch"),
           ("lambda_max", "λ_max"), ("trace", "trace"))


def aggregate(records: list[dict], base: str = "sgd") -> list[dict]:
    """One row per (optimizer, sparsity) in grid order: ``<metric>_mean``/``_std`` over its finished runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["opt"], r["sparsity"]), []).append(r)
    rows = []
    for (opt, sp), recs in groups.items():
        done = [r for r in recs if r["finished"]]
        row = {"optimizer": group_label(opt, sp, base), "opt": opt, "train_opt": recs[0]["train_opt"],
               "sparsity": sp, "runs": len(recs), "finished": len(done),
               "seeds": " ".join(str(r["seed"]) for r in done)}
        for key, _ in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in done if r[key] is not None])
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if digits >= 0 else f"{v:.{-digits}g}"


DIGITS = {"best_acc1": 2, "final_acc1": 2, "final_train_loss": -4, "time_per_epoch": -3, "lambda_max": -4,
          "trace": -4}


def _pm(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if not np.isfinite(mean):
        return "–"
    text = _fmt(mean, DIGITS[key])
    if not np.isfinite(std):
        return text
    # The spread to the same decimal place as the mean, so the two columns of digits line up in meaning.
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else None
    return f"{text} ± {std:.{decimals}f}" if decimals is not None else f"{text} ± {std:.2g}"


def markdown(rows: list[dict], records: list[dict], s: Settings, status: dict) -> str:
    keys = [k for k, _ in METRICS if s.hessian or k not in ("lambda_max", "trace")]
    head = ["optimizer", "train --opt", "runs", *[dict(METRICS)[k] for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(keys)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row["optimizer"], row["train_opt"], f"{row['finished']}/{row['runs']}",
                                        *[_pm(row, k) for k in keys]]) + " |")
    table = "\n".join(lines)
    notes = [f"Mean ± {STD_NOTE}; runs = finished/planned; s/epoch = training time per epoch (without evaluation)."]
    if s.hessian:
        notes.append(f"λ_max (Lanczos) and trace (Hutchinson) of the training-loss Hessian of the final model "
                     f"(last.pt), on {s.hessian_samples} fixed un-augmented training examples, BatchNorm in eval mode.")
    unfinished = [r["name"] for r in records if not r["finished"]]
    if unfinished:
        notes.append("Not finished: " + ", ".join(
            f"{n} ({'diverged' if status.get(n) == 'diverged' else 'missing'})" for n in unfinished) + ".")
    per_run = ["| run | seed | best acc1 | final acc1 | final train loss | s/epoch | λ_max | trace |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        per_run.append(f"| {r['name']} | {r['seed']} | {_fmt(r['best_acc1'], 2)} | {_fmt(r['final_acc1'], 2)} | "
                       f"{_fmt(r['final_train_loss'], -4)} | {_fmt(r['time_per_epoch'], -3)} | "
                       f"{_fmt(r['lambda_max'], -4)} | {_fmt(r['trace'], -4)} |")
    train = " ".join(_flag_tokens(s.train_values) + s.passthrough) or "(train defaults)"
    return "\n".join([
        "# Optimizer comparison", "",
        f"Command: `{s.command}`  ",
        f"Seeds: {', '.join(map(str, s.seeds))}  ",
        f"Train flags (all runs): `{train}`  ",
        *([f"Per-optimizer flags: `{json.dumps(s.per_opt)}`  "] if s.per_opt else []),
        "", table, "", *notes, "", "## Runs", "", *per_run, "",
        "Plots: curves.png" + (", sparsity.png" if s.sparsities and len(s.sparsities) > 1 else "")
        + (", masks.png" if any(r["masks"] for r in records) else "") + ".", ""])


GROUP_COLUMNS = ["optimizer", "opt", "train_opt", "sparsity", "runs", "finished", "seeds",
                 *[f"{k}_{m}" for k, _ in METRICS for m in ("mean", "std")]]
RUN_COLUMNS = ["name", "opt", "train_opt", "sparsity", "seed", "finished", "best_acc1", "final_acc1",
               "final_train_loss", "time_per_epoch", "wall_time", "epochs", "lambda_max", "trace", "trace_stderr"]


def console_table(rows: list[dict], hessian: bool) -> str:
    keys = [k for k, _ in METRICS if hessian or k not in ("lambda_max", "trace")]
    head = ["optimizer", "runs", *[dict(METRICS)[k] for k in keys]]
    body = [[r["optimizer"], f"{r['finished']}/{r['runs']}", *[_pm(r, k) for k in keys]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


# -------------------------------------------------------------------------------------------------- plots

def _colors(rows: list[dict]) -> dict[tuple, Any]:
    import matplotlib
    out = {}
    for opt, cmap in CMAPS.items():
        sps = sorted(r["sparsity"] for r in rows if r["opt"] == opt and r["sparsity"] is not None)
        if len(sps) < 2:
            continue  # one line per optimizer: its own colour reads better than a pale shade
        for i, sp in enumerate(sps):
            # Darker means sparser; the range avoids the near-white start of the colormap.
            out[(opt, sp)] = matplotlib.colormaps[cmap](0.45 + 0.5 * (i / max(1, len(sps) - 1)))
    for r in rows:
        out.setdefault((r["opt"], r["sparsity"]), COLORS[r["opt"]])
    return out


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path: Path, rows: list[dict], records: list[dict]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    colors = _colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    lo_hi = {"test_acc1": (math.inf, -math.inf), "train_loss": (math.inf, -math.inf)}
    for row in rows:
        recs = [r for r in records if r["finished"] and (r["opt"], r["sparsity"]) == (row["opt"], row["sparsity"])
                and r["metrics"]]
        for ax, key in zip(axes, ("test_acc1", "train_loss")):
            series: dict[int, list[float]] = {}
            for r in recs:
                for m in r["metrics"]:
                    if isinstance(m.get(key), (int, float)) and np.isfinite(m[key]):
                        series.setdefault(int(m["epoch"]), []).append(float(m[key]))
            if not series:
                continue
            epochs = sorted(series)
            vals = [series[e] for e in epochs]
            mean = [np.mean(v) for v in vals]
            c = colors[(row["opt"], row["sparsity"])]
            # metrics.jsonl counts epochs from 0; the log and the reader count from 1.
            xs = [e + 1 for e in epochs]
            ax.plot(xs, mean, color=c, label=f"{row['optimizer']} (n={len(recs)})", lw=1.6)
            ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=c, alpha=0.18, lw=0)
            lo_hi[key] = (min(lo_hi[key][0], min(map(min, vals))), max(lo_hi[key][1], max(map(max, vals))))
            drawn = True
    axes[0].set(xlabel="epoch", ylabel="test acc@1 (%)", title="Test accuracy (mean, min–max over seeds)")
    axes[1].set(xlabel="epoch", ylabel="train loss", title="Training loss (mean, min–max over seeds)")
    lo, hi = lo_hi["train_loss"]
    if 0 < lo and hi / lo > 10:
        axes[1].set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        axes[1].yaxis.set_major_formatter(plain)
        axes[1].yaxis.set_minor_formatter(plain)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    if drawn:
        axes[0].legend(fontsize=8)
    _save_figure(fig, path)
    return drawn


def plot_sparsity(path: Path, rows: list[dict], sparsities: list[float], base: str = "sgd") -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Evenly spaced positions: the paper's sweep 0.5 ... 0.99 crowds near 1 on a linear axis.
    xs = sorted(sparsities)
    pos = {sp: i for i, sp in enumerate(xs)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for opt in SPARSE_OPTS:
        pts = sorted((r["sparsity"], r["best_acc1_mean"], r["best_acc1_std"]) for r in rows
                     if r["opt"] == opt and r["sparsity"] in pos and np.isfinite(r["best_acc1_mean"]))
        if pts:
            ax.errorbar([pos[p[0]] for p in pts], [p[1] for p in pts],
                        yerr=[p[2] if np.isfinite(p[2]) else 0.0 for p in pts], color=COLORS[opt], marker="o",
                        capsize=3, label=group_label(opt, None, base))
            drawn = True
    for opt in ("sam", "sgd"):
        for r in rows:
            if r["opt"] == opt and np.isfinite(r["best_acc1_mean"]):
                ax.axhline(r["best_acc1_mean"], color=COLORS[opt], ls="--", label=r["optimizer"])
                if np.isfinite(r["best_acc1_std"]):
                    ax.axhspan(r["best_acc1_mean"] - r["best_acc1_std"], r["best_acc1_mean"] + r["best_acc1_std"],
                               color=COLORS[opt], alpha=0.12, lw=0)
    ax.set_xticks(range(len(xs)), [f"{sp:g}" for sp in xs])
    ax.set(xlabel="sparsity (fraction of weights not perturbed)", ylabel="best test acc@1 (%)",
           title="Accuracy vs sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    return drawn


def plot_masks(path: Path, rows: list[dict], records: list[dict]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    layers: list[str] = []
    curves = []
    for row in rows:
        recs = [r for r in records if r["masks"] and (r["opt"], r["sparsity"]) == (row["opt"], row["sparsity"])]
        per_layer: dict[str, list[float]] = {}
        for r in recs:
            for m in r["masks"]:
                if isinstance(m, dict) and isinstance(m.get("density"), (int, float)) and np.isfinite(m["density"]):
                    name = str(m.get("name"))
                    if name not in per_layer and name not in layers:
                        layers.append(name)
                    per_layer.setdefault(name, []).append(float(m["density"]))
        if per_layer:
            curves.append((row, per_layer, len(recs)))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(min(18, max(7, 0.28 * len(layers) + 3)), 4.5))
    x = np.arange(len(layers))
    for row, per_layer, n in curves:
        ys = [np.mean(per_layer[name]) if name in per_layer else np.nan for name in layers]
        c = colors[(row["opt"], row["sparsity"])]
        ax.plot(x, ys, marker="o", ms=3, color=c, label=f"{row['optimizer']} (n={n})")
        if row["sparsity"] is not None:
            ax.axhline(1 - row["sparsity"], color=c, ls=":", lw=1)
    step = max(1, math.ceil(len(layers) / 60))
    ax.set_xticks(x[::step], layers[::step], rotation=90, fontsize=6)
    ax.set(ylabel="live fraction (perturbed)", ylim=(-0.02, 1.02),
           title="Final SSAM masks per parameter tensor (dotted: 1 − sparsity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    return True


# --------------------------------------------------------------------------------------------------- main

def report(s: Settings, runs: list[Run], status: dict) -> list[dict]:
    records = [load_run(r) for r in runs]
    rows = aggregate(records, s.base)
    out = s.output
    (out / "results.md").write_text(markdown(rows, records, s, status))
    write_csv(out / "results.csv", rows, GROUP_COLUMNS)
    write_csv(out / "runs.csv", records, RUN_COLUMNS)
    plots = []
    if plot_curves(out / "curves.png", rows, records):
        plots.append("curves.png")
    if s.sparsities and len(s.sparsities) > 1 and plot_sparsity(out / "sparsity.png", rows, s.sparsities, s.base):
        plots.append("sparsity.png")
    if plot_masks(out / "masks.png", rows, records):
        plots.append("masks.png")
    print("\n" + console_table(rows, s.hessian), flush=True)
    print(f"\n{STD_NOTE[0].upper() + STD_NOTE[1:]}.  Wrote {out / 'results.md'}, results.csv, runs.csv"
          + (", " + ", ".join(plots) if plots else ""), flush=True)
    return rows


def _train_grid(s: Settings, runs: list[Run], actions: list[tuple[Run, str]], status: dict,
                status_path: Path) -> dict[str, int] | None:
    """Train what is not finished; each run's exit code, or None when interrupted."""
    (s.output / "compare.yaml").write_text(yaml.safe_dump({
        "command": s.command, "opts": s.opts, "seeds": s.seeds, "sparsity": s.sparsities, "base": s.base,
        "train": s.train_values, "per_opt": s.per_opt, "passthrough": s.passthrough,
        "runs": {r.name: ["ssam", "train", *r.flags] for r in runs}}, sort_keys=False))
    for r, a in actions:
        if a in ("done", "diverged"):
            print(f"skip   {r.name}: " + (_result_text(r.folder) if a == "done" else
                                          f"diverged earlier (delete {r.folder} to retry)"), flush=True)
    todo = [(r, a) for r, a in actions if a in ("new", "resume", "restart")]
    if not todo:
        return {}
    gpus = _gpu_ids(runs[0].config.get("device", "auto"))
    jobs = s.jobs or (len(gpus) if gpus else 1)
    print(f"{len(todo)} run(s) to train, {jobs} at a time; logs in {s.output / 'logs'}", flush=True)
    # SIGTERM (a scheduler, `kill`) stops the runs as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return execute(todo, jobs, gpus, s.output / "logs", status, status_path, s.overwrite)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hessians(s: Settings, runs: list[Run]) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and runs[0].config.get("device") != "cpu" else "cpu"
    data_cache: dict = {}
    for r in runs:
        if is_finished(r.folder) and (r.folder / "last.pt").is_file():
            h = hessian_of_run(r.folder, s.hessian_samples, data_cache, device)
            print(f"hessian {r.name}: λ_max {h['lambda_max']:.4g}  trace {h['trace']:.4g} "
                  f"± {h['trace_stderr']:.2g}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    s = resolve(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(s)
    status_path = s.output / "status.json"
    status = _read_json(status_path) if status_path.is_file() else {}
    status = status if isinstance(status, dict) else {}
    actions = [(r, action_for(r, status, s.overwrite)) for r in runs]

    if s.dry_run:
        for r, a in actions:
            extra = " --resume" if a == "resume" else (" --overwrite" if s.overwrite or a == "restart" else "")
            print(f"# {r.name}: {a}")
            if a in ("new", "resume", "restart"):
                print(f"ssam train {shlex.join(r.flags)}{extra}")
        return 0

    s.output.mkdir(parents=True, exist_ok=True)
    codes: dict[str, int] = {}
    if not s.report_only:
        with _Lock(s.output):
            codes = _train_grid(s, runs, actions, status, status_path)
            if codes is None:
                return 130
    if s.hessian:
        _hessians(s, runs)
    report(s, runs, status)
    failed = [n for n, c in codes.items() if c not in (0, 3)]
    diverged = [r.name for r in runs if status.get(r.name) == "diverged" and not is_finished(r.folder)]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    if diverged:
        print(f"{len(diverged)} run(s) diverged: {', '.join(diverged)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # `python -m ssam.compare`: the same error handling and exit codes as `ssam compare`
    from .cli import main as cli_main

    sys.exit(cli_main(["compare", *sys.argv[1:]]))

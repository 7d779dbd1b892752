"""Statistics over seeds and the report files: results.md, results.csv (one row per variant and axis setting),
runs.csv (one row per run), and the console table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..io import write_atomic, write_csv
from ..runfolder import RunFolder
from .columns import FROM_SUMMARY, METRICS, PAIRED, STD_NOTE
from .plan import Run
from .recipe import SPARSE_OPTS, applies, train_flag_names
from .settings import Settings

ALWAYS_SHOWN = ("sparsity", "rho")
NOT_SETTINGS = ("seed", "opt", "output_dir", "output_name")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _density(masks: list | None, metrics: list[dict]) -> float | None:
    """Live fraction over all masked entries (weighted by size), or the trainer's last logged density."""
    rows = [
        m
        for m in masks or []
        if isinstance(m, dict)
        and isinstance(m.get("numel"), (int, float))
        and isinstance(m.get("density"), (int, float))
        and np.isfinite(m["density"])
    ]
    if rows and sum(m["numel"] for m in rows) > 0:
        return float(sum(m["density"] * m["numel"] for m in rows) / sum(m["numel"] for m in rows))
    last = metrics[-1].get("mask_density") if metrics else None
    return float(last) if isinstance(last, (int, float)) and np.isfinite(last) else None


def setting_columns(runs: list[Run]) -> list[str]:
    """sparsity and rho, then every other train flag whose value differs between runs it applies to."""
    cols = list(ALWAYS_SHOWN)
    flags = train_flag_names()
    for key in dict.fromkeys(k for r in runs for k in r.config):
        if key in cols or key in NOT_SETTINGS or key not in flags:
            continue
        values = {repr(r.config[key]) for r in runs if key in r.config and applies(key, r.opt)}
        if len(values) > 1:
            cols.append(key)
    return cols


def load_run(run: Run, columns: Sequence[str] = ALWAYS_SHOWN) -> dict:
    """Everything the report needs from one run folder (``finished`` False when it has no finished summary)."""
    folder = RunFolder(run.folder)
    summary = folder.summary() or {}
    finished = summary.get("finished") is True
    rec = {
        "name": run.name,
        "variant": run.variant,
        "opt": run.opt,
        "train_opt": run.train_opt,
        "seed": run.seed,
        "optimizer": run.label,
        "group": run.group,
        "finished": finished,
        "metrics": folder.metrics(),
    }
    for key in columns:
        rec[key] = run.config.get(key) if applies(key, run.opt) else None
    rec["sparsity"] = run.sparsity
    for key in FROM_SUMMARY:
        v = summary.get(key) if finished else None
        rec[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    masks = folder.read(RunFolder.MASKS)
    rec["masks"] = masks if isinstance(masks, list) and run.opt in SPARSE_OPTS else None
    rec["mask_density"] = _density(rec["masks"], rec["metrics"]) if finished and run.opt in SPARSE_OPTS else None
    hess = folder.read(RunFolder.HESSIAN) if finished else None
    for key in ("lambda_max", "trace", "trace_stderr"):
        rec[key] = float(hess[key]) if isinstance(hess, dict) and isinstance(hess.get(key), (int, float)) else None
    return rec


def aggregate(records: list[dict], columns: Sequence[str] = ALWAYS_SHOWN) -> list[dict]:
    """One row per variant and named axis values, in grid order: ``<metric>_mean``/``_std`` over finished runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for recs in groups.values():
        first, done = recs[0], [r for r in recs if r["finished"]]
        row = {k: first[k] for k in ("optimizer", "variant", "opt", "train_opt", "group", *columns)}
        row.update(runs=len(recs), finished=len(done), seeds=" ".join(str(r["seed"]) for r in done))
        for key in [k for k, _, _ in METRICS] + ["wall_time"]:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in done if r[key] is not None])
        finals = [r["final_acc1"] for r in done if r["final_acc1"] is not None]
        row["final_acc1_min"], row["final_acc1_max"] = (min(finals), max(finals)) if finals else (None, None)
        rows.append(row)
    pair_with_base(rows, records)
    return rows


def _pair_key(rec: dict) -> tuple:
    """What a run shares with the base-optimizer run it is compared with: the base optimizer, the seed, and the
    named axis values that mean something to the base optimizer (label noise does; rho and sparsity do not)."""
    from ..optim.factory import parse_opt  # torch: imported when a report is made, not with the command line

    base = parse_opt(rec["train_opt"])[1]
    return (base, rec["seed"], tuple((k, v) for k, v in rec["group"][1] if applies(k, "sgd")))


def pair_with_base(rows: list[dict], records: list[dict]) -> None:
    """Add ``vs_base_<metric>_mean/_std`` (metrics of PAIRED) to each SAM-family row: the metric minus that of the
    base optimizer's run with the same seed (and label noise), mean ± sample std over the seeds where both finished,
    and ``vs_base_pairs`` / ``vs_base_ahead``: in how many seeds final acc1 was ahead.

    A seed fixes the initial weights and the noisy labels, so a paired difference is free of much of the
    seed-to-seed spread that the unpaired ± of the main table carries. Rows without a base run get nothing."""
    base_runs: dict[tuple, dict] = {}
    ambiguous = set()
    for r in records:
        if r["opt"] == "sgd" and r["finished"] and r["final_acc1"] is not None:
            key = _pair_key(r)
            if key in base_runs and base_runs[key]["variant"] != r["variant"]:
                ambiguous.add(key)  # two base variants (say, two weight decays): no single reference
            base_runs[key] = r
    by_group: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        if r["opt"] == "sgd" or not r["finished"] or r["final_acc1"] is None:
            continue
        key = _pair_key(r)
        if key in base_runs and key not in ambiguous:
            diffs = by_group.setdefault(r["group"], {m: [] for m in PAIRED})
            for m in PAIRED:
                if r.get(m) is not None and base_runs[key].get(m) is not None:
                    diffs[m].append(r[m] - base_runs[key][m])
    for row in rows:
        diffs = by_group.get(row["group"], {m: [] for m in PAIRED})
        row["vs_base_pairs"] = len(diffs["final_acc1"])
        row["vs_base_ahead"] = sum(d > 0 for d in diffs["final_acc1"])
        for m in PAIRED:
            row[f"vs_base_{m}_mean"], row[f"vs_base_{m}_std"] = mean_std(diffs[m])


def group_columns(columns: Sequence[str]) -> list[str]:
    return [
        "optimizer",
        "variant",
        "opt",
        "train_opt",
        *columns,
        "runs",
        "finished",
        "seeds",
        *[f"{k}_{m}" for k, _, _ in METRICS for m in ("mean", "std")],
        "vs_base_pairs",
        "vs_base_ahead",
        *[f"vs_base_{k}_{m}" for k in PAIRED for m in ("mean", "std")],
    ]


def run_columns(columns: Sequence[str]) -> list[str]:
    return [
        "name",
        "variant",
        "opt",
        "train_opt",
        *columns,
        "seed",
        "finished",
        *FROM_SUMMARY,  # what each run's summary says, then what the report measured or derived
        "mask_density",
        "lambda_max",
        "trace",
        "trace_stderr",
    ]


def write_reports(
    s: Settings, rows: list[dict], records: list[dict], status: dict, columns: Sequence[str], plots: Sequence[str]
) -> None:
    from .tables import markdown

    out = s.output
    write_atomic(out / "results.md", markdown(rows, records, s, status, columns, plots).encode())
    write_csv(out / "results.csv", rows, group_columns(columns))
    write_csv(out / "runs.csv", records, run_columns(columns))


def report(s: Settings, runs: list[Run], status: dict) -> list[dict]:
    """Tables and plots of every run of the grid (unfinished ones are counted, not averaged)."""
    from . import frontier, plots
    from .console import say
    from .tables import console_table

    columns = setting_columns(runs)
    records = [load_run(r, columns) for r in runs]
    rows = aggregate(records, columns)
    out, drawn = s.output, []
    if plots.plot_curves(out / "curves.png", rows, records):
        drawn.append("curves.png")
    for flag, short, metric, xlabel, title in SWEEP_PLOTS:
        axis = s.axis(flag)
        if (
            axis
            and len(axis.values) > 1
            and plots.plot_sweep(out / f"{flag}.png", rows, flag, short, list(axis.values), metric, xlabel, title)
        ):
            drawn.append(f"{flag}.png")
    if plots.plot_masks(out / "masks.png", rows, records):
        drawn.append("masks.png")
    if frontier.plot_memorization(out / "memorization.png", rows, records):
        drawn.append("memorization.png")
    if frontier.plot_cost(out / "cost.png", rows):
        drawn.append("cost.png")
    write_reports(s, rows, records, status, columns, drawn)
    say("\n" + console_table(rows, records, s.hessian))
    say(
        f"\n{STD_NOTE[0].upper() + STD_NOTE[1:]}.  Wrote {out / 'results.md'}, results.csv, runs.csv"
        + (", " + ", ".join(drawn) if drawn else "")
    )
    return rows


# The sweeps that get a plot of their own: sparsity (the paper's study, best accuracy ± std) and rho (final
# accuracy with its min–max over seeds: a SAM radius that helps at one value and hurts at another shows there).
SWEEP_PLOTS = (
    ("sparsity", "s", "best_acc1", "sparsity (fraction of weights not perturbed)", "Accuracy vs sparsity"),
    ("rho", "rho", "final_acc1", "rho (SAM radius)", "Final accuracy vs rho"),
)

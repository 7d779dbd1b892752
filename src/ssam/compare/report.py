"""Statistics over seeds and the report files: results.md, results.csv (one row per variant and axis setting),
runs.csv (one row per run), and the console table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..io import write_atomic, write_csv
from .plan import Run, read_json_or_none, value_text
from .recipe import SPARSE_OPTS, applies, flag_tokens, train_flag_names
from .settings import Settings

STD_NOTE = "sample standard deviation over seeds (n-1 in the denominator)"
METRICS = (
    ("best_acc1", "best acc1 (%)"),
    ("final_acc1", "final acc1 (%)"),
    ("final_train_loss", "final train loss"),
    ("time_per_epoch", "s/epoch"),
    ("mask_density", "mask density"),
    ("lambda_max", "λ_max"),
    ("trace", "trace"),
)
DIGITS = {
    "best_acc1": 2,
    "final_acc1": 2,
    "final_train_loss": -4,
    "time_per_epoch": -3,
    "mask_density": 3,
    "lambda_max": -4,
    "trace": -4,
}
NONE = "—"  # a value that is missing or does not apply (the mask density of SGD and SAM)
ALWAYS_SHOWN = ("sparsity", "rho")
NOT_SETTINGS = ("seed", "opt", "output_dir", "output_name")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _read_metrics(path) -> list[dict]:
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
    summary = read_json_or_none(run.folder / "summary.json")
    finished = isinstance(summary, dict) and summary.get("finished") is True
    rec = {
        "name": run.name,
        "variant": run.variant,
        "opt": run.opt,
        "train_opt": run.train_opt,
        "seed": run.seed,
        "optimizer": run.label,
        "group": run.group,
        "finished": finished,
        "metrics": _read_metrics(run.folder / "metrics.jsonl"),
    }
    for key in columns:
        rec[key] = run.config.get(key) if applies(key, run.opt) else None
    rec["sparsity"] = run.sparsity
    for key in ("best_acc1", "final_acc1", "final_train_loss", "time_per_epoch", "wall_time", "epochs"):
        v = summary.get(key) if finished else None
        rec[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    masks = read_json_or_none(run.folder / "masks.json")
    rec["masks"] = masks if isinstance(masks, list) and run.opt in SPARSE_OPTS else None
    rec["mask_density"] = _density(rec["masks"], rec["metrics"]) if finished and run.opt in SPARSE_OPTS else None
    hess = read_json_or_none(run.folder / "hessian.json") if finished else None
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
        for key, _ in METRICS:
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
    """Add ``vs_base_*`` to each SAM-family row: final acc1 minus that of the base optimizer's run with the same
    seed (and label noise), mean ± sample std over the seeds where both finished, and in how many it was ahead.

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
    by_group: dict[tuple, list[float]] = {}
    for r in records:
        if r["opt"] == "sgd" or not r["finished"] or r["final_acc1"] is None:
            continue
        key = _pair_key(r)
        if key in base_runs and key not in ambiguous:
            by_group.setdefault(r["group"], []).append(r["final_acc1"] - base_runs[key]["final_acc1"])
    for row in rows:
        diffs = by_group.get(row["group"], [])
        row["vs_base_pairs"] = len(diffs)
        row["vs_base_ahead"] = sum(d > 0 for d in diffs)
        row["vs_base_final_acc1_mean"], row["vs_base_final_acc1_std"] = mean_std(diffs)


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return NONE
    return f"{v:.{digits}f}" if digits >= 0 else f"{v:.{-digits}g}"


def _pm(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if not np.isfinite(mean):
        return NONE
    text = _fmt(mean, DIGITS[key])
    if not np.isfinite(std):
        return text
    # The spread to the same decimal place as the mean, so the two columns of digits line up in meaning.
    # A whole number (1159) gets a whole spread (± 120), not 1.2e+02.
    decimals = None if "e" in text else len(text.split(".")[1]) if "." in text else 0
    return f"{text} ± {std:.{decimals}f}" if decimals is not None else f"{text} ± {std:.2g}"


def _setting(v: Any) -> str:
    return NONE if v is None else value_text(v)


def _metric_keys(records: list[dict], hessian: bool) -> list[str]:
    masks = any(r["mask_density"] is not None for r in records)
    return [k for k, _ in METRICS if (hessian or k not in ("lambda_max", "trace")) and (masks or k != "mask_density")]


def markdown(
    rows: list[dict], records: list[dict], s: Settings, status: dict, columns: Sequence[str], plots: Sequence[str]
) -> str:
    keys = _metric_keys(records, s.hessian)
    # Settings go after the measurements: the first columns (optimizer, opt, runs, best acc1) keep their places.
    head = ["optimizer", "train --opt", "runs", *[dict(METRICS)[k] for k in keys], *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(keys) + len(columns))) + "|"]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    row["optimizer"],
                    row["train_opt"],
                    f"{row['finished']}/{row['runs']}",
                    *[_pm(row, k) for k in keys],
                    *[_setting(row[c]) for c in columns],
                ]
            )
            + " |"
        )
    notes = [
        f"Mean ± {STD_NOTE}; runs = finished/planned; s/epoch = training time per epoch (without evaluation); "
        f"{NONE} = not measured or does not apply."
    ]
    if "mask_density" in keys:
        notes.append("mask density = live (perturbed) fraction of the maskable weights in the final SSAM mask.")
    if s.hessian:
        notes.append(
            f"λ_max (Lanczos) and trace (Hutchinson) of the training-loss Hessian of the final model "
            f"(last.pt), on {s.hessian_samples} fixed un-augmented training examples with their true labels, "
            f"BatchNorm in eval mode."
        )
    unfinished = [r["name"] for r in records if not r["finished"]]
    if unfinished:
        notes.append(
            "Not finished: "
            + ", ".join(f"{n} ({'diverged' if status.get(n) == 'diverged' else 'missing'})" for n in unfinished)
            + "."
        )
    paired = paired_markdown(rows)
    per_keys = [k for k in keys if k != "time_per_epoch"] + ["time_per_epoch"]
    per_run = [
        "| run | seed | " + " | ".join([*columns, *[dict(METRICS)[k] for k in per_keys]]) + " |",
        "|---|" + "---:|" * (1 + len(columns) + len(per_keys)),
    ]
    for r in records:
        cells = [
            r["name"],
            str(r["seed"]),
            *[_setting(r[c]) for c in columns],
            *[_fmt(r[k], DIGITS[k]) for k in per_keys],
        ]
        per_run.append("| " + " | ".join(cells) + " |")
    train = " ".join(flag_tokens(s.train_values) + s.passthrough) or "(train defaults)"
    variants = [f"`{v.name}` ({v.label}): `{' '.join(flag_tokens(v.flags))}`" for v in s.variants]
    axes = [f"{a.flag} {', '.join(map(value_text, a.values))}" for a in s.axes]
    return "\n".join(
        [
            "# Optimizer comparison",
            "",
            f"Command: `{s.command}`  ",
            f"Seeds: {', '.join(map(str, s.seeds))}  ",
            f"Train flags (all runs): `{train}`  ",
            *([f"Per-optimizer flags: `{json.dumps(s.per_opt)}`  "] if s.per_opt else []),
            f"Variants: {'; '.join(variants)}  ",
            *([f"Axes: {'; '.join(axes)}  "] if axes else []),
            "",
            "\n".join(lines),
            "",
            *notes,
            "",
            *paired,
            "## Runs",
            "",
            *per_run,
            "",
            ("Plots: " + ", ".join(plots) + ".") if plots else "No plots (no finished runs).",
            "",
        ]
    )


def paired_markdown(rows: list[dict]) -> list[str]:
    """The seed-by-seed comparison with the base optimizer (lines ending in a blank one), or nothing."""
    paired = [r for r in rows if r["vs_base_pairs"]]
    if not paired:
        return []
    lines = [
        "## Against the base optimizer, seed by seed",
        "",
        "| optimizer | seeds paired | Δ final acc1 (points) | ahead in |",
        "|---|---:|---:|---:|",
    ]
    for r in paired:
        mean, std = r["vs_base_final_acc1_mean"], r["vs_base_final_acc1_std"]
        delta = f"{mean:+.2f}" + (f" ± {std:.2f}" if np.isfinite(std) else "")
        lines.append(
            f"| {r['optimizer']} | {r['vs_base_pairs']} | {delta} | {r['vs_base_ahead']} of {r['vs_base_pairs']} |"
        )
    lines += [
        "",
        "Δ = final acc1 minus that of the base optimizer's run (SGD or AdamW without SAM) with the same seed and label "
        f"noise, hence the same initial weights and the same noisy labels; mean ± {STD_NOTE}.",
        "",
    ]
    return lines


def console_table(rows: list[dict], records: list[dict], hessian: bool) -> str:
    keys = _metric_keys(records, hessian)
    head = ["optimizer", "runs", *[dict(METRICS)[k] for k in keys]]
    body = [[r["optimizer"], f"{r['finished']}/{r['runs']}", *[_pm(r, k) for k in keys]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


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
        *[f"{k}_{m}" for k, _ in METRICS for m in ("mean", "std")],
        "vs_base_pairs",
        "vs_base_ahead",
        "vs_base_final_acc1_mean",
        "vs_base_final_acc1_std",
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
        "best_acc1",
        "final_acc1",
        "final_train_loss",
        "time_per_epoch",
        "mask_density",
        "wall_time",
        "epochs",
        "lambda_max",
        "trace",
        "trace_stderr",
    ]


def write_reports(
    s: Settings, rows: list[dict], records: list[dict], status: dict, columns: Sequence[str], plots: Sequence[str]
) -> None:
    out = s.output
    write_atomic(out / "results.md", markdown(rows, records, s, status, columns, plots).encode())
    write_csv(out / "results.csv", rows, group_columns(columns))
    write_csv(out / "runs.csv", records, run_columns(columns))


def report(s: Settings, runs: list[Run], status: dict) -> list[dict]:
    """Tables and plots of every run of the grid (unfinished ones are counted, not averaged)."""
    from . import plots
    from .console import say

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

"""The comparison's tables as text: results.md (grid table, paired differences, runs) and the console table.

Numbers follow one rule per column (``numbers.py``): the decimals that show the column's smallest spread to two
significant digits, the same for every mean and spread of the column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .columns import ALWAYS, DEFAULT_DECIMALS, HEADERS, HESSIAN, METRICS, PAIRED, STD_NOTE
from .numbers import NONE, column_decimals, finite, mean_pm, value
from .plan import value_text
from .recipe import flag_tokens
from .settings import Settings

__all__ = ["markdown", "paired_markdown", "console_table", "metric_keys"]


def metric_keys(records: list[dict], hessian: bool) -> list[str]:
    """The measurement columns: ALWAYS, and each other metric that some run has (the Hessian's when measured)."""
    return [
        k
        for k, _, _ in METRICS
        if k in ALWAYS or ((hessian or k not in HESSIAN) and any(r.get(k) is not None for r in records))
    ]


def _decimals(rows: list[dict], key: str, prefix: str = "", default: int | None = None) -> int:
    fallback = DEFAULT_DECIMALS.get(key, 2) if default is None else default
    return column_decimals([r.get(f"{prefix}{key}_std") for r in rows], fallback)


def _cells(rows: list[dict], keys: Sequence[str]) -> list[list[str]]:
    """Each row's ``mean ± std`` per key, the decimals chosen per column."""
    decimals = {k: _decimals(rows, k) for k in keys}
    return [[mean_pm(r[f"{k}_mean"], r[f"{k}_std"], decimals[k]) for k in keys] for r in rows]


def _setting(v: Any) -> str:
    return NONE if v is None else value_text(v)


def markdown(
    rows: list[dict], records: list[dict], s: Settings, status: dict, columns: Sequence[str], plots: Sequence[str]
) -> str:
    keys = metric_keys(records, s.hessian)
    # Settings go after the measurements: the first columns (optimizer, opt, runs, best acc1) keep their places.
    head = ["optimizer", "train --opt", "runs", *[HEADERS[k] for k in keys], *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(keys) + len(columns))) + "|"]
    for row, cells in zip(rows, _cells(rows, keys)):
        settings = [_setting(row[c]) for c in columns]
        lines.append(
            "| "
            + " | ".join([row["optimizer"], row["train_opt"], f"{row['finished']}/{row['runs']}", *cells, *settings])
            + " |"
        )
    notes = [
        f"Mean ± {STD_NOTE}; runs = finished/planned; s/epoch = training time per epoch (without evaluation); "
        f"{NONE} = not measured or does not apply."
    ]
    if "early_stopped_acc1" in keys:
        notes.append(
            "early-stopped acc1 = test accuracy at the epoch of best accuracy on the validation split (held out of "
            "the training data, noisy labels included): no number is chosen on the test set."
        )
    if "final_noisy_memorized" in keys:
        notes.append(
            "wrong labels fit = share of the training examples whose label was corrupted that the final model "
            "predicts as that wrong label (eval mode, no augmentation)."
        )
    if "passes_per_example" in keys:
        notes.append(
            "passes/example = forward + backward passes per training example over the run (SGD 1, SAM 2; a skipping "
            "first pass by the work model of ssam.train.cost)."
        )
    if "mask_density" in keys:
        notes.append("mask density = live (perturbed) fraction of the maskable weights in the final SSAM mask.")
    if s.hessian:
        notes.append(
            f"λ_max (Lanczos) and trace (Hutchinson) of the training-loss Hessian of the final model "
            f"(last.pt), on {s.hessian_samples} fixed un-augmented training examples (of the run's own subset, "
            f"if it trained on one) with their true labels, BatchNorm in eval mode."
        )
    unfinished = [r["name"] for r in records if not r["finished"]]
    if unfinished:
        notes.append(
            "Not finished: "
            + ", ".join(f"{n} ({'diverged' if status.get(n) == 'diverged' else 'missing'})" for n in unfinished)
            + "."
        )
    per_keys = [k for k in keys if k != "time_per_epoch"] + ["time_per_epoch"]
    per_run = [
        "| run | seed | " + " | ".join([*columns, *[HEADERS[k] for k in per_keys]]) + " |",
        "|---|" + "---:|" * (1 + len(columns) + len(per_keys)),
    ]
    run_decimals = {k: _decimals(rows, k) for k in per_keys}
    for r in records:
        cells = [
            r["name"],
            str(r["seed"]),
            *[_setting(r[c]) for c in columns],
            *[value(r[k], run_decimals[k]) for k in per_keys],
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
            *paired_markdown(rows),
            "## Runs",
            "",
            *per_run,
            "",
            ("Plots: " + ", ".join(plots) + ".") if plots else "No plots (no finished runs).",
            "",
        ]
    )


PAIRED_HEADERS = {
    "final_acc1": "Δ final acc1",
    "best_acc1": "Δ best acc1",
    "early_stopped_acc1": "Δ early-stopped acc1",
}


def paired_markdown(rows: list[dict]) -> list[str]:
    """The seed-by-seed comparison with the base optimizer (lines ending in a blank one), or nothing."""
    paired = [r for r in rows if r["vs_base_pairs"]]
    if not paired:
        return []
    # A metric no pair measured (early stopping without a validation split) gets no column.
    keys = [k for k in PAIRED if any(finite(r.get(f"vs_base_{k}_mean")) for r in paired)]
    decimals = {k: _decimals(paired, k, "vs_base_", 2) for k in keys}
    lines = [
        "## Against the base optimizer, seed by seed",
        "",
        "| optimizer | seeds paired | " + " | ".join(f"{PAIRED_HEADERS[k]} (points)" for k in keys) + " | ahead in |",
        "|---|---:|" + "---:|" * len(keys) + "---:|",
    ]
    for r in paired:
        deltas = [mean_pm(r[f"vs_base_{k}_mean"], r[f"vs_base_{k}_std"], decimals[k], sign=True) for k in keys]
        lines.append(
            f"| {r['optimizer']} | {r['vs_base_pairs']} | {' | '.join(deltas)} | "
            f"{r['vs_base_ahead']} of {r['vs_base_pairs']} |"
        )
    lines += [
        "",
        "Δ = the run's accuracy minus that of the base optimizer's run (SGD or AdamW without SAM) with the same seed "
        f"and label noise, hence the same initial weights and the same noisy labels; mean ± {STD_NOTE}; ahead in = "
        "seeds in which the final accuracy was higher.",
        "",
    ]
    return lines


def console_table(rows: list[dict], records: list[dict], hessian: bool) -> str:
    keys = metric_keys(records, hessian)
    head = ["optimizer", "runs", *[HEADERS[k] for k in keys]]
    body = [[r["optimizer"], f"{r['finished']}/{r['runs']}", *cells] for r, cells in zip(rows, _cells(rows, keys))]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])

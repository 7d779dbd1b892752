"""How much of SAM's gain over SGD each optimizer keeps, seed by seed, against its cost: the table of the
cost–accuracy frontier in docs/results.md.

    python scripts/gain_share.py runs/fashion_mem [runs/fashion_mem_sched ...] [--ref sam]

Reads each folder's runs.csv (written by ssam compare). A row group is a variant with its swept settings; the
reference (``--ref``, default the plain ``sam`` variant with no schedule and no micro-batch) and the base (``sgd``)
are taken from any of the folders, matched by seed. Share = (X - SGD) / (REF - SGD) of the same seed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from ssam.runfolder import RunFolder

SETTINGS = (
    "sparsity",
    "rho",
    "granularity",
    "cost_aware",
    "skip_dead",
    "sam_schedule",
    "sam_micro_batch",
    "sam_ascent",
    "saf",
    "mesa",
    "freeze_bn_second_pass",
)
# Settings a folder may give all its runs as one flag (not a runs.csv column): read from each run's config.yaml.
RUN_SETTINGS = ("sam_ascent", "saf", "mesa", "sam_schedule", "sam_micro_batch", "freeze_bn_second_pass")
DEFAULTS = ("", "none", "None", "False", "element", "gradient")  # settings at these values are left out of a label


def _key(row: dict) -> tuple:
    return (row["variant"], *[(k, row.get(k) or "") for k in SETTINGS if (row.get(k) or "") not in DEFAULTS])


def _label(key: tuple, shown: set[str]) -> str:
    return " ".join([key[0], *[f"{k}={v}" for k, v in key[1:] if k in shown]])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gain_share.py")
    p.add_argument("folders", nargs="+")
    p.add_argument("--ref", default="sam", help="the reference group's label (default: sam)")
    p.add_argument("--metric", default="final_acc1", choices=("final_acc1", "early_stopped_acc1", "best_acc1"))
    p.add_argument("--plot", help="also draw every group's mean accuracy against its passes per example (a PNG)")
    p.add_argument(
        "--choose_rho",
        action="store_true",
        help="of the groups that differ only in rho, keep the one of the highest mean final validation accuracy "
        "(scripts/pick_rho.py's rule; the reference and SGD are kept as given)",
    )
    args = p.parse_args(argv)
    rows = []
    for folder in args.folders:
        path = Path(folder) / "runs.csv"
        if not path.is_file():
            print(f"gain_share.py: {path} not found; run ssam compare --report_only first", file=sys.stderr)
            return 2
        with open(path) as f:
            found = [r for r in csv.DictReader(f) if r["finished"] == "True" and r[args.metric]]
        for r in found:
            run = RunFolder(Path(folder) / "runs" / r["name"])
            config, metrics = run.config() or {}, run.metrics()
            r.update({k: str(config[k]) for k in RUN_SETTINGS if not r.get(k) and config.get(k) is not None})
            if not r.get("rho") and config.get("rho") is not None and r["variant"] != "sgd":
                r["rho"] = str(config["rho"])
            r["final_val_acc1"] = metrics[-1].get("val_acc1") if metrics else None
        rows += found
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), {})[r["seed"]] = r
    if args.choose_rho:
        groups = _chosen_rho(groups, args.ref)
    # Show a setting in the labels only where it tells groups of one variant apart.
    shown = {k for key in groups for k, _ in key[1:] if len({dict(g[1:]).get(k) for g in groups if g[0] == key[0]}) > 1}
    # The base: SGD without a setting of its own (SAF and MESA are SGD with a trajectory loss, rows of their own).
    base_key = next(
        (k for k in groups if k[0] == "sgd" and len(k) == 1), next((k for k in groups if k[0] == "sgd"), None)
    )
    base = groups.get(base_key) if base_key is not None else None
    ref = next((g for k, g in groups.items() if _label(k, shown) == args.ref), None)
    if base is None or ref is None:
        known = sorted(_label(k, shown) for k in groups)
        print(f"gain_share.py: no sgd rows or no {args.ref!r} rows among {known}", file=sys.stderr)
        return 2
    m = args.metric
    print(
        f"| optimizer | seeds | passes/example | Δ {m} vs SGD | share of SAM's gain (min / mean) "
        "| ≥ 80% in every seed |"
    )
    print("|---|---:|---:|---:|---:|---|")
    points: list[tuple[str, float, float]] = []  # (label, passes per example, mean metric) of every group
    for key, runs in groups.items():
        seeds = sorted(s for s in runs if s in base and s in ref)
        if not seeds:
            continue
        points.append(
            (
                _label(key, shown),
                statistics.mean(float(runs[s]["passes_per_example"]) for s in seeds),
                statistics.mean(float(runs[s][m]) for s in seeds),
            )
        )
        if key == base_key:
            continue
        delta = [float(runs[s][m]) - float(base[s][m]) for s in seeds]
        share = [d / (float(ref[s][m]) - float(base[s][m])) for s, d in zip(seeds, delta)]
        passes = statistics.mean(float(runs[s]["passes_per_example"]) for s in seeds)
        print(
            f"| {_label(key, shown)} | {len(seeds)} | {passes:.2f} | {statistics.mean(delta):+.2f} | "
            f"{min(share):.0%} / {statistics.mean(share):.0%} | {'yes' if min(share) >= 0.8 else 'no'} |"
        )
    if args.plot:
        _plot(args.plot, points, m)
    return 0


def _chosen_rho(groups: dict[tuple, dict[str, dict]], ref: str) -> dict[tuple, dict[str, dict]]:
    """Of the groups alike but for rho, the one with the highest mean final validation accuracy (the smaller rho on a
    tie); groups without a validation accuracy, and the reference, stay."""
    best: dict[tuple, tuple[float, float, tuple]] = {}
    kept = {}
    for key, runs in groups.items():
        rho = dict(key[1:]).get("rho")
        vals = [float(r["final_val_acc1"]) for r in runs.values() if r.get("final_val_acc1") is not None]
        if rho is None or not vals or _label(key, {k for k, _ in key[1:]}) == ref:
            kept[key] = runs
            continue
        family = (key[0], *[kv for kv in key[1:] if kv[0] != "rho"])
        score = (statistics.mean(vals), -float(rho), key)
        if family not in best or score[:2] > best[family][:2]:
            best[family] = score
    for _, _, key in best.values():
        kept[key] = groups[key]
    return kept


def _plot(path: str, points: list[tuple[str, float, float]], metric: str) -> None:
    """Each group's mean accuracy against its passes per example, labelled: the cost–accuracy frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def short(label: str) -> str:
        return (
            label.replace(" sam_schedule=", " ")
            .replace(" sam_micro_batch=", " m=")
            .replace(" sam_ascent=", " ")
            .replace(":0.7", "")
        )

    base = [acc for label, _, acc in points if label == "sgd"] or [acc for _, _, acc in points]
    floor = min(base) - 3  # the base optimizer's, minus 3 (what falls below is named in the title)
    below = [short(label) for label, _, acc in points if acc < floor]
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (label, passes, acc) in enumerate(points):
        if acc < floor:
            continue
        ax.scatter(passes, acc, s=22)
        ax.annotate(short(label), (passes, acc), fontsize=6, xytext=(4, 4 - 9 * (i % 3)), textcoords="offset points")
    ax.set_ylim(bottom=floor)
    ax.set(xlabel="forward + backward passes per training example", ylabel=f"{metric} (%), mean over seeds")
    ax.set_title("Cost–accuracy frontier" + (f" (below the axis: {', '.join(below)})" if below else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

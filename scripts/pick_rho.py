"""Each optimizer's rho chosen without the test set: the radius with the highest mean final validation accuracy over
the seeds, among the finished runs of the given ``ssam compare`` folders.

    python scripts/pick_rho.py runs/fashion_mem_full runs/fashion_mem_full_rho [...]

A run's rho is read from its saved flags (config.yaml), its final validation accuracy from the last epoch of its
metrics (the held-out split of --val_split, noisy labels included, as in training); the variant and seed from the
folder's runs.csv. Prints one row per optimizer and rho (means over the seeds, with the test numbers beside them,
never used for the choice) and marks the chosen rho; ties go to the smaller radius. SGD has no rho and is left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from ssam.runfolder import RunFolder

COLUMNS = ("final_val_acc1", "final_acc1", "early_stopped_acc1", "final_noisy_memorized")


def collect(folders: list[str], setting: str = "rho") -> dict[tuple[str, float], dict[str, dict[str, float]]]:
    """{(variant, value of ``setting``): {seed: {column: value}}} over the finished runs with a validation split
    (SGD's runs only for a setting other than rho: SAF's and MESA's lambda)."""
    groups: dict[tuple[str, float], dict[str, dict[str, float]]] = {}
    for folder in folders:
        with open(Path(folder) / "runs.csv") as f:
            rows = [
                r for r in csv.DictReader(f) if r["finished"] == "True" and (r["variant"] != "sgd" or setting != "rho")
            ]
        for r in rows:
            run = RunFolder(Path(folder) / "runs" / r["name"])
            cfg, metrics = run.config() or {}, run.metrics()
            if cfg.get(setting) is None or not metrics or "val_acc1" not in metrics[-1]:
                continue
            values = {"final_val_acc1": float(metrics[-1]["val_acc1"])}
            values.update({k: float(r[k]) for k in COLUMNS[1:] if r.get(k)})
            groups.setdefault((r["variant"], float(cfg[setting])), {})[r["seed"]] = values
    return groups


def chosen(groups: dict[tuple[str, float], dict[str, dict[str, float]]]) -> dict[str, float]:
    """Per variant, the rho of the highest mean final validation accuracy (the smaller rho on a tie)."""
    best: dict[str, tuple[float, float]] = {}
    for (variant, rho), runs in sorted(groups.items()):
        val = statistics.mean(v["final_val_acc1"] for v in runs.values())
        if variant not in best or val > best[variant][0]:
            best[variant] = (val, rho)
    return {variant: rho for variant, (_, rho) in best.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pick_rho.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--setting", default="rho", help="the swept setting to choose (default rho; saf, mesa: lambda)")
    args = p.parse_args(argv)
    missing = [f for f in args.folders if not (Path(f) / "runs.csv").is_file()]
    if missing:
        where = f"{missing[0]}/runs.csv"
        print(f"pick_rho.py: {where} not found; allowed: folders written by ssam compare", file=sys.stderr)
        return 2
    groups = collect(args.folders, args.setting)
    if not groups:
        print(
            f"pick_rho.py: no finished run with a {args.setting} and a validation split in these folders",
            file=sys.stderr,
        )
        return 2
    pick = chosen(groups)
    print(
        f"| optimizer | {args.setting} | seeds | final val acc1 | final test acc1 | early-stopped | wrong labels fit "
        "| chosen |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for (variant, rho), runs in sorted(groups.items()):
        mean = {k: statistics.mean(v[k] for v in runs.values() if k in v) for k in COLUMNS}
        print(
            f"| {variant} | {rho:g} | {len(runs)} | {mean['final_val_acc1']:.2f} | {mean['final_acc1']:.2f} | "
            f"{mean['early_stopped_acc1']:.2f} | {mean['final_noisy_memorized']:.3f} | "
            f"{'yes' if pick[variant] == rho else ''} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The figures of the memorization regime: memorization.png (how much of the label noise each optimizer fits, epoch
by epoch) and cost.png (every optimizer's accuracy against its cost: the cost–accuracy frontier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import _finite, _plt, _save, colors

__all__ = ["plot_memorization", "plot_cost"]


def _series(recs: list[dict], key: str) -> tuple[list[int], list[list[float]]]:
    by_epoch: dict[int, list[float]] = {}
    for r in recs:
        for m in r["metrics"]:
            if _finite(m.get(key)):
                by_epoch.setdefault(int(m["epoch"]), []).append(float(m[key]))
    epochs = sorted(by_epoch)
    return [e + 1 for e in epochs], [by_epoch[e] for e in epochs]


def plot_memorization(path: Path, rows: list[dict], records: list[dict]) -> list[str]:
    """Left: share of the corrupted training examples predicted as their wrong label; right: test accuracy. Mean
    over seeds with the min–max band. Returns the rows drawn (their labels); none: no file."""
    plt = _plt()
    cols = colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn: list[str] = []
    for row in rows:
        recs = [r for r in records if r["finished"] and r["group"] == row["group"] and r["metrics"]]
        xs, fit = _series(recs, "noisy_memorized")
        if not xs:
            continue
        c = cols[row["group"]]
        label = f"{row['optimizer']} (n={len(recs)})"
        axes[0].plot(xs, [np.mean(v) for v in fit], color=c, lw=1.6, label=label)
        axes[0].fill_between(xs, [min(v) for v in fit], [max(v) for v in fit], color=c, alpha=0.18, lw=0)
        xt, acc = _series(recs, "test_acc1")
        axes[1].plot(xt, [np.mean(v) for v in acc], color=c, lw=1.6, label=label)
        axes[1].fill_between(xt, [min(v) for v in acc], [max(v) for v in acc], color=c, alpha=0.18, lw=0)
        drawn.append(row["optimizer"])
    if not drawn:
        _plt().close(fig)
        return drawn
    axes[0].set(xlabel="epoch", ylabel="fraction of wrong labels fit", title="Memorization of the noisy labels")
    axes[1].set(xlabel="epoch", ylabel="test acc@1 (%)", title="Test accuracy (mean, min–max over seeds)")
    axes[0].set_ylim(0, 1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return drawn


def plot_cost(path: Path, rows: list[dict]) -> list[str]:
    """Final (filled) and early-stopped (open) test accuracy of every row against passes per example (left) and
    wall time per run (right); mean ± std over seeds. Returns the rows drawn (their labels); none: no file."""
    plt = _plt()
    have = [r for r in rows if _finite(r.get("passes_per_example_mean")) and _finite(r.get("final_acc1_mean"))]
    if not have:
        return []
    cols = colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, xkey, xlabel in (
        (axes[0], "passes_per_example", "forward + backward passes per training example"),
        (axes[1], "wall", "wall time per run (s, training only)"),
    ):
        for row in have:
            c = cols[row["group"]]
            if xkey == "wall":
                x, xerr = row.get("wall_time_mean"), row.get("wall_time_std")
                if not _finite(x):
                    continue
                xerr = xerr if _finite(xerr) else None
            else:
                x, xerr = row["passes_per_example_mean"], None
            for key, marker, face in (("final_acc1", "o", c), ("early_stopped_acc1", "o", "none")):
                y, yerr = row.get(f"{key}_mean"), row.get(f"{key}_std")
                if not _finite(y):
                    continue
                ax.errorbar(
                    x,
                    y,
                    xerr=xerr,
                    yerr=yerr if _finite(yerr) else None,
                    fmt=marker,
                    color=c,
                    mfc=face,
                    ms=7,
                    capsize=3,
                    label=row["optimizer"] if key == "final_acc1" else None,
                )
        ax.set(xlabel=xlabel, ylabel="test acc@1 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy against cost (filled: final, open: early-stopped)")
    axes[1].set_title("Against wall time (noisy on a shared machine)")
    axes[0].legend(fontsize=7, loc="lower right")
    _save(fig, path)
    return [r["optimizer"] for r in have]

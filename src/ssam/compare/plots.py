"""The comparison's figures: curves.png, sparsity.png, rho.png (sweeps), masks.png (SSAM runs).

Each row of the results table is one line or bar set. A variant keeps one colour (SGD grey, SAM blue, SSAM-F red,
SSAM-D green, declared variants from a palette); when it has several rows (a sweep), they are shades of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"sgd": "#555555", "sam": "#1f77b4", "ssamf": "#d62728", "ssamd": "#2ca02c"}
CMAPS = {"sgd": "Greys", "sam": "Blues", "ssamf": "Reds", "ssamd": "Greens"}
PALETTE = [
    ("#9467bd", "Purples"),
    ("#ff7f0e", "Oranges"),
    ("#8c564b", "YlOrBr"),
    ("#e377c2", "RdPu"),
    ("#17becf", "GnBu"),
    ("#bcbd22", "YlGn"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def base_colors(rows: list[dict]) -> dict[str, tuple[Any, str]]:
    """Each variant's colour and colormap: its family's when no other variant of the grid has taken it (a declared
    ``ssamf_element`` is red like SSAM-F), else the next of the palette."""
    out: dict[str, tuple[Any, str]] = {}
    spare = iter(PALETTE * 4)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    family = {r["variant"]: r.get("opt", r["variant"]) for r in rows}
    for v in sorted(variants, key=lambda v: v not in COLORS):  # built-in names claim their colour first
        f = v if v in COLORS else family[v]
        taken = {c for c, _ in out.values()}
        out[v] = (COLORS[f], CMAPS[f]) if f in COLORS and COLORS[f] not in taken else next(spare)
    return out


def colors(rows: list[dict]) -> dict[tuple, Any]:
    """The colour of each row (by its group key)."""
    import matplotlib

    out: dict[tuple, Any] = {}
    for variant, (color, cmap) in base_colors(rows).items():
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) < 2:
            out[mine[0]["group"]] = color  # one line per variant: its own colour reads better than a pale shade
            continue
        for i, r in enumerate(sorted(mine, key=lambda r: r["group"][1])):
            # Darker means a larger axis value; the range avoids the near-white start of the colormap.
            out[r["group"]] = matplotlib.colormaps[cmap](0.45 + 0.5 * (i / (len(mine) - 1)))
    return out


def _save(fig, path: Path) -> None:
    from ..io import write_atomic

    fig.tight_layout()
    # Through io: a reader (or a kill) never sees half a PNG.
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    _plt().close(fig)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and np.isfinite(x)


def plot_curves(path: Path, rows: list[dict], records: list[dict]) -> bool:
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cols = colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    lo_hi = {"test_acc1": (math.inf, -math.inf), "train_loss": (math.inf, -math.inf)}
    for row in rows:
        recs = [r for r in records if r["finished"] and r["group"] == row["group"] and r["metrics"]]
        for ax, key in zip(axes, ("test_acc1", "train_loss")):
            series: dict[int, list[float]] = {}
            for r in recs:
                for m in r["metrics"]:
                    if _finite(m.get(key)):
                        series.setdefault(int(m["epoch"]), []).append(float(m[key]))
            if not series:
                continue
            epochs = sorted(series)
            vals = [series[e] for e in epochs]
            xs = [e + 1 for e in epochs]  # metrics.jsonl counts epochs from 0; the log and the reader count from 1.
            c = cols[row["group"]]
            ax.plot(xs, [np.mean(v) for v in vals], color=c, label=f"{row['optimizer']} (n={len(recs)})", lw=1.6)
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
        ax.grid(alpha=0.3)
    if drawn:
        axes[0].legend(fontsize=8)
    _save(fig, path)
    return drawn


def _others(row: dict, flag: str) -> tuple:
    """The row's group without the swept flag: the points of one line."""
    return (row["variant"], tuple((f, v) for f, v in row["group"][1] if f != flag))


def _line_label(row: dict, flag: str, short: str) -> str:
    # The row label names every axis value; a line spans the values of `flag`, so drop that one.
    value = dict(row["group"][1]).get(flag)
    return row["optimizer"].replace(f" {short}={value:g}", "") if value is not None else row["optimizer"]


def plot_sweep(
    path: Path, rows: list[dict], flag: str, short: str, values: list[float], metric: str, xlabel: str, title: str
) -> bool:
    """``metric`` against the values of ``flag``: one line per variant (and other axis values), mean with the
    spread over seeds; rows the flag does not apply to (SGD under a rho sweep) as horizontal bands."""
    plt = _plt()
    # Evenly spaced positions: sweeps such as 0.5 ... 0.99 or 0.02 ... 0.2 crowd on a linear axis.
    xs = sorted(values)
    pos = {v: i for i, v in enumerate(xs)}
    cols, base = colors(rows), base_colors(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if dict(r["group"][1]).get(flag) in pos and _finite(r[f"{metric}_mean"]):
            lines.setdefault(_others(r, flag), []).append(r)
    for pts in lines.values():
        pts.sort(key=lambda r: dict(r["group"][1])[flag])
        px = [pos[dict(r["group"][1])[flag]] for r in pts]
        lo, hi = _spread(pts, metric)
        mid = [r[f"{metric}_mean"] for r in pts]
        # A variant with one line here keeps its own colour; several (one per other axis value) take its shades.
        many = sum(key[0] == pts[0]["variant"] for key in lines) > 1
        c = cols[pts[len(pts) // 2]["group"]] if many else base[pts[0]["variant"]][0]
        ax.errorbar(
            px,
            mid,
            yerr=[np.subtract(mid, lo), np.subtract(hi, mid)],
            color=c,
            marker="o",
            capsize=3,
            label=_line_label(pts[0], flag, short),
        )
    for r in rows:
        if flag not in dict(r["group"][1]) and _finite(r[f"{metric}_mean"]) and not _swept_elsewhere(r, lines, flag):
            (lo,), (hi,) = _spread([r], metric)
            c = cols[r["group"]]
            ax.axhline(r[f"{metric}_mean"], color=c, ls="--", label=r["optimizer"])
            ax.axhspan(lo, hi, color=c, alpha=0.12, lw=0)
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    spread = "min–max" if metric == "final_acc1" else "± std"
    ax.set(
        xlabel=xlabel,
        ylabel=f"{'final' if metric == 'final_acc1' else 'best'} test acc@1 (%)",
        title=f"{title} (mean, {spread} over seeds)",
    )
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    _save(fig, path)
    return bool(lines)


def _spread(rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """min–max over seeds for the final accuracy (as rho.png promises), mean ± std otherwise."""
    lo, hi = [], []
    for r in rows:
        mean, std = r[f"{metric}_mean"], r[f"{metric}_std"]
        if metric == "final_acc1" and r.get("final_acc1_min") is not None:
            lo.append(r["final_acc1_min"])
            hi.append(r["final_acc1_max"])
        else:
            lo.append(mean - (std if _finite(std) else 0.0))
            hi.append(mean + (std if _finite(std) else 0.0))
    return lo, hi


def _swept_elsewhere(row: dict, lines: dict, flag: str) -> bool:
    # A variant that sets the flag itself (a row with no value of the axis) is a reference only if no line is its own.
    return any(key[0] == row["variant"] for key in lines)


def plot_masks(path: Path, rows: list[dict], records: list[dict]) -> bool:
    """Per parameter tensor, the live fraction of the final mask: one bar per row of the table (mean over seeds)."""
    plt = _plt()
    cols = colors(rows)
    layers: list[str] = []
    sets = []
    for row in rows:
        recs = [r for r in records if r["masks"] and r["group"] == row["group"]]
        per_layer: dict[str, list[float]] = {}
        for r in recs:
            for m in r["masks"]:
                if isinstance(m, dict) and _finite(m.get("density")):
                    name = str(m.get("name"))
                    if name not in layers:
                        layers.append(name)
                    per_layer.setdefault(name, []).append(float(m["density"]))
        if per_layer:
            sets.append((row, per_layer, len(recs)))
    if not sets:
        return False
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(min(18, max(7, 0.18 * len(layers) * (1 + 0.5 * len(sets)) + 3)), 4.5))
    x = np.arange(len(layers))
    for i, (row, per_layer, n) in enumerate(sets):
        ys = [np.mean(per_layer[name]) if name in per_layer else np.nan for name in layers]
        c = cols[row["group"]]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width=width, color=c, label=f"{row['optimizer']} (n={n})")
        if row.get("sparsity") is not None:
            ax.axhline(1 - row["sparsity"], color=c, ls=":", lw=1)
    step = max(1, math.ceil(len(layers) / 60))
    ax.set_xticks(x[::step], layers[::step], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set(
        ylabel="live fraction (perturbed)",
        ylim=(0, 1.02),
        title="Final SSAM masks per parameter tensor (dotted: 1 − sparsity)",
    )
    ax.grid(alpha=0.3, axis="y")
    # Outside the axes: every bar may reach 1.0, so no corner inside is free.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    _save(fig, path)
    return True

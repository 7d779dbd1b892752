"""Figures for the analysis commands.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of pyplot, so that
importing this module neither needs a display nor switches the backend of a notebook that imports it.
Run names can be a hundred characters long (they encode a run's settings): titles and legends show them
shortened in the middle, where runs of one sweep differ least.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["file_slug", "plot_esd", "plot_landscape_1d", "plot_landscape_2d", "short_label"]

LABEL_WIDTH = 40  # characters of a run name shown in a title or legend
SLUG_WIDTH = 24  # characters of a run name in a file name


def short_label(name: str, width: int = LABEL_WIDTH) -> str:
    """``name`` itself when it fits in ``width`` characters, else its start and end around an ellipsis."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def file_slug(name: str, width: int = SLUG_WIDTH) -> str:
    """A short file-name-safe form of a run name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"
    return slug[:width].rstrip("_.-") or "run"


def _figure(**kw) -> Figure:
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    # Through a temporary name, so that an interrupted run never leaves a half-written image behind.
    path = os.fspath(path)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_esd(
    grid: Sequence[float],
    density: Sequence[float],
    path: str | os.PathLike,
    eigenvalues: Sequence[float] | None = None,
    title: str | None = None,
    subtitle: str | None = None,
) -> None:
    """Spectral density on a log y-axis (the bulk near zero and the outliers both stay visible), with the
    top eigenvalues marked as dashed vertical lines.  ``subtitle`` (e.g. the run name) is shortened."""
    t = np.asarray(grid, dtype=float)
    d = np.asarray(density, dtype=float)
    floor = max(float(d.max()) * 1e-10, 1e-300) if d.size and d.max() > 0 else 1e-300
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.semilogy(t, np.maximum(d, floor), color="tab:blue", lw=1.2, label="density (SLQ)")
    for i, lam in enumerate(eigenvalues or []):
        ax.axvline(lam, color="tab:red", ls="--", lw=0.8, label="top eigenvalues" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_ylim(bottom=floor)
    ax.set_title(title or "Hessian eigenvalue density")
    if subtitle:
        ax.text(
            0.5,
            1.0,
            short_label(subtitle, 60),
            transform=ax.transAxes,
            ha="center",
            va="bottom",
            fontsize="x-small",
            color="0.35",
        )
        ax.title.set_y(1.05)
    ax.legend(loc="upper right", fontsize="small")
    _save(fig, path)


def plot_landscape_1d(
    xs: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    loss_path: str | os.PathLike,
    acc_path: str | os.PathLike,
    xlabel: str = "step along direction",
    title: str | None = None,
) -> None:
    """One loss figure and one accuracy figure, each with a curve per run (``curves[name] = {"loss", "acc"}``).
    Missing points (NaN) leave gaps.  The legend sits to the right of the axes, so it covers no curve."""
    x = np.asarray(xs, dtype=float)
    for key, path, ylabel in (("loss", loss_path, "loss"), ("acc", acc_path, "accuracy (%)")):
        fig = _figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for name, c in curves.items():
            ax.plot(x, np.asarray(c[key], dtype=float), marker=".", ms=3, lw=1.2, label=short_label(name))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(short_label(title, 60), fontsize="medium")
        if curves:
            ax.legend(
                fontsize="small",
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0,
                ncol=1 if len(curves) <= 15 else 2,
            )
        _save(fig, path)


def plot_landscape_2d(
    xs: Sequence[float],
    ys: Sequence[float],
    loss: np.ndarray,
    contour_path: str | os.PathLike,
    surface_path: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "direction 1",
    ylabel: str = "direction 2",
) -> None:
    """Contour and 3-D surface of ``loss[i, j]`` at ``(xs[i], ys[j])``.

    Contour levels are log-spaced when the loss is positive: the basin around a minimum spans orders of
    magnitude less than the rim, and linear levels would put every line on the rim.  At most five ticks per
    axis: with more, the labels of a narrow figure run into each other.
    """
    X, Y = np.meshgrid(np.asarray(xs, float), np.asarray(ys, float), indexing="ij")
    Z = np.ma.masked_invalid(np.asarray(loss, dtype=float))
    fig = _figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    if Z.count() >= 4:
        lo, hi = float(Z.min()), float(Z.max())
        if lo > 0 and hi > lo:
            levels = np.geomspace(lo, hi, 30)
        elif hi > lo:
            levels = np.linspace(lo, hi, 30)
        else:
            levels = None
        cs = ax.contour(X, Y, Z, levels=levels, cmap="viridis", linewidths=0.8)
        fig.colorbar(cs, ax=ax, label="loss", format="%.3g")
    ax.plot([0], [0], "r+", ms=8)
    ax.set_xlabel(short_label(xlabel))
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.set_title(short_label(title) if title else "loss contour", fontsize="medium")
    _save(fig, contour_path)

    fig = _figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, np.asarray(loss, dtype=float), cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel(short_label(xlabel, 24))
    ax.set_ylabel(ylabel)
    ax.set_zlabel("loss")
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_title(short_label(title) if title else "loss surface", fontsize="medium")
    _save(fig, surface_path)

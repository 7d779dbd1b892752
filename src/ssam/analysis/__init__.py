"""Sharpness analysis of trained models: Hessian spectrum, loss landscapes, sharpness measures.

Every function takes a model, a loss function returning the batch mean, and a list of
``(inputs, targets)`` batches, so it works the same from a notebook as from ``ssam hessian`` /
``ssam landscape`` / ``ssam sharpness``.  Plotting lives in :mod:`ssam.analysis.plots` (not imported
here, so that importing the analysis does not pull in matplotlib).

The Hessian side: :mod:`.operator` (the product ``H v`` and its graph cache), :mod:`.convolution`
(convolutions differentiated twice with the first-order kernels), :mod:`.eigen` (Lanczos, power
iteration), :mod:`.trace` (Hutchinson), :mod:`.density` (SLQ), :mod:`.per_layer`.  The commands live in
:mod:`.commands`; timing them against PyHessian is a benchmark, :mod:`ssam.bench.hessian`.
"""

from .convolution import first_order_kernels
from .data import subset_batches
from .hessian import (
    HessianOperator,
    analysis_mode,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    per_layer,
    prepare_batches,
    resolve_params,
    select_params,
)
from .landscape import evaluate, evaluate_grid, interpolation_direction, random_direction
from .sharpness import TABLE_COLUMNS, loss_increase, markdown_table, summarize_run

__all__ = [
    "subset_batches",
    "HessianOperator",
    "TABLE_COLUMNS",
    "analysis_mode",
    "evaluate",
    "evaluate_grid",
    "first_order_kernels",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolation_direction",
    "loss_increase",
    "markdown_table",
    "per_layer",
    "prepare_batches",
    "random_direction",
    "resolve_params",
    "select_params",
    "summarize_run",
]

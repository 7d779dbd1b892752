"""Curvature of the training loss, gathered in one import: the operator (:mod:`.operator`), the top
eigenvalues (:mod:`.eigen`), the trace (:mod:`.trace`), the density (:mod:`.density`) and the per-block
table (:mod:`.per_layer`).  ``from ssam.analysis.hessian import ...`` keeps working for all of them."""

from .density import hessian_density
from .eigen import hessian_eigenvalues
from .operator import HessianOperator, analysis_mode, prepare_batches
from .params import resolve_params, select_params
from .per_layer import per_layer
from .trace import hessian_trace

__all__ = [
    "HessianOperator",
    "analysis_mode",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "per_layer",
    "prepare_batches",
    "resolve_params",
    "select_params",
]

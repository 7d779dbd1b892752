"""Deprecated module name, kept for one release: the sparse base class lives in ``ssam.optim.sparse``
(``SparseSAM``; ``_SparseSAM`` is its old name and warns)."""

from __future__ import annotations

import warnings
from typing import Any

from .sparse import STRATEGIES, SparseSAM

__all__ = ["STRATEGIES", "SparseSAM"]


def __getattr__(name: str) -> Any:
    if name == "_SparseSAM":
        warnings.warn(
            "ssam.optim.ssam._SparseSAM is now ssam.optim.sparse.SparseSAM (also ssam.SparseSAM); the old name "
            "goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return SparseSAM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Optional dependencies (the extras of ``pip install 'sparse-sam[...]'``): imported where used, with one line that
says how to install them when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ImportError with the one-line install hint for ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; install it with: pip install 'sparse-sam[{extra}]' "
            f"(from a clone: pip install -e '.[{extra}]')"
        ) from e

"""Drop-in support for the frameworks people train with: Lightning, the Hugging Face Trainer, timm and FSDP.

Each submodule imports its framework, which is an optional extra (``pip install 'sparse-sam[lightning]'`` ...);
importing ``ssam.integrations`` itself needs none of them.
"""

from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str):
    """Import ``module`` or raise ImportError with the one-line install hint for ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; install it with: pip install 'sparse-sam[{extra}]' "
            f"(from a clone: pip install -e '.[{extra}]')"
        ) from e

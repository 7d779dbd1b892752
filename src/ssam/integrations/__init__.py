"""Drop-in support for the frameworks people train with: Lightning, the Hugging Face Trainer, timm and FSDP.

Each submodule imports its framework, which is an optional extra (``pip install 'sparse-sam[lightning]'`` ...);
importing ``ssam.integrations`` itself needs none of them.
"""

from __future__ import annotations

from ..extras import require

__all__ = ["require"]

"""timm: its models for ``ssam train --model timm:NAME`` and for library users. The builder lives with the other
models (``ssam.models.timm``); this module keeps the name it was first published under.

The optimizer side needs nothing timm-specific: ``ssam.create_optimizer(model, "ssamf-sgd", ...,
no_decay_bias_norm=True)`` applies timm's weight-decay convention, including the names a model's
``no_weight_decay()`` returns (a ViT's position embedding and class token).
"""

from __future__ import annotations

from ..models.timm import build_timm_model

__all__ = ["build_timm_model"]

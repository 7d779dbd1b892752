"""timm models for ``ssam train --model timm:NAME`` and for library users: ``build_timm_model(name, ...)``
(also importable as ``ssam.integrations.timm.build_timm_model``).

Any architecture timm knows, built with random weights (``pretrained=False``: nothing is downloaded). The
optimizer side needs nothing timm-specific: ``ssam.create_optimizer(model, "ssamf-sgd", ...,
no_decay_bias_norm=True)`` applies timm's weight-decay convention, including the names a model's
``no_weight_decay()`` returns (a ViT's position embedding and class token).

SSAM-F's Fisher: the fast ``hooks`` method covers Linear (any number of leading dims), Conv2d and BatchNorm2d.
timm ResNets are covered; ViTs hold LayerNorm weights, a position embedding and a class token, so
``fisher_method="auto"`` measures them with the per-example loop (same values, slower) and ``"hooks"`` refuses
them with a ValueError naming the first layer it cannot take.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from torch import nn

from ..extras import require

__all__ = ["build_timm_model"]


def build_timm_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``; ``image_size`` reaches the
    architectures that take one (ViTs: ``img_size``) and is ignored by those that adapt to any size (CNNs).
    ``kwargs`` go to timm (``depth=2``, ``embed_dim=64`` ...)."""
    timm = require("timm", "timm")
    if not timm.is_model(name):
        close = get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model: timm has no architecture {name!r}{hint}; allowed: a name from timm.list_models()")
    kw = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if image_size is not None and "img_size" not in kw:
        try:
            return timm.create_model(name, img_size=image_size, **kw)
        except TypeError:  # a CNN: no img_size argument, any input size works
            pass
    return timm.create_model(name, **kw)

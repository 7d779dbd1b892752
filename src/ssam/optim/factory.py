"""Optimizers by name: the one home of the ``--opt`` forms (``sgd``, ``adamw``, ``sam-sgd``, ``ssamf-adamw`` ...).

``create_optimizer(model, "ssamf-sgd", lr=..., rho=..., sparsity=...)`` is what the trainer, the benchmark and the
framework integrations build their optimizers with. Keyword arguments that the wrapper does not take go to the base
optimizer (``momentum``, ``betas``, ``eps`` ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import registry
from .sam import SAM

__all__ = [
    "BASE_OPTIMIZERS",
    "WRAPPERS",
    "OPT_NAMES",
    "parse_opt",
    "canonical_opt",
    "create_optimizer",
    "param_groups",
]

# Views of the registry, for the code that wants classes by name.
BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {n: b.cls for n, b in registry.BASES.items()}
WRAPPERS: dict[str, type[SAM]] = {n: f.cls for n, f in registry.WRAPPERS.items() if f.cls is not None}
OPT_NAMES: tuple[str, ...] = (
    *BASE_OPTIMIZERS,
    *(f"{w}-{b}" for w in WRAPPERS for b in BASE_OPTIMIZERS),
    *WRAPPERS,  # bare: over the entry point's default base
)


def parse_opt(opt: str, default_base: str = registry.DEFAULT_BASE) -> tuple[str | None, str]:
    """``'ssamf-sgd'`` -> ``('ssamf', 'sgd')``; ``'adamw'`` -> ``(None, 'adamw')``; a bare wrapper ``'ssamf'`` ->
    ``('ssamf', default_base)``; anything else a ``ValueError``."""
    parts = opt.lower().split("-") if isinstance(opt, str) else []
    if len(parts) == 1 and parts[0] in BASE_OPTIMIZERS:
        return None, parts[0]
    if len(parts) == 1 and parts[0] in WRAPPERS:
        return parts[0], default_base
    if len(parts) == 2 and parts[0] in WRAPPERS and parts[1] in BASE_OPTIMIZERS:
        return parts[0], parts[1]
    from difflib import get_close_matches

    close = get_close_matches(str(opt).lower(), OPT_NAMES, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"opt {opt!r} is not an optimizer{hint}; choose from: {', '.join(OPT_NAMES)}")


def canonical_opt(opt: str, default_base: str = registry.DEFAULT_BASE) -> str:
    """The one spelling of an optimizer name: ``'SSAMF'`` -> ``'ssamf-sgd'``, ``'sgd'`` -> ``'sgd'``."""
    wrapper, base = parse_opt(opt, default_base)
    return base if wrapper is None else f"{wrapper}-{base}"


def _no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    # timm's rule: biases, the 1-D weights of normalisation layers, and what the model's own no_weight_decay()
    # names (a ViT's position embedding and class token) take no weight decay.
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def _model_no_decay_names(model: nn.Module) -> set[str]:
    """Names a timm-style model asks to keep out of weight decay (``model.no_weight_decay()``), if it asks."""
    ask = getattr(model, "no_weight_decay", None)
    if not callable(ask):
        return set()
    names = set(ask())
    params = dict(model.named_parameters())
    # timm lists some names as prefixes ("pos_embed" for "pos_embed" itself; "blocks.0.ls1" for its gamma).
    return {n for n in params if n in names or any(n.startswith(k + ".") for k in names)}


def param_groups(model: nn.Module, weight_decay: float, no_decay_bias_norm: bool = False) -> list[dict]:
    """Named trainable parameters as param groups; with ``no_decay_bias_norm`` biases, norms and the names the
    model's ``no_weight_decay()`` returns (timm models) get decay 0."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: it has no parameter with requires_grad=True; nothing to optimize")
    if not no_decay_bias_norm:
        return [{"params": named, "weight_decay": weight_decay}]
    skip = _model_no_decay_names(model)
    decay = [(n, p) for n, p in named if not _no_decay(n, p, skip)]
    rest = [(n, p) for n, p in named if _no_decay(n, p, skip)]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
        if g["params"]
    ]


def create_optimizer(
    model: nn.Module, opt: str, lr: float, weight_decay: float = 0.0, no_decay_bias_norm: bool = False, **kwargs: Any
) -> torch.optim.Optimizer:
    """Build the optimizer named ``opt`` (any ``--opt`` form) over ``model``'s trainable parameters.

    ``kwargs`` holds the wrapper's settings (``rho``, ``sparsity``, ``num_samples`` ...) and the base optimizer's
    (``momentum``, ``nesterov``, ``betas``, ``eps`` ...); a plain base optimizer takes only its own.
    """
    wrapper, base = parse_opt(opt)
    groups = param_groups(model, weight_decay, no_decay_bias_norm)
    if wrapper is None:
        plain = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        try:
            base_class: Any = BASE_OPTIMIZERS[base]  # Optimizer itself takes no lr; its subclasses do
            return base_class(plain, lr=lr, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"{opt}: {e}; a plain {base} takes no SAM settings (use sam-{base}, ssamf-{base} ...)"
            ) from None
    # A keyword neither the wrapper nor the base takes is the wrapper's ValueError, naming both lists.
    return WRAPPERS[wrapper](groups, BASE_OPTIMIZERS[base], lr=lr, **kwargs)

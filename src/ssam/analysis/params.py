"""Which parameters an analysis looks at: the ``params`` argument of every Hessian function, normalised."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["param_groups", "resolve_params", "select_params"]


def select_params(model: nn.Module, regex: str) -> list[nn.Parameter]:
    """The parameters whose qualified names match ``regex`` (``re.search``), in ``named_parameters`` order."""
    return [p for _, p in _select_named(model, regex)]


def _select_named(model: nn.Module, regex: str) -> list[tuple[str, nn.Parameter]]:
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise UsageError(f"params: {regex!r} is not a valid regular expression ({e})") from None
    named = [(n, p) for n, p in model.named_parameters() if pattern.search(n)]
    if not named:
        names = [n for n, _ in model.named_parameters()]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UsageError(f"params: {regex!r} matches no parameter name; names look like: {shown}")
    return named


def resolve_params(model: nn.Module, params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Normalise the ``params`` argument of the analysis functions to ``(name, parameter)`` pairs.

    ``None``: every parameter with ``requires_grad`` (what training moves).  A string: a regex on names.
    Otherwise an iterable of parameters or ``(name, parameter)`` pairs.
    """
    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UsageError("params: the model has no trainable parameters; pass params= to choose some")
        return named
    if isinstance(params, str):
        return _select_named(model, params)
    names = {id(p): n for n, p in model.named_parameters()}
    out, seen = [], set()
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            name, p = item
        else:
            p = item
            name = names.get(id(p), f"param{i}")
        if not torch.is_tensor(p):
            raise UsageError(f"params[{i}]: got a {type(p).__name__}; allowed: a tensor or a (name, tensor) pair")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise UsageError("params: got an empty collection; allowed: None, a regex or some parameters")
    return out


def param_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], by: str) -> list[tuple[str, list]]:
    """``named`` split into blocks: one per parameter tensor (``by="param"``) or per module's own parameters."""
    if by == "param":
        return [(n, [p]) for n, p in named]
    if by != "module":
        raise UsageError(f"by: got {by!r}; allowed: 'param' or 'module'")
    wanted = {id(p) for _, p in named}
    groups = []
    for mname, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if own:
            groups.append((mname or "(root)", own))
    return groups

"""How the SAM-family constructors read their arguments: parameters (plain, named or in group dicts) and the
keywords that go on to the base optimizer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["strip_names", "plain_group", "check_base_kwargs", "build_base"]

RENAMED = {"eps": "perturb_eps", "foreach": "perturb_foreach"}  # SAM's own names before 0.2


def strip_names(items: Iterable, names: dict[int, str]) -> list[Tensor]:
    """Parameters or (name, parameter) pairs -> parameters; the names are recorded in ``names`` by id."""
    out = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names[id(item[1])] = item[0]
            item = item[1]
        if not isinstance(item, Tensor):
            raise ValueError(f"params: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
        out.append(item)
    return out


def plain_group(group: dict, names: dict[int, str]) -> dict:
    """A param-group dict with its (named) parameters as a list of tensors (a copy: the caller's stays)."""
    group = dict(group)
    ps = group["params"]
    group["params"] = strip_names([ps] if isinstance(ps, Tensor) else ps, names)
    return group


def _keywords(fn: Callable, skip: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The keyword names ``fn`` accepts, and whether it takes ``**kwargs`` too (or cannot be read: anything goes)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [], True
    names = [
        n
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "params", *skip)
    ]
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def check_base_kwargs(wrapper: type, root: type, base: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    """A keyword the base class does not take: one line naming it, what the base takes and what ``wrapper`` and
    its classes up to ``root`` take, instead of a TypeError in the base's __init__."""
    accepted, takes_any = _keywords(base.__init__)
    unknown = [k for k in kwargs if k not in accepted]
    if takes_any or not unknown:
        return
    key = unknown[0]
    own = [
        k for cls in wrapper.__mro__ if issubclass(cls, root) for k in _keywords(cls.__init__, ("base_optimizer",))[0]
    ]
    name = wrapper.__name__
    hint = f" ({name}'s own is {RENAMED[key]})" if key in RENAMED else ""
    raise ValueError(
        f"{key}: got {kwargs[key]!r}, a keyword neither {base.__name__} nor {name} takes{hint}; "
        f"allowed: {base.__name__}'s {', '.join(accepted)}; {name}'s {', '.join(dict.fromkeys(own))}"
    )


def build_base(
    wrapper: type, root: type, base: Any, groups: list[dict], kwargs: dict[str, Any], settings: Iterable[str]
) -> torch.optim.Optimizer:
    """The base optimizer: ``base`` itself (an instance over exactly the parameters of ``groups``) or the class
    ``base`` built over ``groups`` with ``kwargs``. Its settings must not be named like the wrapper's
    (``settings``): one group dict holds both sets, and a name in both would mean two things."""
    name = wrapper.__name__
    if isinstance(base, torch.optim.Optimizer):
        if kwargs:
            raise ValueError(
                f"base_optimizer: got an optimizer instance and keyword arguments {sorted(kwargs)}; pass the "
                "arguments when building the instance, or pass the optimizer class"
            )
        ours = {id(p) for g in groups for p in g["params"]}
        theirs = {id(p) for g in base.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError(
                f"base_optimizer: the instance holds {len(theirs)} parameters, {len(theirs & ours)} of them shared "
                f"with the {len(ours)} given to {name}; allowed: an optimizer over exactly the same parameters (or "
                "pass the optimizer class)"
            )
        built = base
    elif isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        check_base_kwargs(wrapper, root, base, kwargs)
        built = base(groups, **kwargs)
    else:
        raise ValueError(f"base_optimizer: got {base!r}; allowed: a torch.optim.Optimizer subclass or instance")
    shared = [k for k in settings if k in built.defaults]
    if shared:
        raise ValueError(
            f"base_optimizer: {type(built).__name__} has its own {shared[0]!r} setting; allowed: a base optimizer "
            f"whose settings are not named like {name}'s"
        )
    return built

"""The settings of the SAM-family optimizers, kept as torch.optim keeps hyper-parameters.

Every setting (``rho``, ``perturb_eps``, ``sparsity``, ``update_freq`` ...) is in ``opt.defaults`` and in every
param group, so that ``state_dict()["param_groups"]`` records how the optimizer was set up. Two kinds:

- **per group** (``SAM.per_group_settings``: ``rho``, ``adaptive``, ``perturb_eps``): a group may set its own value;
  a loaded state_dict's values win, as torch's do for ``lr``.
- **of the whole optimizer** (every other one: one mask, one budget, one norm, one way to call ``step``): the same
  value in every group. A group given another value is a ValueError; ``load_state_dict`` keeps this optimizer's
  values (an ``ssam train --resume`` with more ``--epochs`` keeps its new SSAM-D schedule).

``opt.<name>`` reads a setting. Those that the masks or the generator were built from (``sparsity``,
``granularity``, ``cost_aware``, SSAM-D's ``seed`` and schedule) are read-only; the others are checked and written
to ``defaults`` and every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Setting",
    "stamp_group",
    "check_rho",
    "check_perturb_eps",
    "check_bool",
    "check_choice",
    "check_count",
    "check_foreach",
]


class Setting:
    """``opt.<name>``: the value in ``opt.defaults``. ``check`` validates and normalises a new value (raising a
    one-line ValueError); without it the setting is fixed when the optimizer is built."""

    def __init__(self, check: Callable[[Any], Any] | None = None, doc: str = "") -> None:
        self.check = check
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else obj.defaults[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        if self.check is None:
            raise AttributeError(
                f"{self.name}: fixed when {type(obj).__name__} is built (its masks depend on it); "
                f"build a new {type(obj).__name__} to change it"
            )
        obj._set_setting(self.name, self.check(value))


def stamp_group(
    group: dict, index: int, opt: Any, names: Sequence[str], checks: dict[str, Callable], loaded: bool = False
) -> None:
    """Write every setting in ``names`` into ``group`` (the ``index``-th of ``opt``). A per-group one
    (``opt.per_group_settings``, checked by ``checks``) keeps the group's value or takes the default; a
    whole-optimizer one takes ``opt``'s value, and another value in the group is refused, unless the group was
    ``loaded`` from a state_dict: then it is replaced (see the module docstring)."""
    for k in names:
        if k in opt.per_group_settings:
            try:
                group[k] = checks[k](group.get(k, opt.defaults[k]))
            except ValueError as e:
                raise ValueError(f"param group {index}: {e}") from None
            continue
        if not loaded and k in group and group[k] != opt.defaults[k]:
            raise ValueError(
                f"{k}: got {group[k]!r} in param group {index}; allowed: {opt.defaults[k]!r}, the value of the "
                f"whole {type(opt).__name__} (a setting of the optimizer, not of a group)"
            )
        group[k] = opt.defaults[k]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rho(v: Any) -> float:
    if not (_number(v) and math.isfinite(v) and v >= 0):
        raise ValueError(f"rho: got {v!r}; allowed: a finite number >= 0")
    return float(v)


def check_perturb_eps(v: Any) -> float:
    if not (_number(v) and math.isfinite(v) and v >= 0):
        raise ValueError(f"perturb_eps: got {v!r}; allowed: a finite number >= 0")
    return float(v)


def check_foreach(v: Any) -> bool | None:
    if not (v is None or isinstance(v, bool)):
        raise ValueError(f"perturb_foreach: got {v!r}; allowed: None, True, False")
    return v


def check_bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name}: got {v!r}; allowed: True or False")
        return v

    return check


def check_choice(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"{name}: got {v!r}; allowed: {', '.join(map(repr, choices))}")
        return str(v)

    return check


def check_count(name: str, what: str) -> Callable[[Any], int]:
    """An integer >= 1 (``what`` says what it counts)."""

    def check(v: Any) -> int:
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name}: got {v!r}; allowed: an integer >= 1 ({what})")
        return v

    return check

"""How the SAM-family constructors read their arguments: parameters (plain, named or in group dicts, refused as
torch refuses them), the keywords that go on to the base optimizer and the base optimizer built from them; and the
param groups they make (``ParamGroups``: the settings in every group, ``add_param_group``, the names)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor

from .settings import check_bool, check_perturb_eps, check_rho, stamp_group

__all__ = [
    "check_params",
    "strip_names",
    "plain_group",
    "names_by_id",
    "check_adaptive",
    "check_base_kwargs",
    "build_base",
    "announce_once",
    "ParamGroups",
]

RENAMED = {"eps": "perturb_eps", "foreach": "perturb_foreach"}  # SAM's own names before 0.2


def check_params(params: Any) -> list:
    """The ``params`` argument as a list, refused as torch refuses it: a lone tensor is a TypeError (iterating it
    would give its rows), an empty list a ValueError."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    params = list(params)
    if len(params) == 0:
        raise ValueError("params: got an empty parameter list; pass the model's parameters")
    return params


def strip_names(items: Iterable) -> tuple[list[Tensor], list[str] | None]:
    """Parameters or (name, parameter) pairs -> the parameters and their names (None when none is named); some
    named and some not is a ValueError, as in torch."""
    out, names = [], []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names.append(item[0])
            item = item[1]
        if not isinstance(item, Tensor):
            raise ValueError(f"params: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
        out.append(item)
    if names and len(names) != len(out):
        raise ValueError(
            f"params: {len(names)} of {len(out)} parameters are named; allowed: all named "
            "(model.named_parameters()) or none"
        )
    return out, names or None


def plain_group(group: dict) -> dict:
    """A param-group dict with its parameters as a list of tensors and, when they were named, their names under
    ``"param_names"``, as torch >= 2.5 keeps them (a copy: the caller's dict stays)."""
    group = dict(group)
    ps = group["params"]
    if isinstance(ps, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors in sets "
            "will change between runs. Please use a list instead."
        )
    group["params"], names = strip_names([ps] if isinstance(ps, Tensor) else ps)
    if names is not None:
        group["param_names"] = names
    return group


def names_by_id(groups: list[dict]) -> dict[int, str]:
    """Each named parameter's name, by id (the groups' ``"param_names"``)."""
    return {id(p): n for g in groups for p, n in zip(g["params"], g.get("param_names", ()))}


def check_adaptive(groups: list[dict]) -> None:
    """ASAM's setting is one for the whole optimizer (one norm over every parameter), and ASAM takes real
    parameters only: its scaling by |w| is written for real weights, and complex ones are not claimed."""
    values = [bool(g["adaptive"]) for g in groups]
    if len(set(values)) > 1:
        raise ValueError(
            f"adaptive: got True in param group {values.index(True)} and False in param group {values.index(False)}; "
            "allowed: one value for every group (ASAM takes one norm over all parameters)"
        )
    if not any(values):
        return
    i = 0
    for g in groups:
        names = g.get("param_names", ())
        for j, p in enumerate(g["params"]):
            if p.is_complex():
                name = names[j] if j < len(names) else f"param{i}"
                raise ValueError(
                    f"params: {name} is complex ({p.dtype}) and adaptive=True; allowed: real floating-point "
                    "parameters with ASAM (complex parameters are not supported by adaptive=True)"
                )
            i += 1


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


def _unannounced_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
    """``base.step`` as installed by ``announce_once``: the class's step with the base's own step hooks, without
    torch's global ones."""
    inner = type(self).step.__wrapped__  # type: ignore[attr-defined]
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
        for hook in list(self._optimizer_step_pre_hooks.values()):
            changed = hook(self, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        out = inner(self, *args, **kwargs)
        self._optimizer_step_code()
        for post in list(self._optimizer_step_post_hooks.values()):
            post(self, args, kwargs)
    return out


def announce_once(base: torch.optim.Optimizer) -> None:
    """Make the base optimizer's step, which the wrapper takes inside its own, run without torch's global step
    hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook``): the wrapper's step
    announced this step already, and a hook counting steps must count one. Hooks registered on the base itself
    still run. An instance that already has a ``step`` of its own (an lr scheduler attached to it before the
    wrapper was built) is left as it is."""
    step = getattr(type(base), "step", None)
    if "step" in vars(base) or not getattr(step, "hooked", False) or not hasattr(step, "__wrapped__"):
        return
    base.step = types.MethodType(_unannounced_step, base)  # type: ignore[method-assign]


_GROUP_CHECKS = {"rho": check_rho, "adaptive": check_bool("adaptive"), "perturb_eps": check_perturb_eps}


class ParamGroups:
    """The param groups of a SAM-family optimizer: a base of ``SAM`` (before ``torch.optim.Optimizer``). Its
    settings stamped into every group (``ssam.optim.settings``), groups added to the wrapper and the base optimizer
    at once, the parameters' names. It reads of its class: ``defaults``, ``param_groups`` (shared with
    ``base_optimizer``), ``per_group_settings``, ``_settings`` (the settings' names), ``_param_names`` and
    ``_set_layout()``."""

    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    per_group_settings: tuple[str, ...]
    base_optimizer: torch.optim.Optimizer
    _settings: list[str]
    _param_names: dict[int, str]
    _set_layout: Callable[[], None]

    def _add_settings(self, **settings: Any) -> None:
        """A subclass's settings (checked by it), into ``defaults`` and every group."""
        for k, v in settings.items():
            self.defaults[k] = v
            self._settings.append(k)
        for i, g in enumerate(self.param_groups):
            self._stamp_group(g, i)

    def _stamp_group(self, group: dict, index: int, loaded: bool = False) -> None:
        stamp_group(group, index, self, self._settings, _GROUP_CHECKS, loaded)

    def _set_setting(self, name: str, value: Any) -> None:
        self.defaults[name] = value
        for g in self.param_groups:
            g[name] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapper and the base optimizer at once (named parameters accepted)."""
        group = plain_group(param_group)
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__, before the base exists
            torch.optim.Optimizer.add_param_group(cast(Any, self), group)
            return
        self._stamp_group(group, len(self.param_groups))  # checked before the base takes it
        check_adaptive([*self.param_groups, group])
        self.base_optimizer.add_param_group(group)  # appends to the shared list, with the base's defaults
        self._param_names = names_by_id(self.param_groups)
        self._set_layout()

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def param_name(self, p: Tensor, index: int) -> str:
        """p's name when named parameters were given, else ``param{index}`` (its position in the groups)."""
        return self._param_names.get(id(p), f"param{index}")

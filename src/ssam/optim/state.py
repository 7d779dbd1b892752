"""The state of a SAM-family optimizer as torch sees it: ``opt.state`` and the ``state_dict`` layouts.

``opt.state[p]`` shows, for one parameter, the base optimizer's state (``momentum_buffer``, ``exp_avg`` ...) and
ssam's own (``mask``; ``w_saved``, the copy of w held between the passes) under their own keys, and writes each key
back where it lives: the base optimizer keeps its dicts, so its lazy initialisation (``len(state) == 0`` in Adam)
never sees ssam's keys. ``opt.state`` follows torch's rule that an optimizer lists no state before its first step
(``torch.distributed.checkpoint`` relies on it: it initialises an optimizer whose ``state`` is empty by stepping it
at zero gradients and zero learning rate): until the first step or ``load_state_dict`` it lists the parameters the
base optimizer holds state for (none, as a rule), from then on every parameter with any state. Any parameter can be
looked up at any time: ``opt.state[p]["mask"]`` is there as soon as the mask is. A key that is not a tensor
(``opt.state["k"] = 1``) is kept apart, as torch's ``defaultdict`` keeps it, and saved under its key.

``state_dict()`` and ``load_state_dict()`` run the hooks registered on the optimizer as torch's do; a copy
(``copy.deepcopy``, pickle) holds everything the optimizer does (base optimizer, masks, counters, generators), less
those hooks, as torch's copies do.

``state_dict()`` is torch's layout (format 2)::

    {"state": {0: {"momentum_buffer": T, "mask": M, "ssam": {"format": 2, "num_updates": 3, ...}},
               1: {"momentum_buffer": T, "mask": M}, ...},
     "param_groups": [{"lr": 0.1, "momentum": 0.9, "rho": 0.05, "sparsity": 0.5, ..., "params": [0, 1, ...]}]}

The optimizer's own counters (SSAM-D's generator, the mask updates so far) and the format version sit under
``"ssam"`` in the entry of one parameter (the first that requires a gradient), as torch's LBFGS keeps its counters
with its first parameter: a checkpoint tool that keeps only ``state`` and ``param_groups`` keeps them too.

Format 1 (ssam 0.1, inside the checkpoints of ``ssam train``, Lightning and the Hugging Face Trainer):
``{"state": {index: {"mask": M}}, "base_optimizer": <the base's state_dict>, "extra": {...}}``. ``read_state_dict``
reads both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

from torch import Tensor

from .arguments import names_by_id
from .ascent import PREVIOUS_KEY

# The optimizer is typed Any here: importing SAM (which imports this module) would make a cycle.
SAM = Any

__all__ = [
    "FORMAT",
    "STATE_KEY",
    "OWN_KEYS",
    "SAVED_DIRECTION_KEYS",
    "JointState",
    "StateEntry",
    "Layout",
    "pack",
    "read_state_dict",
    "param_keys",
    "TorchShapedState",
]

#: The state_dict layout this version writes (1: ssam 0.1's ``{"state", "base_optimizer", "extra"}``).
FORMAT = 2
#: Key, in one parameter's entry, of the optimizer's own counters and the format version.
STATE_KEY = "ssam"
#: ssam's per-parameter keys: ``mask``, ``looksam_gv`` (LookSAM's direction) and ``ascent_previous`` (the direction
#: of ``ascent='previous'``) are saved, ``w_saved`` (scratch between the passes) is not.
OWN_KEYS = ("mask", "w_saved", "looksam_gv", PREVIOUS_KEY)
#: The keys of OWN_KEYS a state dict carries beside the masks (the stored directions): ``_saved_own`` and
#: ``_load_own`` read this, so a new stored direction is one entry here.
SAVED_DIRECTION_KEYS = ("looksam_gv", PREVIOUS_KEY)
#: The keys of OWN_KEYS that ``opt.state[p][key] = value`` may write (a mask changes through the mask methods).
SETTABLE_KEYS = tuple(k for k in OWN_KEYS if k != "mask")
#: torch.optim.Optimizer's hook registries: a copy of an optimizer starts with them empty, as torch's does.
HOOK_REGISTRIES = tuple(
    f"_optimizer_{kind}_hooks"
    for kind in (
        "step_pre",
        "step_post",
        "state_dict_pre",
        "state_dict_post",
        "load_state_dict_pre",
        "load_state_dict_post",
    )
)


class StateEntry(MutableMapping):
    """One parameter's state: the base optimizer's keys, then ssam's; the anchor parameter's also ``"ssam"`` (the
    counters, as saved: writing it sets them). The keys are those ``state_dict()`` saves, plus ``w_saved``, so
    that torch.distributed.checkpoint's ``flatten_optimizer_state_dict`` finds every saved key here."""

    def __init__(self, opt: SAM, p: Tensor) -> None:
        self._opt, self._p = opt, p

    def _base(self) -> dict:
        return self._opt.base_optimizer.state.get(self._p, {})  # .get: reading must not create an entry

    def _own(self) -> dict:
        return self._opt._own.get(self._p, {})

    def _anchor(self) -> bool:
        return self._opt._anchor() is self._p

    def __getitem__(self, key: str) -> Any:
        own = self._own()
        if key in own:
            return own[key]
        if key == STATE_KEY and self._anchor():
            return {"format": FORMAT, **self._opt._extra_state()}
        if key in OWN_KEYS or key == STATE_KEY:
            raise KeyError(key)
        return self._base()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in OWN_KEYS or key == STATE_KEY:
            self._opt._set_own(self._p, key, value)
        else:
            self._opt.base_optimizer.state[self._p][key] = value

    def __delitem__(self, key: str) -> None:
        if key in OWN_KEYS or key == STATE_KEY:
            self._opt._set_own(self._p, key, None)
        else:
            del self._opt.base_optimizer.state[self._p][key]

    def __iter__(self) -> Iterator[str]:
        # a snapshot: callers (Lightning moving the state to a device) write keys back while iterating
        return iter([*self._base(), *self._own(), *([STATE_KEY] if self._anchor() else [])])

    def __len__(self) -> int:
        return len(self._base()) + len(self._own()) + self._anchor()

    def __repr__(self) -> str:
        return repr(dict(self))


class JointState(MutableMapping):
    """``opt.state`` of a SAM-family optimizer: parameter -> ``StateEntry`` (see the module docstring). A key that
    is not a tensor (``opt.state["k"] = 1``) holds its value as torch's ``defaultdict`` does (reading a missing one
    gives a new empty dict), apart from the parameters' state, and ``state_dict()`` saves it under its key."""

    def __init__(self, opt: SAM) -> None:
        self._opt = opt

    def __getitem__(self, p: Any) -> Any:
        if not isinstance(p, Tensor):
            return self._opt._other_state.setdefault(p, {})
        return StateEntry(self._opt, p)

    def get(self, p: Any, default: Any = None) -> Any:
        if not isinstance(p, Tensor):  # (no entry is created, as dict.get on torch's defaultdict)
            return self._opt._other_state.get(p, default)
        return super().get(p, default)

    def __setitem__(self, p: Any, entry: Any) -> None:
        if not isinstance(p, Tensor):
            self._opt._other_state[p] = entry
            return
        target = self[p]
        for key in [k for k in target if k not in entry]:
            del target[key]
        for key, value in entry.items():
            target[key] = value

    def __delitem__(self, p: Any) -> None:
        if not isinstance(p, Tensor):
            del self._opt._other_state[p]
            return
        del self._opt.base_optimizer.state[p]
        self._opt._set_own(p, "w_saved", None)

    def _keys(self) -> list[Any]:
        keys = list(self._opt.base_optimizer.state)
        if self._opt._stepped:
            seen = {id(p) for p in keys}
            keys += [p for p, own in self._opt._own.items() if own and id(p) not in seen]
        return keys + list(self._opt._other_state)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, p: object) -> bool:
        if not isinstance(p, Tensor):
            return p in self._opt._other_state
        return any(p is q for q in self._keys())

    def __repr__(self) -> str:
        return f"JointState(parameters: {len(self)})"


class Layout(NamedTuple):
    """A state_dict of any format, taken apart: ``groups`` (torch's param_groups, parameters as the dict names
    them: indices or, from torch.distributed.checkpoint, names), the base optimizer's ``state`` by those keys,
    ssam's per-parameter ``own`` state (masks) by those keys, ``extra``, the optimizer's own counters, and
    ``other``: the entries under keys the param groups do not list (``opt.state["k"]``), kept as they are, as torch
    keeps them."""

    groups: list[dict]
    base: dict[Any, dict]
    own: dict[Any, dict]
    extra: dict[str, Any]
    format: int
    other: Mapping[Any, Any] = {}


def read_state_dict(sd: Any, owner: str) -> Layout:
    """Take apart a state_dict of format 2 or 1; anything else is a one-line ValueError."""
    if isinstance(sd, Mapping) and "base_optimizer" in sd:
        return _format1(sd, owner)
    if not (isinstance(sd, Mapping) and isinstance(sd.get("state"), Mapping) and "param_groups" in sd):
        got = f"keys {sorted(map(str, sd))}" if isinstance(sd, Mapping) else f"a {type(sd).__name__}"
        raise ValueError(
            f"state_dict: got {got}; allowed: a state_dict from {owner}.state_dict() (torch's 'state' and "
            "'param_groups', or ssam 0.1's 'state', 'base_optimizer' and 'extra')"
        )
    base: dict[Any, dict] = {}
    own: dict[Any, dict] = {}
    extra: dict[str, Any] = {}
    listed = {k for g in sd["param_groups"] for k in g["params"]}
    other = {k: v for k, v in sd["state"].items() if k not in listed}
    for key, entry in sd["state"].items():
        if key in other:
            continue
        for name, value in entry.items():
            if name == STATE_KEY:
                extra = dict(value)
            elif name in OWN_KEYS:
                if name != "w_saved":  # (a checkpoint tool that rebuilds entries from opt.state may hand it back)
                    own.setdefault(key, {})[name] = value
            else:
                base.setdefault(key, {})[name] = value
    version = int(extra.pop("format", FORMAT))
    if version > FORMAT:
        raise ValueError(
            f"state_dict: format {version}; allowed: {FORMAT} or older (it was written by a newer ssam: upgrade)"
        )
    return Layout(list(sd["param_groups"]), base, own, extra, version, other)


def _format1(sd: Mapping, owner: str) -> Layout:
    """ssam 0.1: the base optimizer's state_dict whole, ssam's own state (masks) by index beside it."""
    inner = sd["base_optimizer"]
    if not (isinstance(inner, Mapping) and "state" in inner and "param_groups" in inner):
        raise ValueError(
            f"state_dict: 'base_optimizer' is not an optimizer state_dict; allowed: a state_dict from {owner}"
        )
    own = {
        int(k): {name: v for name, v in entry.items() if name == "mask"}
        for k, entry in sd.get("state", {}).items()
        if "mask" in entry
    }
    base = {k: dict(v) for k, v in inner["state"].items()}
    return Layout(list(inner["param_groups"]), base, own, dict(sd.get("extra", {})), 1)


def pack(
    base: dict, params: list[Tensor], saved_own: Callable[[Tensor], dict], anchor: Tensor, extra: dict, opt: SAM
) -> dict[str, Any]:
    """Format 2 from the base optimizer's state_dict ``base`` (indexed as ``params``), ssam's per-parameter state
    ``saved_own(p)`` and the counters ``extra``, which go to ``anchor``'s entry; ``opt.state``'s entries under
    keys that are not tensors are saved under those keys, as torch saves them."""
    state: dict[Any, dict] = {k: dict(v) for k, v in base["state"].items()}  # copies: the base's stay as they are
    for i, p in enumerate(params):
        own = saved_own(p)
        if not own:
            continue
        entry = state.setdefault(i, {})
        clash = [k for k in own if k in entry]
        if clash:
            raise RuntimeError(
                f"{type(opt.base_optimizer).__name__} keeps state named {clash[0]!r}, as {type(opt).__name__} does; "
                "a base optimizer with other state names is needed to save both"
            )
        entry.update(own)
    index = next(i for i, p in enumerate(params) if p is anchor)
    state.setdefault(index, {})[STATE_KEY] = {"format": FORMAT, **extra}
    for key, value in opt._other_state.items():
        if key in state or (isinstance(key, int) and 0 <= key < len(params)):
            raise RuntimeError(
                f"state[{key!r}]: a key of opt.state that is not a parameter names parameter {key!r}'s entry in "
                "state_dict(); allowed: a key that is no parameter index (a string, say)"
            )
        state[key] = value
    return {"state": state, "param_groups": base["param_groups"]}


def param_keys(layout: Layout, params: list[Tensor], owner: str) -> dict[Any, Tensor]:
    """The state_dict's parameter keys (indices or names, in its groups' order) -> this optimizer's parameters."""
    keys = [k for g in layout.groups for k in g["params"]]
    if len(keys) != len(params):
        raise ValueError(
            f"state_dict: {len(keys)} parameters in its param_groups; allowed: {len(params)}, as this {owner} holds "
            "(a state_dict of the same model and groups)"
        )
    by_key = dict(zip(keys, params))
    unknown = [k for k in [*layout.own, *layout.base] if k not in by_key]
    if unknown:
        raise ValueError(
            f"state_dict: an entry for parameter {unknown[0]!r}, which its param_groups do not list; allowed: a "
            f"state_dict from {owner}.state_dict()"
        )
    return by_key


class TorchShapedState:
    """``opt.state``, ``state_dict()`` and ``load_state_dict()`` of a SAM-family optimizer, in torch's shape.

    A base of ``SAM`` (before ``torch.optim.Optimizer``). It reads of its class: ``base_optimizer``, ``param_groups``
    (shared with the base), ``_own`` (ssam's per-parameter dicts), ``_all_params()``, ``_stamp_group()``,
    ``_perturbed`` (a step in progress) and ``_stepped``; and the hooks ``_saved_own(p)`` (what of p's own state is
    saved), ``_extra_state()`` / ``_load_extra_state(extra)`` (the counters under ``"ssam"``), ``_check_own`` and
    ``_load_own`` (take the loaded per-parameter entries, checked before anything is loaded).
    """

    _own: Any
    _perturbed: Any
    _stepped: bool
    base_optimizer: Any
    param_groups: list[dict[str, Any]]
    _all_params: Callable[[], list[Tensor]]
    _stamp_group: Callable[..., None]
    _saved_own: Callable[[Tensor], dict[str, Any]]
    _extra_state: Callable[[], dict[str, Any]]
    _load_extra_state: Callable[[dict[str, Any]], None]
    _check_own: Callable[[dict[Tensor, dict], dict[str, Any]], None]
    _load_own: Callable[[dict[Tensor, dict], dict[str, Any]], None]
    _after_copy: Callable[[], None]
    _other_state: dict[Any, Any]
    _param_names: dict[int, str]
    _patch_step_function: Callable[[], None]
    _optimizer_state_dict_pre_hooks: dict[int, Callable[[Any], None]]
    _optimizer_state_dict_post_hooks: dict[int, Callable[[Any, dict], dict | None]]
    _optimizer_load_state_dict_pre_hooks: dict[int, Callable[[Any, dict], dict | None]]
    _optimizer_load_state_dict_post_hooks: dict[int, Callable[[Any], None]]

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: everything the optimizer holds (the base optimizer, the masks, the
        schedule's counters, ssam's per-parameter state, the generators), less the hooks registered on it, which
        torch leaves out of a copy too. (torch's own keeps ``defaults``, ``state`` and ``param_groups`` only.)"""
        return {k: v for k, v in self.__dict__.items() if k not in HOOK_REGISTRIES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in HOOK_REGISTRIES:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._after_copy()  # what is kept by id (names, the maskable set) is keyed by the copied tensors

    @property
    def state(self) -> JointState:
        """Per parameter: the base optimizer's state and ssam's (``mask``, ``w_saved``), see ``ssam.optim.state``."""
        return JointState(self)

    @state.setter
    def state(self, value: Any) -> None:
        if value:  # torch's Optimizer.__init__ assigns an empty dict; the state lives in the base and in _own
            raise AttributeError("state: read it and write its entries; it is a view, not assignable")

    def _set_own(self, p: Tensor, key: str, value: Any) -> None:
        """A write to ``opt.state[p][key]`` for one of ssam's keys; None removes it (scratch only)."""
        if key == STATE_KEY and p is self._anchor() and value is not None:
            self._load_extra_state(dict(value))
        elif key in SETTABLE_KEYS:
            if value is None:
                self._own.get(p, {}).pop(key, None)
            else:
                self._own[p][key] = value
        else:
            raise ValueError(f"state[p][{key!r}]: {type(self).__name__} keeps no {key!r} there that can be set")

    def _anchor(self) -> Tensor:
        """The parameter whose state entry holds the optimizer's counters: the first that requires a gradient
        (torch.distributed.checkpoint loads no state for the others)."""
        params = self._all_params()
        return next((p for p in params if p.requires_grad), params[0])

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, ``{"state": {index: entry}, "param_groups": [...]}`` (format 2, ``ssam.optim.state``):
        each entry holds the base optimizer's state and ssam's (``mask``); the first parameter that requires a
        gradient also holds ``"ssam"``: the format version and the optimizer's counters. Tensors are shared with
        the optimizer, as torch's are. The hooks of ``register_state_dict_pre_hook`` run before (with the
        optimizer), those of ``register_state_dict_post_hook`` after (with it and the dict; one may return a dict
        to use instead), as torch runs them."""
        for pre in list(self._optimizer_state_dict_pre_hooks.values()):
            pre(self)
        base = self.base_optimizer.state_dict()  # one shared list of groups: its indices are ours
        sd = pack(base, self._all_params(), self._saved_own, self._anchor(), self._extra_state(), self)
        for post in list(self._optimizer_state_dict_post_hooks.values()):
            changed = post(self, sd)
            if changed is not None:
                sd = changed
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of this version (also with parameter names for keys, as
        ``torch.distributed.checkpoint`` hands it back) or of ssam 0.1 (``{"state", "base_optimizer", "extra"}``:
        the checkpoints of ``ssam train``, Lightning and the Hugging Face Trainer). Per-group settings and the base
        optimizer's come from the state_dict; the whole optimizer's stay this optimizer's (``ssam.optim.settings``);
        a setting an older state_dict lacks takes this optimizer's value. As torch does, the hooks of
        ``register_load_state_dict_pre_hook`` get a shallow copy of the dict first (one may return a dict to load
        instead), those of ``register_load_state_dict_post_hook`` the optimizer after."""
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict between first_step and second_step; finish the step first")
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)
        for pre in list(self._optimizer_load_state_dict_pre_hooks.values()):
            changed = pre(self, state_dict)
            if changed is not None:
                state_dict = changed
        layout = read_state_dict(state_dict, type(self).__name__)
        by_key = param_keys(layout, self._all_params(), type(self).__name__)
        own = {by_key[k]: v for k, v in layout.own.items()}
        self._check_own(own, layout.extra)
        self.base_optimizer.load_state_dict({"state": layout.base, "param_groups": layout.groups})
        self.param_groups = self.base_optimizer.param_groups  # torch's load made new group dicts: share them again
        for i, g in enumerate(self.param_groups):
            self._stamp_group(g, i, loaded=True)
        self._own.clear()  # (w_saved is scratch: allocated again at the next first_step)
        self._load_own(own, layout.extra)
        self._other_state = dict(layout.other)
        self._param_names = names_by_id(self.param_groups)  # (names a loaded dict holds replace this one's)
        self._stepped = True
        for post in list(self._optimizer_load_state_dict_post_hooks.values()):
            post(self)

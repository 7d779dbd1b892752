"""SAM and ASAM: a wrapper that perturbs the weights before the base optimizer steps.

One step, as in Foret et al. (2021) and the SSAM paper (Mi et al., 2022):

    g   = grad L(w)                                  (pass one: forward + backward at w)
    e   = rho * g / (||g|| + perturb_eps)            SAM
    e   = rho * w^2 g / (|| |w| g || + perturb_eps)  ASAM (adaptive=True)
    e  *= mask                                       SSAM only (see ssam.optim.ssam)
    w  <- w + e ; g' = grad L(w + e) ; w <- w        (pass two at w + e; w restored by copy)
    base_optimizer.step() with g'

The math lives in ``ssam.optim.perturb`` (single-tensor and foreach paths); this class gathers the tensors. The
wrapper and the base optimizer share one ``param_groups`` list, so a learning-rate scheduler attached to either
changes both, and ``zero_grad`` on either clears every gradient. Parameters sharded by FSDP2's ``fully_shard`` are
perturbed shard by shard, with the norm summed over the ranks in one all-reduce (``ssam.optim.sharded``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import Tensor

from .mask import MaskSegment
from .perturb import grad_norm, perturb_, restore_, use_foreach
from .sharded import ShardLayout, local, shard_layout

__all__ = ["SAM", "CLOSURE_PASSES"]

CLOSURE_PASSES = ("second", "both")
_RENAMED = {"eps": "perturb_eps", "foreach": "perturb_foreach"}  # SAM's own names before 0.2


def _strip_names(items: Iterable, names: dict[int, str]) -> list[Tensor]:
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


def _plain_group(group: dict, names: dict[int, str]) -> dict:
    group = dict(group)
    ps = group["params"]
    group["params"] = _strip_names([ps] if isinstance(ps, Tensor) else ps, names)
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


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param-group dicts.
        base_optimizer: an optimizer instance over the same parameters, or an optimizer class built here with
            ``**base_kwargs``.
        rho: radius of the perturbation (>= 0). ``rho=0`` reproduces the base optimizer exactly.
        adaptive: ASAM (Kwon et al., 2021): scale the perturbation element-wise by |w|.
        perturb_eps: added to the gradient norm; 1e-7 as in the SSAM paper's code. (Named apart from the base
            optimizer's ``eps``, which ``**base_kwargs`` passes on: ``SAM(ps, AdamW, eps=1e-6)`` sets AdamW's.)
        perturb_foreach: ``True`` for the multi-tensor ``torch._foreach_*`` kernels in the perturbation, ``False``
            for a per-tensor loop; ``None`` (default) picks foreach on accelerators and the loop on the CPU, as
            torch.optim does. (The base optimizer's own ``foreach`` goes through ``**base_kwargs``.)
        closure_passes: what ``step(closure)`` expects the closure to be for (see ``step``): ``"second"`` (default)
            or ``"both"``. Also an attribute.
        **base_kwargs: everything else goes to the base optimizer class; a keyword it does not take is a
            ``ValueError`` here.
    """

    #: When a trainer should call ``refresh_mask``: None (never), ``"before_epoch"`` or ``"first_backward"``.
    mask_refresh: str | None = None

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        perturb_eps: float = 1e-7,
        perturb_foreach: bool | None = None,
        closure_passes: str = "second",
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(rho, (int, float)) and rho >= 0 and rho == rho and rho != float("inf")):
            raise ValueError(f"rho: got {rho!r}; allowed: a finite number >= 0")
        if not (isinstance(perturb_eps, (int, float)) and perturb_eps >= 0):
            raise ValueError(f"perturb_eps: got {perturb_eps!r}; allowed: a number >= 0")
        if perturb_foreach not in (None, True, False):
            raise ValueError(f"perturb_foreach: got {perturb_foreach!r}; allowed: None, True, False")
        self._param_names: dict[int, str] = {}
        params = list(params)
        if len(params) == 0:
            raise ValueError("params: got an empty parameter list; pass the model's parameters")
        if isinstance(params[0], dict):
            groups: list = [_plain_group(g, self._param_names) for g in params]
        else:
            groups = _strip_names(params, self._param_names)
        super().__init__(groups, dict(rho=float(rho), adaptive=bool(adaptive)))
        self.perturb_eps = float(perturb_eps)
        self.perturb_foreach = perturb_foreach
        self.closure_passes = closure_passes

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"base_optimizer: got an optimizer instance and keyword arguments {sorted(base_kwargs)}; "
                    "pass the arguments when building the instance, or pass the optimizer class"
                )
            ours = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if ours != theirs:
                raise ValueError(
                    f"base_optimizer: the instance holds {len(theirs)} parameters, {len(theirs & ours)} of them "
                    f"shared with the {len(ours)} given to {type(self).__name__}; allowed: an optimizer over exactly "
                    "the same parameters (or pass the optimizer class)"
                )
            self.base_optimizer = base_optimizer
            for g in base_optimizer.param_groups:
                g.setdefault("rho", float(rho))
                g.setdefault("adaptive", bool(adaptive))
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self._check_base_kwargs(base_optimizer, base_kwargs)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ValueError(
                f"base_optimizer: got {base_optimizer!r}; allowed: a torch.optim.Optimizer subclass or instance"
            )
        # One list of groups for both: schedulers and add_param_group act on the pair.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # Parameters perturbed by the last first_step, with their saved weights, for restore to copy back.
        self._perturbed: tuple[list[Tensor], list[Tensor]] | None = None
        self._set_layout()

    def _set_layout(self) -> None:
        """FSDP2-sharded parameters (``ssam.optim.sharded``): SAM then works on the local shards with one
        all-reduce for the norm. DTensors laid out otherwise keep dense SAM on DTensor operations."""
        self._layout: ShardLayout | None = shard_layout(self._all_params())[0]

    def _check_base_kwargs(self, base: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        """A keyword the base class does not take: one line naming it, instead of a TypeError in its __init__."""
        accepted, takes_any = _keywords(base.__init__)
        unknown = [k for k in kwargs if k not in accepted]
        if takes_any or not unknown:
            return
        key = unknown[0]
        own = [
            k
            for cls in type(self).__mro__
            if issubclass(cls, SAM)
            for k in _keywords(cls.__init__, ("base_optimizer",))[0]
        ]
        hint = f" ({type(self).__name__}'s own is {_RENAMED[key]})" if key in _RENAMED else ""
        raise ValueError(
            f"{key}: got {kwargs[key]!r}, a keyword neither {base.__name__} nor {type(self).__name__} takes{hint}; "
            f"allowed: {base.__name__}'s {', '.join(accepted)}; {type(self).__name__}'s {', '.join(dict.fromkeys(own))}"
        )

    @property
    def closure_passes(self) -> str:
        """``"second"``: step(closure) runs pass two only; ``"both"``: both passes (see ``step``)."""
        return self._closure_passes

    @closure_passes.setter
    def closure_passes(self, value: str) -> None:
        if value not in CLOSURE_PASSES:
            raise ValueError(f"closure_passes: got {value!r}; allowed: {', '.join(map(repr, CLOSURE_PASSES))}")
        self._closure_passes = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapper and the base optimizer at once (named parameters accepted)."""
        group = _plain_group(param_group, self._param_names)
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__, before the base exists
            super().add_param_group(group)
            return
        self.base_optimizer.add_param_group(group)  # appends to the shared list, with the base's defaults
        self.param_groups[-1].setdefault("rho", self.defaults["rho"])
        self.param_groups[-1].setdefault("adaptive", self.defaults["adaptive"])
        self._set_layout()

    # ------------------------------------------------------------------ hooks for the sparse subclasses
    def _mask_for(self, p: Tensor) -> Tensor | None:
        """The boolean mask applied to p's perturbation; dense SAM has none."""
        return None

    def _mask_segment(self, ps: list[Tensor], gs: list[Tensor]) -> MaskSegment | None:
        """The masks of ``ps`` as one stretch of a flat mask buffer (the multi-tensor fast path), or None."""
        return None

    def _perturbable(self, group: dict) -> list[Tensor]:
        """The group's parameters that the perturbation covers and that have a gradient."""
        return [p for p in group["params"] if p.grad is not None]

    def _dead_params(self) -> list[Tensor]:
        """Parameters whose perturbation is zero whatever their gradient (SSAM: no live mask entry)."""
        return []

    def _check_ready(self) -> None:
        """Raise if the optimizer cannot perturb yet (SSAM-F before its first mask)."""

    def _grad_norm(self, params: list[Tensor], grads: list[Tensor], adaptive: bool, foreach: bool) -> Tensor:
        norm = grad_norm(self._locals(params), self._locals(grads), adaptive=adaptive, foreach=foreach)
        return self._global_norm(norm)

    def _locals(self, tensors: list[Tensor]) -> list[Tensor]:
        """The local shards when the parameters are FSDP2-sharded, else the tensors themselves."""
        return tensors if self._layout is None else [local(t) for t in tensors]

    def _global_norm(self, norm: Tensor) -> Tensor:
        """This rank's norm -> the norm over every shard: one all-reduce of the squared norm (sharded only)."""
        if self._layout is None:
            return norm
        return self._layout.all_reduce_(norm.square()).sqrt()

    # ------------------------------------------------------------------ the two passes
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from w to w + e. Raises when no parameter has a gradient."""
        self._check_ready()
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step; call second_step to restore the weights")
        by_group = []
        for group in self.param_groups:
            ps = self._perturbable(group)
            if ps:
                by_group.append((group, ps, cast("list[Tensor]", [p.grad for p in ps])))
        if not by_group:
            raise RuntimeError(
                f"{type(self).__name__}.first_step: no parameter has a gradient, so there is nothing to perturb "
                "with; run forward + backward at w first (or step(closure) with closure_passes='both')"
            )
        all_p = [p for _, ps, _ in by_group for p in ps]
        all_g = [g for _, _, gs in by_group for g in gs]
        # One norm over every parameter, as in the paper; ASAM takes it of |w| * g.
        adaptive = any(g["adaptive"] for g, _, _ in by_group)
        if adaptive and not all(g["adaptive"] for g, _, _ in by_group):
            raise ValueError("adaptive: mixed True/False across param groups is not supported; use one value")
        foreach = use_foreach(self.perturb_foreach, all_p)
        norm = self._grad_norm(all_p, all_g, adaptive, foreach)

        perturbed_p: list[Tensor] = []
        perturbed_w: list[Tensor] = []
        for group, ps, gs in by_group:
            if group["rho"] == 0:
                continue
            saved = [self._buffer(p) for p in ps]
            segment = self._mask_segment(ps, gs) if foreach and self._layout is None else None
            lp = self._locals(ps)
            perturb_(
                lp,
                self._locals(gs),
                saved,
                [self._mask_for(p) for p in ps],
                scale=group["rho"] / (norm + self.perturb_eps),
                adaptive=group["adaptive"],
                foreach=foreach,
                segment=segment,
            )
            perturbed_p.extend(lp)
            perturbed_w.extend(saved)
        self._perturbed = (perturbed_p, perturbed_w)
        if zero_grad:
            self.zero_grad()

    def _buffer(self, p: Tensor) -> Tensor:
        """The persistent copy of w kept during a step (reused every step, so it is allocated once)."""
        st = self.state[p]
        p = self._locals([p])[0]
        w = st.get("w_saved")
        if w is None or w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
            w = torch.empty_like(p, memory_format=torch.preserve_format)
            st["w_saved"] = w
        return w

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last first_step (w + e -> w) without stepping; also used when an fp16 step is skipped."""
        if self._perturbed is None:
            return
        ps, saved = self._perturbed
        if ps:
            restore_(ps, saved, foreach=use_foreach(self.perturb_foreach, ps))
        self._perturbed = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and let the base optimizer step with the gradient taken at w + e."""
        if self._perturbed is None:
            raise RuntimeError("second_step called without first_step; call first_step after the first backward")
        self.restore()
        self.base_optimizer.step()
        # A scheduler attached to the wrapper watches for wrapper.step(); the two-call path is a step too.
        self._opt_called = True  # type: ignore[attr-defined]
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` runs forward + backward and returns the loss. What it is called for is set by
        ``closure_passes``, never guessed from whether gradients happen to be there:

        - ``"second"`` (default; davda54/sam's and pytorch-optimizer's convention): the caller ran pass one at w
          before ``step``. Perturbs, calls the closure once at w + e, restores w, steps the base optimizer; returns
          the closure's loss (at w + e). The closure need not zero gradients (they are zeroed before it).
        - ``"both"`` (torch.optim's LBFGS and Lightning's automatic optimization): zeroes the gradients, calls the
          closure at w (pass one), perturbs, zeroes the gradients, calls it at w + e, restores, steps; returns the
          loss of pass one. The closure may zero the gradients itself or not.

        With no gradient after pass one, ``first_step`` raises: a step never silently skips the perturbation.

        Without a closure, ``step()`` finishes a step that ``first_step()`` began (it is ``second_step()``): for
        trainers that run both passes themselves and then call ``optimizer.step()`` (the Hugging Face Trainer). With
        no perturbation pending it raises, as a step without a second pass cannot be SAM.
        """
        if closure is None:
            if self._perturbed is not None:
                self.second_step()
                return None
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that runs forward + backward; or call "
                "first_step(), then forward + backward, then second_step() (or step())"
            )
        closure = torch.enable_grad()(closure)
        first_loss = None
        if self._closure_passes == "both":
            self.zero_grad()
            first_loss = closure()
        self.first_step(zero_grad=True)
        try:
            loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return first_loss if self._closure_passes == "both" else loss

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[SAM]:
        """Wrap pass one's forward + backward: parameters whose perturbation is masked out entirely (SSAM, no live
        mask entry) get ``requires_grad=False`` inside, so that backward skips their weight gradients; restored on
        exit, exceptions included. For SAM, and for SSAM with a live entry in every tensor, it changes nothing.

        ``first_step`` then takes the norm over the gradients that exist (with ``renormalize=True`` that is the
        same norm; without it, the dead tensors' gradients no longer count). Not around the backward whose
        gradient SSAM-D's ``update_mask`` scores: the dead entries need gradients to compete for growth.
        """
        frozen = [p for p in self._dead_params() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def refresh_mask(
        self,
        epoch: int,
        *,
        model: torch.nn.Module | None = None,
        data: Any = None,
        generator: torch.Generator | None = None,
        reduce: Callable | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> bool:
        """Refresh the mask if ``epoch`` calls for it; True when it did. Dense SAM has no mask: False. Call it where
        ``mask_refresh`` says: ``"before_epoch"`` before an epoch's first step, ``"first_backward"`` after the
        first backward of an epoch's first step. ``model``, ``data``, ``generator``, ``reduce`` and ``loss_fn``
        (``loss_fn(model(x), y)``, default cross-entropy) are what SSAM-F measures its Fisher with."""
        return False

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        # The copy of w is scratch space between the passes, not state: leaving it out keeps checkpoints small.
        saved = {p: self.state[p].pop("w_saved") for p in list(self.state) if "w_saved" in self.state[p]}
        try:
            sd = super().state_dict()
        finally:
            for p, e in saved.items():
                self.state[p]["w_saved"] = e
        # super() also reports the shared groups; the base optimizer's copy of them is the one loaded back.
        sd.pop("param_groups", None)
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["extra"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                f"state_dict: missing 'base_optimizer'; allowed: a state_dict from {type(self).__name__}.state_dict()"
            )
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict between first_step and second_step; finish the step first")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        # Our own state (masks) is keyed by position in the groups, as in torch.optim.
        params = self._all_params()
        own = state_dict.get("state", {})
        self.state.clear()
        for idx, st in own.items():
            idx = int(idx)
            if idx >= len(params):
                raise ValueError(f"state_dict: entry for parameter {idx} but the optimizer has {len(params)}")
            p = params[idx]
            new = {}
            for k, v in st.items():
                if isinstance(v, Tensor):
                    if v.shape != local(p).shape and k == "mask":  # (sharded: the local shard's, per rank)
                        raise ValueError(
                            f"state_dict: mask of parameter {idx} has shape {tuple(v.shape)}, the parameter "
                            f"{tuple(local(p).shape)}; allowed: a state_dict of the same model"
                        )
                    v = v.to(p.device)
                new[k] = v
            self.state[p] = new
        self._load_extra_state(state_dict.get("extra", {}))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def param_name(self, p: Tensor, index: int) -> str:
        """p's name when named parameters were given, else ``param{index}`` (its position in the groups)."""
        return self._param_names.get(id(p), f"param{index}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, rho={self.defaults['rho']})"

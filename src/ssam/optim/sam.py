"""SAM and ASAM: a wrapper that perturbs the weights before the base optimizer steps.

One step, as in Foret et al. (2021) and the SSAM paper (Mi et al., 2022):

    g   = grad L(w)                                  (pass one: forward + backward at w)
    e   = rho * g / (||g|| + perturb_eps)            SAM
    e   = rho * w^2 g / (|| |w| g || + perturb_eps)  ASAM (adaptive=True)
    e  *= mask                                       SSAM only (see ssam.optim.sparse)
    w  <- w + e ; g' = grad L(w + e) ; w <- w        (pass two at w + e; w restored by copy)
    base_optimizer.step() with g'

The math lives in ``ssam.optim.perturb`` (single-tensor and foreach paths); this class gathers the tensors. The
wrapper and the base optimizer share one ``param_groups`` list, so a learning-rate scheduler attached to either
changes both, and ``zero_grad`` on either clears every gradient. Settings live in ``defaults`` and the param groups
(``ssam.optim.settings``), kept by ``ssam.optim.arguments.ParamGroups`` with the parameters' names; ``opt.state``,
``state_dict()``, ``load_state_dict()`` and copies have torch's shape (``ssam.optim.state.TorchShapedState``; the
hooks ``_saved_own``, ``_extra_state``, ``_check_own``, ``_load_own``, ``_after_copy`` say what this class and the
sparse ones add). Parameters sharded by FSDP2's ``fully_shard`` are perturbed shard by shard, with the norm summed
over the ranks in one all-reduce (``ssam.optim.sharded``). Hooks registered on the wrapper run as torch runs them;
torch's global step hooks see one step per SAM step, the wrapper's.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor

from .arguments import ParamGroups, announce_once, build_base, check_adaptive, check_params, names_by_id, plain_group
from .ascent import AscentDirection, check_composes, check_momentum_base, parse_ascent
from .mask import MaskSegment
from .msharp import check_micro_batch
from .perturb import grad_norm, perturb_, restore_, use_foreach
from .schedule import ScheduleState, looksam_store, parse_schedule
from .settings import Setting, check_bool, check_choice, check_foreach, check_perturb_eps, check_rho
from .sharded import ShardLayout, local, shard_layout
from .state import SAVED_DIRECTION_KEYS, TorchShapedState
from .steps import LOOKSAM_KEY, ScheduledSteps

__all__ = ["SAM", "CLOSURE_PASSES"]

CLOSURE_PASSES = ("second", "both")


# The ignore: "state" is a view (TorchShapedState) where torch.optim.Optimizer declares a dict.
class SAM(ScheduledSteps, TorchShapedState, ParamGroups, torch.optim.Optimizer):  # type: ignore[misc]
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

    Every setting is in ``defaults`` and in every param group (``ssam.optim.settings``): ``rho``, ``adaptive`` and
    ``perturb_eps`` per group (a group dict may set its own ``rho``); the others are the whole optimizer's and read
    as attributes (``opt.perturb_eps``, ``opt.closure_passes``).
    """

    #: When a trainer should call ``refresh_mask``: None (never), ``"before_epoch"`` or ``"first_backward"``.
    mask_refresh: str | None = None
    #: Settings a param group may set for itself; every other setting is the whole optimizer's.
    per_group_settings: tuple[str, ...] = ("rho", "adaptive", "perturb_eps")

    perturb_eps = Setting(check_perturb_eps, "Added to the gradient norm (the default for new param groups).")
    perturb_foreach = Setting(check_foreach, "None (foreach off the CPU), True or False: the perturbation's kernels.")
    micro_batch = Setting(
        check_micro_batch, "None (one perturbation per batch) or m: one per chunk of m examples (m-sharpness)."
    )
    closure_passes = Setting(
        check_choice("closure_passes", CLOSURE_PASSES),
        "``'second'``: step(closure) runs pass two only; ``'both'``: both passes (see ``step``).",
    )

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        perturb_eps: float = 1e-7,
        perturb_foreach: bool | None = None,
        closure_passes: str = "second",
        schedule: str | None = None,
        micro_batch: int | None = None,
        ascent: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        plan = parse_schedule(schedule)
        micro_batch = check_micro_batch(micro_batch)
        if micro_batch is not None and plan.kind in ("looksam", "aesam"):
            raise ValueError(
                f"schedule: got {str(plan)!r} with micro_batch={micro_batch}; allowed: 'every:K' or 'late:F' "
                "(LookSAM's direction and AE-SAM's norm are defined for one perturbation per step)"
            )
        direction = parse_ascent(ascent)
        check_composes(direction, plan.kind, micro_batch)
        settings = {
            "rho": check_rho(rho),
            "adaptive": check_bool("adaptive")(adaptive),
            "perturb_eps": check_perturb_eps(perturb_eps),
            "perturb_foreach": check_foreach(perturb_foreach),
            "closure_passes": check_choice("closure_passes", CLOSURE_PASSES)(closure_passes),
            "schedule": str(plan),
            "micro_batch": micro_batch,
            "ascent": str(direction),
        }
        params = check_params(params)
        groups = [plain_group(g) for g in params] if isinstance(params[0], dict) else [plain_group({"params": params})]
        super().__init__(groups, dict(settings))
        self._settings: list[str] = list(settings)
        # ssam's own per-parameter state: the masks (sparse) and w_saved, apart from the base optimizer's.
        self._own: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self._other_state: dict[Any, Any] = {}  # opt.state's entries under keys that are not tensors
        self.base_optimizer = build_base(type(self), SAM, base_optimizer, self.param_groups, base_kwargs, settings)
        announce_once(self.base_optimizer)  # torch's global step hooks see the wrapper's step, not this one too
        # One list of groups for both: schedulers and add_param_group act on the pair.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for i, g in enumerate(self.param_groups):
            self._stamp_group(g, i)
        check_adaptive(self.param_groups)
        self._param_names = names_by_id(self.param_groups)
        check_momentum_base(direction, self.base_optimizer)
        self._ascent = direction  # where the perturbation's direction comes from (ssam.optim.ascent)
        # Parameters perturbed by the last first_step, with their saved weights, for restore to copy back.
        self._perturbed: tuple[list[Tensor], list[Tensor]] | None = None
        self._stepped = False  # a base step was taken or a state_dict loaded: opt.state lists ssam's state too
        self._schedule = ScheduleState(plan)  # which steps ascend (ssam.optim.schedule)
        self._set_layout()
        if plan.kind in ("looksam", "aesam") and self._layout is not None:
            raise ValueError(
                f"schedule: got {str(plan)!r} with FSDP-sharded parameters; allowed: 'every:K' or 'late:F' there "
                "(LookSAM's and AE-SAM's norms are not summed over shards)"
            )

    @property
    def direction(self) -> AscentDirection:
        """The parsed ``ascent`` setting: where the perturbation's direction comes from (ssam.optim.ascent)."""
        return self._ascent

    def _set_layout(self) -> None:
        """FSDP2-sharded parameters (``ssam.optim.sharded``): SAM then works on the local shards with one
        all-reduce for the norm. DTensors laid out otherwise keep dense SAM on DTensor operations."""
        self._layout: ShardLayout | None = shard_layout(self._all_params())[0]

    # ------------------------------------------------------------------ hooks for the sparse subclasses
    def _mask_for(self, p: Tensor) -> Tensor | None:
        """The boolean mask applied to p's perturbation; dense SAM has none."""
        return None

    def _mask_segment(self, ps: list[Tensor], gs: list[Tensor]) -> MaskSegment | None:
        """The masks of ``ps`` as one stretch of a flat mask buffer (the multi-tensor fast path), or None."""
        return None

    def _perturbable(self, group: dict) -> list[Tensor]:
        """The group's parameters that the perturbation covers and that have a direction (ssam.optim.ascent)."""
        return [p for p in group["params"] if self._direction(p) is not None]

    def _direction(self, p: Tensor) -> Tensor | None:
        """p's ascent direction this step: its gradient at w, or what ``ascent`` stores (ssam.optim.ascent)."""
        return self._ascent.vector(p, self._own.get(p, {}), self.base_optimizer.state.get(p, {}))

    def _dead_params(self) -> list[Tensor]:
        """Parameters whose perturbation is zero whatever their gradient (SSAM: no live mask entry)."""
        return []

    def _check_ready(self) -> None:
        """Raise if the optimizer cannot perturb yet (SSAM-F before its first mask)."""

    def _check_plain_step(self, grads: list[Tensor]) -> None:
        """Raise if a plain base step now would hide that the optimizer was never run as SAM (see ``step``)."""

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
        """Move every parameter with a direction from w to w + e. The direction is the gradient at w (``ascent``
        ``gradient`` or ``subbatch:F``: raises when no parameter has one) or a stored one (``previous``,
        ``momentum``, ``msam``: needs no gradient; before any exists nothing moves and the step is a plain one)."""
        self._check_ready()
        check_adaptive(self.param_groups)  # (again: a group's "adaptive" may have been written since)
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step; call second_step to restore the weights")
        by_group = []
        for group in self.param_groups:
            ps = self._perturbable(group)
            if ps:
                by_group.append((group, ps, cast("list[Tensor]", [self._direction(p) for p in ps])))
        if not by_group and self._ascent.one_pass:  # no direction yet: pass two runs at w, a plain step
            self._perturbed = ([], [])
            if zero_grad:
                self.zero_grad()
            return
        if not by_group:
            raise RuntimeError(
                f"{type(self).__name__}.first_step: no parameter has a gradient, so there is nothing to perturb "
                "with; run forward + backward at w first (or step(closure) with closure_passes='both')"
            )
        all_p = [p for _, ps, _ in by_group for p in ps]
        all_g = [g for _, _, gs in by_group for g in gs]
        self._record_norm(all_g)
        if self._schedule.schedule.kind == "looksam":  # keep g at w: second_step turns it into g_v
            for p, g in zip(all_p, all_g):
                self._own[p][LOOKSAM_KEY] = g.detach().clone()
        # One norm over every parameter, as in the paper; ASAM takes it of |w| * g.
        adaptive = any(g["adaptive"] for g, _, _ in by_group)
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
                scale=self._ascent.sign * group["rho"] / (norm + group["perturb_eps"]),
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
        st = self._own[p]
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

    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and let the base optimizer step with the gradient taken at w + e (through ``step()``, so that
        step hooks and a learning-rate scheduler attached to the wrapper see a step)."""
        if self._perturbed is None:
            raise RuntimeError("second_step called without first_step; call first_step after the first backward")
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[..., Any] | None = None, batch: Any = None) -> Any:  # type: ignore[override]
        """One SAM step, or the end of one. What it does follows from the call, never from a guess:

        With a closure (forward + backward, returning the loss), by ``closure_passes``:

        - ``"second"`` (default; davda54/sam's and pytorch-optimizer's convention): the caller ran pass one at w
          before ``step``. Perturbs, calls the closure once at w + e, restores w, steps the base optimizer; returns
          the closure's loss (at w + e). The closure need not zero gradients (they are zeroed before it). With no
          gradient from pass one it raises, naming ``closure_passes='both'`` (Lightning: ``SAMCallback``).
        - ``"both"`` (torch.optim's LBFGS and Lightning's automatic optimization): zeroes the gradients, calls the
          closure at w (pass one), perturbs, zeroes the gradients, calls it at w + e, restores, steps; returns the
          loss of pass one. The closure may zero the gradients itself or not.

        The loss is returned detached, so ``float(opt.step(closure))`` is quiet.

        Without a closure (the Hugging Face Trainer, ``GradScaler.step`` and ``torch.distributed.checkpoint`` call
        it so), in this order:

        1. A perturbation is pending (``first_step`` ran): finish the step as ``second_step()`` does: restore w,
           base step with the gradient now in ``.grad``.
        2. No parameter has a gradient: ``RuntimeError``. There is nothing to step with, and the caller meant a
           step: a step never silently drops its perturbation.
        3. The step is a plain one of the ``schedule`` (``ascent_due()`` is False), or every gradient is zero (a SAM
           step would perturb by zero; this is how ``torch.distributed.checkpoint`` initialises a fresh optimizer):
           a plain step of the base optimizer with the gradients present (LookSAM adds its stored direction).
        4. An ascent is due and the gradient is not zero: ``RuntimeError`` naming the calls that take it
           (``first_step``/``second_step``, ``step(closure)``, Lightning's ``SAMCallback``, the Hugging Face
           ``SAMTrainer``); for a sparse optimizer without a mask, naming what refreshes masks. Without a
           schedule every step is due an ascent, so a framework that drives SAM as a one-pass optimizer is told,
           never silently trained with plain steps.

        With a closure on a plain step of the schedule, the closure is not called at w + e: under ``"second"`` the
        base optimizer steps with pass one's gradient and ``step`` returns None; under ``"both"`` the closure runs
        once (pass one) and its loss is returned.

        Returns None without a closure.
        """
        if batch is not None:
            return self._step_batch(closure, batch)
        if closure is None:
            if self._perturbed is not None:
                self._finish()
                return None
            self._plain_step()
            return None
        closure = torch.enable_grad()(closure)
        if self._ascent.one_pass:  # the closure runs once, at w + e
            return self._one_pass_step(closure)
        if self._ascent.kind == "subbatch" and self.closure_passes == "both":
            raise ValueError(
                f"ascent: got {self.defaults['ascent']!r} with step(closure) and closure_passes='both'; allowed: "
                "step(closure, batch=(inputs, targets)), which gives pass one the sub-batch"
            )
        first_loss = None
        due = self.ascent_due()
        if self.closure_passes == "both":
            self.zero_grad()
            first_loss = closure()
        elif not any(p.grad is not None for p in self._all_params()):
            raise RuntimeError(
                f"{type(self).__name__}.step(closure): no parameter has a gradient at w, and with "
                "closure_passes='second' the closure runs pass two only; run forward + backward before "
                "step(closure), or set closure_passes='both' to run both passes in step (Lightning's automatic "
                "optimization: add ssam.integrations.lightning.SAMCallback(), which sets it)"
            )
        if not due:  # a plain step of the schedule: the gradient of pass one, no closure call at w + e
            self._take_plain_step([p.grad for p in self._all_params() if p.grad is not None])
            return first_loss.detach() if isinstance(first_loss, Tensor) else first_loss
        _, loss, _ = self.ascend(closure)
        out = first_loss if self.closure_passes == "both" else loss
        return out.detach() if isinstance(out, Tensor) else out

    @torch.no_grad()
    def _finish(self) -> None:
        """Pass two is done: back to w, base step with its gradient."""
        ascended = self._perturbed is None or bool(self._perturbed[0])  # (a one-pass step before any direction)
        self.restore()
        if self._schedule.schedule.kind == "looksam":
            ps = [p for p in self._all_params() if LOOKSAM_KEY in self._own.get(p, {}) and p.grad is not None]
            looksam_store([self._own[p][LOOKSAM_KEY] for p in ps], [cast(Tensor, p.grad) for p in ps])
        self._step_after_ascent(ascended)

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

    # ------------------------------------------------------------------ state_dict (ssam.optim.state)
    def _saved_own(self, p: Tensor) -> dict[str, Any]:
        """ssam's saved per-parameter state of p: LookSAM's direction, ``previous``'s gradient (and the masks: see
        SparseSAM)."""
        own = self._own.get(p, {})
        return {k: own[k] for k in SAVED_DIRECTION_KEYS if own.get(k) is not None}

    def _extra_state(self) -> dict[str, Any]:
        """The optimizer's own counters, saved under ``"ssam"`` in one parameter's entry."""
        return {"schedule": self._schedule.state()}

    def _check_own(self, own: dict[Tensor, dict], extra: dict[str, Any]) -> None:
        """Raise if loaded per-parameter entries (masks) do not fit, before anything is loaded."""

    def _load_own(self, own: dict[Tensor, dict], extra: dict[str, Any]) -> None:
        """Take ssam's loaded state: per-parameter entries (LookSAM's direction; masks: SparseSAM) and the
        counters."""
        for p, entry in own.items():
            for key in SAVED_DIRECTION_KEYS:
                if key in entry:
                    self._own[p][key] = entry[key].to(p.device)
        self._load_extra_state(extra)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """The counters of ``_extra_state``: the schedule's (an older state dict has none: counted from 0)."""
        self._schedule.load(extra.get("schedule") or {})

    def _after_copy(self) -> None:
        """After ``copy.deepcopy`` or unpickling (``ssam.optim.state``): what is kept by id is keyed again, and the
        copied base optimizer steps without announcing itself again."""
        self._param_names = names_by_id(self.param_groups)
        announce_once(self.base_optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, rho={self.defaults['rho']})"

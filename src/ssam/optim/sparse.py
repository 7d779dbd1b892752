"""Sparse SAM (Mi et al., NeurIPS 2022): SAM whose perturbation only touches a global subset of the weights.

``SparseSAM`` is the base class of SSAM-F and SSAM-D: what trainers and integrations type against when they need
the masks (``mask_params``, ``flat_mask``, ``set_flat_mask``, ``mask_density``, ``mask_stats``, ``refresh_mask``).

Masks are global: the entries of every maskable parameter tensor compete for the same ``int(N * (1 - sparsity))``
places. The maskable parameters are those with ``requires_grad=True`` when the optimizer is built or their group is
added (``add_param_group``); a parameter frozen then is neither scored nor given a share of the budget, and is never
perturbed. The set is not re-read later, so that a pass that turns ``requires_grad`` off for a while
(``first_pass()``) changes nothing.

State per maskable parameter, in ``opt.state[p]`` beside the base optimizer's: ``mask`` (torch.bool, 1 byte/entry,
a view of one flat buffer: ``ssam.optim.mask``) and ``w_saved``, the copy of w held between the two passes (the
parameter's dtype, not saved): 5 bytes per fp32 entry beyond the base optimizer. ``state_dict()`` holds a ``mask``
for every maskable parameter, all False before the first mask (``"has_masks"`` under ``"ssam"`` says which), so
that the dict of a fresh optimizer has every key a trained one has: torch.distributed.checkpoint loads into it.

- SSAM-F (``ssam.optim.ssamf``) keeps the entries with the largest diagonal empirical Fisher, measured on
  ``num_samples`` examples.
- SSAM-D (``ssam.optim.ssamd``) starts from a random mask; each update kills the weakest live entries (by |w|,
  |g| or at random) at a cosine-decaying death rate and regrows as many entries among those dead before the update.
Every selection follows the one top-k rule of ``ssam.optim.select``.

``granularity`` (both): ``"element"`` (the paper's, default), ``"channel"``, ``"tensor"`` or ``"N:M"``; the rules,
the mean score per group and ``cost_aware`` are in ``ssam.optim.groups``.

FSDP2 (``fully_shard``): masks are held over each rank's local shards and every selection is the same global top-k
as unsharded, on a flat vector gathered across the ranks (``ssam.optim.sharded``); element granularity only.
``flat_mask``, ``mask_density`` and ``mask_stats`` are then collectives (every rank calls them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .groups import resolve
from .mask import FlatMask, MaskSegment
from .perturb import grad_norm
from .sam import SAM
from .settings import Setting, check_bool, check_count
from .sharded import ShardLayout, local, shard_layout
from .steps import FRAMEWORKS as _FRAMEWORKS

__all__ = ["SparseSAM", "STRATEGIES"]

#: How SSAM-D scores entries for its drop and its growth.
STRATEGIES = ("weight", "gradient", "random")


def _flat(tensors: list[Tensor]) -> Tensor:
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device) for t in tensors])


class SparseSAM(SAM):
    """SAM whose perturbation is multiplied by one global boolean mask: the base class of SSAM-F and SSAM-D (the
    maskable set, the mask and its bookkeeping). Settings of the whole optimizer, also in ``defaults`` and every
    param group: ``sparsity``, ``granularity``, ``cost_aware`` (fixed when built), ``update_freq``, ``renormalize``.
    """

    sparsity = Setting(doc="Fraction of the maskable entries NOT perturbed (fixed when built).")
    granularity = Setting(doc="``'element'``, ``'channel'``, ``'tensor'`` or ``'N:M'`` (fixed when built).")
    cost_aware = Setting(doc="Channel/tensor masks kept near the output (fixed when built).")
    update_freq = Setting(check_count("update_freq", "epochs between updates"), "Epochs between mask updates.")
    renormalize = Setting(check_bool("renormalize"), "Rescale the masked perturbation to norm rho.")

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float,
        sparsity: float | None,
        update_freq: int,
        renormalize: bool,
        adaptive: bool,
        granularity: str = "element",
        cost_aware: bool = False,
        **kwargs: Any,
    ) -> None:
        # sparsity=None: 0.5, or for N:M the implied 1 - N/M (an explicit different one is an error)
        self._granularity, sparsity = resolve(granularity, sparsity, cost_aware)
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ValueError(f"sparsity: got {sparsity!r}; allowed: a number in [0, 1) (fraction NOT perturbed)")
        update_freq = check_count("update_freq", "epochs between updates")(update_freq)
        renormalize = check_bool("renormalize")(renormalize)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self._add_settings(
            sparsity=float(sparsity),
            granularity=str(self._granularity),  # "element", "channel", "tensor" or "N:M"
            cost_aware=cost_aware,
            update_freq=update_freq,
            renormalize=renormalize,
        )
        maskable = [p for p in self._all_params() if p.requires_grad]
        if not maskable:
            raise ValueError("params: none has requires_grad=True; allowed: at least one trainable parameter")
        self._set_maskable(maskable)

    def _set_layout(self) -> None:
        layout, why = shard_layout(self._all_params())
        if why:
            raise ValueError(
                f"params: DTensor parameters with {why}; {type(self).__name__} runs on plain tensors or "
                "on FSDP2's fully_shard parameters (Shard(dim=0) on one 1-D mesh)"
            )
        if layout is not None and self._granularity.kind != "element":
            raise ValueError(
                f"granularity: got {str(self._granularity)!r} with FSDP-sharded parameters; allowed: "
                "'element' (channel, tensor and N:M groups would straddle the shards)"
            )
        self._layout = layout

    def _set_maskable(self, maskable: list[Tensor]) -> None:
        self._maskable = list(maskable)
        self._maskable_index = {id(p): i for i, p in enumerate(maskable)}
        self._numel = sum(p.numel() for p in maskable)  # (a DTensor's numel is the global one)
        # Sharded: the masks are held over the local shards, and a global flat mask is gathered from them.
        self._mask_layout = None if self._layout is None else ShardLayout(maskable, self._layout.group)
        self._masks = FlatMask(self._locals(maskable))
        # None when every parameter is maskable: the per-step filter in _perturbable is then skipped.
        ids = {id(p) for p in maskable}
        self._maskable_ids = None if len(ids) == len(self._all_params()) else ids

    def _after_copy(self) -> None:
        """A copy's masks (``ssam.optim.state``): the maskable set keyed by the copied parameters, and the masks one
        buffer again (pickle copies the views of one buffer as separate tensors)."""
        super()._after_copy()
        flat = self._masks.flat() if self.has_masks() else None
        self._set_maskable(self._maskable)
        if flat is not None:
            self._set_local(flat)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters with ``requires_grad=True`` join the maskable set and the budget. SSAM-F then
        needs ``update_mask`` before its next step; SSAM-D draws the new entries' mask at random."""
        super().add_param_group(param_group)
        if "_masks" not in self.__dict__:  # called by Optimizer.__init__
            return
        new = [p for p in self.param_groups[-1]["params"] if p.requires_grad]
        if new:
            old = self._masks.flat() if self.has_masks() else None
            self._set_maskable(self._maskable + new)
            self._extend_mask(old, sum(p.numel() for p in new))

    def _extend_mask(self, old: Tensor | None, n_new: int) -> None:
        """After add_param_group: by default no mask until the next update."""
        for p in self.mask_params():
            self._own.get(p, {}).pop("mask", None)
        self._masks.clear()

    # --------------------------------------------------------------- masks
    def _shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self._maskable]

    def mask_params(self) -> list[Tensor]:
        """The maskable parameters, in group order: those the masks, the budget and the scores cover."""
        return list(self._maskable)

    def excluded_params(self) -> list[str]:
        """Names of the parameters left out of the masks (frozen when the optimizer was built or their group added)."""
        maskable = {id(p) for p in self._maskable}
        return [self.param_name(p, i) for i, p in enumerate(self._all_params()) if id(p) not in maskable]

    @property
    def num_live(self) -> int:
        """The budget: ``int(N * (1 - sparsity))`` of the N maskable entries. Exactly the live count for element
        masks; channel and tensor masks keep at most this many, N:M ones their own pattern (``mask_density()``)."""
        return int(self._numel * (1 - self.sparsity))

    def has_masks(self) -> bool:
        return self._masks.is_set

    def set_flat_mask(self, flat: Tensor) -> None:
        """Set every mask from one flat tensor over all maskable entries, in param-group order (sharded: the global
        mask, the same on every rank; each keeps its own pieces)."""
        if self._mask_layout is not None:
            if flat.numel() != self._numel:
                raise ValueError(
                    f"flat mask: got {flat.numel()} entries; allowed: exactly {self._numel}, one per "
                    "entry of the maskable parameters (all shards)"
                )
            flat = self._mask_layout.local(flat)
        self._set_local(flat)

    def _set_local(self, flat: Tensor) -> None:
        for p, view in zip(self._maskable, self._masks.set(flat)):
            self._own[p]["mask"] = view

    def flat_mask(self) -> Tensor:
        """A new flat bool tensor of every mask, in param-group order. Sharded: the global mask, gathered from every
        rank (a collective: every rank must call it)."""
        if self._mask_layout is not None:
            return self._mask_layout.gather(self._masks.flat())
        return self._masks.flat()

    def _mask_for(self, p: Tensor) -> Tensor | None:
        own = self._own.get(p)
        return None if own is None else own.get("mask")

    def _mask_segment(self, ps: list[Tensor], gs: list[Tensor]) -> MaskSegment | None:
        return self._masks.segment(ps, gs)

    def _perturbable(self, group: dict) -> list[Tensor]:
        ids = self._maskable_ids
        if ids is None:
            return super()._perturbable(group)
        return [p for p in super()._perturbable(group) if id(p) in ids]

    def _dead_params(self) -> list[Tensor]:
        if self._mask_layout is not None:  # a shard may be dead on one rank only: nothing is frozen
            return []
        dead = self._masks.dead()
        # With every tensor dead the perturbation is zero anyway; freezing all would leave backward nothing to do.
        return [] if len(dead) == len(self._maskable) else dead

    # --------------------------------------------------------------- state (ssam.optim.state)
    def _set_own(self, p: Tensor, key: str, value: Any) -> None:
        """``opt.state[p]["mask"] = t`` copies t into p's mask (the flat buffer stays one piece); assigning the
        mask itself is a no-op (Lightning writes every entry back when it moves the state to a device)."""
        if key != "mask":
            return super()._set_own(p, key, value)
        current = self._mask_for(p)
        if value is current:
            return
        if current is None or value is None or tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"state[p]['mask']: got {'None' if value is None else tuple(value.shape)}; allowed: a tensor shaped "
                "like p's mask, copied into it (set_flat_mask sets every mask; a parameter outside the maskable "
                "set has none)"
            )
        current.copy_(value)
        self._set_local(self._masks.flat())  # (keeps the dead-tensor cache right)

    def _saved_own(self, p: Tensor) -> dict[str, Any]:
        own = super()._saved_own(p)
        if id(p) not in self._maskable_index:
            return own
        mask = self._mask_for(p)
        if mask is None:  # a stand-in, so that a fresh optimizer's state_dict has the keys of a trained one
            mask = torch.zeros_like(local(p), dtype=torch.bool)
        return {**own, "mask": mask}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "has_masks": self.has_masks()}

    def _check_own(self, own: dict[Tensor, dict], extra: dict[str, Any]) -> None:
        missing = [p for p in self._maskable if "mask" not in own.get(p, {})]
        if extra.get("has_masks") and missing:
            raise ValueError(
                f"state_dict: it says it has masks but holds none for {len(missing)} of the {len(self._maskable)} "
                "maskable parameters; allowed: a mask for each (with torch.distributed.checkpoint's "
                "flatten_optimizer_state_dict, give a fresh SSAMF a mask before loading: only keys opt.state shows "
                "are loaded)"
            )
        for p, entry in own.items():
            m = entry.get("mask")
            if m is not None and tuple(m.shape) != tuple(local(p).shape):  # (sharded: the local shard's, per rank)
                i = next(i for i, q in enumerate(self._all_params()) if q is p)
                raise ValueError(
                    f"state_dict: mask of parameter {i} has shape {tuple(m.shape)}, the parameter "
                    f"{tuple(local(p).shape)}; allowed: a state_dict of the same model"
                )

    def _load_own(self, own: dict[Tensor, dict], extra: dict[str, Any]) -> None:
        masks = [own.get(p, {}).get("mask") for p in self._maskable]
        # Older state_dicts held masks only when the optimizer had them.
        if extra.get("has_masks", True) and all(m is not None for m in masks):
            # loaded masks are separate tensors: gather them into one buffer again (sharded: this rank's shards)
            self._set_local(_flat(masks))  # type: ignore[arg-type]
        else:
            self._extend_mask(None, 0)
        super()._load_own(own, extra)  # LookSAM's direction and the counters

    def _check_ready(self) -> None:
        if not self.has_masks():
            raise RuntimeError(self._no_mask_message())

    def _no_mask_message(self) -> str:
        return (
            f"{type(self).__name__} has no mask: the loaded state_dict held none; load one saved by "
            f"{type(self).__name__}, or set a mask with opt.set_flat_mask(...)"
        )

    def _check_plain_step(self, grads: list[Tensor]) -> None:
        if self.has_masks() or not any(bool(g.any()) for g in grads):  # all zero: the perturbation would be too
            return
        raise RuntimeError(
            f"{type(self).__name__}.step(): no perturbation is pending and there is no mask yet, so this would be a "
            f"plain {type(self.base_optimizer).__name__} step, never an SSAM one: the optimizer is driven as a "
            f"one-pass one. {_FRAMEWORKS} (both refresh masks and run both passes); own loop: "
            "opt.update_mask(...) or opt.refresh_mask(epoch, ...), then first_step() and second_step()"
        )

    def should_update(self, epoch: int) -> bool:
        """Whether the mask is refreshed at the start of ``epoch`` (every ``update_freq`` epochs, from 0)."""
        return epoch % self.update_freq == 0

    def mask_density(self) -> float:
        """Fraction of the maskable entries that are perturbed (a host sync: not for the inner loop); NaN before
        the first mask. Parameters outside the maskable set (``excluded_params()``) are not counted."""
        if not self.has_masks():
            return float("nan")
        return int(self.flat_mask().sum()) / max(1, self._numel)

    def mask_stats(self) -> list[dict]:
        """One row per maskable parameter tensor: name (``param{i}`` when unnamed, i its position among all the
        optimizer's parameters), shape, numel, live fraction (NaN before the first mask). Frozen parameters have no
        row; ``excluded_params()`` names them. Sharded: of the whole tensors (a collective, as ``flat_mask``)."""
        masks = (
            dict(zip(map(id, self._maskable), self.flat_mask().split([p.numel() for p in self._maskable])))
            if self.has_masks()
            else {}
        )
        maskable = {id(p) for p in self._maskable}
        rows = []
        for i, p in enumerate(self._all_params()):
            if id(p) not in maskable:
                continue
            m = masks.get(id(p))
            rows.append(
                {
                    "name": self.param_name(p, i),
                    "shape": tuple(p.shape),
                    "numel": p.numel(),
                    "density": float(m.float().mean()) if m is not None else float("nan"),
                }
            )
        return rows

    def _grad_norm(self, params: list[Tensor], grads: list[Tensor], adaptive: bool, foreach: bool) -> Tensor:
        if not self.renormalize:
            return super()._grad_norm(params, grads, adaptive, foreach)
        masks = [self.state[p]["mask"] for p in params]
        segment = self._masks.segment(params, grads) if foreach and not adaptive and self._layout is None else None
        norm = grad_norm(
            self._locals(params), self._locals(grads), adaptive=adaptive, foreach=foreach, masks=masks, segment=segment
        )
        return self._global_norm(norm)

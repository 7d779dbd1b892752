"""Sparse SAM (Mi et al., NeurIPS 2022): SAM whose perturbation only touches a global subset of the weights.

Masks are global: the entries of every maskable parameter tensor compete for the same ``int(N * (1 - sparsity))``
places. The maskable parameters are those with ``requires_grad=True`` when the optimizer is built or their group is
added (``add_param_group``); a parameter frozen then is neither scored nor given a share of the budget, and is never
perturbed. The set is not re-read later, so that a pass that turns ``requires_grad`` off for a while
(``first_pass()``) changes nothing.

State per maskable parameter: ``mask`` (torch.bool, 1 byte/entry, a view of one flat buffer: ``ssam.optim.mask``)
and ``w_saved``, the copy of w held between the two passes (the parameter's dtype): 5 bytes per fp32 entry beyond
the base optimizer.

- SSAM-F keeps the entries with the largest diagonal empirical Fisher, measured on ``num_samples`` examples.
- SSAM-D starts from a random mask; each update kills the weakest live entries (by |w|, |g| or at random) at a
  cosine-decaying death rate and regrows as many entries among those dead before the update.
Every selection follows the one top-k rule of ``ssam.optim.select``.

``granularity`` (both): ``"element"`` (the paper's, default), ``"channel"``, ``"tensor"`` or ``"N:M"``; the rules,
the mean score per group and ``cost_aware`` are in ``ssam.optim.groups``.

FSDP2 (``fully_shard``): masks are held over each rank's local shards and every selection is the same global top-k
as unsharded, on a flat vector gathered across the ranks (``ssam.optim.sharded``); element granularity only.
``flat_mask``, ``mask_density`` and ``mask_stats`` are then collectives (every rank calls them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .fisher import FISHER_METHODS, empirical_fisher
from .groups import drop_and_grow, group_sizes, mask_from_scores, random_mask, resolve
from .mask import FlatMask, MaskSegment
from .perturb import grad_norm
from .sam import SAM
from .select import random_subset, top_k_mask
from .sharded import ShardLayout, shard_layout, unsharded

__all__ = ["SSAMF", "SSAMD", "top_k_mask", "STRATEGIES"]

#: How SSAM-D scores entries for its drop and its growth.
STRATEGIES = ("weight", "gradient", "random")


def _flat(tensors: list[Tensor]) -> Tensor:
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device) for t in tensors])


class _SparseSAM(SAM):
    """Shared machinery of SSAM-F and SSAM-D: the maskable set, the global mask and its bookkeeping."""

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
        if not (isinstance(update_freq, int) and not isinstance(update_freq, bool) and update_freq >= 1):
            raise ValueError(f"update_freq: got {update_freq!r}; allowed: an integer >= 1 (epochs between updates)")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.sparsity = float(sparsity)
        self.granularity = str(self._granularity)  # "element", "channel", "tensor" or "N:M"
        self.cost_aware = cost_aware
        self.update_freq = update_freq
        self.renormalize = bool(renormalize)
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
        self._numel = sum(p.numel() for p in maskable)  # (a DTensor's numel is the global one)
        # Sharded: the masks are held over the local shards, and a global flat mask is gathered from them.
        self._mask_layout = None if self._layout is None else ShardLayout(maskable, self._layout.group)
        self._masks = FlatMask(self._locals(maskable))
        # None when every parameter is maskable: the per-step filter in _perturbable is then skipped.
        ids = {id(p) for p in maskable}
        self._maskable_ids = None if len(ids) == len(self._all_params()) else ids

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
            self.state[p].pop("mask", None)
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
            self.state[p]["mask"] = view

    def flat_mask(self) -> Tensor:
        """A new flat bool tensor of every mask, in param-group order. Sharded: the global mask, gathered from every
        rank (a collective: every rank must call it)."""
        if self._mask_layout is not None:
            return self._mask_layout.gather(self._masks.flat())
        return self._masks.flat()

    def _mask_for(self, p: Tensor) -> Tensor | None:
        return self.state[p].get("mask")

    def _mask_segment(self, ps: list[Tensor], gs: list[Tensor]) -> MaskSegment | None:
        return self._masks.segment(ps, gs)

    def _perturbable(self, group: dict) -> list[Tensor]:
        ids = self._maskable_ids
        if ids is None:
            return super()._perturbable(group)
        return [p for p in group["params"] if p.grad is not None and id(p) in ids]

    def _dead_params(self) -> list[Tensor]:
        if self._mask_layout is not None:  # a shard may be dead on one rank only: nothing is frozen
            return []
        dead = self._masks.dead()
        # With every tensor dead the perturbation is zero anyway; freezing all would leave backward nothing to do.
        return [] if len(dead) == len(self._maskable) else dead

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        maskable = {id(p) for p in self._maskable}
        for p in self._all_params():
            if id(p) not in maskable and p in self.state:
                self.state[p].pop("mask", None)
        masks = [self.state[p].get("mask") for p in self._maskable]
        if all(m is not None for m in masks):  # loaded masks are separate tensors: gather them into one buffer again
            self._set_local(_flat(masks))  # type: ignore[arg-type]  # (sharded: this rank's state, its shards)
        else:
            self._extend_mask(None, 0)

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


class SSAMF(_SparseSAM):
    """SSAM-F: the mask keeps the entries with the largest empirical Fisher information.

    Call ``update_mask(model, data)`` before the first step and then every ``update_freq`` epochs
    (``should_update(epoch)``), before that epoch's first step; ``refresh_mask(epoch, model=..., data=...)`` does
    both checks (``mask_refresh == "before_epoch"``).
    """

    mask_refresh = "before_epoch"

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        sparsity: float | None = None,
        num_samples: int = 128,
        update_freq: int = 1,
        renormalize: bool = False,
        adaptive: bool = False,
        fisher_mode: str = "train",
        fisher_method: str = "auto",
        granularity: str = "element",
        cost_aware: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
            raise ValueError(f"num_samples: got {num_samples!r}; allowed: an integer >= 1")
        if fisher_mode not in ("train", "eval"):
            raise ValueError(f"fisher_mode: got {fisher_mode!r}; allowed: 'train', 'eval'")
        if fisher_method not in FISHER_METHODS:
            raise ValueError(f"fisher_method: got {fisher_method!r}; allowed: {', '.join(map(repr, FISHER_METHODS))}")
        super().__init__(
            params,
            base_optimizer,
            rho,
            sparsity,
            update_freq,
            renormalize,
            adaptive,
            granularity,
            cost_aware,
            **base_kwargs,
        )
        self.num_samples = num_samples
        self.fisher_mode = fisher_mode
        self.fisher_method = fisher_method
        self.num_updates = 0

    def _check_ready(self) -> None:
        if not self.has_masks():
            raise RuntimeError(
                "SSAMF has no mask yet: call opt.update_mask(model, train_data) before the first step "
                "(and again whenever opt.should_update(epoch))"
            )

    @torch.no_grad()
    def update_mask(
        self,
        model: nn.Module,
        data: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        """Recompute the mask from the Fisher of ``num_samples`` examples of ``data`` (a Dataset or batches).

        ``reduce`` (distributed training) turns this process's Fisher into the sum over all processes, so that each
        can measure its own share of the examples and every one still builds the same mask. FSDP-sharded
        parameters: the Fisher is measured on full copies of them (``ssam.optim.sharded.unsharded``).
        """
        with (
            torch.enable_grad(),
            unsharded(model, self._maskable)
            if self._layout is not None
            else contextlib.nullcontext(self._maskable) as params,
        ):
            fisher = empirical_fisher(
                model,
                params,
                data,
                self.num_samples,
                loss_fn,
                mode=self.fisher_mode,
                method=self.fisher_method,
                generator=generator,
            )
        self.set_mask_from_scores(reduce(fisher) if reduce is not None else fisher)

    @torch.no_grad()
    def set_mask_from_scores(self, scores: list[Tensor]) -> None:
        """Keep the ``num_live`` entries with the highest scores (one tensor per maskable parameter, in order); for
        channel and tensor granularity the groups best-first by mean score that fit, for N:M the pattern.
        Sharded: whole-tensor scores (the same on every rank), or each rank's local-shard scores (gathered)."""
        if self._granularity.kind == "element":
            flat = _flat(scores).float()
            if self._mask_layout is not None and flat.numel() != self._numel:
                flat = self._mask_layout.gather(flat)
            self.set_flat_mask(top_k_mask(flat, self.num_live))
        else:
            self.set_flat_mask(mask_from_scores(scores, self._granularity, self.num_live, self.cost_aware))
        self.num_updates += 1

    def refresh_mask(
        self,
        epoch: int,
        *,
        model: nn.Module | None = None,
        data: Any = None,
        generator: torch.Generator | None = None,
        reduce: Callable | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> bool:
        """``update_mask(model, data, ...)`` when ``should_update(epoch)`` or there is no mask yet; True if it ran."""
        if not (self.should_update(epoch) or not self.has_masks()):
            return False
        if model is None or data is None:
            raise ValueError(
                f"model, data: got {type(model).__name__}, {type(data).__name__}; allowed: the model and "
                "its training data (SSAM-F measures the Fisher on them)"
            )
        self.update_mask(model, data, loss_fn=loss_fn, generator=generator, reduce=reduce)
        return True

    def _extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def _load_extra_state(self, extra: dict) -> None:
        self.num_updates = int(extra.get("num_updates", 0))


class SSAMD(_SparseSAM):
    """SSAM-D: a random initial mask evolved by drop-and-grow with a cosine-decaying death rate.

    Call ``update_mask(epoch)`` after the first backward of the first step of every epoch with
    ``should_update(epoch)``: it scores entries with the gradient then in ``.grad``. ``refresh_mask(epoch)`` does
    the check and runs at most once per epoch (``mask_refresh == "first_backward"``).
    """

    mask_refresh = "first_backward"

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        sparsity: float | None = None,
        drop_rate: float = 0.5,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        update_freq: int = 1,
        T_start: int = 0,
        T_end: int = 200,
        renormalize: bool = False,
        adaptive: bool = False,
        seed: int | None = None,
        granularity: str = "element",
        cost_aware: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(drop_rate, (int, float)) and 0 <= drop_rate <= 1):
            raise ValueError(f"drop_rate: got {drop_rate!r}; allowed: a number in [0, 1]")
        if drop_strategy not in STRATEGIES:
            raise ValueError(f"drop_strategy: got {drop_strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if growth_strategy not in STRATEGIES:
            raise ValueError(f"growth_strategy: got {growth_strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if not T_end > T_start:
            raise ValueError(f"T_end: got {T_end!r} with T_start={T_start!r}; allowed: T_end > T_start")
        super().__init__(
            params,
            base_optimizer,
            rho,
            sparsity,
            update_freq,
            renormalize,
            adaptive,
            granularity,
            cost_aware,
            **base_kwargs,
        )
        self.drop_rate = float(drop_rate)
        self.drop_strategy = drop_strategy
        self.growth_strategy = growth_strategy
        self.T_start, self.T_end = int(T_start), int(T_end)
        self.num_updates = 0
        self.last_update_epoch: int | None = None
        device = self.mask_params()[0].device
        if seed is None:
            # Drawn from the global generator so torch.manual_seed makes runs (and DDP ranks) agree.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        #: First maskable tensor whose groups may grow: the cost-aware cut of the initial mask (0 without it).
        self.grow_from = 0
        if self._granularity.kind == "element":
            n = self._numel
            self.set_flat_mask(top_k_mask(torch.rand(n, generator=self._generator, device=device), self.num_live))
        else:
            flat, self.grow_from = random_mask(
                self._shapes(), self._granularity, self.num_live, cost_aware, self._generator
            )
            self.set_flat_mask(flat)

    def _extend_mask(self, old: Tensor | None, n_new: int) -> None:
        """After add_param_group: the old entries keep their mask, the new ones get a random one, so that the total
        is ``num_live`` again."""
        if old is None:
            return super()._extend_mask(old, n_new)
        k_new = self.num_live - int(old.sum())
        if self._granularity.kind != "element":  # the new tensors come last: after any cost-aware cut
            shapes, total = self._shapes(), 0
            while total < n_new:
                total += math.prod(shapes.pop())
            new = random_mask(self._shapes()[len(shapes) :], self._granularity, k_new, False, self._generator)[0]
        else:
            new = top_k_mask(torch.rand(n_new, generator=self._generator, device=self._generator.device), k_new)
        self.set_flat_mask(torch.cat([old, new.to(old.device)]))

    def death_rate(self, epoch: int) -> float:
        """drop_rate * (1 + cos(pi * (epoch - T_start) / (T_end - T_start))) / 2, clamped to the schedule."""
        t = min(max(epoch - self.T_start, 0), self.T_end - self.T_start)
        return self.drop_rate * (1 + math.cos(math.pi * t / (self.T_end - self.T_start))) / 2

    def _scores(self, strategy: str) -> Tensor:
        """A fresh flat float32 score per maskable entry: uniform noise, |w| or |g| (a NaN gradient scores 0, the
        lowest a real score can be, not NaN's place in the top-k rule: a broken gradient must not keep a weight)."""
        device = self._generator.device
        if strategy == "random":
            return torch.rand(self._numel, generator=self._generator, device=device)
        srcs = self._locals([p.detach() if strategy == "weight" else p.grad for p in self._maskable])  # type: ignore
        # One concatenation instead of a copy per tensor: on an accelerator, launches are the cost.
        flat = (
            torch.cat([t.reshape(-1) for t in srcs])
            .to(device, torch.float32)
            .abs_()
            .nan_to_num_(nan=0.0, posinf=math.inf)
        )
        return flat if self._mask_layout is None else self._mask_layout.gather(flat)

    def _select(self, strategy: str, among: Tensor, m: int) -> Tensor:
        """Exactly ``m`` of the entries in ``among``: those ``strategy`` scores highest (ties: first positions)."""
        if among.device.type == "cpu":
            if m <= 0:
                return torch.zeros_like(among)
            if strategy == "random":  # a subset drawn directly: no score, no selection pass
                return random_subset(among, m, int(torch.randint(0, 2**62, (1,), generator=self._generator)))
        return top_k_mask(self._scores(strategy), m, among)

    def _keys(self, strategy: str) -> Tensor | np.ndarray:
        """Scores for a grouped update: per entry (averaged per group later), or one uniform draw per channel or
        tensor group for ``random``, so that a group's chance does not depend on its size."""
        if strategy != "random" or not self._granularity.grouped:
            return self._scores(strategy)
        count = group_sizes(self._shapes(), self._granularity.kind).size
        return torch.rand(count, generator=self._generator, device=self._generator.device).double().cpu().numpy()

    def _check_gradients(self) -> None:
        used = [s for s in (self.drop_strategy, self.growth_strategy) if s == "gradient"]
        if not used:
            return
        maskable = {id(p) for p in self._maskable}
        missing = [
            self.param_name(p, i) for i, p in enumerate(self._all_params()) if id(p) in maskable and p.grad is None
        ]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise RuntimeError(
                f"SSAMD.update_mask scores entries by their gradient (drop_strategy={self.drop_strategy!r}, "
                f"growth_strategy={self.growth_strategy!r}), but these maskable parameters have none: {shown}; call "
                "it after a backward pass that reaches every maskable parameter (and not inside first_pass())"
            )

    @torch.no_grad()
    def update_mask(self, epoch: int) -> None:
        """Drop the lowest-scored ``death_rate(epoch)`` fraction of live entries and regrow as many dead ones."""
        self._check_gradients()
        live = self.flat_mask()
        if self._granularity.kind != "element":  # groups die and regrow whole; N:M blocks keep N live
            self.set_flat_mask(
                drop_and_grow(
                    live,
                    self._shapes(),
                    self._granularity,
                    self._keys(self.drop_strategy),
                    self._keys(self.growth_strategy),
                    self.num_live,
                    self.death_rate(epoch),
                    self.grow_from,
                )
            )
            self.num_updates += 1
            self.last_update_epoch = epoch
            return
        n, k = live.numel(), self.num_live
        # As many survive as the paper's int(L * (1 - death rate)); no more can die than there are places to regrow.
        n_die = min(k - int(k * (1 - self.death_rate(epoch))), n - k)
        # Only the live compete to survive and only the dead (before this update) to grow.
        survivors = self._select(self.drop_strategy, live, k - n_die)
        grown = self._select(self.growth_strategy, ~live, n_die)
        self.set_flat_mask(survivors.logical_or_(grown))
        self.num_updates += 1
        self.last_update_epoch = epoch

    def refresh_mask(
        self,
        epoch: int,
        *,
        model: nn.Module | None = None,
        data: Any = None,
        generator: torch.Generator | None = None,
        reduce: Callable | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> bool:
        """``update_mask(epoch)`` when ``should_update(epoch)`` and not yet done at this epoch; True if it ran."""
        if not self.should_update(epoch) or self.last_update_epoch == epoch:
            return False
        self.update_mask(epoch)
        return True

    def _extra_state(self) -> dict:
        return {
            "num_updates": self.num_updates,
            "last_update_epoch": -1 if self.last_update_epoch is None else self.last_update_epoch,
            "generator": self._generator.get_state(),
            "grow_from": self.grow_from,
        }

    def _load_extra_state(self, extra: dict) -> None:
        self.num_updates = int(extra.get("num_updates", 0))
        last = int(extra.get("last_update_epoch", -1))
        self.last_update_epoch = None if last < 0 else last
        self.grow_from = int(extra.get("grow_from", 0))
        if "generator" in extra:
            self._generator.set_state(extra["generator"].cpu())

"""SSAM-F: the sparse perturbation keeps the entries with the largest empirical Fisher (see ``ssam.optim.sparse``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .fisher import FISHER_METHODS, FISHER_MODES, empirical_fisher
from .groups import mask_from_scores
from .select import top_k_mask
from .settings import Setting, check_choice, check_count
from .sharded import unsharded
from .sparse import SparseSAM, _flat

__all__ = ["SSAMF"]


_check_samples = check_count("num_samples", "examples the Fisher is measured on")
_check_mode = check_choice("fisher_mode", FISHER_MODES)
_check_method = check_choice("fisher_method", FISHER_METHODS)


class SSAMF(SparseSAM):
    """SSAM-F: the mask keeps the entries with the largest empirical Fisher information.

    Call ``update_mask(model, data)`` before the first step and then every ``update_freq`` epochs
    (``should_update(epoch)``), before that epoch's first step; ``refresh_mask(epoch, model=..., data=...)`` does
    both checks (``mask_refresh == "before_epoch"``). Settings of the whole optimizer beyond ``SparseSAM``'s:
    ``num_samples``, ``fisher_mode``, ``fisher_method`` (attributes; also in ``defaults`` and every param group).
    """

    mask_refresh = "before_epoch"
    num_samples = Setting(_check_samples, "Examples the Fisher is measured on.")
    fisher_mode = Setting(
        _check_mode,
        "``'auto'`` (default), ``'train'`` or ``'eval'``: the model's mode while the Fisher is measured "
        "(ssam.optim.fisher.FISHER_MODES).",
    )
    fisher_method = Setting(_check_method, "How per-example gradients are computed (``FISHER_METHODS``).")

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
        fisher_mode: str = "auto",
        fisher_method: str = "auto",
        granularity: str = "element",
        cost_aware: bool = False,
        **base_kwargs: Any,
    ) -> None:
        settings = dict(
            num_samples=_check_samples(num_samples),
            fisher_mode=_check_mode(fisher_mode),
            fisher_method=_check_method(fisher_method),
        )
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
        self._add_settings(**settings)
        self.num_updates = 0

    def _no_mask_message(self) -> str:
        return (
            "SSAMF has no mask yet: call opt.update_mask(model, train_data) before the first step and again whenever "
            "opt.should_update(epoch) (opt.refresh_mask(epoch, model=..., data=...) does both); in a framework the "
            "mask is refreshed for you: Lightning: add ssam.integrations.lightning.SAMCallback() to the Trainer's "
            "callbacks; Hugging Face: use ssam.integrations.transformers.SAMTrainer"
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
        return {**super()._extra_state(), "num_updates": self.num_updates}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.num_updates = int(extra.get("num_updates", 0))

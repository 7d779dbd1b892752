"""SSAM-D: a random sparse mask evolved by drop-and-grow (see ``ssam.optim.sparse``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .dropgrow import drop_and_grow, random_mask
from .groups import group_sizes
from .select import random_subset, top_k_mask
from .settings import Setting, check_choice
from .sparse import STRATEGIES, SparseSAM

__all__ = ["SSAMD"]


def _check_drop_rate(v: Any) -> float:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
        raise ValueError(f"drop_rate: got {v!r}; allowed: a number in [0, 1]")
    return float(v)


def _whole(name: str, v: Any) -> int:
    """An integer, or a number equal to one (numpy's integers, 200.0)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not float(v).is_integer():
        raise ValueError(f"{name}: got {v!r}; allowed: a whole number")
    return int(v)


_check_drop = check_choice("drop_strategy", STRATEGIES)
_check_growth = check_choice("growth_strategy", STRATEGIES)


class SSAMD(SparseSAM):
    """SSAM-D: a random initial mask evolved by drop-and-grow with a cosine-decaying death rate.

    Call ``update_mask(epoch)`` after the first backward of the first step of every epoch with
    ``should_update(epoch)``: it scores entries with the gradient then in ``.grad``. ``refresh_mask(epoch)`` does
    the check and runs at most once per epoch (``mask_refresh == "first_backward"``). Settings of the whole
    optimizer beyond ``SparseSAM``'s: ``drop_rate``, ``drop_strategy``, ``growth_strategy``, and, fixed when built,
    ``T_start``, ``T_end`` and ``seed`` (the one drawn from torch's global generator when None was given).
    """

    mask_refresh = "first_backward"
    drop_rate = Setting(_check_drop_rate, "The death rate at T_start.")
    drop_strategy = Setting(_check_drop, "What the live entries that survive are chosen by.")
    growth_strategy = Setting(_check_growth, "What the dead entries that regrow are chosen by.")
    T_start = Setting(doc="First epoch of the cosine death-rate schedule (fixed when built).")
    T_end = Setting(doc="Epoch where the death rate reaches 0 (fixed when built).")
    seed = Setting(doc="Seed of the optimizer's own generator (fixed when built).")

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
        settings: dict[str, Any] = dict(
            drop_rate=_check_drop_rate(drop_rate),
            drop_strategy=_check_drop(drop_strategy),
            growth_strategy=_check_growth(growth_strategy),
        )
        T_start, T_end = _whole("T_start", T_start), _whole("T_end", T_end)
        seed = None if seed is None else _whole("seed", seed)
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
        if seed is None:
            # Drawn from the global generator so torch.manual_seed makes runs (and DDP ranks) agree.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._add_settings(**settings, T_start=T_start, T_end=T_end, seed=seed)
        self.num_updates = 0
        self.last_update_epoch: int | None = None
        device = self.mask_params()[0].device
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
            **super()._extra_state(),
            "num_updates": self.num_updates,
            "last_update_epoch": -1 if self.last_update_epoch is None else self.last_update_epoch,
            "generator": self._generator.get_state(),
            "grow_from": self.grow_from,
        }

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.num_updates = int(extra.get("num_updates", 0))
        last = int(extra.get("last_update_epoch", -1))
        self.last_update_epoch = None if last < 0 else last
        self.grow_from = int(extra.get("grow_from", 0))
        if "generator" in extra:
            self._generator.set_state(extra["generator"].cpu())

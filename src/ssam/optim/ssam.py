"""Sparse SAM (Mi et al., NeurIPS 2022): SAM whose perturbation only touches a global subset of the weights.

Masks are global: every parameter tensor's entries compete for the same ``int(N * (1 - sparsity))`` places.
State per parameter: ``mask`` (torch.bool, 1 byte/entry) and ``w_saved``, the copy of w held between the two passes
(the parameter's dtype, 4 bytes/entry in fp32): 5 bytes per parameter beyond the base optimizer.

- SSAM-F keeps the entries with the largest diagonal empirical Fisher, measured on ``num_samples`` examples.
- SSAM-D starts from a random mask; each update kills the weakest live entries (by |w|, |g| or at random) at a
  cosine-decaying death rate and regrows as many entries among those dead before the update.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .fisher import FISHER_METHODS, empirical_fisher
from .sam import SAM
from .select import device_top_k_mask

__all__ = ["SSAMF", "SSAMD", "top_k_mask", "STRATEGIES"]

STRATEGIES = ("weight", "gradient", "random")
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _dense(t: Tensor) -> bool:
    """Whether t covers one gap-free stretch of memory (contiguous or channels_last), so it can be read flat."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _memory_order(t: Tensor) -> Tensor:
    """A dense tensor's entries as a flat view, in the order they lie in memory (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def _masked_flat(tensors: list[Tensor], mask: Tensor, contiguous: bool = False) -> Tensor:
    """The tensors concatenated (a new tensor) and multiplied by a flat mask laid out the same way: in plain order
    with ``contiguous`` (a mask buffer in plain order; made in one C++ call), else each in memory order."""
    if contiguous and len(tensors) > 1:  # (for one tensor _flatten_dense_tensors returns a view of it, not a copy)
        return torch._utils._flatten_dense_tensors(tensors).mul_(mask)
    if contiguous:
        return tensors[0].reshape(-1).mul(mask)
    return torch.cat([_memory_order(t) for t in tensors]).mul_(mask)


def top_k_mask(score: Tensor, k: int) -> Tensor:
    """Boolean mask with exactly ``k`` True entries at the ``k`` largest scores of a 1-D tensor.

    A k-th value threshold (linear-time selection) instead of a sort; ties at the threshold are broken by position
    so the count is exact, and NaN scores rank lowest. On a CPU the selection is numpy's partition, several times faster than torch.kthvalue;
    on an accelerator it is a topk threshold (``ssam.optim.select``) that runs without a host round trip.
    """
    n = score.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    if score.device.type == "cpu":
        values = score.detach()
        if values.dtype not in (torch.float16, torch.float32, torch.float64):
            values = values.float()
        # kthvalue also sorts indices along and copies in torch's layout; a partition of the values is enough.
        thr = np.partition(values.numpy(), n - k)[n - k].item()
        kept = score >= thr
        if int(kept.count_nonzero()) == k:
            return kept
        if values.is_floating_point() and bool(torch.isnan(values).any()):
            # numpy ranks NaN highest and no comparison keeps it: NaN ranks lowest instead, as on the device path.
            return top_k_mask(torch.nan_to_num(values, nan=-math.inf, posinf=math.inf, neginf=-math.inf), k)
        above = score > thr
        need = k - int(above.count_nonzero())
        at = score == thr
        return above | (at & (torch.cumsum(at, 0) <= need))
    return device_top_k_mask(score, k)


class _SparseSAM(SAM):
    """Shared machinery of SSAM-F and SSAM-D: the global mask and its bookkeeping."""

    def __init__(self, params: Any, base_optimizer: Any, rho: float, sparsity: float, update_freq: int,
                 renormalize: bool, adaptive: bool, **kwargs: Any) -> None:
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ValueError(f"sparsity: got {sparsity!r}; allowed: a number in [0, 1) (fraction NOT perturbed)")
        if not (isinstance(update_freq, int) and not isinstance(update_freq, bool) and update_freq >= 1):
            raise ValueError(f"update_freq: got {update_freq!r}; allowed: an integer >= 1 (epochs between updates)")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.sparsity = float(sparsity)
        self.update_freq = update_freq
        self.renormalize = bool(renormalize)
        # All masks live in one flat bool tensor (when the parameters share a device); state[p]["mask"] are views
        # of it. One buffer lets first_step mask every perturbation with one kernel instead of one per tensor.
        self._mask_buffer: Tensor | None = None
        self._mask_index: dict[int, int] = {}
        self._mask_ptrs: list[int] = []
        self._mask_dense = False
        self._mask_contiguous = False

    # --------------------------------------------------------------- mask plumbing
    def mask_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def num_live(self) -> int:
        """Entries perturbed: ``int(N * (1 - sparsity))`` of the N entries of all parameters."""
        n = sum(p.numel() for p in self.mask_params())
        return int(n * (1 - self.sparsity))

    def _mask_for(self, p: Tensor) -> Tensor | None:
        return self.state[p].get("mask")

    def has_masks(self) -> bool:
        return all("mask" in self.state[p] for p in self.mask_params())

    def set_flat_mask(self, flat: Tensor) -> None:
        """Set every mask from one flat tensor over all entries, in param-group order."""
        params = self.mask_params()
        flat = flat.reshape(-1)
        total = sum(p.numel() for p in params)
        if flat.numel() != total:
            raise ValueError(f"flat mask: got {flat.numel()} entries; allowed: exactly {total}, one per parameter "
                             "entry")
        if len({p.device for p in params}) > 1:  # parameters spread over devices: one mask tensor each
            self._mask_buffer = None
            offset = 0
            for p in params:
                self.state[p]["mask"] = flat[offset:offset + p.numel()].to(p.device, torch.bool).view(p.shape).clone()
                offset += p.numel()
            return
        buf = self._mask_buffer
        if buf is None or buf.numel() != total or buf.device != params[0].device:
            buf = self._mask_buffer = torch.empty(total, dtype=torch.bool, device=params[0].device)
        all_contiguous = all(p.is_contiguous() for p in params)
        if all_contiguous:
            buf.copy_(flat)
        # Each mask is laid out in memory as its parameter is (channels_last included), so that the buffer and the
        # gradients, both read in memory order, line up entry for entry in _perturb_foreach.
        offset = 0
        self._mask_index = {}  # mask data pointer -> position, for _mask_segment's check
        for i, p in enumerate(params):
            n = p.numel()
            piece = buf[offset:offset + n]
            view = piece.as_strided(p.shape, p.stride()) if _dense(p) else piece.view(p.shape)
            if not all_contiguous:  # (else the one copy above already put every entry in place)
                view.copy_(flat[offset:offset + n].view(p.shape))
            self.state[p]["mask"] = view
            self._mask_index[view.data_ptr()] = i
            offset += n
        self._mask_ptrs = list(self._mask_index)
        self._mask_dense = all(_dense(p) for p in params)
        self._mask_contiguous = all_contiguous

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._mask_buffer = None
        if self.has_masks():  # loaded masks are separate tensors: gather them into one buffer again
            self.set_flat_mask(self.flat_mask())

    def _mask_segment(self, ps: list[Tensor], masks: list[Tensor | None], gs: list[Tensor]) -> Tensor | None:
        """The stretch of the mask buffer that ``masks`` tile in order, if they do, the gradients share one dtype and
        the buffer's device, and (unless the buffer is in plain order) each parameter and gradient is laid out in
        memory as its mask; else None. Runs every step, where the host's time is the step's time on an accelerator:
        list comparisons, no per-tensor branching."""
        buf = self._mask_buffer
        if buf is None or not self._mask_dense or not masks or masks[0] is None or gs[0].device != buf.device:
            return None
        try:
            ptrs = [m.data_ptr() for m in masks]
        except AttributeError:  # a parameter without a mask
            return None
        first = self._mask_index.get(ptrs[0])
        if first is None or ptrs != self._mask_ptrs[first:first + len(ptrs)]:
            return None
        # With every parameter contiguous the buffer is in plain order and the gradients are read in plain order
        # whatever their layout (see _masked_flat). Otherwise they are read in memory order and must be laid out as
        # their masks; every mask view is dense (set_flat_mask), so a gradient with its strides is dense too.
        if not self._mask_contiguous:
            strides = [m.stride() for m in masks]
            if strides != [g.stride() for g in gs] or strides != [p.stride() for p in ps]:
                return None
        if len({g.dtype for g in gs}) != 1:  # one concatenation must not promote some gradients' precision
            return None
        start = ptrs[0] - buf.data_ptr()
        return buf[start:start + sum(m.numel() for m in masks)]

    def _perturb_foreach(self, ps: list[Tensor], gs: list[Tensor], saved: list[Tensor], masks: list[Tensor | None],
                         scale: Tensor, adaptive: bool) -> None:
        seg = self._mask_segment(ps, masks, gs)
        if seg is None:
            return super()._perturb_foreach(ps, gs, saved, masks, scale, adaptive)
        # On an accelerator a step is bound by kernel launches: one concatenation and two flat products replace a
        # product per tensor (foreach cannot multiply float by bool lists in one kernel). Same values: g * m * scale
        # is g * scale where m is 1 and 0 where it is 0. Everything is read in memory order (see set_flat_mask).
        torch._foreach_copy_(saved, ps)
        flat = _masked_flat(gs, seg, self._mask_contiguous).mul_(scale)
        if self._mask_contiguous:  # memory order is plain order: the views are made in C++, not one by one here
            es = torch._utils._unflatten_dense_tensors(flat, ps)
        else:
            es = [e.as_strided(p.shape, p.stride()) for e, p in zip(flat.split([p.numel() for p in ps]), ps)]
        if adaptive:
            torch._foreach_mul_(es, torch._foreach_mul(ps, ps))
        torch._foreach_add_(ps, es)

    def _flat(self, tensors: list[Tensor]) -> Tensor:
        device = tensors[0].device
        return torch.cat([t.reshape(-1).to(device) for t in tensors])

    def flat_mask(self) -> Tensor:
        masks = [self.state[p]["mask"] for p in self.mask_params()]
        buf = self._mask_buffer
        in_order = buf is not None and [m.data_ptr() for m in masks] == self._mask_ptrs
        if in_order and all(m.is_contiguous() for m in masks):
            return buf.clone()  # the buffer is already the flat mask, in order
        return self._flat(masks)

    def should_update(self, epoch: int) -> bool:
        """Whether the mask is refreshed at the start of ``epoch`` (every ``update_freq`` epochs, from 0)."""
        return epoch % self.update_freq == 0

    def mask_density(self) -> float:
        """Fraction of all entries that are perturbed (a host sync: not for the inner loop)."""
        if not self.has_masks():
            return float("nan")
        live = sum(int(self.state[p]["mask"].sum()) for p in self.mask_params())
        return live / max(1, sum(p.numel() for p in self.mask_params()))

    def mask_stats(self) -> list[dict]:
        """Per parameter tensor: name (when named parameters were given), numel, live fraction."""
        rows = []
        for i, p in enumerate(self.mask_params()):
            m = self.state[p].get("mask")
            rows.append({
                "name": self.param_name(p, i),
                "shape": tuple(p.shape),
                "numel": p.numel(),
                "density": float(m.float().mean()) if m is not None else float("nan"),
            })
        return rows

    # --------------------------------------------------------------- perturbation
    def _grad_norm(self, params: list[Tensor], grads: list[Tensor], adaptive: bool) -> Tensor:
        if self.renormalize:
            # Normalising by the masked gradient's norm puts the masked perturbation back on the rho-sphere.
            masks = [self.state[p]["mask"] for p in params]
            foreach = self._use_foreach(params)
            seg = self._mask_segment(params, masks, grads) if foreach and not adaptive else None
            if seg is not None:  # the masked gradients as pieces of one flat product (see _perturb_foreach)
                grads = list(_masked_flat(grads, seg, self._mask_contiguous).split([g.numel() for g in grads]))
            elif foreach:
                grads = torch._foreach_mul(grads, masks)
            else:
                grads = [g * m for g, m in zip(grads, masks)]
        return super()._grad_norm(params, grads, adaptive)


class SSAMF(_SparseSAM):
    """SSAM-F: the mask keeps the entries with the largest empirical Fisher information.

    Call ``update_mask(model, data)`` before the first step and then every ``update_freq`` epochs
    (``should_update(epoch)``), before that epoch's first step.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, sparsity: float = 0.5,
                 num_samples: int = 128, update_freq: int = 1, renormalize: bool = False, adaptive: bool = False,
                 fisher_mode: str = "train", fisher_method: str = "auto", **base_kwargs: Any) -> None:
        if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
            raise ValueError(f"num_samples: got {num_samples!r}; allowed: an integer >= 1")
        if fisher_mode not in ("train", "eval"):
            raise ValueError(f"fisher_mode: got {fisher_mode!r}; allowed: 'train', 'eval'")
        if fisher_method not in FISHER_METHODS:
            raise ValueError(f"fisher_method: got {fisher_method!r}; allowed: {', '.join(map(repr, FISHER_METHODS))}")
        super().__init__(params, base_optimizer, rho, sparsity, update_freq, renormalize, adaptive, **base_kwargs)
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
    def update_mask(self, model: nn.Module, data: Any, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                    generator: torch.Generator | None = None,
                    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None) -> None:
        """Recompute the mask from the Fisher of ``num_samples`` examples of ``data`` (a Dataset or batches).

        ``reduce`` (distributed training) turns this process's Fisher into the sum over all processes, so that each
        can measure its own share of the examples and every one still builds the same mask.
        """
        with torch.enable_grad():
            fisher = empirical_fisher(model, self.mask_params(), data, self.num_samples, loss_fn,
                                      mode=self.fisher_mode, method=self.fisher_method, generator=generator)
        self.set_mask_from_scores(reduce(fisher) if reduce is not None else fisher)

    @torch.no_grad()
    def set_mask_from_scores(self, scores: list[Tensor]) -> None:
        """Keep the ``num_live`` entries with the highest scores (one tensor per parameter, in group order)."""
        self.set_flat_mask(top_k_mask(self._flat(scores).float(), self.num_live))
        self.num_updates += 1

    def _extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def _load_extra_state(self, extra: dict) -> None:
        self.num_updates = int(extra.get("num_updates", 0))


class SSAMD(_SparseSAM):
    """SSAM-D: a random initial mask evolved by drop-and-grow with a cosine-decaying death rate.

    Call ``update_mask(epoch)`` after the first backward of the first step of every epoch with
    ``should_update(epoch)``: it scores entries with the gradient then in ``.grad``.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, sparsity: float = 0.5,
                 drop_rate: float = 0.5, drop_strategy: str = "gradient", growth_strategy: str = "random",
                 update_freq: int = 1, T_start: int = 0, T_end: int = 200, renormalize: bool = False,
                 adaptive: bool = False, seed: int | None = None, **base_kwargs: Any) -> None:
        if not (isinstance(drop_rate, (int, float)) and 0 <= drop_rate <= 1):
            raise ValueError(f"drop_rate: got {drop_rate!r}; allowed: a number in [0, 1]")
        if drop_strategy not in STRATEGIES:
            raise ValueError(f"drop_strategy: got {drop_strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if growth_strategy not in STRATEGIES:
            raise ValueError(f"growth_strategy: got {growth_strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if not T_end > T_start:
            raise ValueError(f"T_end: got {T_end!r} with T_start={T_start!r}; allowed: T_end > T_start")
        super().__init__(params, base_optimizer, rho, sparsity, update_freq, renormalize, adaptive, **base_kwargs)
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
        n = sum(p.numel() for p in self.mask_params())
        self.set_flat_mask(top_k_mask(torch.rand(n, generator=self._generator, device=device), self.num_live))

    def death_rate(self, epoch: int) -> float:
        """drop_rate * (1 + cos(pi * (epoch - T_start) / (T_end - T_start))) / 2, clamped to the schedule."""
        t = min(max(epoch - self.T_start, 0), self.T_end - self.T_start)
        return self.drop_rate * (1 + math.cos(math.pi * t / (self.T_end - self.T_start))) / 2

    def _scores(self, strategy: str, params: list[Tensor], among: Tensor | None = None) -> Tensor:
        """A fresh flat float32 score per entry, written in place into one buffer. With ``among`` (CPU only), the
        entries outside it score 0, folded into the same pass (scores are >= 0, so 0 never outranks a member)."""
        n = sum(p.numel() for p in params)
        device = self._generator.device
        if strategy == "random":
            return torch.rand(n, generator=self._generator, device=device)
        srcs = [p.detach() if strategy == "weight" else p.grad for p in params]
        if among is None and all(t is not None for t in srcs):
            # One concatenation instead of a copy per tensor: on an accelerator, launches are the cost.
            # A NaN gradient scores 0, the lowest a member can score (ssam.optim.select ranks NaN below -inf).
            return torch.cat([t.reshape(-1) for t in srcs]).to(device, torch.float32).abs_().nan_to_num_(
                nan=0.0, posinf=math.inf)
        out = torch.empty(n, dtype=torch.float32, device=device)
        keep = among.numpy().view(np.uint8) if among is not None else None
        offset = 0
        for p, src in zip(params, srcs):
            view = out[offset:offset + p.numel()]
            if src is None:
                view.zero_()
            elif keep is not None and src.dtype in _NUMPY_FLOATS:
                # numpy's float-by-uint8 product is vectorised; torch's mixed-type one is not.
                np.multiply(src.reshape(-1).numpy(), keep[offset:offset + p.numel()], out=view.numpy())
            else:
                view.copy_(src.reshape(-1))
                if keep is not None:
                    view.mul_(among[offset:offset + p.numel()])
            offset += p.numel()
        return out.abs_()

    def _top_within_cpu(self, strategy: str, params: list[Tensor], among: Tensor, m: int) -> Tensor:
        """Exactly ``m`` of the entries in ``among``: those ``strategy`` scores highest (ties: first positions)."""
        if m <= 0:
            return torch.zeros_like(among)
        if strategy == "random":
            return self._random_subset_cpu(among, m)
        score = self._scores(strategy, params, among).numpy()
        # Outsiders score 0 <= every member, so the m-th largest score overall is the m-th largest member's.
        thr = np.partition(score, score.size - m)[score.size - m]
        chosen = score >= thr
        if thr > 0 and np.count_nonzero(chosen) == m:
            return torch.from_numpy(chosen)
        if np.isnan(thr) or np.isnan(score).any():  # a NaN gradient scores 0, as on the device path
            np.nan_to_num(score, copy=False, nan=0.0, posinf=np.inf)
            thr = np.partition(score, score.size - m)[score.size - m]
        above = score > thr
        at = (score == thr) & among.numpy()
        need = m - int(np.count_nonzero(above))
        return torch.from_numpy(above | (at & (np.cumsum(at) <= need)))

    def _random_subset_cpu(self, among: Tensor, m: int) -> Tensor:
        """A uniformly random ``m``-subset of ``among``: each member kept with probability about m / |among|
        (16 random bits apiece, not a float), then members added or dropped uniformly at random to make the
        count exact. Given its size, a Bernoulli subset is uniform, and so is a uniform trim or fill of it."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=self._generator)))
        pool = among.numpy()
        size = int(np.count_nonzero(pool))
        if m >= size:
            return among.clone()
        words = (pool.size + 3) // 4
        bits = rng.bit_generator.random_raw(words).view(np.uint16)[:pool.size]
        chosen = (bits < min(65535, round(65536 * m / size))) & pool
        have = int(np.count_nonzero(chosen))
        if have > m:
            idx = np.flatnonzero(chosen)
            chosen[idx[rng.choice(idx.size, have - m, replace=False)]] = False
        elif have < m:
            idx = np.flatnonzero(pool & ~chosen)
            chosen[idx[rng.choice(idx.size, m - have, replace=False)]] = True
        return torch.from_numpy(chosen)

    @torch.no_grad()
    def update_mask(self, epoch: int) -> None:
        """Drop the lowest-scored ``death_rate(epoch)`` fraction of live entries and regrow as many dead ones."""
        params = self.mask_params()
        live = self.flat_mask()
        n, k = live.numel(), self.num_live
        # As many survive as the paper's int(L * (1 - death rate)); no more can die than there are places to regrow.
        n_die = min(k - int(k * (1 - self.death_rate(epoch))), n - k)
        # Only the live compete to survive and only the dead (before this update) to grow.
        if live.device.type == "cpu":
            survivors = self._top_within_cpu(self.drop_strategy, params, live, k - n_die)
            grown = self._top_within_cpu(self.growth_strategy, params, ~live, n_die)
        else:
            death = self._scores(self.drop_strategy, params).masked_fill_(~live, float("-inf"))
            survivors = top_k_mask(death, k - n_die)
            del death
            growth = self._scores(self.growth_strategy, params).masked_fill_(live, float("-inf"))
            grown = top_k_mask(growth, n_die)
        self.set_flat_mask(survivors.logical_or_(grown))
        self.num_updates += 1
        self.last_update_epoch = epoch

    def _extra_state(self) -> dict:
        return {
            "num_updates": self.num_updates,
            "last_update_epoch": -1 if self.last_update_epoch is None else self.last_update_epoch,
            "generator": self._generator.get_state(),
        }

    def _load_extra_state(self, extra: dict) -> None:
        self.num_updates = int(extra.get("num_updates", 0))
        last = int(extra.get("last_update_epoch", -1))
        self.last_update_epoch = None if last < 0 else last
        if "generator" in extra:
            self._generator.set_state(extra["generator"].cpu())

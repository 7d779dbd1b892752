"""A loss scaler for float16 training with SAM's two backward passes.

``torch.amp.GradScaler`` allows one ``unscale_`` per optimizer step, but SAM needs the true gradient twice: once to
build the perturbation and once for the base step. This scaler unscales each pass on its own, skips the whole step
when either pass overflows (restoring w if the weights were already perturbed) and adapts the scale once per step,
the way GradScaler does (halve on overflow, double after ``growth_interval`` clean steps).

    scaler = TwoPassScaler()
    with torch.autocast("cuda", torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    if scaler.first_step(opt):
        with torch.autocast("cuda", torch.float16):
            loss_fn(model(x), y).backward()  # scaled: scaler.scale(...)
        scaler.second_step(opt)
    scaler.update()
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["TwoPassScaler"]


class TwoPassScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self._scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self._good_steps = 0
        self._found_inf = False
        self.skipped_steps = 0

    def get_scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self._scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide every gradient by the scale in place; True when all of them are finite (one host sync)."""
        if not self.enabled:
            return True
        groups: dict[tuple, list[Tensor]] = defaultdict(list)
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    groups[(p.grad.device, p.grad.dtype)].append(p.grad)
        found = None
        for (device, _), grads in groups.items():
            found_inf = torch.zeros(1, device=device)
            inv = torch.full((1,), 1.0 / self._scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
            found = found_inf.cpu() if found is None else found + found_inf.cpu()
        return found is None or float(found) == 0.0

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """One-pass optimizers (plain SGD/AdamW): unscale and step unless a gradient overflowed."""
        if self.unscale_(optimizer):
            optimizer.step()
            return True
        self.skip(optimizer)
        return False

    def first_step(self, optimizer, zero_grad: bool = True) -> bool:
        """Unscale the gradient at w and perturb; False (and nothing moved) when it overflowed."""
        if self.unscale_(optimizer):
            optimizer.first_step(zero_grad=zero_grad)
            return True
        self.skip(optimizer)
        return False

    def second_step(self, optimizer, zero_grad: bool = True) -> bool:
        """Unscale the gradient at w + e, restore w and step; on overflow restore w and skip the step."""
        if self.unscale_(optimizer):
            optimizer.second_step(zero_grad=zero_grad)
            return True
        self.skip(optimizer)  # (restores w)
        return False

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Give up this step: put back w if a SAM perturbation is pending, drop the gradients and count an overflow,
        so that ``update`` backs the scale off. For callers that unscale themselves (``unscale_`` returned False)."""
        restore = getattr(optimizer, "restore", None)
        if restore is not None:
            restore()
        self._found_inf = True
        self.skipped_steps += 1
        optimizer.zero_grad()

    def update(self) -> None:
        """Adapt the scale after each full step (call once per step, after second_step)."""
        if not self.enabled:
            return
        if self._found_inf:
            self._scale *= self.backoff_factor
            self._good_steps = 0
        else:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self._scale *= self.growth_factor
                self._good_steps = 0
        self._found_inf = False

    def state_dict(self) -> dict:
        return {"scale": self._scale, "good_steps": self._good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self._scale = float(sd["scale"])
        self._good_steps = int(sd["good_steps"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))

"""SAF and MESA: "sharpness-aware training for free" (Du et al., NeurIPS 2022, arXiv 2205.14083). No ascent at all:
the loss gains a trajectory term that keeps the model's predictions close to its own earlier ones,

    loss = CE(logits, y) + lam * T^2 * KL( softmax(past / T) || softmax(logits / T) )

- SAF: ``past`` = the same example's logits recorded ``lag`` epochs earlier (looked up by example index; one table of
  N x (lag + 1) x C logits on the device, as the paper's code keeps it: one slot per epoch in a ring). One pass per
  step: the logits come from the training forward itself.
- MESA: ``past`` = the logits of an exponential moving average of the weights (``decay`` per step; the teacher runs
  in eval mode, so its BatchNorm uses its running statistics). One extra forward per step, counted as 1/3 of a pass
  (``ssam.train.cost``'s work model: a forward is one of a pass's three parts).

The term is on from epoch ``start`` (counted from 0): the papers' scripts switch it on after epoch 5 (``epoch >
5``), so the default here is 6. The defaults are the papers': SAF lam 0.3, MESA lam 0.8, T 5, SAF lag 3 epochs, MESA
decay 0.9998. Both keep their state (the table; the teacher's weights) in ``state_dict()`` for an exact resume.

For a user loop: ``loss = saf(logits, y, index, epoch)`` with ``index`` the batch's example indices into the training
set (``SAFLoss``); ``loss = mesa(logits, y, x, epoch)`` then ``mesa.update(model)`` after each optimizer step
(``MESALoss``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SAFLoss",
    "MESALoss",
    "build_trajectory",
    "trajectory_kl",
    "MESA_FORWARD_COST",
    "SAF_LAMBDA",
    "MESA_LAMBDA",
    "KL_TEMPERATURE",
    "SAF_LAG",
    "MESA_DECAY",
    "KL_START",
]

#: The teacher's forward in passes (a pass: forward, input gradients, weight gradients, one part each).
MESA_FORWARD_COST = 1.0 / 3.0
# The papers' settings: the defaults here and of the command line's flags.
SAF_LAMBDA, MESA_LAMBDA, KL_TEMPERATURE, SAF_LAG, MESA_DECAY, KL_START = 0.3, 0.8, 5.0, 3, 0.9998, 6


def trajectory_kl(logits: Tensor, past: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(past / T) || softmax(logits / T)), summed over classes, averaged over the batch; the
    gradient flows through ``logits`` only."""
    t = float(temperature)
    log_now = F.log_softmax(logits.float() / t, dim=-1)
    target = F.softmax(past.detach().float() / t, dim=-1)
    return F.kl_div(log_now, target, reduction="none").sum(-1).mean() * (t * t)


def _check(lam: float, temperature: float, start: int, what: str) -> None:
    if not lam >= 0:
        raise ValueError(f"{what}: got lambda {lam!r}; allowed: a number >= 0")
    if not temperature > 0:
        raise ValueError(f"{what}: got temperature {temperature!r}; allowed: a number > 0")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"{what}: got start epoch {start!r}; allowed: an integer >= 0")


class SAFLoss:
    """SAF's loss over a training set of ``num_examples`` examples and ``num_classes`` classes."""

    def __init__(
        self,
        num_examples: int,
        num_classes: int,
        lam: float = SAF_LAMBDA,
        temperature: float = KL_TEMPERATURE,
        lag: int = SAF_LAG,
        start: int = KL_START,
        device: torch.device | str | None = None,
    ) -> None:
        _check(lam, temperature, start, "saf")
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
            raise ValueError(f"saf: got lag {lag!r}; allowed: an integer >= 1 (epochs)")
        self.lam, self.temperature, self.lag, self.start = float(lam), float(temperature), lag, start
        # One slot per epoch of the ring: epoch e writes slot e % (lag + 1) and reads slot (e - lag) % (lag + 1).
        self.table = torch.zeros(num_examples, lag + 1, num_classes, device=device)

    def active(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` adds the trajectory term (its lagged logits exist and the start has come)."""
        return self.lam > 0 and epoch >= max(self.start, self.lag)

    def __call__(self, logits: Tensor, targets: Tensor, index: Tensor, epoch: int) -> Tensor:
        loss = F.cross_entropy(logits, targets)
        slots = self.lag + 1
        index = index.to(self.table.device)
        if self.active(epoch):
            past = self.table[index, (epoch - self.lag) % slots].to(logits.device)
            loss = loss + self.lam * trajectory_kl(logits, past, self.temperature)
        self.table[index, epoch % slots] = logits.detach().to(self.table.device, self.table.dtype)
        return loss

    # The trainer's hooks (ssam.train.loop): what the loss takes beyond (logits, targets), the loss of an epoch,
    # what follows a step and what it costs.
    def extras(self, inputs: Tensor, index: Tensor) -> tuple[Tensor, ...]:
        return (index,)

    def bind(self, epoch: int) -> Callable[..., Tensor]:
        return lambda logits, targets, index: self(logits, targets, index, epoch)

    def after_step(self, model: nn.Module) -> None:
        pass

    def extra_passes(self, epoch: int) -> float:
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise ValueError(
                f"saf: the saved logits table is {tuple(table.shape)}; this run needs {tuple(self.table.shape)} "
                "(examples x (lag + 1) x classes)"
            )
        self.table.copy_(table)


class MESALoss:
    """MESA's loss with an EMA teacher of ``model`` (a copy, in eval mode, never trained)."""

    def __init__(
        self,
        model: nn.Module,
        lam: float = MESA_LAMBDA,
        temperature: float = KL_TEMPERATURE,
        decay: float = MESA_DECAY,
        start: int = KL_START,
    ) -> None:
        _check(lam, temperature, start, "mesa")
        if not 0 <= decay < 1:
            raise ValueError(f"mesa: got decay {decay!r}; allowed: 0 <= decay < 1")
        self.lam, self.temperature, self.decay, self.start = float(lam), float(temperature), float(decay), start
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def active(self, epoch: int) -> bool:
        return self.lam > 0 and epoch >= self.start

    def __call__(self, logits: Tensor, targets: Tensor, inputs: Tensor, epoch: int) -> Tensor:
        loss = F.cross_entropy(logits, targets)
        if self.active(epoch):
            with torch.no_grad():
                past = self.teacher(inputs)
            loss = loss + self.lam * trajectory_kl(logits, past, self.temperature)
        return loss

    def extras(self, inputs: Tensor, index: Tensor) -> tuple[Tensor, ...]:
        return (inputs,)

    def bind(self, epoch: int) -> Callable[..., Tensor]:
        return lambda logits, targets, inputs: self(logits, targets, inputs, epoch)

    def after_step(self, model: nn.Module) -> None:
        self.update(model)

    def extra_passes(self, epoch: int) -> float:
        return MESA_FORWARD_COST if self.active(epoch) else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimizer step: teacher <- decay * teacher + (1 - decay) * model, for every floating-point
        parameter and buffer (BatchNorm statistics included); integer buffers (batch counters) are copied."""
        source = model.state_dict()
        for name, t in self.teacher.state_dict().items():
            s = source[name]
            if t.dtype.is_floating_point:
                t.mul_(self.decay).add_(s.to(t.dtype), alpha=1.0 - self.decay)
            else:
                t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])


def build_trajectory(cfg: Any, model: nn.Module, num_examples: int, num_classes: int, device: torch.device):
    """The run's trajectory loss from ``--saf``/``--mesa`` and their flags (None without them)."""
    if cfg.saf is not None:
        return SAFLoss(num_examples, num_classes, cfg.saf, cfg.kl_temperature, cfg.saf_lag, cfg.kl_start, device=device)
    if cfg.mesa is not None:
        return MESALoss(model, cfg.mesa, cfg.kl_temperature, cfg.mesa_decay, cfg.kl_start)
    return None

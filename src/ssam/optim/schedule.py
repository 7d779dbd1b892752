"""Ascent schedules: on which optimizer steps SAM takes its ascent (two passes) and on which the base optimizer
steps alone with the gradient at w (one pass). SAM's gain at a fraction of its cost.

Forms (``schedule=`` of SAM, SSAMF and SSAMD; ``--sam_schedule`` on the command line):

- ``every:K``: the ascent on the optimizer steps whose count (from 0, after gradient accumulation) is a multiple
  of K (MosaicML Composer's ``interval``). ``every:1`` is plain SAM, bit for bit.
- ``looksam:K[:ALPHA]``: LookSAM (Liu et al., CVPR 2022). Every K steps a SAM step, which also stores
  ``g_v = g_s - (g.g_s / |g|^2) g``, the part of the SAM gradient g_s orthogonal to the gradient g at w (one
  parameter-sized buffer, in the state dict; with a mask, g_s is the gradient at w + the masked perturbation). In
  between, the base optimizer gets ``g + ALPHA |g| / |g_v| g_v``. Norms and the projection over all parameters, as
  the paper writes them. ALPHA defaults to 0.7.
- ``aesam[:C]``: adaptive (after AE-SAM, Jiang et al., ICLR 2023): the ascent when the squared gradient norm of the
  previous step exceeded the running mean of those before it by C running standard deviations (an exponential
  moving average with momentum 0.9; C defaults to 1). The decision uses earlier steps only, so it is known before
  pass one (also under a skipping first pass, and the same on every rank when the first pass is synchronised).
  AE-SAM moves its threshold over training; a fixed C is this library's simplification.
- ``late:FRACTION``: plain steps for the first (1 - FRACTION) of the run's planned optimizer steps, SAM after
  (Zhou et al., 2024: SAM selects flatter minima late in training). The plan is set once with
  ``opt.plan_steps(total)`` and kept in the state dict, so a resume with more epochs keeps the boundary.

The decision of the next step is ``SAM.ascent_due()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AscentSchedule",
    "ScheduleState",
    "parse_schedule",
    "looksam_store",
    "looksam_apply",
    "SCHEDULE_FORMS",
    "LOOKSAM_ALPHA",
    "AESAM_C",
    "AESAM_MOMENTUM",
]

LOOKSAM_ALPHA = 0.7
AESAM_C = 1.0
AESAM_MOMENTUM = 0.9
SCHEDULE_FORMS = (
    "'every:K', 'looksam:K[:ALPHA]', 'aesam[:C]' or 'late:FRACTION' (K >= 1, ALPHA >= 0, 0 < FRACTION <= 1)"
)


@dataclass(frozen=True)
class AscentSchedule:
    """A parsed schedule; ``None`` kind: every step ascends (plain SAM)."""

    kind: str | None = None
    k: int = 1
    alpha: float = LOOKSAM_ALPHA
    c: float = AESAM_C
    fraction: float = 1.0

    def __str__(self) -> str:
        if self.kind is None:
            return "none"
        if self.kind == "every":
            return f"every:{self.k}"
        if self.kind == "looksam":
            return f"looksam:{self.k}:{self.alpha:g}"
        if self.kind == "aesam":
            return f"aesam:{self.c:g}"
        return f"late:{self.fraction:g}"

    @property
    def always(self) -> bool:
        """Every step ascends: plain SAM."""
        return (
            self.kind is None
            or (self.kind in ("every", "looksam") and self.k == 1)
            or (self.kind == "late" and self.fraction == 1.0)
        )

    def due(self, step: int, planned: int | None, last_sq: float | None, mean: float, var: float, seen: int) -> bool:
        """Whether optimizer step ``step`` (from 0) ascends, from what is known before its first pass."""
        if self.kind is None:
            return True
        if self.kind in ("every", "looksam"):
            return step % self.k == 0
        if self.kind == "late":
            if planned is None:
                raise ValueError(
                    "schedule: got 'late:...' but no plan of the run's length; allowed: call "
                    "opt.plan_steps(total_optimizer_steps) before the first step"
                )
            return step >= math.floor((1.0 - self.fraction) * planned)
        # aesam: ascend at the start (no statistics yet) and when the last step's |g|^2 was unusually high.
        if last_sq is None or seen < 2:
            return True
        return last_sq > mean + self.c * math.sqrt(max(var, 0.0))


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"schedule: got {spec!r}, whose {what} {text!r} is not a number; allowed: {SCHEDULE_FORMS}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"schedule: got {spec!r}, whose {what} is not finite; allowed: {SCHEDULE_FORMS}")
    return value


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"schedule: got {spec!r}, whose K {text!r} is not an integer >= 1; allowed: {SCHEDULE_FORMS}")
    return int(text)


def parse_schedule(spec: object) -> AscentSchedule:
    """``"every:2"`` -> AscentSchedule("every", k=2); None or ``"none"``: plain SAM; a bad form is a ValueError
    naming it."""
    if spec is None or isinstance(spec, AscentSchedule):
        return spec or AscentSchedule()
    if not isinstance(spec, str):
        raise ValueError(f"schedule: got {spec!r}; allowed: None or {SCHEDULE_FORMS}")
    parts = spec.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    if kind == "none" and not args:
        return AscentSchedule()
    if kind == "every" and len(args) == 1:
        return AscentSchedule("every", k=_count(args[0], spec))
    if kind == "looksam" and len(args) in (1, 2):
        alpha = _number(args[1], "ALPHA", spec) if len(args) == 2 else LOOKSAM_ALPHA
        if alpha < 0:
            raise ValueError(f"schedule: got {spec!r}, whose ALPHA {alpha:g} is < 0; allowed: {SCHEDULE_FORMS}")
        return AscentSchedule("looksam", k=_count(args[0], spec), alpha=alpha)
    if kind == "aesam" and len(args) <= 1:
        return AscentSchedule("aesam", c=_number(args[0], "C", spec) if args else AESAM_C)
    if kind == "late" and len(args) == 1:
        fraction = _number(args[0], "FRACTION", spec)
        if not 0 < fraction <= 1:
            raise ValueError(
                f"schedule: got {spec!r}, whose FRACTION {fraction:g} is outside (0, 1]; allowed: {SCHEDULE_FORMS}"
            )
        return AscentSchedule("late", fraction=fraction)
    raise ValueError(f"schedule: got {spec!r}; allowed: {SCHEDULE_FORMS}")


class ScheduleState:
    """What a schedule remembers between steps: the optimizer steps taken, the ascents among them, the planned
    length (``late``) and the running statistics of the squared gradient norm (``aesam``). Saved in the state dict
    under the optimizer's counters, so a resumed run takes the same decisions."""

    def __init__(self, schedule: AscentSchedule) -> None:
        self.schedule = schedule
        self.steps = 0  # optimizer steps taken (SAM or plain)
        self.ascents = 0  # of which SAM steps
        self.planned: int | None = None
        self.last_sq: float | None = None  # |g|^2 at w of the last step
        self.mean = 0.0  # EMA of |g|^2 over the steps before the last one
        self.var = 0.0
        self.seen = 0  # steps whose |g|^2 entered the statistics

    def due(self) -> bool:
        return self.schedule.due(self.steps, self.planned, self.last_sq, self.mean, self.var, self.seen)

    def record(self, sq: float) -> None:
        """The squared gradient norm at w of the step being taken (aesam only)."""
        if self.last_sq is not None:  # the previous step's value joins the statistics the next one is judged by
            if self.seen == 0:
                self.mean, self.var = self.last_sq, 0.0
            else:
                m = AESAM_MOMENTUM
                delta = self.last_sq - self.mean
                self.mean += (1 - m) * delta
                self.var = m * (self.var + (1 - m) * delta * delta)
            self.seen += 1
        self.last_sq = sq

    def done(self, ascended: bool) -> None:
        self.steps += 1
        self.ascents += int(ascended)

    def state(self) -> dict:
        # Numbers only (torch.distributed.checkpoint flattens no strings); the schedule itself is a setting.
        return {
            "steps": self.steps,
            "ascents": self.ascents,
            "planned": -1 if self.planned is None else self.planned,
            "last_sq": -1.0 if self.last_sq is None else self.last_sq,
            "mean": self.mean,
            "var": self.var,
            "seen": self.seen,
        }

    def load(self, state: dict) -> None:
        """A saved ``state()``; an older state dict without one starts the counters at 0."""
        self.steps = int(state.get("steps", 0))
        self.ascents = int(state.get("ascents", 0))
        planned = int(state.get("planned", -1))
        self.planned = None if planned < 0 else planned
        last = float(state.get("last_sq", -1.0))
        self.last_sq = None if last < 0 else last
        self.mean, self.var = float(state.get("mean", 0.0)), float(state.get("var", 0.0))
        self.seen = int(state.get("seen", 0))


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """The dot product over all tensors: one BLAS dot per tensor, summed in float64."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)).double() for x, y in zip(a, b)]).sum()


@torch.no_grad()
def looksam_store(buffers: list[Tensor], grads_s: list[Tensor]) -> None:
    """``buffers`` hold g (the gradient at w); turn them, in place, into ``g_v = g_s - (g.g_s / |g|^2) g``, the
    part of the SAM gradient ``grads_s`` orthogonal to g. Sums over all tensors in float64."""
    coef = _dot(buffers, grads_s) / _dot(buffers, buffers).clamp_min(1e-300)
    for b, s in zip(buffers, grads_s):
        b.mul_(-coef.to(b.dtype)).add_(s)


@torch.no_grad()
def looksam_apply(grads: list[Tensor], buffers: list[Tensor], alpha: float) -> None:
    """``g <- g + alpha |g| / |g_v| g_v`` in place (nothing when g_v is zero), without a host sync."""
    gn, vn = _dot(grads, grads).sqrt(), _dot(buffers, buffers).sqrt()
    scale = torch.where(vn > 0, alpha * gn / vn.clamp_min(1e-300), torch.zeros_like(vn))
    for g, v in zip(grads, buffers):
        g.addcmul_(v, scale.to(g.dtype))

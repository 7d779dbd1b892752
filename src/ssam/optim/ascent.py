"""Where the ascent's direction comes from: the policy that gives the perturbation rule its vector d.

The rule is SAM's for every direction (``ssam.optim.perturb``): ``e = sign * rho * d / (||d|| + perturb_eps)``,
masked (SSAM), scaled by |w| (ASAM) and with the norm summed over FSDP2 shards as for the gradient. Only d and the
passes change (``ascent=`` of SAM, SSAMF and SSAMD; ``--sam_ascent`` on the command line):

- ``gradient`` (default): d = the gradient at w of the whole batch (pass one). Plain SAM.
- ``subbatch:F`` (0 < F <= 1): d = the gradient at w of the first ceil(F * B) examples of the batch (of each
  micro-batch under gradient accumulation); pass two runs on all of it. ``subbatch:1`` is SAM bit for bit. A step
  costs 1 + F passes per example (Wei, Zhang & Tan, Neural Networks 185, 2025, take the ascent from a sub-batch).
- ``previous``: d = the gradient the base optimizer last stepped with (taken at the previous step's w + e; after a
  plain step of a schedule, that step's gradient at w), kept in the optimizer state. No pass one: one pass per step
  (S^2-SAM, NeurIPS 2024, perturbs along the previous step's gradient).
- ``momentum``: d = the base optimizer's momentum, read before its update (SGD's ``momentum_buffer``, Adam's and
  AdamW's ``exp_avg``): uphill along the direction the weights have been descending. One pass per step.
- ``msam``: MSAM's rule (Becker et al., arXiv 2401.12033): e = -rho * v / (||v|| + perturb_eps), v the momentum as
  above: the gradient is taken at a point *ahead* along the descent (downhill), at the same rho units as SAM's (not
  scaled by the learning rate, as in its code). One pass per step. Its code keeps the weights at the offset point
  between steps and removes the offset for evaluation; ssam restores w after every step, which gives the same
  gradients and leaves the weights clean for evaluation and checkpoints.

Before a one-pass direction exists (the first step of a run; ``momentum``/``msam`` before the base optimizer has a
momentum) a step is a plain base step: one pass at w, the gradient there. The base optimizer always steps with the
gradient taken at w + e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AscentDirection",
    "parse_ascent",
    "check_momentum_base",
    "check_composes",
    "ASCENT_FORMS",
    "ASCENT_KINDS",
    "PREVIOUS_KEY",
    "MOMENTUM_BASES",
]

ASCENT_KINDS = ("gradient", "subbatch", "previous", "momentum", "msam")
ASCENT_FORMS = "'gradient', 'subbatch:F' (0 < F <= 1), 'previous', 'momentum' or 'msam'"
PREVIOUS_KEY = "ascent_previous"  # per parameter: the gradient of the last base step (saved in the state dict)
#: Base optimizers whose momentum ``momentum`` and ``msam`` read, with the state entry that holds it.
MOMENTUM_BASES: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.SGD: "momentum_buffer",
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
}


@dataclass(frozen=True)
class AscentDirection:
    """A parsed ``ascent``: its kind and, for ``subbatch``, the fraction of the batch pass one sees."""

    kind: str = "gradient"
    fraction: float = 1.0

    def __str__(self) -> str:
        return f"subbatch:{self.fraction:g}" if self.kind == "subbatch" else self.kind

    @property
    def one_pass(self) -> bool:
        """No pass one: the direction is something the optimizer already holds."""
        return self.kind in ("previous", "momentum", "msam")

    @property
    def at_w(self) -> bool:
        """The direction is a gradient at w of this step (what LookSAM, AE-SAM and m-sharpness need)."""
        return self.kind == "gradient"

    @property
    def sign(self) -> float:
        """+1 uphill (every direction but MSAM's), -1 downhill (``msam``)."""
        return -1.0 if self.kind == "msam" else 1.0

    def pass_one_size(self, n: int) -> int:
        """How many of a batch's n examples pass one takes."""
        return max(1, math.ceil(self.fraction * n)) if self.kind == "subbatch" else n

    def vector(self, p: Tensor, own: dict, base_state: dict) -> Tensor | None:
        """The tensor d of p for this step (None: p has none and is not perturbed)."""
        if self.kind in ("gradient", "subbatch"):
            return p.grad
        if self.kind == "previous":
            return own.get(PREVIOUS_KEY)
        for key in dict.fromkeys(MOMENTUM_BASES.values()):
            if base_state.get(key) is not None:
                return base_state[key]
        return None


def parse_ascent(spec: object) -> AscentDirection:
    """``"subbatch:0.25"`` -> AscentDirection("subbatch", 0.25); None: ``gradient``; a bad form is a ValueError
    naming it and the allowed forms."""
    if spec is None or isinstance(spec, AscentDirection):
        return spec or AscentDirection()
    if not isinstance(spec, str):
        raise ValueError(f"ascent: got {spec!r}; allowed: {ASCENT_FORMS}")
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "subbatch":
        try:
            fraction = float(arg)
        except ValueError:
            raise ValueError(
                f"ascent: got {spec!r}, whose F {arg!r} is not a number; allowed: {ASCENT_FORMS}"
            ) from None
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(f"ascent: got {spec!r}, whose F {fraction:g} is outside (0, 1]; allowed: {ASCENT_FORMS}")
        return AscentDirection("subbatch", fraction)
    if kind in ASCENT_KINDS and not arg:
        return AscentDirection(kind)
    raise ValueError(f"ascent: got {spec!r}; allowed: {ASCENT_FORMS}")


def check_momentum_base(ascent: AscentDirection, base: torch.optim.Optimizer) -> None:
    """``momentum`` and ``msam`` read a momentum: refuse a base optimizer without one, naming the allowed ones."""
    if ascent.kind not in ("momentum", "msam"):
        return
    allowed = "torch.optim.SGD with momentum > 0, Adam or AdamW"
    kind = next((k for k in MOMENTUM_BASES if type(base) is k), None)
    if kind is None:
        raise ValueError(f"ascent: got {str(ascent)!r} over {type(base).__name__}; allowed bases: {allowed}")
    if kind is torch.optim.SGD:
        zero = [g.get("momentum", 0) for g in base.param_groups if not g.get("momentum", 0)]
        if zero:
            raise ValueError(
                f"ascent: got {str(ascent)!r} over SGD with momentum {zero[0]!r} (it keeps no momentum); "
                f"allowed bases: {allowed}"
            )


def check_composes(
    ascent: AscentDirection,
    schedule_kind: str | None,
    micro_batch: int | None,
    names: tuple[str, str, str] = ("ascent", "schedule", "micro_batch"),
) -> None:
    """A direction other than the gradient at w composes with no schedule, every:K and late:F only (LookSAM's
    direction and AE-SAM's norm are the gradient at w), and not with m-sharpness (each chunk takes its own gradient
    at w). ``names``: how the message calls the three settings (the command line passes its flags)."""
    a, s, m = names
    if not ascent.at_w and schedule_kind in ("looksam", "aesam"):
        raise ValueError(
            f"{a}: got {str(ascent)!r} with {s} {schedule_kind!r}; allowed: {a} 'gradient' there, or {s} 'every:K' "
            "or 'late:F' (LookSAM's direction and AE-SAM's norm are the gradient at w)"
        )
    if not ascent.at_w and micro_batch is not None:
        raise ValueError(
            f"{a}: got {str(ascent)!r} with {m} {micro_batch}; allowed: {a} 'gradient' with {m} (m-sharpness takes "
            "each chunk's own gradient at w)"
        )

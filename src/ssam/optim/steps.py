"""The kinds of step a SAM-family optimizer takes besides the two-pass one: the plain steps of an ascent schedule,
and the whole step from a batch (m-sharpness). A mixin of ``SAM``: it uses SAM's state (``_schedule``, ``_own``,
``base_optimizer``) and is not an optimizer by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .ascent import PREVIOUS_KEY
from .msharp import ascend_by_chunks, split_batch
from .schedule import looksam_apply

__all__ = ["ScheduledSteps", "LOOKSAM_KEY", "FRAMEWORKS"]

LOOKSAM_KEY = "looksam_gv"  # per parameter: LookSAM's stored direction g_v (saved in the state dict)
# Where to turn when a framework drives the optimizer as a one-pass one (one line, in several messages).
FRAMEWORKS = (
    "Lightning: add ssam.integrations.lightning.SAMCallback() to the Trainer's callbacks; Hugging Face: use "
    "ssam.integrations.transformers.SAMTrainer"
)


class ScheduledSteps:
    """``ascent_due``, ``plan_steps``, ``steps_taken``, the plain step of a schedule and ``step(closure, batch=...)``
    (see ``ssam.optim.schedule`` and ``ssam.optim.msharp``)."""

    _schedule: Any
    _own: Any
    base_optimizer: torch.optim.Optimizer
    defaults: dict
    _stepped: bool

    _ascent: Any

    if TYPE_CHECKING:  # SAM's, which this mixin is part of
        micro_batch: int | None

        def first_step(self, zero_grad: bool = False) -> None: ...
        def restore(self) -> None: ...
        def _finish(self) -> None: ...

        def _locals(self, tensors: list[Tensor]) -> list[Tensor]: ...
        def _all_params(self) -> list[Tensor]: ...
        def _check_plain_step(self, grads: list[Tensor]) -> None: ...
        def zero_grad(self, set_to_none: bool = True) -> None: ...

    def ascent_due(self) -> bool:
        """Whether the next optimizer step takes the ascent (two passes) or is a plain base step (one pass); known
        before its first pass. Always True without a ``schedule``."""
        return self._schedule.due()

    def plan_steps(self, total: int) -> None:
        """The run's planned optimizer steps (``late:F`` places its boundary by them). Set once: a value loaded
        from a state dict, or set before, is kept (a resume with more epochs keeps the boundary)."""
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"plan_steps: got {total!r}; allowed: an integer >= 1 (optimizer steps of the run)")
        if self._schedule.planned is None:
            self._schedule.planned = total

    @property
    def steps_taken(self) -> tuple[int, int]:
        """(optimizer steps taken, of which ascents), counted over the run (kept in the state dict)."""
        return self._schedule.steps, self._schedule.ascents

    def _record_norm(self, grads: list[Tensor]) -> None:
        """AE-SAM's statistic: the squared norm of the gradient at w of the step being taken (a host sync)."""
        if self._schedule.schedule.kind == "aesam":
            self._schedule.record(float(sum((g.double() ** 2).sum() for g in self._locals(grads))))

    @torch.no_grad()
    def _step_after_ascent(self, ascended: bool = True) -> None:
        """The base step of an ascending step (w already restored), counted by the schedule (``ascended`` False: a
        one-pass direction had nothing to perturb with yet)."""
        self._keep_previous()
        self.base_optimizer.step()
        self._schedule.done(ascended=ascended)
        self._stepped = True

    @torch.no_grad()
    def _keep_previous(self) -> None:
        """``ascent='previous'``: keep the gradient the base optimizer is about to step with (one buffer per
        parameter, reused; in the state dict). It was reduced over the ranks already: no extra all-reduce."""
        if self._ascent.kind != "previous":
            return
        for p in self._all_params():
            if p.grad is None:
                continue
            own = self._own[p]
            buf = own.get(PREVIOUS_KEY)
            if buf is None or buf.shape != p.grad.shape or buf.dtype != p.grad.dtype or buf.device != p.grad.device:
                own[PREVIOUS_KEY] = p.grad.detach().clone()
            else:
                buf.copy_(p.grad)

    def ascend(
        self,
        pass_two: Callable[[], Any],
        *,
        pass_one: Callable[[], Any] | None = None,
        unscale: Callable[[], bool] | None = None,
        finish: bool = True,
        set_to_none: bool = True,
    ) -> tuple[Any, Any, bool]:
        """One ascent: the protocol every SAM step shares (``step``, the trainer, m-sharpness, the Lightning
        plugin), in the shape of Lightning's closure.

        1. ``pass_one()`` at w, when given: forward + backward whose gradient is the direction (``ascent`` gradient
           or subbatch; omit it when the caller ran pass one, and for a one-pass direction, which needs none);
        2. ``unscale()``, when given (a loss scaler's unscale and check of the gradient): False gives up the step
           before anything moved;
        3. w -> w + e (``first_step``; nothing moves for a one-pass direction before one exists), gradients zeroed
           (``set_to_none`` as ``zero_grad`` takes it);
        4. ``pass_two()`` at w + e; on any exception w is restored and the exception propagates;
        5. ``unscale()`` again, then ``finish``: restore w and take the base step with pass two's gradient; with
           ``finish=False`` only restore (m-sharpness sums its chunks' gradients and steps once). An unscale that
           fails here restores w and gives up the step.

        Returns (pass one's result, pass two's result, whether the step went through); results are as returned.
        """
        first = pass_one() if pass_one is not None else None
        if unscale is not None and not unscale():
            return first, None, False
        self.first_step()
        self.zero_grad(set_to_none=set_to_none)
        try:
            second = pass_two()
        except BaseException:
            self.restore()
            raise
        if unscale is not None and not unscale():
            self.restore()
            return first, second, False
        if finish:
            self._finish()
        else:
            self.restore()
        return first, second, True

    def _one_pass_step(self, closure: Callable[[], Any]) -> Any:
        """``step(closure)`` with a one-pass direction: perturb along the stored direction (nothing before one
        exists), call the closure once at w + e, restore, base step. On a plain step of the schedule the closure
        runs at w. Returns the closure's loss, detached."""
        if self.ascent_due():
            _, loss, _ = self.ascend(closure)
        else:
            self.zero_grad()
            loss = closure()
            self._take_plain_step([p.grad for p in self._all_params() if p.grad is not None])
        return loss.detach() if isinstance(loss, Tensor) else loss

    @torch.no_grad()
    def _plain_step(self) -> None:
        """``step()`` with nothing pending: rules 2-4 of ``step``."""
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        if not grads:
            raise RuntimeError(
                f"{type(self).__name__}.step(): no perturbation is pending and no parameter has a gradient, so "
                "there is nothing to step with; a SAM step is forward + backward, first_step(), forward + "
                "backward, then second_step() or step(), or step(closure) in one call. " + FRAMEWORKS
            )
        if self.ascent_due() and any(bool(g.ne(0).any()) for g in grads):
            # An ascent is due: a plain step now would silently drop it (every gradient zero perturbs by zero:
            # torch.distributed.checkpoint's initialising step passes).
            self._check_plain_step(grads)
            raise RuntimeError(
                f"{type(self).__name__}.step(): this step is due an ascent (schedule {self.defaults['schedule']!r}) "
                "and none is pending; take it with first_step(), forward + backward, second_step(), or "
                "step(closure); ask opt.ascent_due() before pass one to know which steps are plain. " + FRAMEWORKS
            )
        self._take_plain_step(grads)

    @torch.no_grad()
    def _take_plain_step(self, grads: list[Tensor]) -> None:
        """A step of the schedule without ascent: the base optimizer with the gradient at w (LookSAM: plus its
        stored direction)."""
        self._record_norm(grads)
        if self._schedule.schedule.kind == "looksam":
            ps = [p for p in self._all_params() if p.grad is not None and LOOKSAM_KEY in self._own.get(p, {})]
            looksam_apply(
                [cast(Tensor, p.grad) for p in ps],
                [self._own[p][LOOKSAM_KEY] for p in ps],
                self._schedule.schedule.alpha,
            )
        self._keep_previous()
        self.base_optimizer.step()
        self._schedule.done(ascended=False)
        self._stepped = True

    def _step_batch(self, closure: Callable[..., Any] | None, batch: Any) -> Tensor:
        """``step(closure, batch=(inputs, targets, ...))``: the whole step from the batch, pass one included (see
        ``ssam.optim.msharp``); with ``micro_batch=m`` one perturbation per chunk of m examples, else one for the
        batch. ``closure(*chunk)`` computes the chunk's mean loss, calls backward and returns the loss. On a plain
        step of the schedule the closure runs once over the batch. Returns the mean pass-one loss, detached."""
        if closure is None:
            raise ValueError("closure: got None with batch=...; allowed: closure(*chunk) -> loss, after backward")
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        step_closure = torch.enable_grad()(closure)
        if self._ascent.one_pass:
            return self._one_pass_step(lambda: step_closure(*batch))
        if self._ascent.kind == "subbatch" and self.ascent_due():
            return self._subbatch_step(step_closure, tuple(batch))
        if not self.ascent_due():
            self.zero_grad()
            loss = closure(*batch)
            self._take_plain_step([p.grad for p in self._all_params() if p.grad is not None])
            return loss.detach()
        n = batch[0].shape[0] if isinstance(batch[0], Tensor) else 0
        chunks = split_batch(batch, self.micro_batch or max(1, n))
        return ascend_by_chunks(cast(Any, self), chunks, lambda chunk, first: torch.enable_grad()(closure)(*chunk))

    def _subbatch_step(self, closure: Callable[..., Any], batch: tuple) -> Tensor:
        """``ascent='subbatch:F'`` from a batch: pass one on its first ceil(F * n) examples, pass two on all of it;
        returns pass two's loss (the whole batch's), detached."""
        k = self._ascent.pass_one_size(batch[0].shape[0])

        def pass_one() -> Any:
            self.zero_grad()
            return closure(*(t[:k] for t in batch))

        _, loss, _ = self.ascend(lambda: closure(*batch), pass_one=pass_one)
        return loss.detach()

"""PyTorch Lightning: SAM / SSAM-F / SSAM-D with automatic optimization.

    class Net(L.LightningModule):
        def configure_optimizers(self):
            return ssam.create_optimizer(self, "ssamf-sgd", lr=0.1, momentum=0.9, rho=0.05, sparsity=0.5)

    trainer = L.Trainer(callbacks=[SAMCallback()], ...)

What ``SAMCallback`` does:

- sets ``closure_passes="both"``: Lightning's closure zeroes the gradients, runs ``training_step`` and backward, so
  ``optimizer.step(closure)`` runs pass one at w, perturbs, runs pass two at w + e, restores w and steps.
- refreshes masks: SSAM-F before the first step of every epoch on its update grid (Fisher from ``fisher_data``, or
  the training dataloader's dataset), SSAM-D after the first backward of the epoch's first step; logs
  ``mask_density`` through the module's ``log`` at the end of every epoch.
- SSAM-F's Fisher calls a model on single examples: the LightningModule's own ``forward``, or the module that
  ``fisher_model`` picks when ``training_step`` calls a submodule instead (``SAMCallback(fisher_model=lambda m:
  m.net)``). A module with neither is refused at the start of ``fit`` in one line naming ``fisher_model``.
- ``accumulate_grad_batches=k``: the perturbation is computed from the gradient at w accumulated over all k
  micro-batches, and pass two runs all k at w + e, as ``ssam train --grad_accum`` does. Lightning already ran the
  first k-1 outside ``step``; the callback keeps their batches and replays them at w + e (under DDP without the
  gradient sync, which the last micro-batch does), so a step costs 2k forward-backward passes, not more.

Lightning runs ``on_before_optimizer_step`` and gradient clipping after every closure call, so with k=1 they run
after both passes (the base optimizer steps with the clipped gradient of pass two; norm clipping of pass one does
not change SAM's perturbation, which is normalised). ``training_step`` runs twice per micro-batch, so values it
logs are logged for both passes (pass two's are the last in a step).

For ``precision="16-mixed"`` pass ``plugins=[SAMMixedPrecision()]``: Lightning's own 16-mixed plugin runs the
closure itself and then ``scaler.step(optimizer)`` without it, and ``torch.amp.GradScaler`` allows one unscale per
step. The plugin unscales each pass on its own (``ssam.TwoPassScaler``) and skips the whole step, restoring w, when
either overflows. bf16-mixed and 32-bit need nothing.

Checkpoints: Lightning saves ``optimizer.state_dict()``, which holds the masks, the base optimizer's state and
SSAM-D's generator; the Fisher examples depend only on (seed, epoch), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..optim.amp import TwoPassScaler
from ..optim.sam import SAM
from . import require
from .common import mask_density, refresh_after_first_backward, refresh_before_epoch, sam_optimizers

L = require("lightning.pytorch", "lightning")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

__all__ = ["SAMCallback", "SAMMixedPrecision"]


class SAMCallback(L.Callback):
    """Runs SAM-type optimizers returned by ``configure_optimizers`` under automatic optimization.

    Args:
        fisher_data: where SSAM-F measures the Fisher: a map-style dataset of (input, target) examples, or an
            iterable of (inputs, targets) batches. Default: the training dataloader's dataset.
        fisher_loss_fn: ``loss_fn(module(x), y)`` for the Fisher; default cross-entropy.
        fisher_model: SSAM-F: a function from the LightningModule to the ``nn.Module`` whose output on a batch of
            inputs is what ``fisher_loss_fn`` scores, e.g. ``lambda m: m.net`` when ``training_step`` calls
            ``self.net(x)``. Its parameters must be the ones the optimizer perturbs (the same tensors). Default: the
            LightningModule itself, which then needs a ``forward``.
        seed: the Fisher examples of an epoch are drawn by a generator seeded from (seed, epoch).
        log_density: log ``mask_density`` (fraction of weights perturbed) at the end of every epoch.
    """

    def __init__(
        self,
        fisher_data: Any = None,
        fisher_loss_fn: Any = None,
        seed: int = 0,
        log_density: bool = True,
        fisher_model: Callable[[Any], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        # A module is callable too, but it would be called on the LightningModule: ask for the function.
        if fisher_model is not None and (isinstance(fisher_model, nn.Module) or not callable(fisher_model)):
            raise ValueError(
                f"SAMCallback(fisher_model=...): got {type(fisher_model).__name__}; allowed: a function from the "
                "LightningModule to the module to measure, e.g. lambda m: m.net"
            )
        self.fisher_data = fisher_data
        self.fisher_loss_fn = fisher_loss_fn
        self.fisher_model = fisher_model
        self.seed = int(seed)
        self.log_density = log_density
        self._opts: list[SAM] = []
        self._window: list[tuple[Any, int]] = []
        self._backwards = 0
        self._steps_this_epoch = 0
        self._stepping = False
        self._patched: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._opts = sam_optimizers(trainer.optimizers)
        if not self._opts:
            raise ValueError(
                "SAMCallback: configure_optimizers returned no SAM, SSAMF or SSAMD optimizer; "
                "allowed: at least one (ssam.create_optimizer(model, 'sam-sgd', ...))"
            )
        if self._needs_fisher():
            self._fisher_target(pl_module)  # a module SSAM-F cannot call is refused now, not inside the Fisher
        k = trainer.accumulate_grad_batches
        for opt in self._opts:
            _check_direction(opt, k)
            opt.closure_passes = "both" if k == 1 else "second"
        if k > 1:
            # Pass one of the window's last micro-batch runs before step; the closure given to step replays the
            # window at w + e. Wrapping the module's optimizer_step keeps a user override of it in the chain.
            original = pl_module.optimizer_step
            pl_module.optimizer_step = self._window_step(trainer, pl_module, original)
            self._patched = (pl_module, original)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._patched is not None:
            module, _ = self._patched
            module.__dict__.pop("optimizer_step", None)  # the class's method shows through again
            self._patched = None

    # ------------------------------------------------------------------ mask refresh
    def _needs_fisher(self) -> bool:
        return any(o.mask_refresh == "before_epoch" for o in self._opts)

    def _fisher_target(self, pl_module: L.LightningModule) -> nn.Module:
        """The module SSAM-F calls on single examples: ``fisher_model(pl_module)``, else the LightningModule."""
        if self.fisher_model is None:
            forward = getattr(type(pl_module), "forward", None)
            if forward in (None, nn.Module.forward, L.LightningModule.forward):
                name = type(pl_module).__name__
                raise ValueError(
                    f"SAMCallback: SSAM-F measures the Fisher by calling the model on examples, and {name} defines "
                    f"no forward(); pass SAMCallback(fisher_model=lambda m: m.net) naming the module that "
                    f"training_step calls, or define {name}.forward"
                )
            return pl_module
        target = self.fisher_model(pl_module)
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"SAMCallback(fisher_model=...): returned {type(target).__name__}; allowed: an nn.Module "
                "(the one training_step calls, e.g. lambda m: m.net)"
            )
        return target

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_this_epoch = 0
        data = self.fisher_data
        target: nn.Module = pl_module
        if self._needs_fisher():
            target = self._fisher_target(pl_module)
            if data is None:
                data = getattr(trainer.train_dataloader, "dataset", None)
            if data is None:
                raise ValueError(
                    "SAMCallback: SSAM-F needs Fisher data and the training dataloader has no "
                    "dataset; pass SAMCallback(fisher_data=...)"
                )
        for opt in self._opts:
            refresh_before_epoch(opt, trainer.current_epoch, target, data, self.seed, self.fisher_loss_fn)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        k = trainer.accumulate_grad_batches
        if batch_idx % k == 0:
            self._window = []
        self._window.append((batch, batch_idx))
        self._backwards = 0
        self._stepping = (batch_idx + 1) % k == 0 or batch_idx + 1 == trainer.num_training_batches

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._backwards += 1
        # Pass one of the epoch's first step is the first backward of the batch that steps; the gradient of the
        # whole window at w is in .grad now (and, under DDP, already averaged over the ranks).
        if self._stepping and self._backwards == 1 and self._steps_this_epoch == 0:
            for opt in self._opts:
                refresh_after_first_backward(opt, trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepping:
            self._steps_this_epoch += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_density:
            return
        for i, opt in enumerate(self._opts):
            density = mask_density(opt)
            if density is not None:
                name = "mask_density" if len(self._opts) == 1 else f"mask_density/{i}"
                pl_module.log(name, density, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ gradient accumulation
    def _window_step(self, trainer: L.Trainer, pl_module: L.LightningModule, original: Any) -> Any:
        def optimizer_step(epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> Any:
            if not sam_optimizers([optimizer]) or optimizer_closure is None:
                return original(epoch, batch_idx, optimizer, optimizer_closure)
            optimizer_closure()  # pass one of the last micro-batch, added to the window's gradient at w
            earlier = self._window[:-1]
            k = trainer.accumulate_grad_batches

            def pass_two() -> Tensor | None:
                strategy = trainer.strategy
                sync_off = getattr(strategy, "block_backward_sync", None)
                with sync_off() if sync_off is not None else contextlib.nullcontext():
                    for batch, idx in earlier:
                        out = strategy.training_step(batch, idx)
                        loss = out["loss"] if isinstance(out, dict) else out
                        strategy.backward(loss / k, optimizer)
                return optimizer_closure()

            return original(epoch, batch_idx, optimizer, pass_two)

        return optimizer_step


def _check_direction(opt: SAM, k: int) -> None:
    """The ascent directions Lightning's loop can drive: the gradient at w (any accumulation) and the one-pass
    directions without accumulation (the closure then runs once, at w + e). A sub-batch needs a pass one on part of
    the batch, which Lightning's closure (training_step on the whole batch) cannot give."""
    d = opt.direction
    if d.kind == "subbatch":
        raise ValueError(
            f"SAMCallback: ascent {str(d)!r} is not supported under Lightning (its closure runs training_step on the "
            "whole batch); allowed: 'gradient', 'previous', 'momentum' or 'msam', or ssam train / "
            "opt.step(closure, batch=...) for a sub-batch"
        )
    if d.one_pass and k > 1:
        raise ValueError(
            f"SAMCallback: ascent {str(d)!r} with accumulate_grad_batches={k}: Lightning runs the earlier "
            "micro-batches at w before the step; allowed: accumulate_grad_batches=1 with a one-pass direction"
        )


class SAMMixedPrecision(MixedPrecision):
    """Lightning's 16-mixed precision with a loss scale that SAM's two passes can use.

    Each pass is unscaled on its own; an overflow in either skips the step (w restored, gradients dropped) and
    halves the scale, as ``ssam.TwoPassScaler`` does. Plain optimizers step as under Lightning's own plugin.
    Needs a device with float16 autocast; the tests run it on the CPU (fp16 autocast there), not on a GPU.
    """

    def __init__(self, device: str = "cuda", scaler: TwoPassScaler | None = None) -> None:
        super().__init__("16-mixed", device, scaler=scaler or TwoPassScaler())  # type: ignore[arg-type]

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        scaler: TwoPassScaler = self.scaler  # type: ignore[assignment]
        if not isinstance(optimizer, SAM):
            result = closure()
            if result is None and model.automatic_optimization:
                return None  # training_step skipped the batch
            ok = scaler.unscale_(optimizer)
            self._after_closure(model, optimizer)
            if ok:
                out = optimizer.step(**kwargs)
            else:
                out = scaler.skip(optimizer)
            scaler.update()
            return out

        def unscale() -> bool:  # each pass unscaled on its own; hooks and clipping see the true gradient
            ok = scaler.unscale_(optimizer)
            if ok:
                self._after_closure(model, optimizer)
            return ok

        loss = None
        due = optimizer.ascent_due()
        if optimizer.direction.one_pass and not due:  # a plain step of the schedule: one pass at w
            optimizer.zero_grad()
            loss = closure()
            if unscale():
                optimizer.step()
            else:
                scaler.skip(optimizer)
            scaler.update()
            return loss
        if not optimizer.direction.one_pass:
            if optimizer.closure_passes == "both":
                optimizer.zero_grad()
                loss = closure()
                if loss is None and model.automatic_optimization:
                    return None
            # Pass one's gradient is in .grad, scaled. Unscale it, let hooks and clipping see it, perturb.
            if not unscale():
                scaler.skip(optimizer)
                scaler.update()
                return loss
            if not due:  # a plain step of the optimizer's schedule: pass one's gradient, one pass
                optimizer.step()
                scaler.update()
                return loss
        # The one protocol (SAM.ascend): perturb (a one-pass direction needs no pass one), the closure at w + e with
        # w restored on any exception, unscale, restore and base step; an overflow gives the step up.
        _, second, stepped = optimizer.ascend(closure, unscale=_after_pass_two(unscale))
        if not stepped:
            scaler.skip(optimizer)  # (w is already restored)
        scaler.update()
        return loss if loss is not None else second

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict)  # type: ignore[union-attr]


def _after_pass_two(unscale: Callable[[], bool]) -> Callable[[], bool]:
    """``SAM.ascend`` calls ``unscale`` before the perturbation and after pass two; here pass one was unscaled
    already (or, for a one-pass direction, did not run), so the first call has nothing to check."""
    calls = {"n": 0}

    def check() -> bool:
        calls["n"] += 1
        return True if calls["n"] == 1 else unscale()

    return check

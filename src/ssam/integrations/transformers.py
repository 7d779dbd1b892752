"""Hugging Face ``Trainer`` with SAM / SSAM-F / SSAM-D: ``SAMTrainer(model, args, ..., sam={...})``.

    trainer = SAMTrainer(model, TrainingArguments(...), train_dataset=ds,
                         sam={"opt": "ssamf", "rho": 0.05, "sparsity": 0.5, "num_samples": 64})
    trainer.train()

``sam["opt"]`` is a wrapper (``"sam"``, ``"ssamf"``, ``"ssamd"``: the base is the Trainer's AdamW with its
``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon``) or any ``--opt`` form
(``"ssamd-sgd"``); the other keys are the optimizer's settings. As the Trainer does, biases and LayerNorm weights
take no weight decay.

The Trainer calls ``optimizer.step()`` without a closure, after its own loop has run every micro-batch's forward
and backward. ``SAMTrainer.training_step`` therefore runs SAM's two passes itself, on the last micro-batch of each
gradient-accumulation window: by then the window's gradient at w is complete (pass one, as the Trainer computes
it), so the perturbation comes from all micro-batches, as ``ssam train --grad_accum`` does; then it perturbs and
runs pass two over the window's micro-batches at w + e (under DDP only the last one syncs). The Trainer then clips
the gradient of pass two and calls ``optimizer.step()``, which with a perturbation pending finishes SAM's step
(restores w, steps the base optimizer); its LR scheduler, logging
(``mask_density`` joins the logged values), bf16 and checkpoints are untouched. Checkpoints hold the optimizer's
``state_dict``: masks, the base optimizer's state and SSAM-D's generator.

Limits: fp16 (needs a loss scale per pass; accelerate's GradScaler allows one unscale per step) is refused with a
ValueError, use bf16. DeepSpeed and FSDP through the Trainer are not supported. SSAM-F's Fisher feeds the model the
tensor inputs shaped like ``input_ids`` (``attention_mask``, ``token_type_ids``) and scores with cross-entropy on
the logits against ``labels``, one example at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.factory import create_optimizer, parse_opt
from ..optim.sam import SAM
from . import require
from .common import mask_density, refresh_after_first_backward, refresh_before_epoch

transformers = require("transformers", "transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

__all__ = ["SAMTrainer"]


class _StackedInputs(nn.Module):
    """A Hugging Face model seen as ``model(x)``: x stacks the per-token inputs along dim 1, so that the Fisher's
    per-example code can index and batch it like an image."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: Tensor) -> Tensor:
        return self.model(**{k: x[:, i] for i, k in enumerate(self.keys)}).logits


class _EpochHooks(TrainerCallback):
    def __init__(self, trainer: SAMTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._on_epoch_begin(state.epoch or 0.0)


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is SAM, SSAM-F or SSAM-D (see the module docstring).

    Args:
        sam: ``{"opt": "ssamf", "rho": 0.05, "sparsity": 0.5, ...}``; default ``{"opt": "sam"}``.
        fisher_dataset: where SSAM-F measures the Fisher (default: ``train_dataset``); examples are dicts as the
            Trainer's dataset yields them, collated by its ``data_collator``.
        fisher_seed: the Fisher examples of an epoch are drawn by a generator seeded from (fisher_seed, epoch).
    """

    def __init__(
        self, *args: Any, sam: dict | None = None, fisher_dataset: Any = None, fisher_seed: int = 0, **kwargs: Any
    ) -> None:
        self.sam_config = dict(sam) if sam is not None else {"opt": "sam"}
        if not isinstance(self.sam_config.get("opt", "sam"), str):
            raise ValueError(
                f"sam['opt']: got {self.sam_config['opt']!r}; allowed: 'sam', 'ssamf', 'ssamd' or an "
                "--opt form such as 'ssamf-sgd'"
            )
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError(
                "args.fp16: got True; allowed: False with SAMTrainer (SAM's two passes need a loss "
                "scale per pass); use bf16=True"
            )
        self.fisher_dataset = fisher_dataset
        self.fisher_seed = int(fisher_seed)
        self._window: list[tuple[dict, Any]] = []
        self._one_pass_micro = 0  # micro-batches of the window run at w + e so far (one-pass directions)
        self._epoch = 0
        self.add_callback(_EpochHooks(self))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        cfg = dict(self.sam_config)
        opt = cfg.pop("opt", "sam")
        wrapper, base = parse_opt(opt, default_base="adamw")  # a bare "ssamf": the HF Trainer's own AdamW
        if wrapper is None:
            raise ValueError(
                f"sam['opt']: got {opt!r}, a plain optimizer; allowed: 'sam', 'ssamf', 'ssamd' or "
                "'<wrapper>-<base>' (for a plain optimizer use transformers.Trainer)"
            )
        a = self.args
        base_kw: dict[str, Any] = (
            {"betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon} if base == "adamw" else {}
        )
        sam = create_optimizer(
            model if model is not None else self.model,
            f"{wrapper}-{base}",
            lr=a.learning_rate,
            weight_decay=a.weight_decay,
            no_decay_bias_norm=True,
            **{**base_kw, **cfg},
        )
        self.optimizer = sam
        return sam

    @property
    def sam(self) -> SAM:
        opt = self.optimizer
        while not isinstance(opt, SAM) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer
        if not isinstance(opt, SAM):
            raise RuntimeError("SAMTrainer: the optimizer is not built yet; call train() first")
        return opt

    # ------------------------------------------------------------------ masks
    def _on_epoch_begin(self, epoch_float: float) -> None:
        self._epoch = math.floor(epoch_float + 1e-6)
        sam = self.sam
        if sam.mask_refresh != "before_epoch":
            return
        # Resumed in the middle of an epoch: the checkpoint's mask is the one this epoch started with.
        if epoch_float - self._epoch > 1e-6 and sam.has_masks():
            return
        data = self.fisher_dataset if self.fisher_dataset is not None else self.train_dataset
        first = self.data_collator([data[0]])
        keys = [
            k
            for k, v in first.items()
            if k != "labels" and isinstance(v, Tensor) and v.shape == first["input_ids"].shape
        ]
        device = next(self.model.parameters()).device

        def collate(items: list) -> tuple[Tensor, Tensor]:
            batch = self.data_collator(items)
            return torch.stack([batch[k] for k in keys], 1), batch["labels"]

        def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(logits, y.to(device))

        refresh_before_epoch(
            sam, self._epoch, _StackedInputs(self.model, keys), data, self.fisher_seed, loss_fn, collate=collate
        )

    # ------------------------------------------------------------------ the two passes
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> Tensor:
        direction = self.sam.direction
        if direction.one_pass:
            return self._one_pass_training_step(model, inputs, num_items_in_batch)
        if direction.kind == "subbatch":  # pass one on the first ceil(F * b) examples of each micro-batch
            self._window.append((dict(inputs), num_items_in_batch))
            sub = _first_examples(inputs, direction.pass_one_size(_batch_size(inputs)))
            loss = super().training_step(model, sub, None)
            return self._after_window(model, loss)
        # compute_loss may pop keys (labels) from the dict: keep a copy for pass two.
        self._window.append((dict(inputs), num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        return self._after_window(model, loss)

    def _after_window(self, model: nn.Module, loss: Tensor) -> Tensor:
        """Pass one of a micro-batch is done; at the window's last one, perturb and replay the window at w + e."""
        if not self.accelerator.sync_gradients:
            return loss  # an earlier micro-batch: its gradient at w joins the window's
        window, self._window = self._window, []
        sam = self.sam
        refresh_after_first_backward(sam, self._epoch)  # SSAM-D: once, at the epoch's first step
        if not sam.ascent_due():
            return loss  # a plain step of the schedule: the Trainer's optimizer.step() takes it with this gradient
        sam.first_step(zero_grad=True)
        try:
            for j, (inp, n) in enumerate(window):
                if j < len(window) - 1:
                    with self.accelerator.no_sync(model):
                        super().training_step(model, dict(inp), n)
                else:
                    super().training_step(model, dict(inp), n)
        except BaseException:
            sam.restore()
            raise
        # w + e stays until the Trainer clips and calls optimizer.step(), which finishes the step that first_step
        # began (second_step: restore w, base step with pass two's gradient).
        return loss

    def _one_pass_training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any) -> Tensor:
        """A one-pass direction: the window's first micro-batch perturbs along the stored direction, every
        micro-batch runs once at w + e, and the Trainer's optimizer.step() restores w and steps."""
        sam = self.sam
        if self._one_pass_micro == 0 and sam.ascent_due():
            sam.first_step()
        self._one_pass_micro += 1
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            sam.restore()
            raise
        if self.accelerator.sync_gradients:
            self._one_pass_micro = 0
            refresh_after_first_backward(sam, self._epoch)  # SSAM-D: its refresh scores this gradient (at w + e)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.optimizer is not None:
            density = mask_density(self.sam)
            if density is not None:
                logs["mask_density"] = density
        super().log(logs, *args, **kwargs)


def _batch_size(inputs: dict) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0)


def _first_examples(inputs: dict, k: int) -> dict:
    """The first k examples of a batch dict (every tensor with the batch's leading size; the rest as it is)."""
    n = _batch_size(inputs)
    return {key: v[:k] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v for key, v in inputs.items()}

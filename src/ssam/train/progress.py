"""Where a run stands: the counters a checkpoint carries beside the model, optimizer, scheduler and scaler states.

One owner for them, so that what is saved, what a resume reads back and what the summary reports cannot drift
apart. The keys are the checkpoint's own (flat, as earlier checkpoints wrote them), so old runs resume unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Progress"]


@dataclass
class Progress:
    """A run's position and running totals."""

    epoch: int = 0  # the epoch to start or continue with
    step: int = 0  # its first step: > 0 after a resume from the middle of an epoch
    best_acc1: float = 0.0
    elapsed: float = 0.0  # training seconds; evaluation and the memorization count are outside them
    skipped_steps: int = 0  # fp16 steps the scaler skipped
    passes: float = 0.0  # forward + backward passes summed over the examples trained on (see cost.py)
    examples: int = 0
    # The first epoch of best validation accuracy and the test accuracy then: the early-stopped result.
    best_val: dict[str, float] = field(default_factory=dict)
    partial: dict | None = None  # an interrupted epoch's running sums, to continue it
    resumed: bool = False

    @property
    def passes_per_example(self) -> float:
        return self.passes / max(1, self.examples)

    def count(self, passes_per_example: float, examples: int) -> None:
        """A step over ``examples`` examples (all ranks), each costing ``passes_per_example`` passes."""
        self.passes += passes_per_example * examples
        self.examples += examples

    def note_validation(self, epoch: int, val_acc1: float, test_acc1: float) -> float:
        """Keep the first epoch of best validation accuracy; returns the early-stopped test accuracy."""
        if val_acc1 > self.best_val.get("val_acc1", -1.0):
            self.best_val = {"val_acc1": val_acc1, "epoch": epoch, "test_acc1": test_acc1}
        return self.best_val["test_acc1"]

    def to_checkpoint(self, epoch: int, step: int, partial: dict | None) -> dict[str, Any]:
        """The checkpoint's entries for a save at ``epoch``/``step`` (the point a resume continues from)."""
        return {
            "epoch": epoch,
            "step": step,
            "best_acc1": self.best_acc1,
            "elapsed": self.elapsed,
            "skipped_steps": self.skipped_steps,
            "passes": self.passes,
            "examples": self.examples,
            "best_val": self.best_val,
            "partial": partial,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Progress:
        """Read back; every key but ``epoch`` is optional (checkpoints of earlier versions lack some)."""
        return cls(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt.get("step", 0)),
            best_acc1=float(ckpt.get("best_acc1", 0.0)),
            elapsed=float(ckpt.get("elapsed", 0.0)),
            skipped_steps=int(ckpt.get("skipped_steps", 0)),
            passes=float(ckpt.get("passes", 0.0)),
            examples=int(ckpt.get("examples", 0)),
            best_val=dict(ckpt.get("best_val") or {}),
            partial=ckpt.get("partial"),
            resumed=True,
        )

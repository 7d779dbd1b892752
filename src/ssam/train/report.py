"""What a run reports: progress inside an epoch, each epoch's record (a line of metrics.jsonl) and its log line, and
the run's summary.json."""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .memorization import KEYS as MEMORIZATION_KEYS
from .progress import Progress
from .rundir import say

__all__ = ["PROGRESS_EVERY_S", "StepLog", "epoch_line", "epoch_record", "run_header", "run_summary"]

PROGRESS_EVERY_S = 30.0


def run_header(
    cfg: Namespace,
    model: torch.nn.Module,
    device: torch.device,
    world: int,
    path: Path,
    progress: Progress,
    noisy_labels: int | None,
    micro_batch_note: str | None,
) -> list[str]:
    """The log's first lines: what is trained, where (threads on a CPU), from where it resumes, and what the data
    and the step do that the flags alone do not show."""
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    lines = [
        f"ssam train | {cfg.dataset} {cfg.model} ({n_params:,} params) {cfg.opt} | {device}"
        + (f" x{world}" if world > 1 else "")
        + (f" | {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else "")
        + f" | {path}"
        + (f", resumed at epoch {progress.epoch + 1} step {progress.step}" if progress.resumed else "")
    ]
    if noisy_labels is not None:
        lines.append(f"label noise {cfg.label_noise:g}: {noisy_labels} training labels replaced")
    if micro_batch_note:
        lines.append(f"--sam_micro_batch {cfg.sam_micro_batch}: one ascent per chunk, {micro_batch_note}")
    return lines


class StepLog:
    """Progress inside an epoch: a bar on a terminal; elsewhere a line every ``log_freq`` steps and at least every
    ``PROGRESS_EVERY_S`` seconds, so that a slow model on a CPU does not look hung. ``quiet``: no bar, no lines;
    ``main`` False (ranks other than 0): nothing."""

    def __init__(self, main: bool, quiet: bool, log_freq: int, epoch: int, epochs: int, total: int) -> None:
        from tqdm import tqdm

        self.main, self.quiet, self.log_freq, self.epoch = main, quiet, log_freq, epoch
        show = main and not quiet and sys.stderr.isatty()
        self.bar = tqdm(
            total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show, dynamic_ncols=True
        )
        self.last = time.time()

    def step(self, step: int, steps: int, sums: Tensor) -> None:
        """After step ``step`` (0-based) of ``steps``; ``sums`` are the epoch's running (loss sum, top-1, top-5,
        examples), read only when a line is due (reading waits for the device)."""

        def mean_loss() -> float:
            return sums[0].item() / sums[3].item()

        self.bar.update(1)
        due = (step + 1) % self.log_freq == 0 or time.time() - self.last >= PROGRESS_EVERY_S
        if not (due and self.main):
            return
        self.last = time.time()
        if self.bar.disable and not self.quiet:
            say(f"  epoch {self.epoch + 1} step {step + 1}/{steps} loss {mean_loss():.4f}")
        elif not self.bar.disable:
            self.bar.set_postfix(loss=f"{mean_loss():.4f}")

    def close(self) -> None:
        self.bar.close()


def epoch_record(
    epoch: int, train: dict, test: dict, held: dict, progress: Progress, lr: float, mask_density: float
) -> dict[str, Any]:
    """One epoch: the train loop's numbers, the test set's, the held-out ones (validation, memorization)."""
    return {
        "epoch": epoch,
        **{k: train[k] for k in ("train_loss", "train_acc1", "train_acc5")},
        **test,
        "best_acc1": progress.best_acc1,
        "lr": lr,
        "mask_density": mask_density,
        **{k: train[k] for k in ("epoch_time", "images_per_s", "skipped_steps", "ascent_share")},
        **held,
        "passes_per_example": progress.passes_per_example,
    }


def epoch_line(rec: dict, epochs: int, mask: bool, ascent: bool) -> str:
    """The log line of an epoch; the mask density with a mask, the ascent share with a schedule."""
    return (
        f"epoch {rec['epoch'] + 1:>3}/{epochs} | train loss {rec['train_loss']:.4f} acc1 {rec['train_acc1']:.2f} "
        f"acc5 {rec['train_acc5']:.2f} | test loss {rec['test_loss']:.4f} acc1 {rec['test_acc1']:.2f} "
        f"acc5 {rec['test_acc5']:.2f} | best {rec['best_acc1']:.2f} | lr {rec['lr']:.4g} | "
        + (f"mask {rec['mask_density']:.3f} | " if mask else "")
        + (f"ascent {rec['ascent_share']:.2f} | " if ascent else "")
        + (f"val acc1 {rec['val_acc1']:.2f} | " if "val_acc1" in rec else "")
        + (
            f"noisy fit {rec['noisy_memorized']:.3f} true {rec['noisy_true']:.3f} | "
            if "noisy_memorized" in rec
            else ""
        )
        + f"{rec['epoch_time']:.1f}s {rec['images_per_s']:.0f} img/s"
        + (f" | {rec['skipped_steps']} fp16 steps skipped" if rec["skipped_steps"] else "")
    )


def run_summary(
    progress: Progress, last: dict, epochs: int, start_epoch: int, loss_at_w: bool = True
) -> dict[str, Any]:
    """summary.json of a finished run; ``last`` is the final epoch's record. ``loss_at_w``: the logged training loss
    is pass one's, at w (SAM's gradient direction, the plain optimizers), else pass two's at w + e over the whole
    batch (the other ascent directions, ssam.train.step)."""
    summary: dict[str, Any] = {
        "finished": True,
        "best_acc1": progress.best_acc1,
        "final_acc1": last.get("test_acc1"),
        "final_train_loss": last.get("train_loss"),
        "epochs": epochs,
        "wall_time": progress.elapsed,
        "time_per_epoch": progress.elapsed / max(1, epochs - start_epoch),
        "skipped_steps": progress.skipped_steps,
        "passes_per_example": progress.passes_per_example,
        "train_loss_pass": "one (at w)" if loss_at_w else "two (at w + e)",
    }
    if progress.best_val:
        summary.update(
            early_stopped_acc1=progress.best_val["test_acc1"],
            best_val_acc1=progress.best_val["val_acc1"],
            best_val_epoch=int(progress.best_val["epoch"]),
        )
    summary.update({f"final_{k}": last[k] for k in MEMORIZATION_KEYS if k in last})
    return summary

"""The run folder (config.yaml, log.txt, metrics.jsonl, checkpoints, summary.json), the checkpoint a run resumes
from, and the optional trackers.

Only rank 0 writes, and nothing is written before the configuration is known good.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..errors import UsageError
from ..io import save_torch, write_atomic, write_json
from ..runfolder import RunFolder
from .config import to_plain
from .distributed import elastic_restart
from .identity import changed_flags

__all__ = ["RunDir", "Trackers", "checkpoint_to_resume"]


class RunDir(RunFolder):
    """The run folder of a training run, with the writing: only rank 0 writes."""

    def __init__(self, cfg: Namespace, rank: int) -> None:
        super().__init__(Path(cfg.output_dir) / cfg.output_name)
        self.rank = rank
        self.main = rank == 0

    def prepare(self, cfg: Namespace, replace: bool = True) -> None:
        """Refuse to train over a run unless told to continue (--resume) or replace (--overwrite) it; with
        ``replace``, remove the run that --overwrite replaces (call that once every input has been checked)."""
        if cfg.eval_only:
            return
        resuming = cfg.resume or cfg.resume_path
        if self.holds_run() and not resuming and not cfg.overwrite:
            kind = "a finished run" if self.finished() else "a run"
            raise UsageError(
                f"output folder {self.path} already holds {kind}; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        if replace and cfg.overwrite and self.main and self.path.exists() and not resuming:
            shutil.rmtree(self.path)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            write_atomic(self.path / name, text.encode())

    def append(self, name: str, line: str) -> None:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / name, "a") as f:
                f.write(line.rstrip("\n") + "\n")

    def log(self, line: str) -> None:
        """A line for the terminal and log.txt (--quiet hides the progress bar, never these lines)."""
        if self.main:
            say(line)
            self.append(self.LOG, line)

    def save(self, name: str, obj: dict) -> None:
        if self.main:
            save_torch(obj, self.path / name)

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            write_json(self.path / name, obj)

    def truncate_metrics(self, epoch: int) -> None:
        """On resume, forget records of epochs that will be run again."""
        f = self.path / self.METRICS
        if self.main and f.exists():
            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epoch]
            self.write_text(self.METRICS, "".join(ln + "\n" for ln in keep))


class Trackers:
    """Optional wandb / TensorBoard; asked for but not installed is a one-line error before any work."""

    def __init__(self, cfg: Namespace, run: RunDir) -> None:
        self.wandb: Any = None
        self.tb: Any = None
        if not run.main:
            return
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError(
                    "--wandb needs the wandb package: pip install 'sparse-sam[wandb]' "
                    "(from a clone: pip install -e '.[wandb]')"
                ) from None
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_name or cfg.output_name,
                config=to_plain(cfg),
                dir=str(run.path),
                resume="allow",
            )
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run.path / "tensorboard"))

    def log(self, record: dict) -> None:
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def checkpoint_to_resume(cfg: Namespace, run: RunDir, device: torch.device) -> tuple[dict | None, list[str]]:
    """The checkpoint this run continues from (None: a fresh start) and the flags that changed since it was written.

    Flags that shape the run must match the checkpoint's unless --allow_changed_flags (see identity.py); the
    model, optimizer and data set must always match, or the checkpoint cannot be loaded.
    """
    if cfg.eval_only:
        path = Path(cfg.resume_path) if cfg.resume_path else run.best
    elif cfg.resume_path:
        path = Path(cfg.resume_path)
    elif cfg.resume:
        path = run.last
        if not path.exists():
            # `ssam compare` resumes every run folder it manages, and an elastic restart may come before the
            # first checkpoint: an empty folder simply starts.
            if os.environ.get("SSAM_RESUME_OR_START") == "1" or elastic_restart():
                return None, []
            if run.holds_run():
                raise UsageError(
                    f"--resume: no checkpoint at {path}; the folder holds a run that never "
                    "finished an epoch: pass --overwrite to start again"
                )
            hint = ""
            if getattr(cfg, "name_from_settings", False):
                hint = (
                    "; the folder name holds a hash of the settings that shape the run, so a run with other "
                    "flags lives in another folder (name it with --output_name)"
                )
            raise UsageError(f"--resume: no checkpoint at {path}{hint}")
    else:
        return None, []
    if not path.exists():
        raise UsageError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path, map_location=device)
    saved = ckpt.get("config", {})
    for key in ("model", "opt", "dataset"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise UsageError(
                f"checkpoint {path} was written with --{key} {saved[key]}; this run has "
                f"--{key} {getattr(cfg, key)}: use the same --{key} or another --output_name"
            )
    if cfg.eval_only:
        return ckpt, []
    changes = changed_flags(saved, to_plain(cfg))
    if changes and not cfg.allow_changed_flags:
        raise UsageError(
            f"--resume: {path} was trained with other settings ({', '.join(changes)}); "
            "use the same flags, or add --allow_changed_flags to continue with the new values"
        )
    if "epochs" in saved and saved["epochs"] != cfg.epochs:
        changes.append(f"--epochs {saved['epochs']} -> {cfg.epochs}")
    return ckpt, changes


def say(line: str) -> None:
    """Print a line; when the reader of stdout went away (``ssam train ... | head``), keep training: later lines go
    to log.txt only."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would also fail flushing stdout at exit
        os.close(devnull)

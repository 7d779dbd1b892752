"""The run folder (config.yaml, log.txt, metrics.jsonl, checkpoints, summary.json) and the optional trackers.

Only rank 0 writes, and nothing is written before the configuration is known good.
"""
from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import save_torch, write_atomic
from .config import to_plain

__all__ = ["RunDir", "Trackers"]


class RunDir:
    def __init__(self, cfg: Namespace, rank: int) -> None:
        self.path = Path(cfg.output_dir) / cfg.output_name
        self.rank = rank
        self.main = rank == 0

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in ("last.pt", "summary.json", "metrics.jsonl"))

    def finished(self) -> bool:
        try:
            return bool(json.loads((self.path / "summary.json").read_text()).get("finished"))
        except (OSError, ValueError):
            return False

    def prepare(self, cfg: Namespace) -> None:
        """Refuse to train over a run unless told to continue (--resume) or replace (--overwrite) it."""
        if cfg.eval_only:
            return
        resuming = cfg.resume or cfg.resume_path
        if self.holds_run() and not resuming and not cfg.overwrite:
            kind = "a finished run" if self.finished() else "a run"
            raise UsageError(f"output folder {self.path} already holds {kind}; pass --resume to continue it or "
                             "--overwrite to replace it")
        if cfg.overwrite and self.main and self.path.exists() and not resuming:
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
            print(line, flush=True)
            self.append("log.txt", line)

    def save(self, name: str, obj: dict) -> None:
        if self.main:
            save_torch(obj, self.path / name)

    def truncate_metrics(self, epoch: int) -> None:
        """On resume, forget records of epochs that will be run again."""
        f = self.path / "metrics.jsonl"
        if self.main and f.exists():
            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epoch]
            self.write_text("metrics.jsonl", "".join(ln + "\n" for ln in keep))


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
                raise UsageError("--wandb needs the wandb package: pip install 'sparse-sam[wandb]' "
                                 "(from a clone: pip install -e '.[wandb]')") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or cfg.output_name,
                                    config=to_plain(cfg), dir=str(run.path), resume="allow")
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

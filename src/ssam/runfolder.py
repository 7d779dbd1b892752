"""A run folder: the one place that names its files and knows what they say.

``ssam train`` writes one (``train.rundir`` adds the writing), ``ssam compare`` plans and reports over them, the
analysis commands read their checkpoints, and ``scripts/results_fashion.sh`` archives and shares them through
``python -m ssam.runfolder`` (below). A run is *finished* when its ``summary.json`` says so; it *holds a run* once
any of its checkpoint, summary or metrics exists.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunFolder"]


class RunFolder:
    """The files of one run: ``RunFolder(path).summary()``, ``.finished()``, ``.metrics()`` ..."""

    CONFIG = "config.yaml"  # the flags, loadable with ssam train --config
    LOG = "log.txt"
    METRICS = "metrics.jsonl"  # one JSON record per epoch
    LAST = "last.pt"  # the checkpoint to resume from (also mid-epoch)
    BEST = "best.pt"  # the checkpoint of the best test accuracy
    SUMMARY = "summary.json"  # written when the run ends: finished, accuracies, times, costs
    MASKS = "masks.json"  # SSAM runs: the final mask per parameter tensor
    HESSIAN = "hessian.json"  # ssam compare's cached sharpness of the final model
    CHECKPOINT_SUFFIX = ".pt"  # LAST, BEST: the large files, left out of an archive

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in (self.LAST, self.SUMMARY, self.METRICS))

    def summary(self) -> dict | None:
        """The summary, or None when there is none or it cannot be read."""
        return _json_dict(self.path / self.SUMMARY)

    def finished(self) -> bool:
        s = self.summary()
        return s is not None and s.get("finished") is True

    def config(self) -> dict | None:
        """The saved flags, or None when there are none or they cannot be read."""
        try:
            cfg = yaml.safe_load((self.path / self.CONFIG).read_text())
        except (OSError, yaml.YAMLError):
            return None
        return cfg if isinstance(cfg, dict) else None

    def metrics(self) -> list[dict]:
        """Per-epoch records in epoch order; a torn last line (a killed run) is dropped, a re-logged epoch keeps its
        last record."""
        by_epoch: dict[int, dict] = {}
        try:
            lines = (self.path / self.METRICS).read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), (int, float)):
                by_epoch[int(rec["epoch"])] = rec
        return [by_epoch[e] for e in sorted(by_epoch)]

    def checkpoint(self) -> Path:
        """The checkpoint an analysis reads from this folder: best.pt, else last.pt (which need not exist)."""
        return self.best if self.best.is_file() else self.last

    def archive_files(self) -> list[Path]:
        """The folder's own files but the checkpoints: a few kB that keep a finished run's results."""
        if not self.path.is_dir():
            return []
        return sorted(f for f in self.path.iterdir() if f.is_file() and f.suffix != self.CHECKPOINT_SUFFIX)

    def read(self, name: str) -> Any:
        """A JSON file of the folder (masks, hessian), or None."""
        try:
            with open(self.path / name, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def _json_dict(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def main(argv: list[str] | None = None) -> int:
    """For scripts (``scripts/results_fashion.sh``), the one rule of what is finished and what an archive keeps:
    ``finished DIR...`` prints the finished runs among DIR..., ``archive-files DIR...`` the files of each DIR an
    archive keeps (no checkpoints); one path a line, so that a script starts Python once per folder, not per run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["finished"]:
        paths = [d for d in args[1:] if RunFolder(d).finished()]
    elif args[:1] == ["archive-files"]:
        paths = [str(f) for d in args[1:] for f in RunFolder(d).archive_files()]
    else:
        got = " ".join(args) or "no arguments"
        print(
            f"python -m ssam.runfolder: got {got!r}; allowed: finished DIR... | archive-files DIR...", file=sys.stderr
        )
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

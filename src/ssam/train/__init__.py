"""The training system: configuration, loop, checkpoints. ``main(argv)`` is ``ssam train``."""

from __future__ import annotations

import signal
import sys
from argparse import Namespace

from .config import build_parser, parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    train(cfg)
    return 0


def train(cfg: Namespace) -> dict:
    """Run a whole training from a parsed configuration; exceptions carry the exit status (see cli)."""
    import torch.distributed as dist

    from .loop import Trainer

    trainer = Trainer(cfg)
    previous = {}

    def on_signal(signum, _frame):
        if trainer.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        print(f"\nssam: signal {signum} received; finishing the current step and writing last.pt", file=sys.stderr)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[s] = signal.signal(s, on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        return trainer.fit()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["main", "train", "parse_args", "build_parser"]

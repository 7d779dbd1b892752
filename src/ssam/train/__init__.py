"""The training system: configuration, loop, checkpoints. ``main(argv)`` is ``ssam train``."""

from .config import build_parser, parse_args


def main(argv: list[str] | None = None) -> int:
    from .loop import train

    cfg = parse_args(argv)
    train(cfg)
    return 0


__all__ = ["main", "parse_args", "build_parser"]

"""``ssam hessian``, ``ssam landscape`` and ``ssam sharpness``: argument sets and runners.

Each command exposes ``add_<cmd>_args(parser)`` and ``run_<cmd>(args) -> int``; user mistakes raise
``UsageError`` (one line, exit code 2 in ``ssam.cli``).  The commands live in :mod:`ssam.analysis.commands`,
one module each; this module gathers them for ``ssam.cli``.
"""

from .commands.common import parse_range
from .commands.hessian import add_hessian_args, run_hessian
from .commands.landscape import add_landscape_args, run_landscape
from .commands.sharpness import add_sharpness_args, run_sharpness

__all__ = [
    "add_hessian_args",
    "add_landscape_args",
    "add_sharpness_args",
    "parse_range",
    "run_hessian",
    "run_landscape",
    "run_sharpness",
]

"""Deprecated module name, kept for one release: the ssam-vs-PyHessian profiler is a benchmark and lives in
``ssam.bench.hessian`` (``python -m ssam.bench.hessian``). Nothing in the package imports this module; it reaches
the bench only when an old name is used."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = ("TOOLS", "available", "format_profile", "main", "measure", "run_profile")


def _warn(what: str) -> None:
    warnings.warn(
        f"ssam.analysis.profile.{what} moved to ssam.bench.hessian; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        _warn(name)
        from ..bench import hessian

        return getattr(hessian, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import sys

    from ssam.bench.hessian import main

    # Said on stderr: a DeprecationWarning raised here is hidden by Python's default filters.
    print(
        "note: python -m ssam.analysis.profile is now python -m ssam.bench.hessian; the old name goes in the next "
        "release",
        file=sys.stderr,
    )
    sys.exit(main())

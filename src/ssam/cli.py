"""The `ssam` command: train, hessian, landscape, sharpness, compare, bench.

Every user mistake is a ``UsageError``: one line on stderr and exit code 2. A diverged run exits 3, a run stopped by
SIGINT/SIGTERM exits 130 after writing last.pt. ``--debug`` shows the Python traceback of any failure.
"""

from __future__ import annotations

import sys
import traceback

from .errors import EXIT_CODES, ArgumentParser, Diverged, Interrupted, UsageError

USAGE = """usage: ssam <command> [flags]   (ssam <command> --help for its flags)

commands:
  train       train a classifier with SGD/AdamW, SAM, SSAM-F or SSAM-D (the official code's flags)
  compare     run a grid of optimizer variants x seeds x swept flags (rho, sparsity, ...) and report them
  hessian     Hessian spectrum of a checkpoint: top eigenvalues, trace, eigenvalue density
  landscape   loss landscape along filter-normalised directions (1-D, 2-D, or between checkpoints)
  sharpness   one table of accuracy, lambda_max, trace and loss increase for several checkpoints
  bench       speed and memory of SGD, SAM, SSAM-F, SSAM-D side by side"""


def _analysis(name: str):
    def run(argv: list[str]) -> int:
        from .analysis import cli as acli

        parser = ArgumentParser(prog=f"ssam {name}")
        getattr(acli, f"add_{name}_args")(parser)
        parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
        return int(getattr(acli, f"run_{name}")(parser.parse_args(argv)) or 0)

    return run


def _hessian(argv: list[str]) -> int:
    """The analysis command plus its --profile flags, whose runner is a benchmark: composed here, at the top,
    so that neither layer imports the other."""
    from .analysis.cli import add_hessian_args, run_hessian
    from .bench.hessian import add_profile_args, run_hessian_profile

    parser = ArgumentParser(prog="ssam hessian")
    add_hessian_args(parser)
    add_profile_args(parser)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)
    return int((run_hessian_profile if args.profile else run_hessian)(args) or 0)


def _train(argv: list[str]) -> int:
    from .train import main

    return main(argv)


def _compare(argv: list[str]) -> int:
    from .compare import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from .bench import main

    return main(argv)


COMMANDS = {
    "train": _train,
    "compare": _compare,
    "hessian": _hessian,
    "landscape": _analysis("landscape"),
    "sharpness": _analysis("sharpness"),
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"ssam {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ssam: error: unknown command {cmd!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    try:
        return COMMANDS[cmd](rest)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the point is one line and an exit code per kind
        if debug:
            traceback.print_exc()
        code = next((c for t, c in EXIT_CODES.items() if isinstance(e, t)), 1)
        if isinstance(e, UsageError):
            print(f"ssam {cmd}: error: {e}", file=sys.stderr)
        elif isinstance(e, Diverged):
            print(f"ssam {cmd}: diverged: {e}", file=sys.stderr)
        elif isinstance(e, Interrupted):
            print(f"ssam {cmd}: {e}", file=sys.stderr)
        elif isinstance(e, KeyboardInterrupt):
            print(f"ssam {cmd}: interrupted", file=sys.stderr)
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(
                f"ssam {cmd}: error: {type(e).__name__}: {first[:300]} (run with --debug for the traceback)",
                file=sys.stderr,
            )
        return code


if __name__ == "__main__":
    sys.exit(main())

"""The error types of ssam, their exit codes, and the one argument parser every command uses.

Library code raises ``ValueError`` (or ``UsageError``, a ``ValueError``) naming the bad argument; the command line turns
each error type below into one line on stderr and the exit code of ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable

__all__ = [
    "UsageError",
    "Diverged",
    "Interrupted",
    "EXIT_CODES",
    "ArgumentParser",
    "HelpFormatter",
    "did_you_mean",
    "flag_error",
]


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed."""


class Diverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: the current step finished and last.pt was written."""


# The exit code of each failure kind (anything else is 1). 130 is the shell's code for a SIGINT.
EXIT_CODES: dict[type[BaseException], int] = {UsageError: 2, Diverged: 3, Interrupted: 130, KeyboardInterrupt: 130}


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if not close:  # sam-adam -> sam-adamw, weight-decay -> weight_decay: compare with - and _ alike
        norm = {c.replace("-", "_"): c for c in choices}
        hit = difflib.get_close_matches(value.replace("-", "_"), list(norm), n=1, cutoff=0.6)
        close = [norm[h] for h in hit]
    return f" (did you mean {close[0]!r}?)" if close else ""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is ``None``/``False`` or the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in help_text:
            return help_text
        return super()._get_help_string(action) or help_text


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` with one line (no usage dump, no prefix: the CLI adds ``ssam CMD:``),
    and suggests the closest flag for a misspelt one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [o for a in self._actions for o in a.option_strings]
            bad = message[len(prefix) :].split()
            hints = "".join(did_you_mean(b.split("=")[0], flags) for b in bad if b.startswith("-"))
            message += hints
        raise UsageError(message)


def flag_error(error: ValueError, flags: Iterable[str] = ()) -> str:
    """An optimizer's or data set's ``ValueError`` ("granularity: got 'x'; allowed: ...") as a line that names the
    command-line flag ("--granularity: got 'x'; allowed: ..."): the one place that translates them. A message
    that does not start with one of ``flags`` (all, when none are given) is returned as it is."""
    text = str(error)
    head = text.split(":", 1)[0]
    known = set(flags)
    if head.isidentifier() and (not known or head in known):
        return f"--{text}"
    return text

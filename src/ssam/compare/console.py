"""Printing that survives a closed pipe: ``ssam compare --dry_run | head`` ends quietly.

When the reader of stdout goes away, further output is pointless but the comparison (children in training, the
report) must go on: stdout is pointed at /dev/null once and every later print is dropped.
"""

from __future__ import annotations

import os
import sys


def say(*parts: object, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    try:
        print(*parts, file=stream, flush=True)
    except BrokenPipeError:
        _drop(stream)


def _drop(stream) -> None:
    # Python's own advice for SIGPIPE: dup /dev/null over the descriptor, so that the final flush at exit does
    # not raise again ("Exception ignored ... BrokenPipeError").
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (pytest's capture)
        pass

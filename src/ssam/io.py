"""Every file ssam writes goes through here: atomic replacement, JSON and CSV in one format each.

A reader (or a kill at any instant) sees the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["write_atomic", "save_torch", "to_plain", "write_json", "read_json", "write_csv"]


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``path`` so that a reader sees the old file or the complete new one.

    ``data`` is the bytes, or a function writing them to a binary file. The bytes go to a temporary file in the same
    folder, are flushed to disk, and the file is renamed over ``path``; the folder is synced so the rename survives a
    power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a file written by open() gets 0666 less the umask, and so does this one.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that a kill at any instant cannot tear."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def to_plain(obj: Any) -> Any:
    """JSON-ready values: numpy scalars become Python numbers, non-finite floats ``None``, paths strings."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_plain(obj.tolist())  # numpy arrays and scalars, torch tensors
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """One JSON style for every file: 2-space indent, keys in insertion order, NaN/inf as null, final newline."""
    write_atomic(path, (json.dumps(to_plain(obj), indent=2, allow_nan=False) + "\n").encode())


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: list[str]) -> None:
    """A CSV with exactly ``columns``; a missing, ``None`` or non-finite value is an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if _blank(r.get(c)) else r.get(c) for c in columns])
    write_atomic(path, buf.getvalue().encode())

"""Checkpoints that survive a kill at any instant and load without executing pickled code.

Format (a plain dict, loadable with ``torch.load(weights_only=True)``):
    version      int
    model        the unwrapped model's state_dict (no ``module.`` / ``_orig_mod.`` prefixes)
    model_args   {"name", "num_classes", "in_channels", "image_size"[, "width"]} to rebuild the model
    config       the run's full configuration as plain values
    optimizer    the optimizer's state_dict (base state, masks, SSAM-D schedule position)
    scheduler    the LR scheduler's state_dict
    epoch        number of finished epochs (the next epoch to run)
    step         optimizer steps done in the current epoch (mid-epoch checkpoints), else 0
    best_acc1    best test top-1 so far
    rng          random-generator states
    finished     True once the final epoch has been written
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

VERSION = 1


def _first_line(e: BaseException) -> str:
    """An exception's first line, whole (torch's messages are long; a cut one misleads), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unpickler_reason(e: BaseException) -> str:
    """The reason inside torch's long weights-only message ("Unsupported global: GLOBAL x.Y ...", "Trying to load
    unsupported GLOBAL posix.system ...", "Unsupported operand 214"): its first sentence, on one line."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    chosen = next((p for p in paragraphs if "GLOBAL" in p), None) or next(
        (p for p in paragraphs if not p.lstrip().startswith(("Weights only load failed", "Check the documentation"))),
        paragraphs[0] if paragraphs else "",
    )
    words = " ".join(chosen.split())
    return (words.split(". ")[0].rstrip(".") if words else type(e).__name__)[:300]


def _not_a_torch_file(path: Path) -> str | None:
    """Why the file cannot be a torch checkpoint (a zip archive since torch 1.6, a pickle before), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "is empty"
    if head.startswith(b"version https://git-lfs"):
        return "is a git-lfs pointer, not the checkpoint itself (fetch it with: git lfs pull)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    return f"is not a torch checkpoint (a zip archive or a pickle): it starts with {head[:12]!r}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint safely; every failure becomes a one-line ``UsageError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise UsageError(f"checkpoint {path} is truncated or corrupt: it {not_torch}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = _unpickler_reason(e)
        if "GLOBAL" in why:  # weights_only met a class or function: executable content
            raise UsageError(
                f"refusing to load {path}: it holds objects that plain tensors and containers cannot express "
                f"(possible code execution); only checkpoints written by ssam load. torch said: {why}"
            ) from None
        raise UsageError(f"checkpoint {path} is truncated or corrupt: torch said: {why}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, IndexError) as e:
        raise UsageError(f"checkpoint {path} is truncated or corrupt: {_first_line(e)}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise UsageError(f"{path} is not an ssam checkpoint (no 'model' entry)")
    return obj


def model_from_checkpoint(
    ckpt: dict, path: str | os.PathLike, name: str | None = None, fallback: dict | None = None
) -> torch.nn.Module:
    """Rebuild the checkpoint's model (``model_args``; ``fallback`` fills missing entries) and load its weights."""
    from .models import build_model

    margs = {**(fallback or {}), **(ckpt.get("model_args") or {})}
    name = name or margs.get("name") or (ckpt.get("config") or {}).get("model")
    if not name:
        raise UsageError(f"{path}: the checkpoint records no architecture; pass --model")
    missing = [k for k in ("num_classes", "in_channels", "image_size") if k not in margs]
    if missing:
        raise UsageError(f"{path}: the checkpoint records no {', '.join(missing)}; pass --dataset")
    width = margs.get("width")
    model = build_model(
        name,
        int(margs["num_classes"]),
        in_channels=int(margs["in_channels"]),
        image_size=int(margs["image_size"]),
        width=None if width is None else int(width),
    )
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: its weights do not fit model {name!r} ({first[:200]})") from None
    return model

"""Strict reader for IDX files, the format of MNIST and Fashion-MNIST (plain or gzip).

Layout (all integers big-endian): two zero bytes, a type byte (0x08 = unsigned byte, the only type
these data sets use), a byte with the number of dimensions d, then d uint32 sizes, then the values
in row-major order. So images are magic 0x00000803 (N, rows, cols) and labels 0x00000801 (N).

Every way a file can be wrong is reported as one line that names the file and what is wrong:
a downloaded file cut short, a file of the wrong kind under the right name, or a gzip stream that
does not decompress must never turn into a shape error deep inside training.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from ..errors import UsageError

UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_bytes(path: str, fix: str) -> bytes:
    """The file's content, decompressed when its name ends in .gz. ``fix`` ends every message."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except EOFError as exc:  # gzip's "Compressed file ended before the end-of-stream marker was reached"
        raise UsageError(f"{path!r} is truncated: the gzip stream ends early; {fix}") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise UsageError(f"{path!r} is not a valid gzip file ({exc}); {fix}") from exc
    except OSError as exc:
        raise UsageError(f"{path!r} cannot be read ({exc.strerror or exc}); {fix}") from exc


def parse_idx(raw: bytes, magic: int, path: str, fix: str) -> np.ndarray:
    """The uint8 array in ``raw``, whose header must carry ``magic``; the length must match exactly."""

    def bad(why: str) -> UsageError:
        return UsageError(f"{path!r} is not a valid IDX file: {why}; {fix}")

    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"{len(raw)} bytes, shorter than the {header}-byte header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise bad(f"magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        shape = " x ".join(map(str, dims))
        raise bad(f"the header says {shape} ({expected} bytes with the header) but the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int, fix: str = "replace the file") -> np.ndarray:
    """Read one IDX file (``.gz`` decompressed) whose magic number must be ``magic``."""
    path = os.fspath(path)
    return parse_idx(read_bytes(path, fix), magic, path, fix)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8, 1 to 3 dimensions) in IDX form; the inverse of ``parse_idx`` (tests write files with it)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = bytes([0, 0, UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return head + array.tobytes()

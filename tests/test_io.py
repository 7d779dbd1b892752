"""ssam.io: the atomic writer keeps the umask's permissions, as open() does (the first hour's bug 6)."""

from __future__ import annotations

import os
import stat

import pytest

from ssam.io import write_atomic, write_json


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_permissions_open_would_give(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "a.bin", b"x")
        write_json(tmp_path / "s.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() gives under this umask
            f.write("x")
    finally:
        os.umask(old)
    want = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.bin", "s.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

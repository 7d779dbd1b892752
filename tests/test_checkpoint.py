"""ssam.checkpoint.load_checkpoint: every bad file is one line that says what it is (the first hour's bugs 3, 4)."""

from __future__ import annotations

import os

import pytest
import torch

from ssam.checkpoint import load_checkpoint
from ssam.cli import main
from ssam.errors import UsageError


class NotPlain:  # a class: a weights-only load must refuse it
    pass


@pytest.mark.parametrize(
    "content, says",
    [
        (b"hello\n", "truncated or corrupt: it is not a torch checkpoint (a zip archive or a pickle)"),
        (b"", "truncated or corrupt: it is empty"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
            "truncated or corrupt: it is a git-lfs pointer, not the checkpoint itself (fetch it with: git lfs pull)",
        ),
    ],
)
def test_a_file_that_is_no_torch_file_says_what_it_is(tmp_path, content, says):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_random_bytes_after_a_pickle_header_are_corrupt_not_code(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"\x80\x02" + os.urandom(5000))
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert "truncated or corrupt" in str(e.value) and "code execution" not in str(e.value)


def test_a_truncated_zip_is_corrupt(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(100)}}, good)
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_executable_content_is_refused_with_torch_s_whole_line(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {}, "x": NotPlain()}, path)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    text = str(e.value)
    assert "possible code execution" in text and "torch said:" in text and "\n" not in text


def test_hessian_on_a_text_file_is_exit_2_naming_it(tmp_path, capsys):
    path = tmp_path / "best.pt"
    path.write_text("hello\n")
    assert main(["hessian", "--checkpoint", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and len(err.strip().splitlines()) == 1

"""pipeline/files.py: the one atomic write of every published file."""

from __future__ import annotations

import json
import resource

import pytest
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_output, remove_stale_temps, save_torch, write_json


def test_a_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"n": 1})
    write_json(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failing_block_keeps_the_previous_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_output(path) as temp:
        temp.write_bytes(b"half")
        raise ValueError("the writer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_user_error_inside_passes_through_unchanged(tmp_path):
    """A UserError raised while handling an OSError (a missing input file) is not a refused write."""
    with pytest.raises(UserError, match="cannot read the input"), atomic_output(tmp_path / "a.bin"):
        try:
            open(tmp_path / "missing")
        except OSError:
            raise UserError("cannot read the input") from None
    assert list(tmp_path.iterdir()) == []


def test_a_write_the_disk_refuses_is_one_sentence_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.pt"
    save_torch(path, {"w": torch.zeros(4)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # the next file may not exceed 1000 bytes
    try:
        with pytest.raises(UserError, match=r"cannot write .*state\.pt.*the previous state\.pt \(if any\) is kept"):
            save_torch(path, {"w": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert torch.load(path, weights_only=True)["w"].shape == (4,)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_stale_temps_of_killed_writers_are_removed(tmp_path):
    path = tmp_path / "last.pt"
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"torn")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"not ours")
    remove_stale_temps(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp"]

"""Atomic writes: a reader sees the old file or the new one, never a part; a failed write leaves no temporary."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cnn.fsio import atomic_path, sha256_file, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    write_json_atomic(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sha256_file(target) == hashlib.sha256(target.read_bytes()).hexdigest()

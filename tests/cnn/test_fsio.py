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


def test_a_file_name_from_strings_stays_in_its_folder(tmp_path: Path) -> None:
    from cnn.errors import UserError
    from cnn.fsio import file_in

    assert file_in(tmp_path, "scan.cam-effusion.png") == tmp_path / "scan.cam-effusion.png"
    for name in ("x.cam-o/../../../escape.png", "..", "", "a\0b"):
        with pytest.raises(UserError):
            file_in(tmp_path, name)
    (tmp_path / "link.png").symlink_to(tmp_path.parent / "elsewhere.png")
    with pytest.raises(UserError, match="outside"):
        file_in(tmp_path, "link.png")


def test_a_bounded_hash_reads_no_further_than_its_limit(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB of holes: costs nothing on disk, everything to read
    before = _bytes_read()
    digest = sha256_file(sparse, limit=(1 << 20) + 1)
    assert _bytes_read() - before < 2 << 20
    assert digest == hashlib.sha256(b"\0" * ((1 << 20) + 1)).hexdigest()


def _bytes_read() -> int:
    """What this process has read through read() calls so far (Linux /proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])

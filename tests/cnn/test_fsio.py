"""Atomic writes: a reader sees the old file or the new one, never a part; a failed write leaves no temporary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cnn.fsio import atomic_path, atomic_set, finish_set, sha256_file, write_json_atomic
from tests.helpers import TinyDisk


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


def test_a_set_of_files_is_replaced_whole_or_not_at_all_on_a_full_disk(tiny_disk: TinyDisk) -> None:
    targets = [tiny_disk.mount / name for name in ("a.parquet", "b.parquet", "c.parquet")]
    for target in targets:
        target.write_bytes(b"old")
    journal = tiny_disk.mount / ".a.publish.json"
    tiny_disk.fill(room=64 << 10)
    with pytest.raises(OSError), atomic_set(targets, journal) as temps:
        for tmp in temps:  # the second one does not fit
            tmp.write_bytes(os.urandom(48 << 10))
    assert [t.read_bytes() for t in targets] == [b"old"] * 3
    assert sorted(p.name for p in tiny_disk.mount.iterdir()) == [".filler", "a.parquet", "b.parquet", "c.parquet"]
    tiny_disk.grow()
    with atomic_set(targets, journal) as temps:
        for i, tmp in enumerate(temps):
            tmp.write_bytes(b"new %d" % i)
    assert [t.read_bytes() for t in targets] == [b"new 0", b"new 1", b"new 2"] and not journal.exists()


_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from cnn.fsio import atomic_set
folder = Path(sys.argv[1])
real, made = os.replace, []
def replace(src, dst):
    real(src, dst)
    made.append(dst)
    if len(made) == 2:  # the journal's own atomic write, then the first of the three renames
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
with atomic_set([folder / n for n in ("a", "b", "c")], folder / ".journal") as temps:
    for tmp in temps:
        tmp.write_text("new")
"""


def test_a_set_interrupted_between_renames_is_completed_by_the_next_reader(tmp_path: Path) -> None:
    import subprocess
    import sys

    for name in "abc":
        (tmp_path / name).write_text("old")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(tmp_path)], cwd=Path(__file__).parents[2]
    )
    assert killed.returncode == -9
    assert [(tmp_path / n).read_text() for n in "abc"] == ["new", "old", "old"]  # a mixed set, and its journal
    assert all(not os.path.isabs(name) for pair in json.loads((tmp_path / ".journal").read_text()) for name in pair)
    assert finish_set(tmp_path / ".journal")
    assert [(tmp_path / n).read_text() for n in "abc"] == ["new", "new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]

"""Atomic file writes (write to a temporary file in the same folder, then rename over the target), file names that
stay in their folder, bounded hashing."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnn.errors import UserError


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_set(targets: list[Path], journal: Path) -> Iterator[list[Path]]:
    """Replace several files as one: yield a temporary path beside each target; once all are written (a full disk
    while writing any of them leaves every target as it was), the journal lists the renames, they are made, and the
    journal goes. A process killed between renames leaves the journal: `finish_set` completes the set."""
    finish_set(journal)
    temps = []
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".set.tmp", dir=target.parent)
        os.close(fd)
        temps.append(Path(name))
    try:
        yield temps
        for tmp in temps:
            fsync_path(tmp)
        names = [
            [os.path.relpath(t, journal.parent), os.path.relpath(target, journal.parent)]
            for t, target in zip(temps, targets)
        ]
        write_text_atomic(journal, json.dumps(names))  # relative names: the folder may be shared, its path is not
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    finish_set(journal)


def finish_set(journal: Path) -> bool:
    """Complete the renames a killed `atomic_set` left in `journal` (those whose temporary file is still there were
    not made yet); whether there was one."""
    try:
        pairs = json.loads(journal.read_text())
    except (OSError, ValueError):
        return False
    for tmp, target in pairs:
        if (journal.parent / tmp).exists():
            os.replace(journal.parent / tmp, journal.parent / target)
    fsync_path(journal.parent)
    journal.unlink(missing_ok=True)
    return True


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether `path`, links resolved, lies within `folder` (links resolved too)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def file_in(folder: str | os.PathLike[str], name: str) -> Path:
    """`folder / name` for a file `name` built from strings others chose (image names, class names): refused with a
    UserError unless it is one plain file name that resolves inside `folder`, so no string becomes a path elsewhere."""
    if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"{name!r} cannot name a file: it is not one plain file name")
    target = Path(folder) / name
    if not inside(target, folder):  # a plain name is never the folder itself
        raise UserError(f"{name!r} would be written outside {Path(folder).name}")
    return target


def sha256_file(handle_or_path: str | os.PathLike[str] | Any, limit: int | None = None) -> str:
    """The sha256 of a file (a path, or a binary handle opened elsewhere), read in blocks; with `limit`, of its first
    `limit` bytes only (nothing past them is read)."""
    digest = hashlib.sha256()
    if isinstance(handle_or_path, (str, os.PathLike)):
        with open(handle_or_path, "rb") as handle:
            return sha256_file(handle, limit)
    left = -1 if limit is None else limit
    while left:
        block = handle_or_path.read(1 << 20 if left < 0 else min(1 << 20, left))
        if not block:
            break
        digest.update(block)
        left = left - len(block) if left > 0 else left
    return digest.hexdigest()


def write_atomic(target: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `target` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write text to `target` atomically."""
    return write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(target: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON to `target` atomically."""
    return write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

"""Atomic file writes: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def sha256_file(handle_or_path: str | os.PathLike[str] | Any) -> str:
    """The sha256 of a file (a path, or a binary handle opened elsewhere), read in blocks."""
    digest = hashlib.sha256()
    if isinstance(handle_or_path, (str, os.PathLike)):
        with open(handle_or_path, "rb") as handle:
            return sha256_file(handle)
    for block in iter(lambda: handle_or_path.read(1 << 20), b""):
        digest.update(block)
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

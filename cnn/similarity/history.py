"""What a version scored (`History`), for `cnn similar` and the next runs' reuse check: kept under CNN_HOME and
extended atomically after each run."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.fsio import write_text_atomic
from cnn.similarity.fingerprints import layout_matrix, layouts_of
from cnn.similarity.index import VectorIndex

HISTORY_COLUMNS = ["image_id", "path_key", "label", "ids", "phash", "phash_mirror", "layout", "scored_at"]


def path_key(path: str) -> str:
    """A short digest of a path as the tables show it: tells the same file scored again from a copy of it,
    without keeping the path (which may name a patient) in the history."""
    return hashlib.sha256(path.encode()).hexdigest()[:16]


class History:
    """What a version scored, for `cnn similar` and the reuse check: a FAISS index and its rows, as one
    generation folder that a `CURRENT` file names; `extend` writes a new generation and swaps the pointer in one
    rename, under a lock, so readers never see half an extension and concurrent runs take turns."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _current(self) -> Path | None:
        pointer = self.folder / "CURRENT"
        if not pointer.is_file():
            return None
        generation = self.folder / pointer.read_text(encoding="utf-8").strip()
        return generation if generation.is_dir() else None

    def generation(self) -> str:
        """The current generation's name ("" when nothing was scored yet)."""
        current = self._current()
        return current.name if current is not None else ""

    def rows(self) -> pd.DataFrame:
        current = self._current()
        if current is None:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in HISTORY_COLUMNS})
        return pd.read_parquet(current / "rows.parquet")

    def index(self) -> VectorIndex | None:
        current = self._current()
        return VectorIndex.load(current / "vectors.faiss") if current is not None else None

    def layout_index(self) -> VectorIndex | None:
        current = self._current()
        path = current / "layouts.faiss" if current is not None else None
        return VectorIndex.load(path) if path is not None and path.is_file() else None

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def extend(self, rows: pd.DataFrame, vectors: np.ndarray) -> int:
        """Add the rows (HISTORY_COLUMNS) whose image_id is not there yet, with their vectors; the number added."""
        with self._lock():
            old_rows, old_index = self.rows(), self.index()
            fresh = ~rows["image_id"].isin(set(old_rows["image_id"])) & ~rows["image_id"].duplicated()
            if not fresh.any():
                return 0
            new_vectors = np.asarray(vectors, dtype=np.float32)[fresh.to_numpy()]
            index = old_index.add(new_vectors) if old_index is not None else VectorIndex.build(new_vectors)
            combined = pd.concat([old_rows, rows.loc[fresh, HISTORY_COLUMNS]], ignore_index=True)
            layout_index = self.layout_index()
            if layout_index is not None and len(layout_index) == len(old_rows):  # only the new rows' layouts
                layout_index = layout_index.add(layouts_of(combined[len(old_rows) :], layout_index.index.d))
            else:
                grid = layout_matrix(combined)
                layout_index = VectorIndex.build(grid, metric="l2") if grid is not None else None
            generation = self.folder / f"gen-{uuid.uuid4().hex[:12]}"
            generation.mkdir()
            combined.to_parquet(generation / "rows.parquet", index=False)
            index.save(generation / "vectors.faiss")
            if layout_index is not None:
                layout_index.save(generation / "layouts.faiss")
            previous = self._current()
            write_text_atomic(self.folder / "CURRENT", generation.name)  # the commit point
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            return int(fresh.sum())

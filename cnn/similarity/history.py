"""What a version scored (`History`), for `cnn similar` and the next runs' reuse check: kept under CNN_HOME and
extended after each run by appending a segment (its rows and indexes), never by rewriting what is there."""

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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cnn.frames import among
from cnn.fsio import write_text_atomic
from cnn.similarity.fingerprints import layout_matrix
from cnn.similarity.index import SegmentedIndex, VectorIndex

HISTORY_COLUMNS = ["image_id", "path_key", "label", "ids", "phash", "phash_mirror", "layout", "scored_at"]


def path_key(path: str) -> str:
    """A short digest of a path as the tables show it: tells the same file scored again from a copy of it,
    without keeping the path (which may name a patient) in the history."""
    return hashlib.sha256(path.encode()).hexdigest()[:16]


class History:
    """What a version scored, for `cnn similar` and the reuse check: segments (each a folder with its rows, a FAISS
    index of the embeddings and one of the layouts) that a `CURRENT` file lists in order. `extend` writes the run's
    new rows as a new segment and rewrites `CURRENT` in one rename, under a lock, so readers never see half an
    extension and concurrent runs take turns. Segments are merged like a binary counter (the newest into the one
    before it while it holds at least as many rows), so each row is rewritten at most log2(n) times over a history
    of n rows, and there are at most log2(n) segments to search."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _segments(self) -> list[Path]:
        pointer = self.folder / "CURRENT"
        if not pointer.is_file():
            return []
        names = pointer.read_text(encoding="utf-8").split()
        return [self.folder / n for n in names if (self.folder / n).is_dir()]

    def generation(self) -> str:
        """What the history holds now, as one name ("" when nothing was scored yet): changes with every extension."""
        return "+".join(s.name for s in self._segments())

    def rows(self) -> pd.DataFrame:
        frames = [pd.read_parquet(s / "rows.parquet") for s in self._segments()]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in HISTORY_COLUMNS})
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def index(self) -> VectorIndex | SegmentedIndex | None:
        segments = self._segments()
        return SegmentedIndex([VectorIndex.load(s / "vectors.faiss") for s in segments]) if segments else None

    def layout_index(self) -> VectorIndex | SegmentedIndex | None:
        """The layouts' index, where every segment has one (its row ids must follow the rows)."""
        paths = [s / "layouts.faiss" for s in self._segments()]
        if not paths or not all(p.is_file() for p in paths):
            return None
        return SegmentedIndex([VectorIndex.load(p) for p in paths])

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
            segments = self._segments()
            fresh = ~among(rows["image_id"], _known(segments, rows["image_id"])) & ~rows["image_id"].duplicated()
            if not fresh.any():
                return 0
            new_rows = rows.loc[fresh, HISTORY_COLUMNS].reset_index(drop=True)
            new_vectors = np.asarray(vectors, dtype=np.float32)[fresh.to_numpy()]
            kept, merged = list(segments), []
            while kept and len(new_rows) >= _count(kept[-1]):  # a binary counter's carry
                older = kept.pop()
                merged.append(older)
                new_rows = pd.concat([pd.read_parquet(older / "rows.parquet"), new_rows], ignore_index=True)
                new_vectors = np.concatenate([VectorIndex.load(older / "vectors.faiss").vectors(), new_vectors])
            segment = self._write(new_rows, new_vectors)
            write_text_atomic(self.folder / "CURRENT", "\n".join(s.name for s in [*kept, segment]))  # the commit point
            for old in merged:
                shutil.rmtree(old, ignore_errors=True)
            return int(fresh.sum())

    def _write(self, rows: pd.DataFrame, vectors: np.ndarray) -> Path:
        """A new segment: its rows, the embeddings' index, the layouts' index (where the rows have layouts)."""
        segment = self.folder / f"seg-{uuid.uuid4().hex[:12]}"
        segment.mkdir()
        rows.to_parquet(segment / "rows.parquet", index=False)
        VectorIndex.build(vectors).save(segment / "vectors.faiss")
        grid = layout_matrix(rows)
        if grid is not None:
            VectorIndex.build(grid, metric="l2").save(segment / "layouts.faiss")
        return segment


def _known(segments: list[Path], image_ids: pd.Series) -> set[str]:
    """Which of `image_ids` the segments hold: one narrow column per segment, matched in Arrow."""
    wanted = pa.array(image_ids.astype(str).unique(), pa.string())
    found: set[str] = set()
    for segment in segments:
        stored = pq.read_table(segment / "rows.parquet", columns=["image_id"]).column(0)
        found.update(stored.filter(pc.is_in(stored, value_set=wanted)).to_pylist())
    return found


def _count(segment: Path) -> int:
    """A segment's rows, from its Parquet footer."""
    return int(pq.read_metadata(segment / "rows.parquet").num_rows)

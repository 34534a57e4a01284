"""Cosine (or Euclidean) nearest neighbours through FAISS, chosen by `bench/ann.py`: exact inner-product search
up to `exact_limit(dim)` vectors, where a query still takes about a millisecond, HNSW above it. Saved with FAISS's
own format (no pickle)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from cnn.fsio import atomic_path

EXACT_LIMIT = 200_000  # 128-dim vectors up to which exact search answers in about 1 ms (bench/ann.py)


def exact_limit(dim: int) -> int:
    """How many vectors of `dim` dimensions exact search keeps (its cost grows with vectors x dimensions: at 512
    dimensions 100k vectors took 10 ms a query, bench/ann.py)."""
    return EXACT_LIMIT * 128 // max(dim, 1)


HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 16, 128, 64
K = 10


def search_in_one_thread() -> None:
    """Make FAISS search with one thread in the calling thread: the reuse check runs beside the model's forward
    pass, whose threads already hold the cores, and OpenMP threads spinning for a core cost more than they save."""
    # imported here: heavy (FAISS): only where an index is built or searched
    import faiss

    faiss.omp_set_num_threads(1)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows (inner product = cosine similarity)."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


class IndexFileError(ValueError):
    """An index file whose layout is not one `VectorIndex.save` writes, or does not match its reference."""


_FLAT = {b"IxFI", b"IxF2", b"IxFl"}  # IndexFlat (inner product, L2, generic)
_HNSW = {b"IHNf"}  # IndexHNSWFlat
_HEADER = struct.Struct("<4siqqqBi")  # fourcc, d, ntotal, two fixed fields, is_trained, metric (faiss index_write)
_HNSW_VECTORS = (8, 4, 4, 8, 4)  # assign_probas, cum_nneighbor_per_level, levels, offsets, neighbors (item bytes)


def check_index_file(path: Path, dim: int | None = None, count: int | None = None) -> None:
    """Walk the size fields of a flat or HNSW-flat FAISS file without allocating: every field must fit in the file,
    the file must end where the layout does, and its dimension and row count must be `dim` and `count` (when given).
    Raises IndexFileError saying what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        end = _check_index(handle, 0, size, dim, count)
    if end != size:
        raise IndexFileError(f"{path.name}: {size - end} bytes beyond the index's layout")


def _check_index(handle: Any, at: int, size: int, dim: int | None, count: int | None) -> int:
    handle.seek(at)
    head = handle.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise IndexFileError("truncated index header")
    fourcc, d, ntotal, _, _, _, metric = _HEADER.unpack(head)
    at += _HEADER.size + (4 if metric > 1 else 0)  # metrics past L2 carry an argument
    if (dim is not None and d != dim) or (count is not None and ntotal != count) or d <= 0 or ntotal < 0:
        raise IndexFileError(f"index of {ntotal} vectors of {d} dimensions, expected {count} of {dim}")
    if fourcc in _FLAT:
        return _skip_vector(handle, at, size, 4, expected=ntotal * d)
    if fourcc not in _HNSW:
        raise IndexFileError(f"not an index this project writes ({fourcc!r})")
    for item in _HNSW_VECTORS:
        at = _skip_vector(handle, at, size, item)
    return _check_index(handle, at + 20, size, d, ntotal)  # five ints (entry point, levels, ef...), then storage


def _skip_vector(handle: Any, at: int, size: int, item: int, expected: int | None = None) -> int:
    handle.seek(at)
    raw = handle.read(8)
    if len(raw) < 8:
        raise IndexFileError("truncated index")
    n = int(struct.unpack("<Q", raw)[0])
    if (expected is not None and n != expected) or at + 8 + n * item > size:
        raise IndexFileError(f"a field of the index claims {n} items, more than the file holds")
    return at + 8 + n * item


class VectorIndex:
    """Nearest neighbours over the rows added so far (ids are row positions): by cosine similarity (embeddings)
    or by Euclidean distance (`metric="l2"`: layouts)."""

    def __init__(self, index: Any) -> None:
        # imported here: heavy (FAISS): only where an index is built or searched
        import faiss

        self.index = index  # a faiss index (flat or HNSW)
        self.cosine = index.metric_type == faiss.METRIC_INNER_PRODUCT

    @classmethod
    def build(cls, vectors: np.ndarray, metric: str = "cosine") -> VectorIndex:
        # imported here: heavy (FAISS): only where an index is built or searched
        import faiss

        x = normalise(vectors) if metric == "cosine" else np.ascontiguousarray(vectors, dtype=np.float32)
        dim = x.shape[1] if x.ndim == 2 and x.shape[1] else 1
        kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index: Any
        if len(x) <= exact_limit(dim):
            index = faiss.IndexFlat(dim, kind)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, kind)
            index.hnsw.efConstruction = HNSW_EF_BUILD
            index.hnsw.efSearch = HNSW_EF_SEARCH
        if len(x):
            index.add(x)
        return cls(index)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def vectors(self) -> np.ndarray:
        """The vectors the index holds, as added (normalised for cosine: adding them again leaves them as they are)."""
        return self.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.index.d), np.float32)

    def _prepared(self, vectors: np.ndarray) -> np.ndarray:
        return normalise(vectors) if self.cosine else np.ascontiguousarray(vectors, dtype=np.float32)

    def add(self, vectors: np.ndarray) -> VectorIndex:
        """This index with `vectors` appended; a flat index that outgrows its exact limit is rebuilt as HNSW."""
        metric = "cosine" if self.cosine else "l2"
        if len(self) + len(vectors) > exact_limit(self.index.d) and not hasattr(self.index, "hnsw"):
            return VectorIndex.build(np.concatenate([self.vectors(), self._prepared(vectors)]), metric)
        if len(vectors):
            self.index.add(self._prepared(vectors))
        return self

    def search(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities or squared distances, row ids) of the k nearest rows of each query; id -1 where
        there are fewer rows."""
        if not len(self) or not len(queries):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(self._prepared(queries), min(k, len(self)))
        return scores, ids

    def save(self, path: Path) -> Path:
        # imported here: heavy (FAISS): only where an index is built or searched
        import faiss

        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: Path, dim: int | None = None, count: int | None = None) -> VectorIndex:
        """An index saved by `save`; its layout is checked first (`check_index_file`), against `dim` and `count`
        where given, so a damaged or crafted file is refused before FAISS allocates what its size fields say."""
        # imported here: heavy (FAISS): only where an index is built or searched
        import faiss

        check_index_file(path, dim, count)
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as exc:
            raise IndexFileError(f"{path.name}: FAISS cannot read it ({type(exc).__name__})") from None
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(index)


class SegmentedIndex:
    """Several indexes searched as one (row ids run on from one segment to the next): the history's segments, each
    written once by the run that scored it, so a night adds an index instead of rewriting one."""

    def __init__(self, segments: list[VectorIndex]) -> None:
        self.segments = [s for s in segments if len(s)]
        self.cosine = segments[0].cosine if segments else True

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    def search(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """As VectorIndex.search, over every segment: each segment's k nearest, merged."""
        if len(self.segments) == 1:
            return self.segments[0].search(queries, k)
        if not len(self) or not len(queries):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids, start = [], [], 0
        for segment in self.segments:
            found, rows = segment.search(queries, k)
            scores.append(found)
            ids.append(np.where(rows >= 0, rows + start, -1))
            start += len(segment)
        merged, positions = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-merged if self.cosine else merged, axis=1, kind="stable")[:, : min(k, len(self))]
        return np.take_along_axis(merged, order, 1), np.take_along_axis(positions, order, 1)

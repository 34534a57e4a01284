"""Cosine (or Euclidean) nearest neighbours through FAISS, chosen by `bench/ann.py`: exact inner-product search
up to `exact_limit(dim)` vectors, where a query still takes about a millisecond, HNSW above it. Saved with FAISS's
own format (no pickle)."""

from __future__ import annotations

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

    def _prepared(self, vectors: np.ndarray) -> np.ndarray:
        return normalise(vectors) if self.cosine else np.ascontiguousarray(vectors, dtype=np.float32)

    def add(self, vectors: np.ndarray) -> VectorIndex:
        """This index with `vectors` appended; a flat index that outgrows its exact limit is rebuilt as HNSW."""
        metric = "cosine" if self.cosine else "l2"
        if len(self) + len(vectors) > exact_limit(self.index.d) and not hasattr(self.index, "hnsw"):
            stored = self.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.index.d), np.float32)
            return VectorIndex.build(np.concatenate([stored, self._prepared(vectors)]), metric)
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
    def load(cls, path: Path) -> VectorIndex:
        # imported here: heavy (FAISS): only where an index is built or searched
        import faiss

        index = faiss.read_index(str(path))
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(index)

"""What the embeddings tell: similar cases and reused images.

- `VectorIndex`: cosine nearest neighbours through FAISS (chosen by `bench/ann.py`: exact inner-product search up to
  `exact_limit(dim)` vectors, where a query still takes about a millisecond, HNSW above it). Saved with FAISS's own
  format (no pickle).
- The reuse check (`HashTable`, `Lookup`): the sha256 `image_id` finds exact copies; perceptual hashes (imagehash's
  pHash, of the image and of its mirror image) find resized, recompressed and mirrored ones; layouts compared in
  every crop an image may have had find cropped ones; embeddings closer than the version's semantic threshold
  find the same picture otherwise changed.
- `Reference`: what a registered version carries about its training data (the training split's embeddings,
  labels and hashes; the validation split's predictions and image statistics for drift), in its model folder.
- `History`: everything a version scored, kept under CNN_HOME and extended atomically after each run.
"""

from __future__ import annotations

import fcntl
import functools
import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.fsio import atomic_path, write_json_atomic, write_text_atomic

EXACT_LIMIT = 200_000  # 128-dim vectors up to which exact search answers in about 1 ms (bench/ann.py)


def exact_limit(dim: int) -> int:
    """How many vectors of `dim` dimensions exact search keeps (its cost grows with vectors x dimensions: at 512
    dimensions 100k vectors took 10 ms a query, bench/ann.py)."""
    return EXACT_LIMIT * 128 // max(dim, 1)


HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 16, 128, 64
HASH_SIZE = 16  # pHash of 16 x 16 = 256 bits: 64 bits told distinct photos of one class apart too rarely
NEAR_BITS = 10  # Hamming distance (of 256 bits) up to which two images count as the same photo (bench/reuse.py)
K = 10
SEMANTIC_QUANTILE, SEMANTIC_FLOOR, SEMANTIC_OFF = 0.999, 0.95, 0.9999
# The layout: an image's central region (a crop may have cut up to LAYOUT_MARGIN off any side) as a grid of mean
# colours, from the image reduced to LAYOUT_SIDE px. A query is compared in every crop it may have had (up to
# CROP_MOST off each axis in CROP_STEP steps: 441 views, the best refined in quarter steps) with the few earlier
# layouts nearest to its uncropped views, and counts as a copy within LAYOUT_RMS (0-255 levels; bench/reuse.py:
# copies <= 2.3, distinct photos of one class >= 10.8, distinct generated X-rays >= 3.1).
LAYOUT_GRID, LAYOUT_MARGIN, LAYOUT_SIDE = 8, 0.10, 32
COARSE_GRID = 4  # the 441 crops are first tried on 4 x 4 cells (a quarter of the work), the best refined on 8 x 8
CROP_MOST, CROP_STEP = 0.10, 0.02
LAYOUT_RMS, REFINED = 2.5, 3  # the 3 nearest on the coarse grid are refined
# Gates before the refinement (its 2 x 625 crops are the costly part): the grey RMS on the coarse grid, then the RMS
# of all cells at that best coarse crop. Cropped copies in bench/reuse.py came within 2.0 and 4.8 (claims photos),
# 3.9 and 6.2 (X-rays); distinct claims photos passing the first gate were 11.9 or more at the second.
COARSE_BELOW, REFINE_BELOW = 5.0, 8.0
FLAT_LAYOUT = 2.0  # a layout whose cells vary less than this (a blank or uniform image) identifies nothing
CANDIDATES = 16


def search_in_one_thread() -> None:
    """Make FAISS search with one thread in the calling thread: the reuse check runs beside the model's forward
    pass, whose threads already hold the cores, and OpenMP threads spinning for a core cost more than they save."""
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
        import faiss

        self.index = index  # a faiss index (flat or HNSW)
        self.cosine = index.metric_type == faiss.METRIC_INNER_PRODUCT

    @classmethod
    def build(cls, vectors: np.ndarray, metric: str = "cosine") -> VectorIndex:
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
        import faiss

        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        import faiss

        index = faiss.read_index(str(path))
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(index)


def content(image: np.ndarray) -> np.ndarray:
    """The image without the letterbox bars the decoder added (`pad`): a copy at another size or aspect ratio
    must hash like its original."""
    rows = np.flatnonzero(image.reshape(image.shape[0], -1).max(axis=1))  # reductions over contiguous memory
    cols = np.flatnonzero(image.max(axis=0).max(axis=1))
    if not len(rows) or not len(cols):
        return image
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def phashes(images: np.ndarray) -> tuple[list[str], list[str]]:
    """(pHash, pHash of the mirror image) of each decoded image's content, as 64 hex digits: imagehash's pHash
    (256 bits), bit for bit, with both hashes from one DCT. Mirroring a row reverses it, which only flips the sign
    of the odd horizontal frequencies, so the second resize and DCT imagehash would run are not needed (half the
    cost; tests/cnn/test_neighbours.py checks both against imagehash.phash)."""
    return _phashes([content(image) for image in images])


def _phashes(regions: Sequence[np.ndarray]) -> tuple[list[str], list[str]]:
    import scipy.fftpack
    from PIL import Image

    if not regions:
        return [], []
    side = HASH_SIZE * 4  # imagehash's highfreq_factor
    pixels = np.stack(
        [
            np.asarray(
                Image.fromarray(region[:, :, 0] if region.shape[2] == 1 else region)
                .convert("L")
                .resize((side, side), Image.Resampling.LANCZOS)
            )
            for region in regions
        ]
    )
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=1), axis=2)[:, :HASH_SIZE, :HASH_SIZE]  # one call each
    out = []
    for signed in (low, low * _MIRROR_SIGNS):
        bits = (signed > np.median(signed, axis=(1, 2), keepdims=True)).reshape(len(signed), -1)
        out.append([row.tobytes().hex() for row in np.packbits(bits, axis=1)])
    return out[0], out[1]


_MIRROR_SIGNS = np.where(np.arange(HASH_SIZE) % 2 == 1, -1.0, 1.0)


def _bits(hexes: Sequence[str]) -> np.ndarray:
    """(N, bytes) uint8 rows of hex hashes (zeros for a missing one)."""
    width = HASH_SIZE * HASH_SIZE // 8
    return np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) if h else np.zeros(width, np.uint8) for h in hexes])


_CROPS = [
    (left, right)
    for left in np.arange(0, CROP_MOST + 1e-9, CROP_STEP)
    for right in np.arange(0, CROP_MOST + 1e-9, CROP_STEP)
    if left + right <= CROP_MOST + 1e-9
]
_MIDDLE = next(i for i, (a, b) in enumerate(_CROPS) if a == b and a >= CROP_MOST / 2 - CROP_STEP)
_SEARCHED_CROPS = [_CROPS[0], _CROPS[_MIDDLE]]  # on each axis: the views that find the candidates in the index


def _reduced(region: np.ndarray) -> np.ndarray:
    """An image's content (no letterbox) with its long side at LAYOUT_SIDE px, as float32 (h, w, channels)."""
    import cv2

    h, w, channels = region.shape
    scale = LAYOUT_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(np.ascontiguousarray(region), size, interpolation=cv2.INTER_AREA)
    return small.reshape(size[1], size[0], channels).astype(np.float32)


def _cells(n_px: int, start: float, stop: float, g: int = LAYOUT_GRID) -> np.ndarray:
    """(g, n_px) weights that average pixels over g equal cells of [start, stop) (fractions of the axis)."""
    edges = np.linspace(start, stop, g + 1) * n_px
    px = np.arange(n_px)
    covered = np.clip(edges[1:, None], px, px + 1) - np.clip(edges[:-1, None], px, px + 1)
    weights: np.ndarray = (covered / covered.sum(axis=1, keepdims=True)).astype(np.float32)
    return weights


@functools.lru_cache(maxsize=1024)
def _crop_cells(n_px: int, crops: tuple[tuple[float, float], ...], g: int = LAYOUT_GRID) -> np.ndarray:
    """(len(crops) * g, n_px): for each crop (off the start, off the end) an axis may have had, the g cells of the
    original's central region in the cropped axis's pixels."""
    m = LAYOUT_MARGIN
    return np.concatenate([_cells(n_px, (m - a) / (1 - a - b), (1 - m - a) / (1 - a - b), g) for a, b in crops])


def _grid(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, g: int = LAYOUT_GRID) -> np.ndarray:
    """(N, len(rows) // g, len(cols) // g, g * g * channels): images of one shape (N, h, w, c) through every pair
    of row and column cells (two matrix products for the whole stack)."""
    n, h, w, c = images.shape
    a, b = len(rows) // g, len(cols) // g
    by_col = (images.transpose(0, 1, 3, 2).reshape(n * h * c, w) @ cols.T).reshape(n, h, c * b * g)
    both = (rows @ by_col).reshape(n, a, g, c, b, g)  # rows contract h
    grid: np.ndarray = both.transpose(0, 1, 4, 2, 5, 3).reshape(n, a, b, g * g * c)
    return grid


def layouts(images: np.ndarray) -> np.ndarray:
    """(N, LAYOUT_GRID^2 * channels) uint8: each image's central region as a grid of mean colours."""
    channels = images.shape[3] if np.ndim(images) == 4 else 1
    out = np.zeros((len(images), LAYOUT_GRID * LAYOUT_GRID * channels), np.float32)
    uncropped = (_CROPS[0],)
    for positions, smalls in _by_shape([_reduced(content(image)) for image in images]):
        _, h, w, _ = smalls.shape
        out[positions] = _grid(smalls, _crop_cells(h, uncropped), _crop_cells(w, uncropped))[:, 0, 0]
    return _as_bytes(out)


def _as_bytes(layouts: np.ndarray) -> np.ndarray:
    """Layouts rounded to uint8, as they are stored."""
    stored: np.ndarray = np.clip(np.rint(layouts), 0, 255).astype(np.uint8)
    return stored


def _by_shape(smalls: list[np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
    """Reduced images grouped by shape: (their positions, their stack)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, small in enumerate(smalls):
        groups.setdefault(small.shape, []).append(i)
    return [(positions, np.stack([smalls[i] for i in positions])) for positions in groups.values()]


def _pooled(layouts: np.ndarray) -> np.ndarray:
    """Layouts (N, LAYOUT_GRID^2 * c) on the coarse grid in grey (N, COARSE_GRID^2): the mean of each block of cells
    over the channels."""
    f = LAYOUT_GRID // COARSE_GRID
    cells = layouts.reshape(len(layouts), COARSE_GRID, f, COARSE_GRID, f, -1).astype(np.float32)
    pooled: np.ndarray = cells.mean(axis=(2, 4, 5)).reshape(len(layouts), -1)
    return pooled


@dataclass(frozen=True)
class CropViews:
    """An image as the reuse check compares it with earlier layouts: reduced (`small`), as its original's layout
    for each crop on the coarse grid of crops and cells, in grey (`views`: len(_CROPS)^2 rows of COARSE_GRID^2
    cells; grey does a third of the work and picks the same crop), and
    for the few crops that search the index (`searched`, full layouts)."""

    small: np.ndarray
    views: np.ndarray
    searched: np.ndarray
    norms: np.ndarray  # each view's squared length
    flat: bool  # a blank or uniform image: nobody's copy by layout

    def coarse(self, pooled: np.ndarray, pooled_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each earlier layout (on the coarse grid: `_pooled`, with its squared lengths), the RMS difference for
        the best crop on the coarse grid, and that crop (a row of `views`)."""
        squared = self.norms[:, None] - 2 * self.views @ pooled.T + pooled_norms
        best = squared.argmin(axis=0)
        rms = np.sqrt(np.maximum(squared[best, np.arange(len(best))], 0) / self.views.shape[1])
        return rms, best

    def refined(self, layout: np.ndarray, best: int) -> float:
        """The RMS difference to an earlier layout (all its cells) for the best crop: from the coarse grid's best
        (`best`, a row of `views`), refined twice on grids half as wide around it; infinite where that coarse crop
        is already REFINE_BELOW or more away."""
        rows, cols = _CROPS[best // len(_CROPS)], _CROPS[best % len(_CROPS)]
        h, w, _ = self.small.shape
        there = _grid(self.small[None], _crop_cells(h, (rows,)), _crop_cells(w, (cols,)))[0, 0, 0]
        if np.sqrt(((there - layout) ** 2).mean()) >= REFINE_BELOW:
            return float("inf")
        rms = float("inf")
        for half in (CROP_STEP, CROP_STEP / 2):
            rms, rows, cols = self._around(layout, rows, cols, half)
        return rms

    def _around(
        self, layout: np.ndarray, rows: tuple[float, float], cols: tuple[float, float], half: float
    ) -> tuple[float, tuple[float, float], tuple[float, float]]:
        """The best crop within `half` of (rows, cols) on each edge, in steps of half / 2: (RMS, rows, cols)."""
        h, w, _ = self.small.shape
        row_crops, col_crops = _crops_around(*rows, half), _crops_around(*cols, half)
        fine = _grid(self.small[None], _crop_cells(h, row_crops), _crop_cells(w, col_crops))[0]
        rms = np.sqrt(((fine - layout) ** 2).mean(axis=2))
        i, j = np.unravel_index(int(rms.argmin()), rms.shape)
        return float(rms[i, j]), row_crops[i], col_crops[j]


def _crops_around(first: float, last: float, half: float) -> tuple[tuple[float, float], ...]:
    """Crops (off the start, off the end) within `half` of (first, last), in steps of half / 2."""
    starts = np.clip(np.linspace(first - half, first + half, 5), 0, LAYOUT_MARGIN)
    ends = np.clip(np.linspace(last - half, last + half, 5), 0, LAYOUT_MARGIN)
    return tuple((round(float(a), 5), round(float(b), 5)) for a in starts for b in ends)


def crop_views(images: np.ndarray) -> list[CropViews]:
    """Each image's CropViews (images of one reduced shape computed together)."""
    return _crop_views([content(image) for image in images])


def _crop_views(regions: Sequence[np.ndarray]) -> list[CropViews]:
    out: list[CropViews | None] = [None] * len(regions)
    crops, searched_crops = tuple(_CROPS), tuple(_SEARCHED_CROPS)
    for positions, smalls in _by_shape([_reduced(region) for region in regions]):
        _, h, w, _ = smalls.shape
        greys = smalls.mean(axis=3, keepdims=True)
        views = _grid(greys, _crop_cells(h, crops, COARSE_GRID), _crop_cells(w, crops, COARSE_GRID), COARSE_GRID)
        found = _grid(smalls, _crop_cells(h, searched_crops), _crop_cells(w, searched_crops))
        views = views.reshape(len(positions), -1, views.shape[3])
        norms = (views**2).sum(axis=2)
        flat = _flat(found[:, 0, 0])
        for i, small, view, norm, first, blank in zip(positions, smalls, views, norms, found, flat):
            out[i] = CropViews(small, view, first.reshape(-1, first.shape[2]), norm, bool(blank))
    return [v for v in out if v is not None]


def _layout_matrix(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' layouts as float32 (rows without one far from any image), or None when no row has one."""
    values = rows["layout"] if "layout" in rows.columns else []
    width = next((len(v) for v in values if isinstance(v, bytes | bytearray) and len(v)), None)
    return _layouts_of(rows, width) if width is not None else None


def _layouts_of(rows: pd.DataFrame, width: int) -> np.ndarray:
    """The rows' layouts of `width` cells as float32; a row without one (or of another width) far from any image."""
    out = np.full((len(rows), width), 1e4, np.float32)  # never within LAYOUT_RMS of a real layout
    for i, value in enumerate(rows["layout"] if "layout" in rows.columns else []):
        if isinstance(value, bytes | bytearray) and len(value) == width:
            out[i] = np.frombuffer(value, np.uint8)
    return out


def _flat(layouts: np.ndarray) -> np.ndarray:
    """For each layout (N, cells * channels), whether it is a blank or uniform image: its cells hardly vary in any
    channel."""
    cells = layouts.reshape(len(layouts), LAYOUT_GRID * LAYOUT_GRID, -1)
    flat: np.ndarray = cells.std(axis=1).max(axis=1) < FLAT_LAYOUT
    return flat


@dataclass(frozen=True)
class _Allowed:
    """Which rows may be each query's earlier image: not of the query's own path (`owns`, "" for none), and before
    its row `stops`."""

    path_keys: np.ndarray
    owns: np.ndarray
    stops: np.ndarray

    def __call__(self, q: int, row: int) -> bool:
        return bool(row < self.stops[q]) and (not self.owns[q] or self.path_keys[row] != self.owns[q])

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """(queries, M): whether each query's candidate rows (-1: none) may be its earlier image."""
        own = self.owns[:, None]
        other = (own == "") | (self.path_keys[np.maximum(rows, 0)] != own)
        allowed: np.ndarray = (rows >= 0) & (rows < self.stops[:, None]) & other
        return allowed


@dataclass(frozen=True)
class Match:
    """An earlier image a scored one repeats."""

    row: int  # the row of the table it was found in
    kind: str  # exact | near | semantic
    measure: str  # how close: phash_bits (0 for exact), layout_rms (a crop), cosine (embeddings)
    value: float


class HashTable:
    """Earlier images' ids, hashes and layouts. pHashes are searched by Hamming distance with a FAISS binary index
    (exact; about a millisecond per image against a million earlier images, bench/reuse.py), layouts through a
    Euclidean index (`layout_index`, built from the rows unless given)."""

    def __init__(self, rows: pd.DataFrame, layout_index: VectorIndex | None = None) -> None:
        import faiss

        self.rows = rows.reset_index(drop=True)
        self.by_id: dict[str, list[int]] = {}
        for i, image_id in enumerate(self.rows["image_id"] if len(rows) else []):
            self.by_id.setdefault(str(image_id), []).append(i)
        keys = self.rows["path_key"] if "path_key" in self.rows.columns else pd.Series([""] * len(self.rows))
        self.path_keys = keys.fillna("").astype(str).to_numpy()
        self.index = faiss.IndexBinaryFlat(HASH_SIZE * HASH_SIZE)
        if len(self.rows):  # rows 2i and 2i + 1: image i and its mirror image
            both = np.empty((2 * len(self.rows), HASH_SIZE * HASH_SIZE // 8), np.uint8)
            both[0::2], both[1::2] = _bits(self.rows["phash"].tolist()), _bits(self.rows["phash_mirror"].tolist())
            self.index.add(both)
        self.layouts = _layout_matrix(self.rows)
        self.pooled = _pooled(self.layouts) if self.layouts is not None else np.zeros((0, 0), np.float32)
        self.pooled_norms = (self.pooled**2).sum(axis=1)
        if layout_index is None and self.layouts is not None:
            layout_index = VectorIndex.build(self.layouts, metric="l2")
        self.layout_index = layout_index if self.layouts is not None else None

    @functools.cached_property
    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(the rows' distinct labels, sorted; each row's label as a position in them)."""
        labels = self.rows["label"].astype(str).to_numpy(dtype=object) if "label" in self.rows else np.array([], object)
        names, codes = np.unique(labels, return_inverse=True)
        return names.astype(object), codes.astype(np.int64)

    def matches(
        self,
        image_ids: Sequence[str],
        hashes: Sequence[str],
        own_paths: Sequence[str],
        near_bits: int = NEAR_BITS,
        views: Sequence[CropViews | None] = (),
        before: Sequence[int] | None = None,
    ) -> list[Match | None]:
        """For each image, the earlier row it copies: the same bytes, a pHash within `near_bits` of the row's (or of
        its mirror image's), or one of its crop `views` within LAYOUT_RMS of the row's layout. Rows of its own path
        (the same file scored again) do not count, nor rows from `before[q]` on where given."""
        n = len(self.rows)
        stops = np.asarray(before if before is not None else [n] * len(image_ids), np.int64)
        allowed = _Allowed(self.path_keys, np.asarray(own_paths, dtype=object), stops)
        out: list[Match | None] = [None] * len(image_ids)
        searched = [i for i, h in enumerate(hashes) if h]
        found_d: Any = []
        found_i: Any = []
        if searched and n:
            found_d, found_i = self.index.search(_bits([hashes[i] for i in searched]), 16)
        near: dict[int, tuple[Any, Any]] = dict(zip(searched, zip(found_d, found_i)))
        for q, image_id in enumerate(image_ids):
            exact = [i for i in self.by_id.get(image_id, []) if allowed(q, i)]
            if exact:
                out[q] = Match(exact[0], "exact", "phash_bits", 0)
                continue
            for distance, position in zip(*near.get(q, ((), ()))):
                if position < 0 or distance > near_bits:
                    break
                if allowed(q, int(position) // 2):
                    out[q] = Match(int(position) // 2, "near", "phash_bits", int(distance))
                    break
        todo = [(q, v) for q, (m, v) in enumerate(zip(out, views)) if m is None and v is not None]
        picked = np.asarray([q for q, _ in todo], np.int64)
        sub = _Allowed(self.path_keys, allowed.owns[picked], allowed.stops[picked])
        for (q, _), match in zip(todo, self._cropped([v for _, v in todo], sub)):
            out[q] = match
        return out

    def _cropped(self, views: list[CropViews], allowed: _Allowed) -> list[Match | None]:
        """For each image's crop views, the earlier row whose layout one of them repeats within LAYOUT_RMS:
        candidates from the index (nearest to the uncropped views), then every view against each candidate."""
        if not views or self.layout_index is None or self.layouts is None:
            return [None] * len(views)
        _, found = self.layout_index.search(np.concatenate([v.searched for v in views]), CANDIDATES)
        found = found.reshape(len(views), -1)  # each image's candidates from all its searched views
        out: list[Match | None] = []
        for view, candidates, ok in zip(views, found, allowed.mask(found)):
            rows = np.unique(candidates[ok])
            if not len(rows) or view.flat:
                out.append(None)
                continue
            coarse, crops = view.coarse(self.pooled[rows], self.pooled_norms[rows])
            refined = {int(rows[i]): view.refined(self.layouts[rows[i]], int(crops[i]))
                       for i in np.argsort(coarse)[:REFINED] if coarse[i] <= COARSE_BELOW}  # fmt: skip
            best = min(refined, key=lambda row: refined[row], default=None)
            near = best is not None and refined[best] <= LAYOUT_RMS
            out.append(
                Match(best, "near", "layout_rms", round(refined[best], 2)) if near and best is not None else None
            )
        return out


# --- what a version carries, and what it scored ----------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A registered version's reference files (its model folder's `reference/`)."""

    folder: Path

    @property
    def exists(self) -> bool:
        return (self.folder / "train_rows.parquet").is_file()

    def rows(self) -> pd.DataFrame:
        """The training split: image_id, label, phash, phash_mirror, layout (row i = vector i)."""
        return pd.read_parquet(self.folder / "train_rows.parquet")

    def vectors(self) -> np.ndarray:
        vectors: np.ndarray = np.load(self.folder / "train_embeddings.npy", allow_pickle=False).astype(np.float32)
        return vectors

    def index(self) -> VectorIndex:
        path = self.folder / "train.faiss"
        return VectorIndex.load(path) if path.is_file() else VectorIndex.build(self.vectors())

    def drift(self) -> dict[str, object]:
        """The validation split's statistics (see cnn.drift)."""
        data: dict[str, object] = json.loads((self.folder / "drift.json").read_text(encoding="utf-8"))
        return data

    def drift_embeddings(self) -> np.ndarray:
        vectors: np.ndarray = np.load(self.folder / "val_embeddings.npy", allow_pickle=False).astype(np.float32)
        return vectors

    def semantic_cosine(self) -> float | None:
        """The embedding cosine from which two images count as the same picture (None: the check is off)."""
        path = self.folder / "reuse.json"
        found = json.loads(path.read_text(encoding="utf-8")).get("semantic_cosine") if path.is_file() else None
        return float(found) if found is not None else None


def semantic_threshold(vectors: np.ndarray) -> dict[str, float | None]:
    """When two embeddings are close enough to call the images the same picture: closer than SEMANTIC_QUANTILE of
    the training images are to their nearest other training image (and at least SEMANTIC_FLOOR). Off (None) where
    that would be almost 1: the model's embeddings then do not tell one picture from another (a weak or
    small model often maps a whole class to nearly one point)."""
    if len(vectors) < 2:
        return {"semantic_cosine": None, "nearest_cosine_p50": None, "nearest_cosine_p99": None}
    scores, ids = VectorIndex.build(vectors).search(vectors, 2)
    nearest = np.where(ids[:, 0] == np.arange(len(vectors)), scores[:, 1], scores[:, 0])
    cut = max(SEMANTIC_FLOOR, float(np.quantile(nearest, SEMANTIC_QUANTILE)))
    return {
        "semantic_cosine": round(cut, 6) if cut < SEMANTIC_OFF else None,
        "nearest_cosine_p50": round(float(np.median(nearest)), 6),
        "nearest_cosine_p99": round(float(np.quantile(nearest, 0.99)), 6),
    }


def save_reference(
    folder: Path,
    train_ids: Sequence[str],
    train_labels: Sequence[str],
    train_vectors: np.ndarray,
    train_images: np.ndarray,
    drift: dict[str, object],
    val_vectors: np.ndarray,
) -> Reference:
    """Write a version's reference files: embeddings as float16 .npy, rows as Parquet, the index in FAISS's format."""
    folder.mkdir(parents=True, exist_ok=True)
    plain, mirrored = phashes(train_images)
    rows = pd.DataFrame({"image_id": list(train_ids), "label": list(train_labels), "phash": plain})
    rows["phash_mirror"] = mirrored
    rows["layout"] = [bytes(v) for v in layouts(train_images)]
    with atomic_path(folder / "train_rows.parquet") as tmp:
        rows.to_parquet(tmp, index=False)
    for name, vectors in (("train_embeddings.npy", train_vectors), ("val_embeddings.npy", val_vectors)):
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.asarray(vectors, dtype=np.float16), allow_pickle=False)
    VectorIndex.build(train_vectors).save(folder / "train.faiss")
    write_json_atomic(folder / "drift.json", drift)
    write_json_atomic(folder / "reuse.json", semantic_threshold(train_vectors))
    return Reference(folder)


def build_reference(run_dir: Path, dataset_root: Path) -> Reference:
    """A trained run's reference (run_dir/reference): the training split's embeddings, labels and hashes for the
    similar-case index and the reuse check; the validation split's predictions, image statistics and embeddings for
    the drift check (the training split where there is no validation split)."""
    from cnn.contract import ModelContract
    from cnn.dataset import Dataset
    from cnn.drift import DriftSample, reference_sample
    from cnn.evaluation import split_images
    from cnn.inference import Predictor

    contract = ModelContract.load(run_dir / "contract.json")
    predictor = Predictor.load(run_dir / "best.pt", contract)
    dataset = Dataset(dataset_root)
    images, labels, ids = split_images(dataset, "train", contract)
    _, train_vectors = predictor.predict_with_embeddings(images)
    held_out = "val" if len(dataset.usable("val")) else "train"
    val_images, _, val_ids = split_images(dataset, held_out, contract)
    probs, val_vectors = predictor.predict_with_embeddings(val_images)
    source = dataset.usable(held_out, distinct=True).set_index("image_id")
    sizes = [(int(source.at[i, "width"]), int(source.at[i, "height"])) for i in val_ids]
    formats = [str(source.at[i, "format"]) for i in val_ids]
    classes = contract.classes
    predicted = [classes[j] for j in probs.argmax(axis=1)]
    sample = DriftSample.of(predicted, probs.max(axis=1), val_images, sizes, formats, None)
    return save_reference(
        run_dir / "reference",
        ids,
        [classes[j] for j in labels],
        train_vectors,
        images,
        {**reference_sample(sample), "split": held_out},
        val_vectors,
    )


HISTORY_COLUMNS = ["image_id", "path_key", "label", "ids", "phash", "phash_mirror", "layout", "scored_at"]


def path_key(path: str) -> str:
    """A short digest of a path as the tables show it: tells the same file scored again from a copy of it,
    without keeping the path (which may name a patient) in the history."""
    import hashlib

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
                layout_index = layout_index.add(_layouts_of(combined[len(old_rows) :], layout_index.index.d))
            else:
                grid = _layout_matrix(combined)
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


@dataclass(frozen=True)
class Copies:
    """What the reuse check found from the images alone: their rows (image_id, path_key, ids, phash, phash_mirror,
    layout) and, per source (name, its rows, a match or None per image), the exact and near copies."""

    rows: pd.DataFrame
    sources: list[tuple[str, pd.DataFrame, list[Match | None]]]


@dataclass(frozen=True)
class Lookup:
    """What scoring compares each image with: the version's training split (index, labels, hashes, layouts), what
    it scored before (hashes, layouts, embeddings) and what earlier shards of this run scored. Loaded once per
    shard."""

    train: HashTable
    train_index: VectorIndex
    history: HashTable
    history_index: VectorIndex | None = None  # the history's embeddings (for the semantic check)
    semantic: float | None = None  # the cosine from which two embeddings are the same picture (None: off)
    run: HashTable | None = None  # earlier shards of this run

    @classmethod
    def load(cls, reference: Reference, history: History) -> Lookup:
        semantic = reference.semantic_cosine()
        return cls(
            HashTable(reference.rows()),
            reference.index(),
            HashTable(history.rows(), history.layout_index()),
            history.index() if semantic is not None else None,
            semantic,
        )

    def with_run(self, rows: pd.DataFrame) -> Lookup:
        """This lookup with what earlier shards of the run scored (HISTORY_COLUMNS rows) as one more source."""
        return replace(self, run=HashTable(rows)) if len(rows) else self

    def copies(
        self, image_ids: Sequence[str], paths: Sequence[str], images: np.ndarray, ids: Sequence[str] = ()
    ) -> Copies:
        """The part of the reuse check that needs only the images (their hashes, layouts and crop views, searched
        in every source): scoring runs it while the model predicts, then `annotate`. `ids`: each image's carried id
        columns as JSON (`{}` when none are given)."""
        n = len(image_ids)
        regions = [content(image) for image in images]  # each image's content once, for every fingerprint
        plain, mirrored = _phashes(regions)
        views = _crop_views(regions)
        grid = _as_bytes(np.stack([v.searched[0] for v in views])) if n else np.zeros((0, 0), np.uint8)
        keys = [path_key(p) for p in paths]
        rows = pd.DataFrame(
            {"image_id": list(image_ids), "path_key": keys, "ids": list(ids) or ["{}"] * n, "phash": plain,
             "phash_mirror": mirrored, "layout": [bytes(v) for v in grid]},
            dtype=object,
        )  # fmt: skip
        sources: list[tuple[str, pd.DataFrame, list[Match | None]]] = [
            ("training", self.train.rows, self.train.matches(image_ids, plain, [""] * n, views=views)),
            ("scored", self.history.rows, self.history.matches(image_ids, plain, keys, views=views)),
        ]
        if self.run is not None:
            sources.append(("this run", self.run.rows, self.run.matches(image_ids, plain, keys, views=views)))
        shard = HashTable(rows).matches(image_ids, plain, keys, views=views, before=range(n))
        sources.append(("this run", rows, shard))
        return Copies(rows, sources)

    def annotate(self, found: Copies, labels: Sequence[str], vectors: np.ndarray | None) -> pd.DataFrame:
        """For each image `copies` looked at (`found`), given its predicted label and embedding: the history's
        columns but `scored_at` (image_id, path_key, label, ids, phash, phash_mirror, layout) and neighbour_label,
        neighbour_agreement, duplicate_of, duplicate_kind. A copy of a training image first, else of an image scored
        before (earlier runs, then earlier shards of this run), else of an earlier image of the same shard; exact
        and near copies before semantic ones; never of itself (a file scored again under its own path)."""
        out = found.rows.copy()
        out.insert(2, "label", pd.Series(list(labels), dtype=object))
        (out["neighbour_label"], out["neighbour_agreement"]), nearest = self._neighbours(labels, vectors)
        sources = list(found.sources)
        if self.semantic is not None and vectors is not None:
            sources += self._semantic(self.semantic, vectors, nearest, out["path_key"].tolist(), found.rows)
        of: list[str | None] = []
        kinds: list[str | None] = []
        for q in range(len(out)):
            matched = [(m.kind == "semantic", rank, m, rows, name)
                       for rank, (name, rows, ms) in enumerate(sources) if (m := ms[q]) is not None]  # fmt: skip
            if not matched:
                of.append(None)
                kinds.append(None)
                continue
            _, _, match, rows, source = min(matched, key=lambda f: (f[0], f[1]))
            row = rows.iloc[match.row]
            described: dict[str, object] = {"image_id": row["image_id"], "source": source, match.measure: match.value}
            if source != "training" and row.get("ids"):
                described.update(json.loads(row["ids"]))
            elif source == "training":
                described["label"] = row["label"]
            of.append(json.dumps(described, sort_keys=True))
            kinds.append(match.kind)
        out["duplicate_of"] = pd.Series(of, dtype=object)
        out["duplicate_kind"] = pd.Series(kinds, dtype=object)
        return out

    def _semantic(
        self,
        cut: float,
        vectors: np.ndarray,
        nearest: tuple[np.ndarray, np.ndarray],
        keys: list[str],
        out: pd.DataFrame,
    ) -> list[tuple[str, pd.DataFrame, list[Match | None]]]:
        """Earlier images whose embedding is within the version's semantic cosine `cut`: the nearest training
        image, the nearest image scored before (another path), an earlier image of this shard (another path)."""
        found = [("training", self.train.rows, _semantic_matches(*nearest, cut))]
        if self.history_index is not None and len(self.history_index):
            scores, rows = self.history_index.search(vectors, 4)  # the file itself, scored before, may come first
            own = self.history.path_keys[np.maximum(rows, 0)] == np.array(keys)[:, None]
            scores = np.where(own | (rows < 0), -1, scores)  # the same file scored again is not a copy of itself
            first = scores.argmax(axis=1)[:, None]
            best, best_rows = np.take_along_axis(scores, first, 1), np.take_along_axis(rows, first, 1)
            found.append(("scored", self.history.rows, _semantic_matches(best, best_rows, cut)))
        unit = normalise(vectors)
        similar = np.tril(unit @ unit.T, k=-1)
        similar[np.array(keys)[:, None] == np.array(keys)[None, :]] = -1
        best = similar.argmax(axis=1)[:, None]
        found.append(("this run", out, _semantic_matches(np.take_along_axis(similar, best, axis=1), best, cut)))
        return found

    def _neighbours(
        self, labels: Sequence[str], vectors: np.ndarray | None
    ) -> tuple[tuple[list[str | None], list[float]], tuple[np.ndarray, np.ndarray]]:
        """((neighbour_label, neighbour_agreement), (similarities, rows) of the nearest training images)."""
        n = len(labels)
        if vectors is None or not len(self.train.rows):
            return ([None] * n, [float("nan")] * n), (np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64))
        similarities, ids = self.train_index.search(vectors, K)
        names, codes = self.train.label_codes
        valid = ids >= 0
        found = np.where(valid, codes[np.maximum(ids, 0)], -1)
        counts = np.zeros((n, len(names) + 1), np.int64)  # the last column counts the missing neighbours
        np.add.at(counts, (np.repeat(np.arange(n), found.shape[1]), found.ravel()), 1)
        top = counts[:, :-1].argmax(axis=1)  # ties: the label first in sorted order
        position = np.minimum(np.searchsorted(names, np.asarray(labels, dtype=object)), max(len(names) - 1, 0))
        predicted = np.where(names[position] == np.asarray(labels, dtype=object), position, -2)
        total = valid.sum(axis=1)
        agree = ((found == predicted[:, None]) & valid).sum(axis=1) / np.maximum(total, 1)
        voted: list[str | None] = [str(names[t]) if k else None for t, k in zip(top, total)]
        shares = [float(a) if k else float("nan") for a, k in zip(agree, total)]
        return (voted, shares), (similarities, ids)


def _semantic_matches(scores: np.ndarray, rows: np.ndarray, cut: float) -> list[Match | None]:
    """A semantic match for each query whose nearest row (first column) is at cosine `cut` or more."""
    if not scores.size:
        return [None] * len(scores)
    return [
        Match(int(r), "semantic", "cosine", round(float(c), 4)) if r >= 0 and c >= cut else None
        for c, r in zip(scores[:, 0], rows[:, 0])
    ]

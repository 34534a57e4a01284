"""The reuse check: the sha256 `image_id` finds exact copies; perceptual hashes find resized, recompressed and
mirrored ones; layouts compared in every crop an image may have had find cropped ones; embeddings closer than the
version's semantic threshold find the same picture otherwise changed. Also the similar training cases
(`neighbour_label`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from cnn.similarity.fingerprints import (
    HASH_SIZE,
    REFINED,
    CropViews,
    as_bytes,
    content,
    hash_bits,
    layout_matrix,
    pooled,
    region_phashes,
    region_views,
)
from cnn.similarity.history import History, path_key
from cnn.similarity.index import K, SegmentedIndex, VectorIndex, normalise
from cnn.similarity.reference import Reference
from cnn.similarity.tolerance import TOLERANT_FROM, Tolerance

CANDIDATES = 16


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

    def __init__(self, rows: pd.DataFrame, layout_index: VectorIndex | SegmentedIndex | None = None) -> None:
        # imported here: heavy (FAISS): only where an index is built or searched
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
            both[0::2] = hash_bits(self.rows["phash"].tolist())
            both[1::2] = hash_bits(self.rows["phash_mirror"].tolist())
            self.index.add(both)
        self.layouts = layout_matrix(self.rows)
        self.pooled = pooled(self.layouts) if self.layouts is not None else np.zeros((0, 0), np.float32)
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
        tolerance: Tolerance = Tolerance(),
        views: Sequence[CropViews | None] = (),
        before: Sequence[int] | None = None,
    ) -> list[Match | None]:
        """For each image, the earlier row it copies: the same bytes, a pHash within `tolerance.bits` of the row's
        (or of its mirror image's), or one of its crop `views` within `tolerance.rms` of the row's layout (both by
        the image's size, which its views know). Rows of its own path (the same file scored again) do not count,
        nor rows from `before[q]` on where given."""
        n = len(self.rows)
        stops = np.asarray(before if before is not None else [n] * len(image_ids), np.int64)
        allowed = _Allowed(self.path_keys, np.asarray(own_paths, dtype=object), stops)
        out: list[Match | None] = [None] * len(image_ids)
        searched = [i for i, h in enumerate(hashes) if h]
        found_d: Any = []
        found_i: Any = []
        if searched and n:
            found_d, found_i = self.index.search(hash_bits([hashes[i] for i in searched]), 16)
        near: dict[int, tuple[Any, Any]] = dict(zip(searched, zip(found_d, found_i)))
        sides = [v.side if v is not None else TOLERANT_FROM for v in views] or [TOLERANT_FROM] * len(image_ids)
        for q, image_id in enumerate(image_ids):
            exact = [i for i in self.by_id.get(image_id, []) if allowed(q, i)]
            if exact:
                out[q] = Match(exact[0], "exact", "phash_bits", 0)
                continue
            within = tolerance.bits(sides[q])
            for distance, position in zip(*near.get(q, ((), ()))):
                if position < 0 or distance > within:
                    break
                if allowed(q, int(position) // 2):
                    out[q] = Match(int(position) // 2, "near", "phash_bits", int(distance))
                    break
        todo = [(q, v) for q, (m, v) in enumerate(zip(out, views)) if m is None and v is not None]
        picked = np.asarray([q for q, _ in todo], np.int64)
        sub = _Allowed(self.path_keys, allowed.owns[picked], allowed.stops[picked])
        for (q, _), match in zip(todo, self._cropped([v for _, v in todo], sub, tolerance)):
            out[q] = match
        return out

    def _cropped(self, views: list[CropViews], allowed: _Allowed, tolerance: Tolerance) -> list[Match | None]:
        """For each image's crop views, the earlier row whose layout one of them repeats within the tolerance:
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
            gate, rms = tolerance.gate(view.side), tolerance.rms(view.side)
            refined = {int(rows[i]): view.refined(self.layouts[rows[i]], int(crops[i]))
                       for i in np.argsort(coarse)[:REFINED] if coarse[i] <= gate}  # fmt: skip
            best = min(refined, key=lambda row: refined[row], default=None)
            near = best is not None and refined[best] <= rms
            out.append(
                Match(best, "near", "layout_rms", round(refined[best], 2)) if near and best is not None else None
            )
        return out


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
    history_index: VectorIndex | SegmentedIndex | None = None  # the history's embeddings (the semantic check)
    semantic: float | None = None  # the cosine from which two embeddings are the same picture (None: off)
    run: HashTable | None = None  # earlier shards of this run
    tolerance: Tolerance = Tolerance()  # how far a near copy may be, by image size (the version's: reuse.json)

    @classmethod
    def load(cls, reference: Reference, history: History) -> Lookup:
        semantic, tolerance = reference.reuse_thresholds()
        return cls(
            HashTable(reference.rows()),
            reference.index(),
            HashTable(history.rows(), history.layout_index()),
            history.index() if semantic is not None else None,
            semantic,
            tolerance=tolerance,
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
        plain, mirrored = region_phashes(regions)
        views = region_views(regions)
        grid = as_bytes(np.stack([v.searched[0] for v in views])) if n else np.zeros((0, 0), np.uint8)
        keys = [path_key(p) for p in paths]
        rows = pd.DataFrame(
            {"image_id": list(image_ids), "path_key": keys, "ids": list(ids) or ["{}"] * n, "phash": plain,
             "phash_mirror": mirrored, "layout": [bytes(v) for v in grid]},
            dtype=object,
        )  # fmt: skip
        tol = self.tolerance
        sources: list[tuple[str, pd.DataFrame, list[Match | None]]] = [
            ("training", self.train.rows, self.train.matches(image_ids, plain, [""] * n, tol, views)),
            ("scored", self.history.rows, self.history.matches(image_ids, plain, keys, tol, views)),
        ]
        if self.run is not None:
            sources.append(("this run", self.run.rows, self.run.matches(image_ids, plain, keys, tol, views)))
        shard = HashTable(rows).matches(image_ids, plain, keys, tol, views, before=range(n))
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

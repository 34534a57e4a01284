"""What the embeddings tell: similar cases and reused images.

- `VectorIndex`: cosine nearest neighbours through FAISS (chosen by `bench/ann.py`: exact inner-product search up to
  EXACT_LIMIT vectors, where a query still takes about a millisecond, HNSW above it). Saved with FAISS's own
  format (no pickle).
- Perceptual hashes (imagehash's pHash, of the image and of its mirror image) find re-used photos that were
  resized, recompressed or lightly cropped; the sha256 `image_id` finds exact copies.
- `Reference`: what a registered version carries about its training data (the training split's embeddings,
  labels and hashes; the validation split's predictions and image statistics for drift), in its model folder.
- `History`: everything a version scored, kept under CNN_HOME and extended atomically after each run.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.fsio import atomic_path, write_json_atomic, write_text_atomic

EXACT_LIMIT = 200_000  # below this many vectors exact search answers in about 1 ms (bench/ann.py)
HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 16, 128, 64
HASH_SIZE = 16  # pHash of 16 x 16 = 256 bits: 64 bits told distinct photos of one class apart too rarely
NEAR_BITS = 16  # Hamming distance (of 256 bits) up to which two images count as the same photo (bench/reuse.py)
K = 10


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows (inner product = cosine similarity)."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


class VectorIndex:
    """Cosine nearest neighbours over the rows added so far (ids are row positions)."""

    def __init__(self, index: Any) -> None:
        self.index = index  # a faiss index (flat or HNSW)

    @classmethod
    def build(cls, vectors: np.ndarray) -> VectorIndex:
        import faiss

        x = normalise(vectors)
        dim = x.shape[1] if x.ndim == 2 and x.shape[1] else 1
        index: Any
        if len(x) <= EXACT_LIMIT:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_BUILD
            index.hnsw.efSearch = HNSW_EF_SEARCH
        if len(x):
            index.add(x)
        return cls(index)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> VectorIndex:
        """This index with `vectors` appended; a flat index that outgrows EXACT_LIMIT is rebuilt as HNSW."""
        import faiss

        if len(self) + len(vectors) > EXACT_LIMIT and isinstance(self.index, faiss.IndexFlatIP):
            stored = self.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.index.d), np.float32)
            return VectorIndex.build(np.concatenate([stored, normalise(vectors)]))
        if len(vectors):
            self.index.add(normalise(vectors))
        return self

    def search(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, row ids) of the k nearest rows of each query; id -1 where there are fewer rows."""
        if not len(self) or not len(queries):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(normalise(queries), min(k, len(self)))
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
    lit = image[:, :, 0]
    for channel in range(1, image.shape[2]):  # OR of the channels: ten times faster than any(axis=2)
        lit = lit | image[:, :, channel]
    rows, cols = np.flatnonzero(lit.max(axis=1)), np.flatnonzero(lit.max(axis=0))
    if not len(rows) or not len(cols):
        return image
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def phashes(images: np.ndarray) -> tuple[list[str], list[str]]:
    """(pHash, pHash of the mirror image) of each decoded image's content, as 64 hex digits (imagehash's pHash,
    256 bits)."""
    import imagehash
    from PIL import Image

    plain, mirrored = [], []
    for image in images:
        region = content(image)
        picture = Image.fromarray(region[:, :, 0] if region.shape[2] == 1 else region)
        plain.append(_hex(imagehash.phash(picture, hash_size=HASH_SIZE)))
        flipped = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored.append(_hex(imagehash.phash(flipped, hash_size=HASH_SIZE)))
    return plain, mirrored


def _hex(value: Any) -> str:
    """An ImageHash as hex digits, the same string as str(value) (big-endian bits), without its per-bit loop."""
    return np.packbits(np.asarray(value.hash, dtype=bool).flatten()).tobytes().hex()


def _bits(hexes: Sequence[str]) -> np.ndarray:
    """(N, bytes) uint8 rows of hex hashes (zeros for a missing one)."""
    width = HASH_SIZE * HASH_SIZE // 8
    return np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) if h else np.zeros(width, np.uint8) for h in hexes])


@dataclass(frozen=True)
class Match:
    """An earlier image a scored one repeats."""

    row: int  # the row of the table it was found in
    kind: str  # exact | near
    bits: int  # pHash distance (0 for exact)


class HashTable:
    """Earlier images' ids and hashes, searched by Hamming distance with a FAISS binary index (exact; about a
    millisecond per image against a million earlier images, bench/reuse.py)."""

    def __init__(self, rows: pd.DataFrame) -> None:
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

    def matches(
        self, image_ids: Sequence[str], hashes: Sequence[str], own_paths: Sequence[str], near_bits: int = NEAR_BITS
    ) -> list[Match | None]:
        """For each image, the earlier row it copies: the same bytes, or a pHash within `near_bits` of the row's
        (or of its mirror image's). Rows of its own path (the same file scored again) do not count."""
        out: list[Match | None] = [None] * len(image_ids)
        searched = [i for i, h in enumerate(hashes) if h]
        found_d: Any = []
        found_i: Any = []
        if searched and len(self.rows):
            found_d, found_i = self.index.search(_bits([hashes[i] for i in searched]), 8)
        near: dict[int, tuple[Any, Any]] = dict(zip(searched, zip(found_d, found_i)))
        for q, (image_id, own) in enumerate(zip(image_ids, own_paths)):
            exact = [i for i in self.by_id.get(image_id, []) if not own or self.path_keys[i] != own]
            if exact:
                out[q] = Match(exact[0], "exact", 0)
                continue
            for distance, position in zip(*near.get(q, ((), ()))):
                row = int(position) // 2
                if position < 0 or distance > near_bits:
                    break
                if not own or self.path_keys[row] != own:
                    out[q] = Match(row, "near", int(distance))
                    break
        return out


def _within_shard(
    image_ids: list[str], keys: list[str], plain: Sequence[str], mirrored: Sequence[str], near_bits: int = NEAR_BITS
) -> list[Match | None]:
    """For each image, the first earlier image of the same list it copies (same bytes, or a pHash of it or of its
    mirror image within `near_bits`), from another path; all pairs at once (a shard is a few hundred images)."""
    if not plain:
        return []
    a, m = _bits(plain), _bits(mirrored)
    distance = np.minimum(
        np.bitwise_count(a[:, None, :] ^ a[None, :, :]).sum(axis=2),
        np.bitwise_count(a[:, None, :] ^ m[None, :, :]).sum(axis=2),
    )
    same_bytes = np.array(image_ids)[:, None] == np.array(image_ids)[None, :]
    other_path = np.array(keys)[:, None] != np.array(keys)[None, :]
    earlier = np.tril(np.ones_like(same_bytes), k=-1)
    out: list[Match | None] = []
    for i in range(len(plain)):
        exact = np.flatnonzero(same_bytes[i] & other_path[i] & earlier[i])
        near = np.flatnonzero((distance[i] <= near_bits) & other_path[i] & earlier[i])
        if len(exact):
            out.append(Match(int(exact[0]), "exact", 0))
        elif len(near):
            out.append(Match(int(near[0]), "near", int(distance[i, near[0]])))
        else:
            out.append(None)
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
        """The training split: image_id, label, phash, phash_mirror (row i = vector i)."""
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
    with atomic_path(folder / "train_rows.parquet") as tmp:
        rows.to_parquet(tmp, index=False)
    for name, vectors in (("train_embeddings.npy", train_vectors), ("val_embeddings.npy", val_vectors)):
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.asarray(vectors, dtype=np.float16), allow_pickle=False)
    VectorIndex.build(train_vectors).save(folder / "train.faiss")
    write_json_atomic(folder / "drift.json", drift)
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


HISTORY_COLUMNS = ["image_id", "path_key", "label", "ids", "phash", "phash_mirror", "scored_at"]


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
            generation = self.folder / f"gen-{uuid.uuid4().hex[:12]}"
            generation.mkdir()
            combined = pd.concat([old_rows, rows.loc[fresh, HISTORY_COLUMNS]], ignore_index=True)
            combined.to_parquet(generation / "rows.parquet", index=False)
            index.save(generation / "vectors.faiss")
            previous = self._current()
            write_text_atomic(self.folder / "CURRENT", generation.name)  # the commit point
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            return int(fresh.sum())


@dataclass(frozen=True)
class Lookup:
    """What scoring compares each image with: the version's training split (index, labels, hashes) and what it
    scored before (hashes). Loaded once per shard."""

    train: HashTable
    train_index: VectorIndex
    history: HashTable

    @classmethod
    def load(cls, reference: Reference, history: History) -> Lookup:
        return cls(HashTable(reference.rows()), reference.index(), HashTable(history.rows()))

    def annotate(
        self,
        image_ids: Sequence[str],
        paths: Sequence[str],
        labels: Sequence[str],
        images: np.ndarray,
        vectors: np.ndarray | None,
        ids: Sequence[str] = (),
    ) -> pd.DataFrame:
        """For each scored image: the history's columns but `scored_at` (image_id, path_key, label, ids, phash,
        phash_mirror) and neighbour_label, neighbour_agreement, duplicate_of, duplicate_kind. A copy of a training
        image first, else of an image scored before, else of an earlier image of the same shard (`ids`: each
        image's carried id columns as JSON, `{}` when none are given); never of itself (a file scored again under
        its own path)."""
        plain, mirrored = phashes(images) if len(images) else ([], [])
        keys = [path_key(p) for p in paths]
        out = pd.DataFrame(
            {"image_id": list(image_ids), "path_key": keys, "label": list(labels),
             "ids": list(ids) or ["{}"] * len(plain), "phash": plain, "phash_mirror": mirrored},
            dtype=object,
        )  # fmt: skip
        out["neighbour_label"], out["neighbour_agreement"] = self._neighbours(labels, vectors)
        of: list[str | None] = []
        kinds: list[str | None] = []
        in_training = self.train.matches(image_ids, plain, [""] * len(plain))
        scored_before = self.history.matches(image_ids, plain, keys)
        within = _within_shard(list(image_ids), keys, plain, mirrored)
        for t, h, w in zip(in_training, scored_before, within):
            match, rows, source = (
                (t, self.train.rows, "training") if t is not None else (h, self.history.rows, "scored")
            )
            if match is None:  # an earlier image of this shard: the same photo twice in one batch
                match, rows, source = w, out, "this run"
            if match is None:
                of.append(None)
                kinds.append(None)
                continue
            row = rows.iloc[match.row]
            described: dict[str, object] = {"image_id": row["image_id"], "source": source, "phash_bits": match.bits}
            if source != "training" and row.get("ids"):
                described.update(json.loads(row["ids"]))
            elif source == "training":
                described["label"] = row["label"]
            of.append(json.dumps(described, sort_keys=True))
            kinds.append(match.kind)
        out["duplicate_of"] = pd.Series(of, dtype=object)
        out["duplicate_kind"] = pd.Series(kinds, dtype=object)
        return out

    def _neighbours(self, labels: Sequence[str], vectors: np.ndarray | None) -> tuple[list[str | None], list[float]]:
        if vectors is None or not len(self.train.rows):
            return [None] * len(labels), [float("nan")] * len(labels)
        _, ids = self.train_index.search(vectors, K)
        known = self.train.rows["label"].to_numpy()
        names: list[str | None] = []
        shares: list[float] = []
        for row, label in zip(ids, labels):
            found = known[row[row >= 0]]
            if not len(found):
                names.append(None)
                shares.append(float("nan"))
                continue
            values, counts = np.unique(found, return_counts=True)
            names.append(str(values[counts.argmax()]))
            shares.append(float((found == label).mean()))
        return names, shares

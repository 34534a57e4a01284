"""What a registered version carries about its training data, in its model folder's `reference/`: the training
split's embeddings, labels and hashes (similar cases, the reuse check) and the validation split's predictions and
image statistics (the drift check)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cnn.data.dataset import Dataset
from cnn.fsio import atomic_path, write_json_atomic
from cnn.infer.predictor import Predictor
from cnn.metrics.drift import DriftReference, DriftSample, reference_sample
from cnn.model.contract import ModelContract
from cnn.model.run import RunFolder
from cnn.similarity.fingerprints import layouts, phashes
from cnn.similarity.index import SegmentedIndex, VectorIndex
from cnn.similarity.tolerance import Tolerance
from cnn.trust.evaluation import split_images

SEMANTIC_QUANTILE, SEMANTIC_FLOOR, SEMANTIC_OFF = 0.999, 0.95, 0.9999


def nearest_rows(
    index: VectorIndex | SegmentedIndex, rows: pd.DataFrame, vectors: np.ndarray, k: int
) -> list[list[dict[str, object]]]:
    """For each vector, the k nearest rows of `rows` (row i = the index's vector i): rank, similarity, image_id,
    label and, where the rows carry them, their id columns (`ids`)."""
    similarity, positions = index.search(vectors, k)
    found = []
    for scores, ids in zip(similarity, positions):
        near = []
        for rank, (score, position) in enumerate(zip(scores, ids), start=1):
            if position < 0:
                continue
            row = rows.iloc[int(position)]
            near.append(
                {"rank": rank, "similarity": round(float(score), 4), "image_id": row["image_id"], "label": row["label"],
                 **({"ids": row["ids"]} if "ids" in rows.columns else {})}
            )  # fmt: skip
        found.append(near)
    return found


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
        """The training embeddings, one row per training row (checked before anything is allocated)."""
        return _matrix(self.folder / "train_embeddings.npy", self._row_count())

    def index(self) -> VectorIndex:
        """The training embeddings' index, its file's layout checked against them before it is read."""
        path = self.folder / "train.faiss"
        if not path.is_file():
            return VectorIndex.build(self.vectors())
        shape = np.load(self.folder / "train_embeddings.npy", mmap_mode="r", allow_pickle=False).shape
        return VectorIndex.load(path, shape[1] if len(shape) == 2 else None, self._row_count())

    def nearest(self, vectors: np.ndarray, k: int) -> list[list[dict[str, object]]]:
        """For each vector, its k nearest training images: rank, cosine similarity, image_id and label."""
        return nearest_rows(self.index(), self.rows(), vectors, k)

    def _row_count(self) -> int:
        # from the Parquet footer: the check needs the count, not a second read of the rows the lookup already reads
        return int(pq.read_metadata(self.folder / "train_rows.parquet").num_rows)

    def drift(self) -> DriftReference:
        """The held-out split's statistics for the drift check (cnn.metrics.drift)."""
        return DriftReference.from_dict(json.loads((self.folder / "drift.json").read_text(encoding="utf-8")))

    def drift_embeddings(self) -> np.ndarray:
        return _matrix(self.folder / "val_embeddings.npy")

    def reuse_thresholds(self) -> tuple[float | None, Tolerance]:
        """From reuse.json, read once: the embedding cosine from which two images count as the same picture (None:
        the check is off) and the near-copy tolerances (the photo ones for versions registered before them)."""
        path = self.folder / "reuse.json"
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        found = found if isinstance(found, dict) else {}
        semantic = found.get("semantic_cosine")
        return (float(semantic) if semantic is not None else None), Tolerance.from_dict(found)


def _matrix(path: Path, rows: int | None = None) -> np.ndarray:
    """A 2-D float .npy file as float32; mapped first, so a header that claims more than the file holds raises a
    ValueError instead of allocating it."""
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    if mapped.ndim != 2 or (rows is not None and mapped.shape[0] != rows) or mapped.dtype.kind != "f":
        raise ValueError(f"{path.name}: {mapped.dtype} array of shape {mapped.shape}, expected {rows} float rows")
    return np.asarray(mapped, dtype=np.float32)


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
    drift: DriftReference,
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
    write_json_atomic(folder / "drift.json", drift.to_dict())
    tolerance = Tolerance.calibrate(rows)  # how alike distinct training images are at this size
    write_json_atomic(folder / "reuse.json", {**semantic_threshold(train_vectors), **tolerance.to_dict()})
    return Reference(folder)


def build_reference(run_dir: Path, dataset_root: Path) -> Reference:
    """A trained run's reference (run_dir/reference): the training split's embeddings, labels and hashes for the
    similar-case index and the reuse check; the validation split's predictions, image statistics and embeddings for
    the drift check (the training split where there is no validation split)."""
    folder = RunFolder(run_dir)
    contract = ModelContract.load(folder.contract)
    predictor = Predictor.load(folder.weights, contract)
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
        folder.reference,
        ids,
        [classes[j] for j in labels],
        train_vectors,
        images,
        reference_sample(sample, held_out),
        val_vectors,
    )

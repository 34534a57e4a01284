"""Batch scoring: list the inputs, decode each shard in parallel with the ingest decoder, predict in
batches, and turn the results into prediction rows and reject rows (every input exactly once)."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnn.errors import UserError
from cnn.inference import Predictor
from cnn.parallel import decode_many
from cnn.sources import MANIFEST_SUFFIXES, iter_files, load_manifest_table

OUTPUT_COLUMNS = ["image_id", "path", "label", "confidence", "top_k", "needs_review", "model_name",
                  "model_version", "run_id", "scored_at", "flow_run_id"]
_ID_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class ScoringInputs:
    """The files to score, one row each, with the id columns carried to the output."""

    files: pd.DataFrame  # columns: path, *id_columns
    id_columns: list[str]


@dataclass(frozen=True)
class ModelRef:
    """The concrete model version a scoring run uses from start to end."""

    name: str
    version: str
    run_id: str


def list_inputs(source: str) -> ScoringInputs:
    """A folder (recursive), a glob, or a CSV/Parquet manifest with `path` and any id columns."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        table = load_manifest_table(path)
        if "path" not in table.columns:
            raise UserError(f"manifest {path} has no `path` column; it has: {', '.join(map(str, table.columns))}")
        ids = [str(c) for c in table.columns if c != "path"]
        reserved = set(OUTPUT_COLUMNS) | {c for c in ids if c.startswith("prob_")}
        for column in ids:
            if not _ID_COLUMN.match(column) or column in reserved:
                raise UserError(f"manifest column {column!r} cannot be carried to the output "
                                "(use letters, digits and _, and avoid the output's own column names)")
        files = table.copy()
        files["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in files["path"].astype(str)]
        files[ids] = files[ids].astype(str)
    elif path.is_dir():
        files, ids = pd.DataFrame({"path": sorted(str(p) for p in iter_files(path))}), []
    elif any(ch in source for ch in "*?["):
        matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        files, ids = pd.DataFrame({"path": matches}), []
    else:
        raise UserError(f"nothing to score: {source} is not a folder, a glob or a CSV/Parquet manifest")
    files = files.drop_duplicates("path", ignore_index=True)
    return ScoringInputs(files[["path", *ids]], ids)


def cpu_bf16_available() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_agreement(predictor: Predictor, images: np.ndarray, batch_size: int = 128) -> float:
    """Share of images whose top-1 label under bf16 autocast equals fp32's."""
    if len(images) == 0:
        return 0.0
    fp32 = predictor.with_precision(None).predict_arrays(images, batch_size).argmax(axis=1)
    bf16 = predictor.with_precision(torch.bfloat16).predict_arrays(images, batch_size).argmax(axis=1)
    return float((fp32 == bf16).mean())


def mark_duplicates(files: pd.DataFrame, predicted: dict[str, str] | None = None, threads: int = 4) -> pd.DataFrame:
    """Add `image_id` and `duplicate_of`: a file whose bytes an earlier file has (in path order, or an earlier
    run's prediction) is a duplicate of it. Done once before sharding, so shards scored in parallel agree."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(path: str) -> str:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return ""  # unreadable: the decoder reports why
        return h.hexdigest()

    with ThreadPoolExecutor(threads) as pool:  # hashlib and file reads release the GIL
        ids = list(pool.map(digest, files["path"]))
    owner = dict(predicted or {})
    duplicate_of: list[str | None] = []
    for path, image_id in zip(files["path"], ids):
        if not image_id:
            duplicate_of.append(None)
        elif image_id in owner and owner[image_id] != path:
            duplicate_of.append(owner[image_id])
        else:
            owner.setdefault(image_id, path)
            duplicate_of.append(None)
    return files.assign(image_id=ids, duplicate_of=duplicate_of)


def score_files(files: pd.DataFrame, id_columns: list[str], predictor: Predictor, model: ModelRef,
                flow_run_id: str = "", batch_size: int = 64, top_k: int = 3, review_below: float = 0.0,
                workers: int = 0, predicted: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one shard: (prediction rows, reject rows), one row per input file.

    `predicted` maps image_id -> path of what this model version already predicted: those bytes are not
    decoded again, and a file repeating them under another path becomes a "duplicate" reject; rows that
    `mark_duplicates` marked (`duplicate_of`) become such rejects without being decoded."""
    spec = predictor.contract.decode_spec()
    arrays: list[np.ndarray] = []
    kept: list[tuple[int, str]] = []
    rejects: list[dict[str, object]] = []
    ids_by_path = files[["path", *id_columns]]
    if "duplicate_of" in files.columns:
        marked = files["duplicate_of"].notna()
        rejects += [{"image_id": i, "path": p, "reason": f"duplicate of {d} (same bytes, predicted once)"}
                    for i, p, d in zip(files.loc[marked, "image_id"], files.loc[marked, "path"],
                                       files.loc[marked, "duplicate_of"])]
        files = files.loc[~marked].reset_index(drop=True)
    seen: dict[str, str] = dict(predicted or {})
    for i, outcome in enumerate(decode_many(files["path"].tolist(), spec, workers, seen)):
        if outcome.status != "ok":
            rejects.append({"image_id": outcome.image_id, "path": outcome.path, "reason": outcome.reason})
        elif outcome.image_id in seen:
            if seen[outcome.image_id] == outcome.path:
                continue  # this very file was predicted by an earlier run
            rejects.append({"image_id": outcome.image_id, "path": outcome.path,
                            "reason": f"duplicate of {seen[outcome.image_id]} (same bytes, predicted once)"})
        else:
            seen[outcome.image_id] = outcome.path
            arrays.append(outcome.array)
            kept.append((i, outcome.image_id))
    probs = predictor.predict_arrays(np.stack(arrays), batch_size) if arrays else np.zeros((0, 0))
    now = datetime.now(UTC)
    stamp = {"model_name": model.name, "model_version": model.version, "run_id": model.run_id,
             "scored_at": now, "flow_run_id": flow_run_id}
    predictions = _prediction_rows(files, id_columns, kept, probs, predictor.contract.classes, top_k, review_below)
    for key, value in stamp.items():
        predictions[key] = value
    reject_frame = pd.DataFrame(rejects, columns=["image_id", "path", "reason"])
    reject_frame = reject_frame.merge(ids_by_path, on="path", how="left") if id_columns else reject_frame
    for key, value in stamp.items():
        reject_frame[key] = value
    return predictions, reject_frame


def _prediction_rows(files: pd.DataFrame, id_columns: list[str], kept: list[tuple[int, str]], probs: np.ndarray,
                     classes: list[str], top_k: int, review_below: float) -> pd.DataFrame:
    rows = files.iloc[[i for i, _ in kept]].reset_index(drop=True)
    frame = pd.DataFrame({"image_id": [image_id for _, image_id in kept], "path": rows["path"]})
    for column in id_columns:
        frame[column] = rows[column]
    if len(kept):
        best = probs.argmax(axis=1)
        frame["label"] = [classes[j] for j in best]
        frame["confidence"] = probs.max(axis=1).astype(np.float64)
        order = np.argsort(-probs, axis=1)[:, :max(1, top_k)]
        frame["top_k"] = [json.dumps([[classes[j], round(float(p[j]), 6)] for j in row]) for row, p in zip(order, probs)]
    else:
        frame["label"], frame["confidence"], frame["top_k"] = [], np.zeros(0), []
    frame["needs_review"] = frame["confidence"] < review_below
    for j, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, j].astype(np.float64) if len(kept) else np.zeros(0)
    return frame

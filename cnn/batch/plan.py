"""Planning a scoring run: hash the inputs, drop what every table already holds with the same bytes, mark
duplicates by content, cut the rest into shards (`ShardPlan`, saved as Parquet; shards read their rows from it)."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cnn.batch.masking import Masking
from cnn.batch.run import SPOOL, ModelRef, ShardPlan
from cnn.batch.sinks import Sink
from cnn.batch.tables import EMBEDDING, OUTPUT_COLUMNS, REJECT_COLUMNS, REVIEWER_COLUMNS, SIMILARITY_COLUMNS
from cnn.fsio import atomic_path
from cnn.io import inputs as listing
from cnn.io import storage
from cnn.io.decode import RejectKind
from cnn.io.inputs import VERSION_COLUMN, ScoringInputs, content_ids, with_stat_versions
from cnn.limits import DEFAULT_MAX_FILE_BYTES

PLAN_COLUMNS = ["image_id", "same_bytes_as", "shard", "attempt", "local_copy"]
RESERVED = {
    *OUTPUT_COLUMNS,
    *REJECT_COLUMNS,
    *SIMILARITY_COLUMNS,
    *PLAN_COLUMNS,
    *REVIEWER_COLUMNS,
    VERSION_COLUMN,
    EMBEDDING,
}


def list_inputs(source: str, allow_outside: bool = False) -> ScoringInputs:
    """The files of `source` to score (cnn.io.inputs), with carried id columns that cannot clash with the output's
    own."""
    return listing.list_inputs(source, RESERVED, allow_outside)


def mark_duplicates(
    files: pd.DataFrame,
    predicted: dict[str, str] | None = None,
    masking: Masking = Masking(),
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> pd.DataFrame:
    """Add `image_id` (unless there) and `same_bytes_as`: a file whose bytes an earlier file has (in path order,
    or an earlier run's prediction) is a duplicate of it. Done once before sharding, so parallel shards agree.
    Paths are compared and named as the tables show them (`masking`)."""
    if "image_id" in files.columns:
        ids = files["image_id"].tolist()
    else:
        ids = content_ids(files["path"].tolist(), max_file_bytes=max_file_bytes)
    owner = dict(predicted or {})
    same_bytes_as: list[str | None] = []
    for path, image_id in zip(files["path"].map(masking.path), ids):
        if not image_id:
            same_bytes_as.append(None)
        elif image_id in owner and owner[image_id] != path:
            same_bytes_as.append(owner[image_id])
        else:
            owner.setdefault(image_id, path)
            same_bytes_as.append(None)
    return files.assign(image_id=ids, same_bytes_as=same_bytes_as)


@dataclass(frozen=True)
class Increment:
    """What a run still has to do, from the sinks' current rows: a file is done when its path has a current
    row for the same bytes (a prediction, a final reject, or a transient one tried `max_attempts` times)."""

    done: set[tuple[str, str]]  # (path, image_id)
    attempts: dict[tuple[str, str], int]  # transient rejects: tries so far
    owners: dict[str, str]  # image_id -> path of its current prediction (for duplicates)

    @classmethod
    def of(cls, current: pd.DataFrame, max_attempts: int) -> Increment:
        """From one sink's current rows (path, image_id, reject_kind ("" = prediction), attempts)."""
        pairs = list(zip(current["path"].astype(str), current["image_id"].astype(str)))
        kinds = current["reject_kind"].astype(str).tolist()
        tries = pd.to_numeric(current["attempts"], errors="coerce").fillna(1).astype(int).tolist()
        retry = {
            pair: n for pair, kind, n in zip(pairs, kinds, tries) if kind and _transient(kind) and n < max_attempts
        }
        owners = {image_id: path for (path, image_id), kind in zip(pairs, kinds) if not kind and image_id}
        return cls({pair for pair in pairs if pair not in retry}, retry, owners)


def _transient(kind: str) -> bool:
    try:
        return RejectKind(kind).transient
    except ValueError:  # a kind this version does not know (written by a newer one): final
        return False


SHARD_FILES_AT_224 = 256  # files per shard at a 224 px input; smaller inputs get more, up to MAX_SHARD_FILES
MAX_SHARD_FILES = 8192


def shard_files(image_size: int, shard_size: int = 0) -> int:
    """Files per shard: `shard_size` where given, else about the pixels of 256 images at 224 px (a shard commits its
    own table parts, which cost the same whatever its images: 256 thumbnails of 28 px spent most of their shard's
    time committing)."""
    if shard_size > 0:
        return shard_size
    scaled = SHARD_FILES_AT_224 * (224 * 224) // max(1, image_size * image_size)
    return max(SHARD_FILES_AT_224, min(MAX_SHARD_FILES, scaled))


def plan_shards(
    inputs: ScoringInputs,
    sinks: Sequence[Sink],
    model: ModelRef,
    shard_size: int,
    run_dir: Path,
    *,
    rescore: bool = False,
    max_attempts: int = 3,
    masking: Masking = Masking(),
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    verify_content: bool = False,
) -> ShardPlan:
    """Hash every new input (at most `max_file_bytes + 1` bytes of each: the model's decode limit), drop those every
    sink already holds with the same bytes (rows of any version, or of this version only with `rescore`), resolve
    duplicates by content, and number the shards. An input whose version (an object's ETag, a file's
    `stat_version`) a sink recorded with its path is known without reading it, unless `verify_content`."""
    masking.check(inputs.id_columns)
    shown = inputs.files["path"].map(masking.path)  # what the tables hold
    currents = [sink.current(model.name, shown.tolist()) for sink in sinks]
    listed = with_stat_versions(inputs.files)
    ids, copies = _image_ids(listed, shown, [] if verify_content else currents, Path(run_dir) / SPOOL, max_file_bytes)
    files = listed.assign(image_id=ids)
    if any(copies):
        files["local_copy"] = copies
    pairs = pd.Series(list(zip(shown, files["image_id"])), dtype=object)
    todo = pd.Series(False, index=files.index)
    attempts: dict[tuple[str, str], int] = {}
    owners: dict[str, str] = {}
    for current in currents:
        if rescore:
            current = current[current["model_version"].astype(str) == str(model.version)]
        increment = Increment.of(current, max_attempts)
        todo |= ~pairs.isin(increment.done)  # done only when every sink has it
        attempts.update(increment.attempts)
        owners.update(increment.owners)
    keep = todo.to_numpy()
    files = mark_duplicates(files[keep].reset_index(drop=True), owners, masking, max_file_bytes)
    files["attempt"] = [attempts.get(pair, 0) + 1 for pair in pairs[keep]]
    files["shard"] = files.index // shard_size
    plan = Path(run_dir) / "plan.parquet"
    with atomic_path(plan) as tmp:
        files.to_parquet(tmp, index=False)
    shards = int(files["shard"].max() + 1) if len(files) else 0
    return ShardPlan(
        str(plan),
        shards,
        len(files),
        len(inputs.files) - len(files),
        tuple(inputs.id_columns),
        retried=int((files["attempt"] > 1).sum()),
        key=uuid.uuid4().hex,
    )


def sweep_copies(scoring_dir: Path, older_than_s: float = 7 * 86400) -> int:
    """Remove the object copies that killed runs left in their run folders (`<run>/objects/`, nothing in it touched
    for `older_than_s`: a run still going writes copies or removes them as it goes); return how many folders."""
    swept, now = 0, time.time()
    for folder in Path(scoring_dir).glob(f"*/{SPOOL}"):
        try:
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        except OSError:  # removed meanwhile
            continue
        if now - newest > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
    return swept


def _image_ids(
    files: pd.DataFrame, shown: pd.Series, currents: Sequence[pd.DataFrame], spool: Path, max_file_bytes: int
) -> tuple[list[str], list[str]]:
    """Each input's content id, and the local copy of the objects read for it: for an input whose version a sink
    recorded with the same path, the id recorded then (it is not read at all); for other objects, the hash of the
    bytes, which are kept in `spool` for the decoder (up to storage.SPOOL_BYTES); for files, the hash."""
    copies = [""] * len(files)
    known: dict[tuple[str, str], str] = {}
    for current in currents:
        rows = current[current[VERSION_COLUMN].astype(str) != ""]
        known.update(zip(zip(rows["path"].astype(str), rows[VERSION_COLUMN].astype(str)), rows["image_id"].astype(str)))
    ids = [known.get((p, str(v)), "") if v else "" for p, v in zip(shown, files[VERSION_COLUMN])]
    paths = files["path"].tolist()
    objects = [i for i, image_id in enumerate(ids) if not image_id and storage.is_url(paths[i])]
    for i, (image_id, copy) in zip(
        objects, storage.fetch_objects([paths[i] for i in objects], spool, max_bytes=max_file_bytes)
    ):
        ids[i], copies[i] = image_id, copy
    local = [i for i, image_id in enumerate(ids) if not image_id and not storage.is_url(paths[i])]
    for i, image_id in zip(local, content_ids([paths[i] for i in local], max_file_bytes=max_file_bytes)):
        ids[i] = image_id
    return ids, copies

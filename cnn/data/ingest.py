"""Ingest a source into a dataset: scan -> decode into the cache -> split -> commit.

Each stage is one call that reads and writes files in a staging folder and returns a path, so an
orchestrator can run the stages as separate tasks that pass references, never arrays.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal, Self

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field

from cnn.frames import among
from cnn.config import IngestOptions
from cnn.data.dataset import (
    GENERATIONS,
    MANIFEST_COLUMNS,
    Dataset,
    DatasetMeta,
    ImageCache,
    usable_rows,
    validate_name,
)
from cnn.io.decode import DecodeSpec
from cnn.errors import UserError
from cnn.fsio import atomic_path, write_json_atomic
from cnn.choices import CLASS_NAME, CLASS_NAME_RULE, SPLITS
from cnn.limits import DEFAULT_TIME_LIMIT_S, MAX_FILE_MB
from cnn.io.pool import DecodeOutcome, ProgressFn, decode_many
from cnn.io.pseudonyms import dicom_tag, pseudonym
from cnn.io.sources import SOURCE_COLUMNS, SourceListing, scan_source
from cnn.data.report import IngestStats, build_report, save_report
from cnn.data.splits import assign_splits
from cnn.io.storage import is_url, local_path, redact



@contextmanager
def ingest_lock(dataset_dir: str | Path) -> Iterator[None]:
    """Hold the dataset for one ingest at a time: a second ingest of the same dataset is refused with a message
    (it would otherwise delete the first one's staging folder). The lock is the kernel's: it goes with the
    process, so a killed ingest never leaves the dataset locked."""
    path = Path(dataset_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".ingest.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"dataset {path.name!r} is being ingested by another run; try again when it has finished"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def staging_dir(dataset_dir: Path) -> Path:
    """Where the stages of an ingest keep their intermediate files."""
    return Path(dataset_dir) / ".staging"


class _StageRecord:
    """A stage's facts, saved as one JSON file in staging and read back typed by the next stages."""

    file: ClassVar[str]

    def save(self, dataset_dir: Path) -> Path:
        record = asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
        return write_json_atomic(staging_dir(dataset_dir) / self.file, record)

    @classmethod
    def load(cls, dataset_dir: Path) -> Self:
        path = staging_dir(dataset_dir) / cls.file
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class ScanRecord(_StageRecord):
    """What scanning found: the resolved source, its layout, and files it skipped."""

    file: ClassVar[str] = "scan.json"
    source: str
    layout: str
    skipped: int


@dataclass(frozen=True)
class DecodeRecord(_StageRecord):
    """What decoding did: the cache it produced, files decoded and reused."""

    file: ClassVar[str] = "decode.json"
    cache_shards: list[str]
    decoded: int  # images decoded and stored in new shards
    reused: int
    files: int
    compacted: bool = False


@dataclass(frozen=True)
class SplitRecord(_StageRecord):
    """What splitting did: files whose given split moved to keep a group or duplicate set together."""

    file: ClassVar[str] = "split.json"
    moved: int


# --- stage 1: scan ---------------------------------------------------------------------------


def stage_scan(source: str | Path, dataset_dir: Path, options: IngestOptions) -> Path:
    """List the source's files into staging/scan.parquet; raise UserError for an unusable source."""
    validate_name(Path(dataset_dir).name)
    options.fractions()  # validate before any work
    listing = scan_source(source, options.group_column, options.allow_outside)
    listing = _added_to(Dataset(dataset_dir), listing, everything=options.add or listing.layout == "review")
    staging = staging_dir(dataset_dir)
    if staging.exists():
        shutil.rmtree(staging)  # leftovers of an interrupted ingest
    staging.mkdir(parents=True)
    listing.files.to_parquet(staging / "scan.parquet", index=False)
    ScanRecord(_shown_source(source), listing.layout, listing.skipped).save(dataset_dir)
    return staging / "scan.parquet"


def _shown_source(source: str | Path) -> str:
    """The source as the dataset records it: an object store URL (never with credentials) or an absolute path."""
    text = local_path(str(source))
    return redact(text) if is_url(text) else str(Path(text).expanduser().resolve())


def _added_to(dataset: Dataset, listing: SourceListing, everything: bool) -> SourceListing:
    """The listing plus the dataset's earlier files: all of them when adding (`--add`, a review table), else only
    those a reviewer labelled, which a scheduled re-ingest of the raw source must not drop; never a file a review
    table's reviewer called unusable or none of the classes (`excluded`). A reviewed label wins
    over the source's for the same file; otherwise the listing's label wins (a correction). Earlier files keep
    their split (see `_fixed_and_allowed`) and are not decoded again."""
    if not dataset.exists():
        return listing
    old = dataset.manifest()
    reviewed = old["reviewed"].fillna(False).astype(bool)
    if not everything:
        old = old[reviewed]
        keep = listing.files[~among(listing.files["path"], old["path"])]
        listing = replace(listing, files=keep)
    else:
        old = old[~among(old["path"], listing.files["path"])]
    old = old[~among(old["path"], listing.excluded)]  # a reviewer said it is unusable or none of the classes
    earlier = pd.DataFrame(
        {
            "path": old["path"],
            "label": old["label"],
            "split": None,
            "group": old["group"],
            "size_bytes": old["size_bytes"],
            "mtime_ns": old["mtime_ns"],
            "version": old["version"].fillna("").astype(str),
            "reviewed": old["reviewed"].fillna(False).astype(bool),
        }
    )
    files = pd.concat([earlier, listing.files], ignore_index=True)[SOURCE_COLUMNS]
    return replace(listing, files=files.astype({"size_bytes": "int64", "mtime_ns": "int64", "reviewed": bool}))


# --- stage 2: decode -------------------------------------------------------------------------
#
# Decoding writes the new images into new shards of the cache and leaves the earlier shards as they are. It runs
# as plan -> parts -> finish, so an orchestrator can send the parts to a cluster; `stage_decode` runs all three
# here. A part decodes a list of files into a shard of its own and records its outcomes in staging.

MAX_SHARDS = 64  # past this many shards (or when dead slots outnumber live ones) an ingest compacts the cache


@dataclass(frozen=True)
class DecodePlan(_StageRecord):
    """What decoding has to do: how many files to decode (listed in staging/todo.parquet), in how many parts,
    and the shards of the previous cache that the new one may keep."""

    file: ClassVar[str] = "decode-plan.json"
    todo: int
    parts: int
    old_shards: list[str]

    def part_rows(self, part: int) -> slice:
        """The rows of todo.parquet that part `part` decodes."""
        size = -(-self.todo // max(1, self.parts))
        return slice(part * size, (part + 1) * size)


def plan_decode(dataset_dir: Path, options: IngestOptions) -> DecodePlan:
    """Decide which scanned files must be decoded (new or changed) and which keep their cached result; split the
    work into parts of `files_per_part` when it fans out to a cluster, else into one part."""
    dataset, staging = Dataset(dataset_dir), staging_dir(dataset_dir)
    files = pd.read_parquet(staging / "scan.parquet")
    previous, old_cache, old_shards = _previous_state(dataset, options)
    old_index = old_cache.index()
    reuse_mask, reused = _reusable_rows(files, previous, old_index)
    reused.to_parquet(staging / "reused.parquet", index=False)
    known = usable_rows(previous, distinct=True)  # what a part need not decode again: the bytes are cached
    known = known.loc[among(known["image_id"], list(old_index)), ["image_id", "width", "height", "format"]]
    known.to_parquet(staging / "known.parquet", index=False)
    todo = files.loc[~reuse_mask, ["path"]]
    todo.to_parquet(staging / "todo.parquet", index=False)
    parts = -(-len(todo) // options.files_per_part) if options.fan_out else min(1, len(todo))
    plan = DecodePlan(len(todo), parts, old_shards)
    plan.save(dataset_dir)
    return plan


def decode_part(dataset_dir: Path, options: IngestOptions, part: int, progress: ProgressFn | None = None) -> str:
    """Decode part `part` of the plan into a new shard (images already in the previous cache are not decoded or
    stored again); save its outcomes to staging. Return the part's token (its shard's, when it stored images)."""
    dataset, staging = Dataset(dataset_dir), staging_dir(dataset_dir)
    paths = pd.read_parquet(staging / "todo.parquet")["path"].tolist()[DecodePlan.load(dataset_dir).part_rows(part)]
    cached = pd.read_parquet(staging / "known.parquet")  # the plan's, read once per part rather than the old cache
    known = {r.image_id: (r.width, r.height, r.format) for r in cached.itertuples()}
    shard = _ShardWriter(dataset, capacity=len(paths))
    outcomes = []
    for outcome in decode_many(
        paths, options.decode_spec(), options.decode_workers, known, progress, options.decode_time_limit_s
    ):
        if outcome.ok and outcome.array is None:  # same bytes as a cached image
            width, height, fmt = known[outcome.image_id]
            outcome = DecodeOutcome(outcome.path, outcome.image_id, "ok", "", width, height, fmt)
        elif outcome.ok and outcome.array is not None:
            shard.add(outcome.image_id, outcome.array)
        outcomes.append(outcome)
    shard.finish()
    _outcome_frame(outcomes).to_parquet(staging / f"part-{shard.token}.parquet", index=False)
    return shard.token


def finish_decode(dataset_dir: Path, options: IngestOptions, parts: list[str]) -> Path:
    """Gather the parts' outcomes into staging/decoded.parquet and choose the shards the new cache is made of:
    the earlier shards that still hold a live image, then the parts' new shards (compacted into one when the
    dead slots outnumber the live ones or the shards are too many)."""
    dataset, staging = Dataset(dataset_dir), staging_dir(dataset_dir)
    files = pd.read_parquet(staging / "scan.parquet")
    plan = DecodePlan.load(dataset_dir)
    reused = pd.read_parquet(staging / "reused.parquet")
    fresh = [pd.read_parquet(staging / f"part-{part}.parquet") for part in parts]
    decoded = _decoded_frame(files, reused, pd.concat([_outcome_frame([]), *fresh], ignore_index=True))
    live = set(usable_rows(decoded)["image_id"])
    new_shards = [part for part in parts if dataset.cache_paths(part)[1].is_file()]  # parts that stored images
    ids = {token: set(dataset.shard_ids(token).tolist()) - {""} for token in [*plan.old_shards, *new_shards]}
    stored = len(set().union(*(ids[token] for token in new_shards)))
    shards = [token for token in plan.old_shards if live & ids[token]] + new_shards
    compacted = len(shards) > MAX_SHARDS or len(set().union(*(ids[token] for token in shards))) > 2 * len(live)
    if compacted:
        shards = [_compact(dataset, dataset.open_cache(shards), live)]
    decoded.to_parquet(staging / "decoded.parquet", index=False)
    DecodeRecord(shards, stored, len(files) - plan.todo, len(files), compacted).save(dataset_dir)
    return staging / "decoded.parquet"


def stage_decode(dataset_dir: Path, options: IngestOptions, progress: ProgressFn | None = None) -> Path:
    """Decode new or changed files into new shards of the cache (plan, parts, finish, all in this process)."""
    plan = plan_decode(dataset_dir, options)
    return finish_decode(
        dataset_dir, options, [decode_part(dataset_dir, options, k, progress) for k in range(plan.parts)]
    )


def _previous_state(dataset: Dataset, options: IngestOptions) -> tuple[pd.DataFrame, ImageCache, list[str]]:
    """The last committed manifest, cache and its shards, when the cache was built with the same decode settings."""
    if not dataset.exists():
        return pd.DataFrame(columns=MANIFEST_COLUMNS), ImageCache.empty(), []
    meta = dataset.meta()
    if meta.cache_key() != (options.image_size, options.channels, options.resize):
        return pd.DataFrame(columns=MANIFEST_COLUMNS), ImageCache.empty(), []
    return dataset.manifest(), dataset.open_cache(meta.cache_shards), list(meta.cache_shards)


def _reusable_rows(
    files: pd.DataFrame, previous: pd.DataFrame, old_index: dict[str, int]
) -> tuple[pd.Series, pd.DataFrame]:
    """Rows whose file is unchanged (same path, size, mtime and, for an object, version) and whose result is still
    cached."""
    if previous.empty:
        return pd.Series(False, index=files.index), previous
    prev = previous.drop_duplicates("path").set_index("path")
    stamp = ["size_bytes", "mtime_ns", "version"]
    joined = files.join(prev[[*stamp, "status", "image_id"]], on="path", rsuffix="_prev")
    unchanged = pd.Series(True, index=files.index)
    for column in stamp:
        unchanged &= joined[column] == joined[f"{column}_prev"]
    still_valid = (joined["status"] == "rejected") | among(joined["image_id"], list(old_index))
    mask = (unchanged & still_valid & (files["size_bytes"] >= 0)).fillna(False).astype(bool)
    reused = prev.loc[files.loc[mask, "path"]].reset_index()
    return mask, reused


class _ShardWriter:
    """Writes one new shard of the cache: freshly decoded images, each distinct image once. The file is sized for
    every file of the part; slots left unused (rejects, images already cached) are never written, so on the
    usual filesystems (ext4, XFS, APFS) they take no disk space. Images go in with `pwrite`, not through a
    memory map: a fresh map faults on every page it touches, which cost more than decoding a 224 px JPEG."""

    def __init__(self, dataset: Dataset, capacity: int) -> None:
        self.dataset, self.capacity = dataset, capacity
        self.ids: list[str] = []
        self._stored: set[str] = set()  # ids as a set: a list's `in` made every ingest quadratic
        self._file: _NpyWriter | None = None
        self.token = uuid.uuid4().hex[:12]

    def add(self, image_id: str, array: np.ndarray) -> None:
        if image_id in self._stored:
            return  # identical bytes seen twice in one part: stored once
        if self._file is None:
            self._file = _NpyWriter(self.dataset.cache_paths(self.token)[0], (self.capacity, *array.shape))
        self._file.write(len(self.ids), array)
        self.ids.append(image_id)
        self._stored.add(image_id)

    def finish(self) -> None:
        """Write the images to disk, then the ids (the shard is complete once its ids file exists)."""
        if self._file is not None:
            self._file.close()
            _write_ids(self.dataset, self.token, self.capacity, self.ids)


class _NpyWriter:
    """A uint8 .npy file of a fixed shape, written one item at a time at its offset."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        self.offset, self.item = len(header.getvalue()), int(np.prod(shape[1:]))
        self.pending: list[np.ndarray] = []  # arrays for slots first, first + 1, ... not written yet
        self.first = 0
        self.handle = open(path, "wb")
        self.handle.write(header.getvalue())
        self.handle.flush()
        self.handle.truncate(self.offset + shape[0] * self.item)  # unwritten slots stay holes

    def write(self, slot: int, array: np.ndarray) -> None:
        """Write `array` at `slot`; consecutive slots are gathered into one call of about a megabyte."""
        if array.size != self.item:
            raise ValueError(f"an item of {array.size} bytes in a file of {self.item}-byte items")
        if self.pending and slot != self.first + len(self.pending):
            self._flush()
        if not self.pending:
            self.first = slot
        self.pending.append(array)
        if len(self.pending) * self.item >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            data = np.ascontiguousarray(np.stack(self.pending), dtype=np.uint8)
            os.pwrite(self.handle.fileno(), data.data, self.offset + self.first * self.item)
            self.pending = []

    def close(self) -> None:
        self._flush()
        os.fsync(self.handle.fileno())  # on disk before the ids file says the shard is complete
        self.handle.close()


def _write_ids(dataset: Dataset, token: str, capacity: int, ids: list[str]) -> None:
    slots = np.full(capacity, "", dtype="<U64")
    slots[: len(ids)] = ids
    _, ids_path = dataset.cache_paths(token)
    with atomic_path(ids_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, slots, allow_pickle=False)


def _compact(dataset: Dataset, cache: ImageCache, live: set[str]) -> str:
    """Copy the live images of `cache` into one new shard, a bounded batch at a time; return its token."""
    index = cache.index()
    ids = [image_id for image_id in index if image_id in live]
    token = uuid.uuid4().hex[:12]
    images = _NpyWriter(dataset.cache_paths(token)[0], (len(ids), *cache.images.image_shape))
    step = max(1, (64 << 20) // max(1, int(np.prod(cache.images.image_shape))))  # about 64 MB read at a time
    for start in range(0, len(ids), step):
        for slot, image in enumerate(cache.images.read([index[i] for i in ids[start : start + step]]), start):
            images.write(slot, image)
    images.close()
    _write_ids(dataset, token, len(ids), ids)
    return token


def _outcome_frame(outcomes: list[DecodeOutcome]) -> pd.DataFrame:
    """A part's outcomes, one row per file."""
    return pd.DataFrame(
        [
            (o.path, o.image_id, o.width, o.height, o.format, o.status, o.reason, o.kind and o.kind.value)
            for o in outcomes
        ],
        columns=["path", *_RESULT_COLUMNS],
    )


_RESULT_COLUMNS = ["image_id", "width", "height", "format", "status", "reason", "reject_kind"]


def _decoded_frame(files: pd.DataFrame, reused: pd.DataFrame, fresh: pd.DataFrame) -> pd.DataFrame:
    """One row per scanned file with the decode results, in scan order."""
    results = pd.concat([reused[["path", *_RESULT_COLUMNS]], fresh], ignore_index=True)
    frame = files.rename(columns={"split": "preset"}).merge(results, on="path", how="left")
    return frame.astype({"width": "int64", "height": "int64"})


# --- stage 3: split --------------------------------------------------------------------------


def stage_split(dataset_dir: Path, options: IngestOptions, pseudonym_key: bytes | None = None) -> Path:
    """Assign train/val/test; write staging/manifest.parquet. Raise UserError for unusable data. With a key,
    DICOM files without a group get one from `options.group_tag`, stored as its keyed pseudonym only."""
    dataset, staging = Dataset(dataset_dir), staging_dir(dataset_dir)
    frame = pd.read_parquet(staging / "decoded.parquet")
    if options.group_tag and pseudonym_key:
        frame = _dicom_groups(frame, options.group_tag, pseudonym_key)
    scan = ScanRecord.load(dataset_dir)
    ok = frame.index.isin(usable_rows(frame).index)
    if not ok.any():
        reasons = frame["reason"].value_counts().head(3)
        detail = "; ".join(f"{n} x {r}" for r, n in reasons.items())
        raise UserError(f"{scan.source} holds no usable image ({len(frame)} files rejected: {detail})")
    classes = sorted(frame.loc[ok, "label"].unique())
    bad = [c for c in classes if not CLASS_NAME.match(c)]
    if bad:  # class names become column names (prob_<class>) in every prediction table
        raise UserError(
            f"{scan.source}: class name(s) {', '.join(map(repr, bad))} cannot be used; use {CLASS_NAME_RULE}"
        )
    if len(classes) < 2:
        raise UserError(f"{scan.source} has {len(classes)} class ({', '.join(classes)}); at least two are needed")

    rows = frame.loc[ok, ["path", "image_id", "label", "group", "preset"]].copy()
    rows["fixed"], rows["allowed"] = _fixed_and_allowed(rows, dataset, options, scan.layout)
    splits, moved = assign_splits(rows, options.fractions(), options.seed)
    frame["split"] = None
    frame.loc[ok, "split"] = splits.to_numpy()
    manifest = frame[MANIFEST_COLUMNS]
    manifest.to_parquet(staging / "manifest.parquet", index=False)
    SplitRecord(moved).save(dataset_dir)
    return staging / "manifest.parquet"


def _dicom_groups(frame: pd.DataFrame, tag: str, key: bytes) -> pd.DataFrame:
    """Fill the group of DICOM rows that have none with the pseudonym of their `tag` (read from the header)."""
    todo = frame["group"].isna() & (frame["format"] == "DICOM") & (frame["status"] == "ok")
    values = {path: dicom_tag(path, tag) for path in frame.loc[todo, "path"]}
    groups = frame["group"].astype(object).copy()
    for index, path in frame.loc[todo, "path"].items():
        value = values[path]
        if value is not None:
            groups[index] = pseudonym(value, key)
    return frame.assign(group=groups)


def _fixed_and_allowed(
    rows: pd.DataFrame, dataset: Dataset, options: IngestOptions, layout: str
) -> tuple[list[str | None], list[tuple[str, ...]]]:
    """Which rows keep a split (given by the source, or drawn by an earlier ingest) and where the rest may go."""
    previous: dict[str, str] = {}
    if dataset.exists():
        meta = dataset.meta()
        if meta.split_key() == (options.seed, options.val_fraction, options.test_fraction, options.group_column):
            old = dataset.usable()
            previous = dict(zip(old["path"], old["split"]))
    carve_val = layout == "split-folders" and "val" not in set(rows["preset"].dropna())
    fixed: list[str | None] = []
    allowed: list[tuple[str, ...]] = []
    for path, preset in zip(rows["path"], rows["preset"]):
        if isinstance(preset, str) and not (carve_val and preset == "train"):
            fixed.append(preset)
            allowed.append((preset,))
            continue
        fixed.append(previous.get(path))
        allowed.append(("train", "val") if preset == "train" else SPLITS)
    return fixed, allowed


# --- stage 4: commit -------------------------------------------------------------------------


def commit_dataset(dataset_dir: Path, options: IngestOptions) -> Path:
    """Publish the staged manifest and cache as a new generation (see cnn.data.dataset), then drop the earlier ones
    (a run that already opened them keeps reading: open and memory-mapped files outlive their names)."""
    dataset, staging = Dataset(dataset_dir), staging_dir(dataset_dir)
    scan, shards = ScanRecord.load(dataset_dir), DecodeRecord.load(dataset_dir).cache_shards
    manifest = pd.read_parquet(staging / "manifest.parquet")
    classes = sorted(usable_rows(manifest)["label"].unique())
    meta = DatasetMeta(
        name=dataset.name,
        source=scan.source,
        layout=scan.layout,
        image_size=options.image_size,
        channels=options.channels,
        resize=options.resize,
        seed=options.seed,
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
        group_column=options.group_column,
        classes=classes,
        cache_shards=shards,
        updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        max_file_bytes=options.max_file_bytes,
    )
    generation = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    folder = dataset.root / GENERATIONS / generation
    folder.mkdir(parents=True)
    manifest.to_parquet(folder / "manifest.parquet", index=False)
    write_json_atomic(folder / "dataset.json", meta.__dict__)
    dataset.publish(generation)  # the commit point
    _drop_unused(dataset, keep=folder)
    return dataset.manifest_path


def _drop_unused(dataset: Dataset, keep: Path) -> None:
    """Remove other generations, cache files the kept one does not use, and the earlier layout's files."""
    used = {path.name for token in Dataset.meta_of(keep).cache_shards for path in dataset.cache_paths(token)}
    for folder in (dataset.root / GENERATIONS).iterdir():
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
    for name in ("manifest.parquet", "dataset.json"):  # the layout before generations
        (dataset.root / name).unlink(missing_ok=True)
    for stale in dataset.cache_dir.glob("*"):
        if stale.name not in used:
            stale.unlink(missing_ok=True)


def staged_stats(dataset_dir: Path) -> IngestStats:
    """Counters the stages recorded (files, decoded, reused, moved, skipped, layout)."""
    stats: dict[str, object] = {}
    for record in (ScanRecord, DecodeRecord, SplitRecord):
        if (staging_dir(dataset_dir) / record.file).is_file():
            stats.update(asdict(record.load(dataset_dir)))
    return IngestStats.from_dict(stats)


def clear_staging(dataset_dir: Path) -> None:
    shutil.rmtree(staging_dir(dataset_dir), ignore_errors=True)


def ingest(
    source: str | Path,
    dataset_dir: Path,
    options: IngestOptions | None = None,
    progress: ProgressFn | None = None,
    pseudonym_key: bytes | None = None,
) -> Path:
    """Run every stage in this process (the library path, without an orchestrator), report included."""
    options = options or IngestOptions()
    with ingest_lock(dataset_dir):
        stage_scan(source, dataset_dir, options)
        stage_decode(dataset_dir, options, progress)
        stage_split(dataset_dir, options, pseudonym_key)
        manifest = commit_dataset(dataset_dir, options)
        save_report(build_report(Path(dataset_dir), staged_stats(Path(dataset_dir))), Path(dataset_dir))
    return manifest

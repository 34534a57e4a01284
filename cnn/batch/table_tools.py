"""What `cnn tables` does to a folder (or prefix) of Delta prediction tables: compact the per-shard files, remove
what no version needs any more, export the current rows as a plain file, and convert tables written by earlier
versions (a Parquet or CSV file with its side files, a partitioned Parquet folder) into Delta tables once."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
from deltalake import DeltaTable

from cnn.batch.delta_sink import DELTA_TABLES, DeltaKind, DeltaSink, read_tables
from cnn.batch.tables import (
    EMBEDDING,
    KEY,
    REVIEW_COLUMN,
    read_csv_table,
    row_keys,
    side_table,
    with_paths,
    write_csv,
)
from cnn.choices import DELTA_EXPORTS, PARTITION_COLUMNS
from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.io import storage
from cnn.limits import VACUUM_RETAIN_HOURS


@dataclass(frozen=True)
class Maintained:
    """One table's files before and after `optimize` or `vacuum`."""

    table: str
    files_before: int
    files_after: int
    removed: int = 0  # files deleted from storage (vacuum)


def _tables(root: str) -> list[tuple[DeltaKind, DeltaTable]]:
    """The Delta tables under `root` that exist (a UserError where none does)."""
    sink = DeltaSink(root)
    found = [(kind, table) for kind in DELTA_TABLES if (table := sink.table(kind)) is not None]
    if not found:
        raise UserError(f"{storage.redact(root)} holds no Delta prediction tables (none of {', '.join(DELTA_TABLES)})")
    return found


def optimize(root: str) -> list[Maintained]:
    """Compact each table's small files (one per shard and partition) into large ones, then write a checkpoint, so
    readers open a few files and read the log from the checkpoint on."""
    done = []
    for kind, table in _tables(root):
        before = len(table.file_uris())
        table.optimize.compact()
        table.create_checkpoint()
        done.append(Maintained(kind, before, len(table.file_uris())))
    return done


def vacuum(root: str, retain_hours: int = VACUUM_RETAIN_HOURS) -> list[Maintained]:
    """Delete the files no version younger than `retain_hours` needs (those optimize replaced, those of commits
    that never happened: a writer killed mid-commit), and the log entries past the log's retention."""
    if retain_hours < VACUUM_RETAIN_HOURS:
        raise UserError(
            f"--retain-hours {retain_hours} is below {VACUUM_RETAIN_HOURS}: a run still writing could lose files "
            "it has not committed yet, and time travel would end there"
        )
    done = []
    for kind, table in _tables(root):
        files = len(table.file_uris())
        removed = table.vacuum(retention_hours=retain_hours, dry_run=False, enforce_retention_duration=True)
        table.cleanup_metadata()
        done.append(Maintained(kind, files, files, len(removed)))
    return done


def export(
    root: str, out: Path, as_of: datetime | None = None, history: bool = False, kind: str = "predictions"
) -> int:
    """Write one table or view (`read_tables`) as one Parquet or CSV file, as of `as_of`; the rows written.
    Predictions and rejects: the current rows (with `history`, every row, `superseded_at` set where a newer row
    replaced it); the review queue: its current rows, most urgent first, ready for a reviewer's `reviewed_label` and
    `cnn ingest`. Its cost is a read of the whole table."""
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise UserError(f"export writes a .parquet or .csv file, not {out.name}")
    if kind not in DELTA_EXPORTS:
        raise UserError(f"no table {kind!r}: name one of {', '.join(DELTA_EXPORTS)}")
    rows = read_tables(DeltaSink(root), as_of, current=True)[kind]
    if kind in ("predictions", "rejects") and not history and len(rows):
        rows = rows.loc[rows["superseded_at"].isna()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".csv":
            write_csv(rows, tmp)
        else:
            rows.to_parquet(tmp, index=False)
    return len(rows)


def migrate(old: str, root: str) -> dict[str, int]:
    """Read a table an earlier version wrote (X.parquet|csv and its side files, on disk or in a store, with any parts
    it had not merged; or a partitioned folder) and append it to the Delta tables at `root` (the embeddings joined to
    their predictions, the review queue's answered rows as reviewers' answers), each table in one commit whose
    identifier is the old table's location: migrating twice writes nothing the second time. Rows per table."""
    found = _read_old(old)
    if found["predictions"].empty and found["rejects"].empty:
        raise UserError(f"{storage.redact(old)}: no prediction table there to migrate")
    sink = DeltaSink(root)
    app = f"cnn-migrate/{hashlib.sha256(old.encode()).hexdigest()[:16]}"
    written: dict[str, int] = {}
    for kind, frame in found.items():
        if len(frame):
            sink.commit_migrated(kind, frame, app)
            written[kind] = len(frame)
    return written


def _read_old(old: str) -> dict[DeltaKind, pd.DataFrame]:
    """The tables of an earlier version's output, newest row per key (parts not merged yet included)."""
    target = storage.local_path(old).rstrip("/")
    if target.lower().endswith((".parquet", ".csv")):
        predictions = _concat([_read_file(target), *_parts(f"{target}.parts", "pred")])
        rejects = _concat([_read_file(side_table(target, "rejects")), *_parts(f"{target}.parts", "rej")])
        embeddings = _concat([_read_file(side_table(target, "embeddings")), *_parts(f"{target}.parts", "emb")])
        review, drift = _read_file(side_table(target, "review")), _read_file(side_table(target, "drift"))
    else:
        predictions = _read_partitioned(target)
        rejects = _concat(_parts(storage.join(target, "_rejects"), ""))
        embeddings = _concat(_parts(storage.join(target, "_embeddings"), ""))
        review = _read_file(side_table(target, "review", "partitioned"))
        drift = _read_file(side_table(target, "drift", "partitioned"))
    predictions = _newest_per_key(predictions)
    embeddings = _newest_per_key(with_paths(embeddings, predictions))
    if len(embeddings) and len(predictions):
        vectors = embeddings.set_index(row_keys(embeddings, KEY))[EMBEDDING]
        predictions[EMBEDDING] = row_keys(predictions, KEY).map(vectors).to_numpy()
    answered = pd.DataFrame()
    if REVIEW_COLUMN in review.columns:
        answered = review[review[REVIEW_COLUMN].fillna("").astype(str).str.strip() != ""]
        answered = answered.drop(columns=[c for c in answered.columns if c.startswith("prob_")])
    return {"predictions": predictions, "rejects": rejects, "reviews": answered, "drift": drift}


def _newest_per_key(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame.sort_values("scored_at", kind="stable").drop_duplicates(KEY, keep="last").reset_index(drop=True)


def _read_file(url: str) -> pd.DataFrame:
    try:
        data = storage.read_object(url)
    except FileNotFoundError:
        return pd.DataFrame()
    if not data:
        return pd.DataFrame()
    if url.lower().endswith(".csv"):
        return _typed(read_csv_table(io.BytesIO(data)))
    return pd.read_parquet(io.BytesIO(data))


def _parts(folder: str, kind: str) -> list[pd.DataFrame]:
    suffix = f".{kind}.parquet" if kind else ".parquet"
    try:
        urls = [u for u in storage.list_prefix(folder) if u.endswith(suffix)]
    except FileNotFoundError:
        return []
    return [_read_file(u) for u in urls]


def _read_partitioned(root: str) -> pd.DataFrame:
    """A Hive-partitioned Parquet folder (the partition values typed as text, as they were written)."""
    if storage.is_url(root):
        fs, path = storage.filesystem(root)
    else:
        fs, path = None, root
        if not Path(root).is_dir():
            return pd.DataFrame()
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])
    frame = dataset.to_table().to_pandas()
    for column in PARTITION_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype(str)
    return frame.drop(columns="date", errors="ignore")


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


_NUMBERS = ("confidence", "urgency", "neighbour_agreement")


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV table's columns typed as a Parquet one types them (numbers, flags), so the Delta table has one type."""
    for column in frame.columns:
        if column in _NUMBERS or column.startswith("prob_"):
            frame[column] = pd.to_numeric(frame[column].replace("", None), errors="coerce")
    if "needs_review" in frame.columns:
        frame["needs_review"] = frame["needs_review"].astype(str).str.lower().isin(["true", "1"])
    if "attempts" in frame.columns:
        frame["attempts"] = pd.to_numeric(frame["attempts"], errors="coerce").fillna(1).astype(int)
    return frame

"""Prediction tables as Delta Lake tables (delta-rs): `--output FOLDER` or `--output s3://bucket/prefix` holds

  T/predictions/   one row per prediction, with its embedding (float16 bytes), appended shard by shard
                   (Hive-partitioned by --partition-by)
  T/rejects/       one row per file that could not be scored
  T/reviews/       reviewers' answers (`reviewed_label` by image bytes and version), appended; none are written by
                   scoring
  T/drift/         one row per drift statistic and run

each a Delta table that pandas, Polars, DuckDB and Spark read (docs/operations/delta-tables.md). The review queue,
the reused photos and the embeddings are views of the predictions (`read_tables`), never tables of their own: a
shard's rows are then in two commits that never overlap (its rejects, then its predictions), so no kill between
commits can leave a row written twice or a prediction without its embedding.

Exactly once without a lock or a manifest of ours: each commit of a shard carries a transaction identifier
(app id `cnn-score/<plan key>/<shard>`, Delta's idempotent-write `txn` action). A retried shard (a Prefect retry, a
worker lost after its commit) finds its identifier in the table's log and writes nothing; two writers of one shard
race in the log and the loser's commit fails as a concurrent transaction (it then finds the winner's identifier).
Runs that write the same table at once simply append: delta-rs settles the commit order (a conditional PUT on S3,
an exclusive create on disk). A shard killed after its rejects' commit and before its predictions' leaves those
rejects: the next run's plan counts their paths as done (or retries the transient ones) and scores only the rest.

Rows are never rewritten. The current row of a path (per model) is its newest across predictions and rejects, derived
at read time (`read_tables(..., current=True)` sets `superseded_at` as the file tables keep it); "what did we say on
date X" is the same read as of X (Delta time travel). `cnn tables optimize|vacuum` compacts the small per-shard files
and removes unreferenced ones; planning reads only the rows of the paths it lists (pruned by the files' statistics).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from cnn import choices
from cnn.batch.tables import (
    ANSWER_KEY,
    CURRENT_COLUMNS,
    EMBEDDING,
    KEY,
    REVIEWER_COLUMNS,
    as_time,
    duplicates,
    latest_per_path,
    mark_superseded,
    review_queue,
    row_keys,
)
from cnn.choices import PARTITION_COLUMNS
from cnn.errors import UserError
from cnn.frames import among
from cnn.io import storage

DeltaKind = Literal["predictions", "rejects", "reviews", "drift"]  # cnn.choices.DELTA_TABLES
DELTA_TABLES: tuple[DeltaKind, ...] = choices.DELTA_TABLES  # type: ignore[assignment]  # the same names, typed
# what a table keeps of its commits' transaction identifiers (one per shard) and of removed files, for time travel
TABLE_PROPERTIES = {
    "delta.setTransactionRetentionDuration": "interval 30 days",
    "delta.deletedFileRetentionDuration": "interval 7 days",
    "delta.logRetentionDuration": "interval 30 days",
}
_DERIVED = ("superseded_at",)  # kept by the file tables; derived at read time here


class DeltaSink:
    """The prediction tables as Delta tables under one folder or prefix (see the module's note)."""

    def __init__(self, root: str, partition_by: Sequence[str] = ()) -> None:
        root = storage.local_path(root)  # file:///x is the folder /x, for every caller (CLI, flows, library)
        unknown = [c for c in partition_by if c not in PARTITION_COLUMNS]
        if unknown:
            raise UserError(f"cannot partition by {', '.join(unknown)}: use some of {', '.join(PARTITION_COLUMNS)}")
        if root.lower().endswith((".parquet", ".csv")):
            raise UserError(
                f"{storage.redact(root)}: Delta tables live in a folder or prefix; name one without .parquet/.csv"
            )
        if storage.is_url(root):
            storage.filesystem(root)  # an unknown scheme, a credential in the URL or a missing extra is refused now
        self.root = root.rstrip("/")
        self.partition_by = list(partition_by)
        self.options = storage.delta_options(root)

    def uri(self, kind: DeltaKind) -> str:
        """Where the table `kind` lives."""
        return storage.join(self.root, kind)

    def table(self, kind: DeltaKind, as_of: datetime | None = None) -> DeltaTable | None:
        """The table `kind` (as it was at `as_of`), or None where nothing was written yet."""
        try:
            found = DeltaTable(self.uri(kind), storage_options=self.options or None)
        except TableNotFoundError:
            return None
        if as_of is not None:
            try:
                found.load_as_version(as_of)
            except Exception as exc:  # noqa: BLE001 - delta-rs raises a plain exception for a time before the table
                raise UserError(f"{kind} has no version as of {as_of.isoformat()}: {exc}") from None
        return found

    # --- reading ---------------------------------------------------------------------------

    def current(self, model_name: str, paths: Sequence[str] | None = None) -> pd.DataFrame:
        """The current row of each path this model name scored (of `paths` only, where given: what planning needs,
        read with the files' statistics pruning the rest)."""
        wanted = pc.field("model_name") == model_name
        if paths is not None and len(paths):
            # the range lets the files' min/max statistics leave out whole files; isin alone cannot
            listed = pa.array(list(paths), pa.string())
            low, high = pc.min_max(listed).values()
            wanted = wanted & (pc.field("path") >= low) & (pc.field("path") <= high) & pc.field("path").isin(listed)
        elif paths is not None:
            wanted = wanted & pc.scalar(False)
        columns = ["model_name", *CURRENT_COLUMNS]
        frames = [self._read(kind, columns, wanted) for kind in ("predictions", "rejects")]
        return latest_per_path(*frames)[CURRENT_COLUMNS]  # only this model's rows were read

    def _read(self, kind: DeltaKind, columns: list[str], wanted: pc.Expression | None) -> pd.DataFrame:
        found = self.table(kind)
        if found is None:
            return pd.DataFrame(columns=columns)
        dataset = found.to_pyarrow_dataset()
        names = set(dataset.schema.names)
        return dataset.to_table(columns=[c for c in columns if c in names], filter=wanted).to_pandas()

    # --- writing ---------------------------------------------------------------------------

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame, run_key: str = "") -> None:
        """Append one shard's rejects, then its predictions (with their embeddings), each in one commit carrying the
        shard's transaction identifier; a table that holds the identifier already is not written again."""
        app_id = f"cnn-score/{run_key or uuid.uuid4().hex}/{shard}"
        for kind, frame in (("rejects", rejects), ("predictions", _as_bytes(predictions))):
            if len(frame):
                self._append(kind, frame, app_id)  # type: ignore[arg-type]

    def record_drift(self, rows: pd.DataFrame) -> None:
        """A run's drift statistics, once per flow run (a retried check writes nothing again)."""
        run = str(rows["flow_run_id"].iloc[0]) if len(rows) and "flow_run_id" in rows else ""
        if len(rows):
            self._append("drift", rows, f"cnn-drift/{run or uuid.uuid4().hex}")

    def commit_migrated(self, kind: DeltaKind, frame: pd.DataFrame, app_id: str) -> None:
        """Append a table an earlier version wrote, once (`cnn tables migrate`)."""
        self._append(kind, _as_bytes(frame), app_id)

    def review_rows(self) -> pd.DataFrame:
        """The current review queue: the predictions flagged for review (read with a filter) that no newer row of
        their path replaced, most urgent first, with the newest answer from `reviews` for each."""
        found = self.table("predictions")
        if found is None:
            return pd.DataFrame()
        dataset = found.to_pyarrow_dataset()
        columns = [c for c in dataset.schema.names if c != EMBEDDING]
        flagged = dataset.to_table(columns=columns, filter=pc.field("needs_review") == True).to_pandas()  # noqa: E712
        if flagged.empty:
            return review_queue(flagged, pd.DataFrame())
        stamps = ["model_name", "path", "scored_at"]
        scored = pd.concat([self._read(kind, stamps, None) for kind in ("predictions", "rejects")])
        scored["scored_at"] = as_time(scored["scored_at"])
        newest = scored.groupby(row_keys(scored, ["model_name", "path"]))["scored_at"].max()
        latest = row_keys(flagged, ["model_name", "path"]).map(newest)
        live = flagged.loc[(as_time(flagged["scored_at"]) >= latest).to_numpy()]
        reviews = self.table("reviews")
        answered = reviews.to_pyarrow_table().to_pandas() if reviews is not None else pd.DataFrame()
        return review_queue(live, _newest(answered))

    def record_reviews(self, answers: pd.DataFrame) -> int:
        """Append the answers to rows of the queue to `reviews` in one commit, named by their content (the same
        answers twice are written once); the view takes the newest answer of each prediction."""
        queue = self.review_rows()
        if answers.empty or queue.empty:
            return 0
        frame = answers[[*ANSWER_KEY, *REVIEWER_COLUMNS]].astype({"model_version": str})
        held = among(row_keys(frame, ANSWER_KEY), row_keys(queue, ANSWER_KEY))
        frame = frame.loc[held]  # answers to rows it holds
        if frame.empty:
            return 0
        frame = frame.assign(reviewed_at=pd.to_datetime(frame["reviewed_at"], utc=True))
        digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:24]
        self._append("reviews", frame, f"cnn-review/{digest}")
        return len(frame)

    def finish(self) -> list[str]:
        """Nothing to publish: every commit is visible when made. Where the tables live."""
        return [self.uri(kind) for kind in DELTA_TABLES if self.table(kind) is not None]

    def _append(self, kind: DeltaKind, frame: pd.DataFrame, app_id: str) -> None:
        for attempt in range(2):
            found = self.table(kind)
            if found is not None and found.transaction_version(app_id) is not None:
                return  # this shard's rows are in this table already
            data = _arrow(frame.drop(columns=list(_DERIVED), errors="ignore"), found, kind, self.partition_by)
            if found is not None:
                _check_partitioning(found, kind, self.partition_by)
            try:
                write_deltalake(
                    found if found is not None else self.uri(kind),
                    data,
                    mode="append",
                    partition_by=(self.partition_by or None) if kind == "predictions" else None,
                    schema_mode="merge",
                    configuration=TABLE_PROPERTIES if found is None else None,
                    storage_options=(self.options or None) if found is None else None,
                    commit_properties=CommitProperties(app_transactions=[Transaction(app_id, 1)]),
                )
                return
            except CommitFailedError:
                # another writer committed first: this shard's own retry (its identifier is there now: done), or
                # the first commit of a new table (appended to on the next attempt)
                if attempt:
                    raise


def _as_bytes(frame: pd.DataFrame) -> pd.DataFrame:
    """Vectors as float16 bytes (Delta has no half floats; the SQL tables keep them the same way)."""
    if EMBEDDING not in frame.columns or frame.empty:
        return frame
    vectors = [_half_bytes(v) for v in frame[EMBEDDING]]
    return frame.assign(**{EMBEDDING: vectors})


def _half_bytes(vector: object) -> bytes | None:
    """One vector as float16 bytes; None for a row without one (missing, or NaN from a join)."""
    if isinstance(vector, bytes) or vector is None:
        return vector
    if isinstance(vector, float):
        return None
    return np.asarray(vector, np.float16).tobytes()


def _arrow(frame: pd.DataFrame, found: DeltaTable | None, kind: DeltaKind, partition_by: list[str]) -> pa.Table:
    """A frame as the table keeps it: times in UTC microseconds, every column typed as the table types it (a column
    that is all empty in this shard takes the table's type, or text), a `date` column where the table is partitioned
    by the day rows were scored."""
    frame = frame.reset_index(drop=True)
    if kind == "predictions" and "date" in partition_by:
        frame = frame.assign(date=pd.to_datetime(frame["scored_at"], utc=True).dt.date)
    data = pa.Table.from_pandas(frame, preserve_index=False)
    known = pa.schema(found.schema().to_arrow()) if found is not None else pa.schema([])
    fields = []
    for field in data.schema:
        if pa.types.is_timestamp(field.type):
            wanted = pa.timestamp("us", tz="UTC")
        elif field.name in known.names:
            wanted = known.field(field.name).type
        else:
            wanted = pa.string() if pa.types.is_null(field.type) else field.type
        fields.append(pa.field(field.name, wanted))
    try:
        return data.cast(pa.schema(fields))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(f"these rows do not fit the {kind} table's columns ({exc}); write to a new table") from None


def _check_partitioning(found: DeltaTable, kind: DeltaKind, partition_by: list[str]) -> None:
    columns = list(found.metadata().partition_columns)
    if kind == "predictions" and partition_by and columns != partition_by:
        raise UserError(
            f"the predictions table is partitioned by {', '.join(columns) or 'nothing'}, not "
            f"{', '.join(partition_by)}: drop --partition-by or name the same columns"
        )


def read_tables(sink: DeltaSink, as_of: datetime | None = None, current: bool = False) -> dict[str, pd.DataFrame]:
    """Every table (as of `as_of`) as pandas frames, and the views: the predictions without their vectors,
    `embeddings` (KEY, scored_at, dim, embedding as float16 bytes), `duplicates` and the `review` queue (the predictions
    that need review, most urgent first, with what reviewers answered). With `current`, predictions and rejects carry
    `superseded_at` (when a newer row of the same path replaced the row) and the views hold current rows only."""
    tables: dict[str, pd.DataFrame] = {}
    for kind in DELTA_TABLES:
        found = sink.table(kind, as_of)
        tables[kind] = found.to_pyarrow_table().to_pandas() if found is not None else pd.DataFrame()
    predictions, embeddings = tables["predictions"], pd.DataFrame()
    if EMBEDDING in predictions.columns:
        vectors = predictions[[*KEY, "scored_at", EMBEDDING]].dropna(subset=[EMBEDDING])
        embeddings = vectors.assign(dim=vectors[EMBEDDING].map(len) // 2).reset_index(drop=True)
        predictions = predictions.drop(columns=EMBEDDING)
    tables["predictions"], tables["embeddings"] = predictions, embeddings
    live = predictions
    if current:
        mark_superseded(tables["predictions"], tables["rejects"])
        if len(live):
            live = live.loc[live["superseded_at"].isna()]
    tables["review"] = review_queue(live, _newest(tables["reviews"]))
    tables["duplicates"] = duplicates(live)
    return tables


def _newest(reviews: pd.DataFrame) -> pd.DataFrame:
    """The newest answer for each image and version (a reviewer who changes their mind writes a newer row)."""
    if reviews.empty:
        return reviews
    order = "reviewed_at" if "reviewed_at" in reviews.columns else "scored_at"
    key = KEY if "path" in reviews.columns else ANSWER_KEY  # rows migrated from a review file keep their path
    return reviews.sort_values(order, kind="stable").drop_duplicates(key, keep="last")

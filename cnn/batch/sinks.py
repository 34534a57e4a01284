"""Prediction tables: Parquet or CSV files (atomic) and SQL tables (upsert), each with a rejects twin.

A shard is committed on its own: a file sink writes one part file per shard atomically and merges the
parts into the output at the end; a SQL sink writes each shard in one transaction. A run killed at any
moment and run again therefore ends with every input exactly once, as a prediction or as a reject.

History: a path has one *current* row per model name, across both tables (`superseded_at` empty). When
a path is scored again (its bytes changed, a transient reject was retried, `--rescore` with another
version) the new row becomes current and the earlier one is kept, with `superseded_at` set to the time
the new row was scored. Prediction rows are unique per (image_id, model, version), rejects per (path,
model, version).

Embeddings (the model's description of each image, `--embeddings`) go to a side table keyed like the predictions:
`X.embeddings.parquet` (float16 lists; also beside a CSV output) or `<table>_embeddings` (float16 bytes), written
in the same commit as the shard's predictions.

Review queue: the predictions that need review also go to `X.review.parquet|csv` (rebuilt at each publish from
the current predictions, most urgent first) or `<table>_review` (upserted with each shard). A reviewer fills
`reviewed_label`; a run keeps what is there (and any column a reviewer added to a review file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.io.storage import is_url, local_path

if TYPE_CHECKING:
    from sqlalchemy import URL, Connection
    from sqlalchemy.types import TypeEngine

KEY = ["image_id", "model_name", "model_version"]
REVIEW_COLUMN = "reviewed_label"  # the review table's column a reviewer fills in; a run never overwrites it
DRIFT_KEY = ["flow_run_id", "name"]
EMBEDDING = "embedding"  # a prediction frame's column of float16 vectors, kept in the embeddings side table


def split_embeddings(predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions without the vectors, the side table's rows: KEY, dim, embedding float16)."""
    if EMBEDDING not in predictions.columns:
        return predictions, pd.DataFrame()
    side = predictions[[*KEY, "scored_at", EMBEDDING]].copy()
    side.insert(3, "dim", [len(v) for v in side[EMBEDDING]])
    return predictions.drop(columns=EMBEDDING), side


REJECT_KEY = ["path", "model_name", "model_version"]
VERSION_COLUMN = "source_version"  # an object's version id or ETag when it was scored ("" for a local file)
CURRENT_COLUMNS = ["path", "image_id", "model_version", "reject_kind", "attempts", "scored_at", VERSION_COLUMN]
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TIMES = ("scored_at", "superseded_at")
_HISTORY = ("reject_kind", "attempts", "superseded_at")  # columns a table written by an earlier version may lack


class Sink(Protocol):
    """Where predictions and rejects go."""

    def current(self, model_name: str) -> pd.DataFrame:
        """The current row of each path this model name scored (CURRENT_COLUMNS; reject_kind "" = predicted)."""

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        """Make one shard's rows durable, exactly once."""

    def finish(self) -> list[str]:
        """Publish; return where the tables live."""

    def record_drift(self, rows: pd.DataFrame) -> None:
        """Keep a run's drift statistics (one row per statistic, unique per flow run and statistic)."""


def open_sink(
    output: str | None, table: str | None, default_table: str, partition_by: list[str] | None = None
) -> list[Sink]:
    """The sinks named by --output and --table; the default SQL table when neither is given. An --output URL
    (`s3://bucket/preds/night.parquet`) is a table in an object store, and `partition_by` makes --output a
    partitioned Parquet table (cnn/object_sink.py)."""
    sinks: list[Sink] = []
    if partition_by and not output:
        raise UserError("--partition-by needs an --output folder or prefix to write the partitioned table to")
    if output and partition_by:
        from cnn.batch.object_sink import PartitionedSink

        target = local_path(output)
        sinks.append(
            PartitionedSink(target if is_url(target) else str(Path(target).expanduser().resolve()), partition_by)
        )
    elif output and is_url(local_path(output)):
        from cnn.batch.object_sink import ObjectSink

        sinks.append(ObjectSink(local_path(output)))
    elif output:
        sinks.append(FileSink(Path(local_path(output))))
    if table or not output:
        sinks.append(SqlSink.from_url(table or default_table))
    return sinks


def _frame_key(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The columns' values as one string per row (joined column by column: a row-wise join is ten times slower)."""
    text = frame[columns].astype(str).fillna("")
    key = text[columns[0]]
    for column in columns[1:]:
        key = key + "\x1f" + text[column]
    return key


def _as_time(values: pd.Series) -> pd.Series:
    """UTC timestamps from a typed column or from CSV text ("" = none)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
    return pd.to_datetime(values.replace("", None), utc=True, format="ISO8601")


def _column(frame: pd.DataFrame, name: str, default: object) -> pd.Series:
    """A column, with `default` for rows (or tables, written before it existed) without a value."""
    if name not in frame.columns:
        return pd.Series(default, index=frame.index)
    return frame[name].replace("", None).fillna(default)


def read_csv_table(source: Path | IO[bytes]) -> pd.DataFrame:
    """A prediction table from CSV: every column as text (a claim number 007123 stays 007123, and nothing is
    re-parsed between runs) except the times, which the history is computed from."""
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # an earlier run with nothing to write left an empty file
        return pd.DataFrame()
    for column in _TIMES:
        if column in frame.columns:
            frame[column] = _as_time(frame[column])
    return frame


def _latest_per_path(predictions: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """CURRENT_COLUMNS for the newest row of each (model, path) across both tables."""
    frames = []
    for frame, is_reject in ((predictions, False), (rejects, True)):
        if frame.empty:
            continue
        rows = pd.DataFrame(
            {
                "model_name": frame["model_name"].astype(str),
                "path": frame["path"].astype(str),
                "image_id": frame["image_id"].fillna("").astype(str),
                "model_version": frame["model_version"].astype(str),
                "reject_kind": _column(frame, "reject_kind", "corrupt").astype(str) if is_reject else "",
                "attempts": pd.to_numeric(_column(frame, "attempts", 1), errors="coerce") if is_reject else 0,
                "scored_at": _as_time(frame["scored_at"]),
                VERSION_COLUMN: _column(frame, VERSION_COLUMN, "").astype(str),
            }
        )
        if "superseded_at" in frame.columns:
            rows = rows[_as_time(frame["superseded_at"]).isna().to_numpy()]
        frames.append(rows)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ["model_name", *CURRENT_COLUMNS]})
    rows = pd.concat(frames, ignore_index=True).sort_values("scored_at", kind="stable")
    rows["attempts"] = rows["attempts"].fillna(1).astype(int)
    return rows.drop_duplicates(["model_name", "path"], keep="last").reset_index(drop=True)


class FileSink:
    """`X.parquet` or `X.csv` plus `X.rejects.parquet|csv`; shard parts wait in `X.parts/`."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"--output must end in .parquet or .csv, not {path.name}")
        self.path = path.expanduser().resolve()
        self.rejects_path = self.path.with_name(f"{self.path.stem}.rejects{suffix}")
        self.review_path = self.path.with_name(f"{self.path.stem}.review{suffix}")
        self.duplicates_path = self.path.with_name(f"{self.path.stem}.duplicates{suffix}")
        self.embeddings_path = self.path.with_name(f"{self.path.stem}.embeddings.parquet")
        self.drift_path = self.path.with_name(f"{self.path.stem}.drift{suffix}")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.csv = suffix == ".csv"

    def _read(self, path: Path) -> pd.DataFrame:
        if not path.is_file() or path.stat().st_size == 0:
            return pd.DataFrame()
        if not self.csv:
            return pd.read_parquet(path)
        return read_csv_table(path)

    def _read_review(self) -> pd.DataFrame:
        return self._read(self.review_path)

    def _parts(self, kind: str) -> list[Path]:
        return sorted(self.parts.glob(f"*.{kind}.parquet")) if self.parts.is_dir() else []

    def _all(self, kind: str) -> pd.DataFrame:
        if kind == "emb":
            stored = pd.read_parquet(self.embeddings_path) if self.embeddings_path.is_file() else pd.DataFrame()
            frames = [stored]
        else:
            frames = [self._read(self.path if kind == "pred" else self.rejects_path)]
        frames += [pd.read_parquet(p) for p in self._parts(kind)]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def current(self, model_name: str) -> pd.DataFrame:
        with self._lock():  # a consistent view: no merge removes parts while they are read
            latest = _latest_per_path(self._all("pred"), self._all("rej"))
        return latest.loc[latest["model_name"] == model_name, CURRENT_COLUMNS].reset_index(drop=True)

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        name = f"shard-{shard:06d}-{uuid.uuid4().hex[:12]}"  # unique across runs writing the same output
        predictions, embeddings = split_embeddings(predictions)
        with self._lock():  # never between another run's merge and its removal of the parts it merged
            self.parts.mkdir(parents=True, exist_ok=True)
            # Rejects and embeddings first: a shard counts as done when its predictions part exists.
            parts = [(rejects, "rej"), (embeddings, "emb"), (predictions, "pred")]
            for frame, kind in [(f, k) for f, k in parts if k != "emb" or len(f)]:
                with atomic_path(self.parts / f"{name}.{kind}.parquet") as tmp:
                    frame.to_parquet(tmp, index=False)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock on `X.lock` beside the output: commits and merges of concurrent runs take turns."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def finish(self) -> list[str]:
        with self._lock():
            return self._merge()

    def record_drift(self, rows: pd.DataFrame) -> None:
        with self._lock():
            table = pd.concat([self._read(self.drift_path), rows], ignore_index=True)
            table = table.loc[~_frame_key(table, DRIFT_KEY).duplicated(keep="last")]
            with atomic_path(self.drift_path) as tmp:
                table.to_csv(tmp, index=False) if self.csv else table.to_parquet(tmp, index=False)

    def _merged(self) -> dict[str, pd.DataFrame]:
        """The tables as the publish writes them: what is published plus every committed part, each key once."""
        tables = {}
        for kind, key in (("pred", KEY), ("rej", REJECT_KEY), ("emb", KEY)):
            merged = self._all(kind)
            if not merged.empty:  # the newest row of a key wins (a retried reject, bytes that came back)
                merged["scored_at"] = _as_time(merged["scored_at"])
                merged = merged.sort_values("scored_at", kind="stable")
                merged = merged.loc[~_frame_key(merged, key).duplicated(keep="last")].sort_index()
            tables[kind] = merged
        _supersede(tables["pred"], tables["rej"])
        tables["review"] = review_queue(tables["pred"], self._read_review())
        tables["dup"] = duplicates(tables["pred"])
        return tables

    def _merge(self) -> list[str]:
        tables = self._merged()
        targets = [("pred", self.path), ("rej", self.rejects_path), ("review", self.review_path)]
        if len(tables["dup"]):
            targets.append(("dup", self.duplicates_path))
        if len(tables["emb"]):
            with atomic_path(self.embeddings_path) as tmp:
                tables["emb"].to_parquet(tmp, index=False)
        for kind, target in targets:
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed run's unfinished merge
                stale.unlink(missing_ok=True)
            with atomic_path(target) as tmp:
                if self.csv:
                    tables[kind].to_csv(tmp, index=False)
                else:
                    tables[kind].to_parquet(tmp, index=False)
        for part in self._parts("pred") + self._parts("rej") + self._parts("emb"):
            part.unlink()
        if self.parts.is_dir():
            # A run killed mid-write leaves its temporary part behind: an incomplete write, never a commit.
            for stale in self.parts.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            try:
                self.parts.rmdir()
            except OSError:  # something else appeared meanwhile: keep it; the next run merges it
                pass
        written = [str(self.path), str(self.rejects_path), str(self.review_path)]
        written += [str(self.duplicates_path)] if len(tables["dup"]) else []
        return written + ([str(self.embeddings_path)] if len(tables["emb"]) else [])


DUPLICATE_COLUMNS = ["image_id", "path", "duplicate_kind", "duplicate_of", "earlier_image_id", "earlier_source"]


def duplicates(predictions: pd.DataFrame) -> pd.DataFrame:
    """The current predictions that repeat an earlier image (reused photos), with the earlier image's id and where
    it was (training, scored, this run) pulled out of `duplicate_of`; carried id columns and the stamp stay."""
    if predictions.empty or "duplicate_kind" not in predictions.columns:
        return pd.DataFrame(columns=[*DUPLICATE_COLUMNS, "model_name", "model_version"])
    found = predictions.loc[predictions["duplicate_kind"].notna() & _live(predictions)]
    found = _without(found, "top_k", "review_reason", "explanation", "phash")
    earlier = [json.loads(str(v)) for v in found["duplicate_of"]]
    found["earlier_image_id"] = [e.get("image_id") for e in earlier]
    found["earlier_source"] = [e.get("source") for e in earlier]
    return found.reset_index(drop=True)


def _live(predictions: pd.DataFrame) -> pd.Series | bool:
    """Which rows are current (no later row replaced them)."""
    return _as_time(predictions["superseded_at"]).isna() if "superseded_at" in predictions else True


def _without(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """A copy without the probabilities and these columns (what a side table leaves out)."""
    drop = [c for c in frame.columns if c.startswith("prob_") or c in columns]
    return frame.drop(columns=drop)


def review_queue(predictions: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """The current predictions that need review, most urgent first, with `reviewed_label`. What a reviewer wrote
    in `earlier` (the review file as it was) stays: their labels and columns by row key, and reviewed rows whose
    prediction has been replaced since."""
    if predictions.empty or "needs_review" not in predictions.columns:
        queue = pd.DataFrame(columns=[*KEY, REVIEW_COLUMN])
    else:
        flagged = predictions["needs_review"].astype(str).str.lower().isin(["true", "1"])
        queue = _without(predictions.loc[flagged & _live(predictions)], "top_k", "flow_run_id", "run_id")
        queue[REVIEW_COLUMN] = pd.Series(None, index=queue.index, dtype=object)
    if not earlier.empty and REVIEW_COLUMN in earlier.columns:
        keyed = earlier.set_index(_frame_key(earlier, KEY))
        theirs = [c for c in earlier.columns if c not in queue.columns or c == REVIEW_COLUMN]
        index = _frame_key(queue, KEY)
        for column in theirs:
            queue[column] = index.map(keyed[column].to_dict()).where(index.isin(keyed.index), None).to_numpy()
        reviewed = earlier[earlier[REVIEW_COLUMN].fillna("").astype(str).str.strip() != ""]
        queue = pd.concat([queue, reviewed[~_frame_key(reviewed, KEY).isin(index)]], ignore_index=True)
    if "urgency" in queue.columns and len(queue):
        queue = queue.assign(_u=pd.to_numeric(queue["urgency"], errors="coerce")).sort_values(
            "_u", ascending=False, na_position="last", kind="stable"
        )
        queue = queue.drop(columns="_u")
    return queue.reset_index(drop=True)


def _supersede(predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Mark each current row that a newer row of its path (per model) follows as superseded at that row's time."""
    rows = []
    for which, frame in enumerate((predictions, rejects)):
        if frame.empty:
            continue
        if "superseded_at" not in frame.columns:
            frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
        frame["superseded_at"] = _as_time(frame["superseded_at"]).astype("datetime64[us, UTC]")
        live = frame["superseded_at"].isna()
        rows.append(
            pd.DataFrame(
                {
                    "which": which,
                    "row": frame.index[live],
                    "model_name": frame.loc[live, "model_name"].astype(str),
                    "path": frame.loc[live, "path"].astype(str),
                    "scored_at": _as_time(frame.loc[live, "scored_at"]).astype("datetime64[us, UTC]"),
                }
            )
        )
    if not rows:
        return
    chain = pd.concat(rows, ignore_index=True).sort_values("scored_at", kind="stable")
    chain["next"] = chain.groupby(["model_name", "path"])["scored_at"].shift(-1)
    for which, frame in enumerate((predictions, rejects)):
        later = chain[(chain["which"] == which) & chain["next"].notna()]
        frame.loc[later["row"].to_numpy(), "superseded_at"] = later["next"].to_numpy()


class SqlSink:
    """A SQL table and its `<table>_rejects` twin, through SQLAlchemy; upsert on the unique key.

    Each shard is one transaction. On PostgreSQL it first takes a transaction-scoped advisory lock on the table,
    so concurrent runs create and alter the tables and upsert in turn; SQLite serialises writers itself (a
    writer waits up to 30 s for the lock, then the shard's retry takes over)."""

    DIALECTS = ("postgresql", "sqlite")

    def __init__(self, url: str, table: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.exc import ArgumentError

        if not _TABLE.match(table):
            raise UserError(f"invalid table name {table!r}: use letters, digits and _, starting with a letter")
        self.url, self.table, self.rejects, self.review = url, table, f"{table}_rejects", f"{table}_review"
        self.embeddings = f"{table}_embeddings"
        self.duplicates = f"{table}_duplicates"
        try:
            parsed = parse_url(url)
        except ArgumentError:
            raise UserError(f"not a database URL: {redact(url)} (e.g. postgresql://user@host/db#table)") from None
        backend = parsed.get_backend_name()
        if backend not in self.DIALECTS:  # refused before any file is decoded
            raise UserError(f"prediction tables live in SQLite or PostgreSQL, not {backend}: {redact(url)}")
        try:
            self.engine = create_engine(parsed, connect_args={"timeout": 30} if backend == "sqlite" else {})
            if backend == "sqlite":
                _begin_immediate(self.engine)
            with self.engine.connect():
                pass
        except Exception as exc:  # noqa: BLE001 - drivers raise their own types for bad URLs and servers
            detail = str(exc).replace(parsed.password, "***") if parsed.password else str(exc)
            raise UserError(f"cannot open the table database {redact(url)}: {type(exc).__name__}: {detail}") from None
        self.quote = self.engine.dialect.identifier_preparer.quote  # identifiers are quoted by SQLAlchemy
        self._indexed: set[str] = set()

    @classmethod
    def from_url(cls, spec: str) -> SqlSink:
        """`URL#table` (table defaults to `predictions`)."""
        url, _, table = spec.partition("#")
        return cls(url, table or "predictions")

    def _columns(self, conn: Connection, name: str) -> set[str]:
        from sqlalchemy import inspect

        inspector = inspect(conn)
        return {c["name"] for c in inspector.get_columns(name)} if inspector.has_table(name) else set()

    def _ensure(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str], history: bool = True) -> None:
        """Create the table with a unique key, or add columns it lacks (new id or class columns)."""
        from sqlalchemy import (
            BigInteger,
            Boolean,
            Column,
            DateTime,
            Float,
            LargeBinary,
            MetaData,
            String,
            Table,
            Text,
            UniqueConstraint,
            text,
        )

        def column_type(series: pd.Series) -> TypeEngine[Any]:
            if series.name == EMBEDDING:
                return LargeBinary()
            if pd.api.types.is_bool_dtype(series):
                return Boolean()
            if pd.api.types.is_integer_dtype(series):
                return BigInteger()
            if pd.api.types.is_float_dtype(series):
                return Float()
            if pd.api.types.is_datetime64_any_dtype(series):
                return DateTime(timezone=True)
            return String(512) if series.name in key else Text()

        existing = self._columns(conn, name)
        if not existing:
            meta = MetaData()
            Table(
                name,
                meta,
                *[Column(c, column_type(frame[c])) for c in frame.columns],
                UniqueConstraint(*key, name=f"uq_{name}_key"),
            )
            meta.create_all(conn)
        for column in frame.columns:
            if existing and column not in existing:
                ddl = column_type(frame[column]).compile(dialect=self.engine.dialect)
                conn.execute(text(f"ALTER TABLE {self.quote(name)} ADD COLUMN {self.quote(str(column))} {ddl}"))
        if history and name not in self._indexed:  # each shard supersedes its paths' earlier rows: find them by index
            index = self.quote(f"ix_{name}_path")
            conn.execute(text(f"CREATE INDEX IF NOT EXISTS {index} ON {self.quote(name)} (model_name, path)"))
            self._indexed.add(name)

    def current(self, model_name: str) -> pd.DataFrame:
        from sqlalchemy import text

        frames = []
        with self.engine.connect() as conn:
            for name in (self.table, self.rejects):
                columns = self._columns(conn, name)
                if columns:
                    readable = (
                        "path",
                        "image_id",
                        "model_name",
                        "model_version",
                        "scored_at",
                        *_HISTORY,
                        VERSION_COLUMN,
                    )
                    wanted = [c for c in readable if c in columns]
                    where = "model_name = :m" + (" AND superseded_at IS NULL" if "superseded_at" in columns else "")
                    query = f"SELECT {', '.join(map(self.quote, wanted))} FROM {self.quote(name)} WHERE {where}"
                    frames.append(pd.read_sql_query(text(query), conn, params={"m": model_name}))
                else:
                    frames.append(pd.DataFrame())
        latest = _latest_per_path(*frames)
        return latest[CURRENT_COLUMNS]

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        predictions, embeddings = split_embeddings(predictions)
        with self.engine.begin() as conn:  # one transaction per shard: all of it or none of it
            self._lock(conn)
            if len(embeddings):  # float16 bytes: the vectors' own width, readable with numpy.frombuffer
                vectors = embeddings.assign(
                    embedding=[np.asarray(v, np.float16).tobytes() for v in embeddings[EMBEDDING]]
                )
                self._ensure(conn, self.embeddings, vectors, KEY, history=False)
                self._upsert(
                    conn, self.embeddings, vectors.assign(model_version=vectors["model_version"].astype(str)), KEY
                )
            review, copies = review_queue(predictions, pd.DataFrame()), duplicates(predictions)
            frames = [(self.table, predictions, KEY), (self.rejects, rejects, REJECT_KEY), (self.review, review, KEY)]
            frames.append((self.duplicates, copies, KEY))
            for name, frame, key in frames:
                if len(frame) or self._columns(conn, name):
                    self._ensure(conn, name, _sql_ready(frame), key)
            for name, _, _ in frames:  # rows of these paths so far give way to this shard's
                self._supersede(conn, name, predictions, rejects)
            for name, frame, key in frames:
                if len(frame):
                    self._upsert(conn, name, _sql_ready(frame), key)

    def _supersede(self, conn: Connection, name: str, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        from sqlalchemy import bindparam, text

        if not self._columns(conn, name):
            return
        rows = pd.concat([f[["model_name", "path", "scored_at"]] for f in (predictions, rejects) if len(f)])
        if rows.empty:
            return
        model, when = str(rows["model_name"].iloc[0]), rows["scored_at"].max().to_pydatetime()
        statement = text(
            f"UPDATE {self.quote(name)} SET superseded_at = :when "
            "WHERE model_name = :m AND superseded_at IS NULL AND path IN :paths"
        ).bindparams(bindparam("paths", expanding=True))
        paths = rows["path"].astype(str).unique().tolist()
        for start in range(0, len(paths), 500):
            conn.execute(statement, {"when": when, "m": model, "paths": paths[start : start + 500]})

    def _lock(self, conn: Connection) -> None:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy import text

            key = int.from_bytes(hashlib.sha256(self.table.encode()).digest()[:8], "big", signed=True)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def _upsert(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str]) -> None:
        from sqlalchemy import MetaData, Table

        table = Table(name, MetaData(), autoload_with=conn)
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]  # same API, other dialect
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        statement = insert(table).values(records)
        update = {c: statement.excluded[c] for c in frame.columns if c not in key and c != REVIEW_COLUMN}
        conn.execute(statement.on_conflict_do_update(index_elements=key, set_=update))

    def record_drift(self, rows: pd.DataFrame) -> None:
        name = f"{self.table}_drift"
        frame = rows.assign(model_version=rows["model_version"].astype(str))
        with self.engine.begin() as conn:
            self._lock(conn)
            self._ensure(conn, name, frame, DRIFT_KEY, history=False)
            self._upsert(conn, name, frame, DRIFT_KEY)

    def finish(self) -> list[str]:
        with self.engine.connect() as conn:  # the side tables exist once a run wrote to them
            extra = [n for n in (self.review, self.embeddings, self.duplicates) if self._columns(conn, n)]
        return [f"{redact(self.url)}#{name}" for name in (self.table, self.rejects, *extra)]


def _begin_immediate(engine: Any) -> None:
    """SQLite: take the write lock when a transaction begins, so concurrent writers queue on the busy timeout
    instead of failing at once when a read lock cannot be upgraded (SQLAlchemy's documented recipe)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sql_ready(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["model_version"] = out["model_version"].astype(str)
    if "superseded_at" not in out.columns:  # the sink keeps the history, whoever built the rows
        out["superseded_at"] = pd.Series(pd.NaT, index=out.index, dtype="datetime64[us, UTC]")
    return out


def parse_url(url: str) -> URL:
    """SQLAlchemy's URL of `url`, also when a password holds a raw `@` (SQLAlchemy splits at the first one and
    leaves the rest of the password in the host)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.host and "@" in parsed.host:
        extra, host = parsed.host.rsplit("@", 1)
        parsed = parsed.set(password=f"{parsed.password or ''}@{extra}", host=host)
    return parsed


def redact(url: str) -> str:
    """A database URL as SQLAlchemy renders it with the password hidden; text that is no URL is shown only when
    it cannot hold credentials."""
    from sqlalchemy.exc import ArgumentError

    try:
        return parse_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url if "@" not in url else "<a database URL that does not parse>"

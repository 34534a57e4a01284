"""Prediction tables: Parquet or CSV files (atomic) and SQL tables (upsert), each with a rejects twin.

A shard is committed on its own: a file sink writes one part file per shard atomically and merges the
parts into the output at the end; a SQL sink writes each shard in one transaction. A run killed at any
moment and run again therefore ends with every input exactly once, as a prediction or as a reject.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from cnn.errors import UserError
from cnn.fsio import atomic_path

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.types import TypeEngine

KEY = ["image_id", "model_name", "model_version"]
REJECT_KEY = ["path", "model_name", "model_version"]
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Sink(Protocol):
    """Where predictions and rejects go."""

    def scored(self, model_name: str, version: str) -> tuple[dict[str, str], set[str]]:
        """({image_id: path} predicted, paths rejected) by this model version so far."""

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        """Make one shard's rows durable, exactly once."""

    def finish(self) -> list[str]:
        """Publish; return where the tables live."""


def open_sink(output: str | None, table: str | None, default_table: str) -> list[Sink]:
    """The sinks named by --output and --table; the default SQL table when neither is given."""
    sinks: list[Sink] = []
    if output:
        sinks.append(FileSink(Path(output)))
    if table or not output:
        sinks.append(SqlSink.from_url(table or default_table))
    return sinks


def _frame_key(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    return frame[columns].astype(str).agg("\x1f".join, axis=1)


class FileSink:
    """`X.parquet` or `X.csv` plus `X.rejects.parquet|csv`; shard parts wait in `X.parts/`."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"--output must end in .parquet or .csv, not {path.name}")
        self.path = path.expanduser().resolve()
        self.rejects_path = self.path.with_name(f"{self.path.stem}.rejects{suffix}")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.csv = suffix == ".csv"

    def _read(self, path: Path) -> pd.DataFrame:
        if not path.is_file() or path.stat().st_size == 0:
            return pd.DataFrame()
        if not self.csv:
            return pd.read_parquet(path)
        try:  # every column as text: a claim number 007123 stays 007123, and nothing is re-parsed between runs
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:  # an earlier run with nothing to write left an empty file
            return pd.DataFrame()

    def _parts(self, kind: str) -> list[Path]:
        return sorted(self.parts.glob(f"*.{kind}.parquet")) if self.parts.is_dir() else []

    def _all(self, kind: str) -> pd.DataFrame:
        frames = [self._read(self.path if kind == "pred" else self.rejects_path)]
        frames += [pd.read_parquet(p) for p in self._parts(kind)]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def scored(self, model_name: str, version: str) -> tuple[dict[str, str], set[str]]:
        def mine(frame: pd.DataFrame) -> pd.DataFrame:
            if frame.empty:
                return pd.DataFrame(columns=["image_id", "path"])
            return frame[(frame["model_name"] == model_name) & (frame["model_version"].astype(str) == str(version))]

        with self._lock():  # a consistent view: no merge removes parts while they are read
            predicted, rejected = mine(self._all("pred")), mine(self._all("rej"))
        return dict(zip(predicted["image_id"], predicted["path"])), set(rejected["path"])

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        name = f"shard-{shard:06d}-{uuid.uuid4().hex[:12]}"  # unique across runs writing the same output
        with self._lock():  # never between another run's merge and its removal of the parts it merged
            self.parts.mkdir(parents=True, exist_ok=True)
            # Rejects first: a shard counts as done when its predictions part exists.
            for frame, kind in ((rejects, "rej"), (predictions, "pred")):
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

    def _merge(self) -> list[str]:
        for kind, target, key in (("pred", self.path, KEY), ("rej", self.rejects_path, REJECT_KEY)):
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed run's unfinished merge
                stale.unlink(missing_ok=True)
            merged = self._all(kind)
            if not merged.empty:
                merged = merged.loc[~_frame_key(merged, key).duplicated()]
            with atomic_path(target) as tmp:
                if self.csv:
                    merged.to_csv(tmp, index=False)
                else:
                    merged.to_parquet(tmp, index=False)
        for part in self._parts("pred") + self._parts("rej"):
            part.unlink()
        if self.parts.is_dir():
            # A run killed mid-write leaves its temporary part behind: an incomplete write, never a commit.
            for stale in self.parts.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            try:
                self.parts.rmdir()
            except OSError:  # something else appeared meanwhile: keep it; the next run merges it
                pass
        return [str(self.path), str(self.rejects_path)]


class SqlSink:
    """A SQL table and its `<table>_rejects` twin, through SQLAlchemy; upsert on the unique key.

    Each shard is one transaction. On PostgreSQL it first takes a transaction-scoped advisory lock on the table,
    so concurrent runs create and alter the tables and upsert in turn; SQLite serialises writers itself (a
    writer waits up to 30 s for the lock, then the shard's retry takes over)."""

    DIALECTS = ("postgresql", "sqlite")

    def __init__(self, url: str, table: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if not _TABLE.match(table):
            raise UserError(f"invalid table name {table!r}: use letters, digits and _, starting with a letter")
        self.url, self.table, self.rejects = url, table, f"{table}_rejects"
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            raise UserError(f"not a database URL: {redact(url)} (e.g. postgresql://user@host/db#table)") from None
        if backend not in self.DIALECTS:  # refused before any file is decoded
            raise UserError(f"prediction tables live in SQLite or PostgreSQL, not {backend}: {redact(url)}")
        try:
            self.engine = create_engine(url, connect_args={"timeout": 30} if backend == "sqlite" else {})
            with self.engine.connect():
                pass
        except Exception as exc:  # noqa: BLE001 - drivers raise their own types for bad URLs and servers
            raise UserError(f"cannot open the table database {redact(url)}: {type(exc).__name__}: {exc}") from None
        self.quote = self.engine.dialect.identifier_preparer.quote  # identifiers are quoted by SQLAlchemy

    @classmethod
    def from_url(cls, spec: str) -> SqlSink:
        """`URL#table` (table defaults to `predictions`)."""
        url, _, table = spec.partition("#")
        return cls(url, table or "predictions")

    def _columns(self, conn: Connection, name: str) -> set[str]:
        from sqlalchemy import inspect

        inspector = inspect(conn)
        return {c["name"] for c in inspector.get_columns(name)} if inspector.has_table(name) else set()

    def _ensure(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str]) -> None:
        """Create the table with a unique key, or add columns it lacks (new id or class columns)."""
        from sqlalchemy import Boolean, Column, DateTime, Float, MetaData, String, Table, Text, UniqueConstraint, text

        def column_type(series: pd.Series) -> TypeEngine[Any]:
            if pd.api.types.is_bool_dtype(series):
                return Boolean()
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
            return
        for column in frame.columns:
            if column not in existing:
                ddl = column_type(frame[column]).compile(dialect=self.engine.dialect)
                conn.execute(text(f"ALTER TABLE {self.quote(name)} ADD COLUMN {self.quote(str(column))} {ddl}"))

    def scored(self, model_name: str, version: str) -> tuple[dict[str, str], set[str]]:
        from sqlalchemy import text

        where = "WHERE model_name = :m AND model_version = :v"
        params = {"m": model_name, "v": str(version)}
        predicted: dict[str, str] = {}
        rejected: set[str] = set()
        with self.engine.connect() as conn:
            if self._columns(conn, self.table):
                query = text(f"SELECT image_id, path FROM {self.quote(self.table)} {where}")
                predicted = {str(i): str(p) for i, p in conn.execute(query, params).all()}
            if self._columns(conn, self.rejects):
                query = text(f"SELECT path FROM {self.quote(self.rejects)} {where}")
                rejected = {str(r[0]) for r in conn.execute(query, params)}
        return predicted, rejected

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        with self.engine.begin() as conn:  # one transaction per shard: all of it or none of it
            self._lock(conn)
            for name, frame, key in ((self.table, predictions, KEY), (self.rejects, rejects, REJECT_KEY)):
                if len(frame):
                    ready = _sql_ready(frame)
                    self._ensure(conn, name, ready, key)
                    self._upsert(conn, name, ready, key)

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
        update = {c: statement.excluded[c] for c in frame.columns if c not in key}
        conn.execute(statement.on_conflict_do_update(index_elements=key, set_=update))

    def finish(self) -> list[str]:
        return [f"{redact(self.url)}#{self.table}", f"{redact(self.url)}#{self.rejects}"]


def _sql_ready(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["model_version"] = out["model_version"].astype(str)
    return out


def redact(url: str) -> str:
    """Hide a password in a database URL."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)

"""Prediction tables: Parquet or CSV files (atomic) and SQL tables (upsert), each with a rejects twin.

A shard is committed on its own: a file sink writes one part file per shard atomically and merges the
parts into the output at the end; a SQL sink writes each shard in one transaction. A run killed at any
moment and run again therefore ends with every input exactly once, as a prediction or as a reject.
"""

from __future__ import annotations

import re
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
        self.csv = suffix == ".csv"

    def _read(self, path: Path) -> pd.DataFrame:
        if not path.is_file():
            return pd.DataFrame()
        return pd.read_csv(path, dtype={"model_version": str}) if self.csv else pd.read_parquet(path)

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

        predicted = mine(self._all("pred"))
        return dict(zip(predicted["image_id"], predicted["path"])), set(mine(self._all("rej"))["path"])

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        # Rejects first: a shard counts as done when its predictions part exists.
        for frame, kind in ((rejects, "rej"), (predictions, "pred")):
            with atomic_path(self.parts / f"shard-{shard:06d}-{id(frame):x}.{kind}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)

    def finish(self) -> list[str]:
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
    """A SQL table and its `<table>_rejects` twin, through SQLAlchemy; upsert on the unique key."""

    def __init__(self, url: str, table: str) -> None:
        from sqlalchemy import create_engine

        if not _TABLE.match(table):
            raise UserError(f"invalid table name {table!r}: use letters, digits and _, starting with a letter")
        self.url, self.table, self.rejects = url, table, f"{table}_rejects"
        try:
            self.engine = create_engine(url, future=True)
            with self.engine.connect():
                pass
        except Exception as exc:  # noqa: BLE001 - drivers raise their own types for bad URLs and servers
            raise UserError(f"cannot open the table database {redact(url)}: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_url(cls, spec: str) -> SqlSink:
        """`URL#table` (table defaults to `predictions`)."""
        url, _, table = spec.partition("#")
        return cls(url, table or "predictions")

    def _columns(self, name: str) -> set[str]:
        from sqlalchemy import inspect

        inspector = inspect(self.engine)
        return {c["name"] for c in inspector.get_columns(name)} if inspector.has_table(name) else set()

    def _ensure(self, name: str, frame: pd.DataFrame, key: list[str]) -> None:
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

        existing = self._columns(name)
        if not existing:
            meta = MetaData()
            Table(
                name,
                meta,
                *[Column(c, column_type(frame[c])) for c in frame.columns],
                UniqueConstraint(*key, name=f"uq_{name}_key"),
            )
            meta.create_all(self.engine)
            return
        with self.engine.begin() as conn:
            for column in frame.columns:
                if column not in existing:
                    ddl = column_type(frame[column]).compile(dialect=self.engine.dialect)
                    conn.execute(text(f'ALTER TABLE "{name}" ADD COLUMN "{column}" {ddl}'))

    def scored(self, model_name: str, version: str) -> tuple[dict[str, str], set[str]]:
        from sqlalchemy import text

        where = "WHERE model_name = :m AND model_version = :v"
        params = {"m": model_name, "v": str(version)}
        predicted: dict[str, str] = {}
        rejected: set[str] = set()
        with self.engine.connect() as conn:
            if self._columns(self.table):
                predicted = dict(conn.execute(text(f'SELECT image_id, path FROM "{self.table}" {where}'), params).all())
            if self._columns(self.rejects):
                rejected = {r[0] for r in conn.execute(text(f'SELECT path FROM "{self.rejects}" {where}'), params)}
        return predicted, rejected

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        for name, frame, key in ((self.table, predictions, KEY), (self.rejects, rejects, REJECT_KEY)):
            if len(frame):
                self._ensure(name, _sql_ready(frame), key)
        with self.engine.begin() as conn:  # one transaction per shard: all of it or none of it
            for name, frame, key in ((self.table, predictions, KEY), (self.rejects, rejects, REJECT_KEY)):
                if len(frame):
                    self._upsert(conn, name, _sql_ready(frame), key)

    def _upsert(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str]) -> None:
        from sqlalchemy import MetaData, Table

        table = Table(name, MetaData(), autoload_with=conn)
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]  # same API, other dialect
        else:
            raise UserError(f"SQL sink supports SQLite and PostgreSQL, not {dialect}")
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

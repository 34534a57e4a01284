"""A SQL prediction table and its side tables (PostgreSQL or SQLite, through SQLAlchemy): each shard upserted in
one transaction."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    URL,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import NullPool

from cnn.batch.tables import (
    ANSWER_KEY,
    CURRENT_COLUMNS,
    DRIFT_KEY,
    EMBEDDING,
    KEY,
    LATER_COLUMNS,
    REJECT_KEY,
    REVIEWER_COLUMNS,
    duplicates,
    latest_per_path,
    review_queue,
    side_table,
    split_embeddings,
)
from cnn.errors import InfrastructureError, UserError
from cnn.io import credentials as url_credentials
from cnn.io.inputs import VERSION_COLUMN
from cnn.waits import Waits

if TYPE_CHECKING:
    from sqlalchemy.types import TypeEngine

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SqlSink:
    """A SQL table and its `<table>_rejects` twin, through SQLAlchemy; upsert on the unique key.

    Each shard is one transaction. On PostgreSQL it first takes a transaction-scoped advisory lock on the table,
    so concurrent runs create and alter the tables and upsert in turn; SQLite serialises writers itself (a
    writer waits up to CNN_LOCK_TIMEOUT_S for the lock, then the shard's retry takes over)."""

    DIALECTS = ("postgresql", "sqlite")

    def __init__(self, url: str, table: str) -> None:
        if not _TABLE.match(table):
            raise UserError(f"invalid table name {table!r}: use letters, digits and _, starting with a letter")
        self.url, self.table = url, table
        waits = Waits.from_environment()
        self.rejects, self.review, self.embeddings, self.duplicates, self.drift = (
            side_table(table, kind, "sql") for kind in ("rejects", "review", "embeddings", "duplicates", "drift")
        )
        try:
            parsed = parse_url(url)
        except ArgumentError:
            raise UserError(f"not a database URL: {redact(url)} (e.g. postgresql://user@host/db#table)") from None
        backend = parsed.get_backend_name()
        if backend not in self.DIALECTS:  # refused before any file is decoded
            raise UserError(f"prediction tables live in SQLite or PostgreSQL, not {backend}: {redact(url)}")
        try:
            self.engine = _engine(url, backend, waits)
            with self.engine.connect():
                pass
        except Exception as exc:  # noqa: BLE001 - drivers raise their own types for bad URLs and servers
            detail = url_credentials.scrub(
                str(exc).replace(parsed.password, "***") if parsed.password else str(exc), url
            )
            message = f"cannot open the table database {redact(url)}: {type(exc).__name__}: {detail}"
            if isinstance(exc, OperationalError):  # the server refused, timed out or is gone: not the URL's fault
                raise InfrastructureError(f"{message}; check that the database is up and reachable") from None
            raise UserError(message) from None
        self.quote = self.engine.dialect.identifier_preparer.quote  # identifiers are quoted by SQLAlchemy
        self._indexed: set[str] = set()
        self._keyed: set[str] = set()  # tables whose unique key was checked (once per sink)

    @classmethod
    def from_url(cls, spec: str) -> SqlSink:
        """`URL#table` (table defaults to `predictions`)."""
        url, _, table = spec.partition("#")
        return cls(url, table or "predictions")

    def _columns(self, conn: Connection, name: str) -> set[str]:
        inspector = inspect(conn)
        return {c["name"] for c in inspector.get_columns(name)} if inspector.has_table(name) else set()

    def _ensure(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str], history: bool = True) -> None:
        """Create the table with a unique key, or add columns it lacks (new id or class columns)."""

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
        if existing and name not in self._keyed:
            self._rekey(conn, name, key, existing)
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

    def _rekey(self, conn: Connection, name: str, key: list[str], existing: set[str]) -> None:
        """Bring a table an earlier version created up to `key`: a prediction row's key was (image_id, model,
        version) before it became (path, image_id, model, version); the embeddings table then kept no path, and its
        rows take their prediction's. SQLite cannot alter a constraint, so alembic's batch mode rebuilds the table
        there (in this transaction: concurrent writers wait on the lock)."""
        self._keyed.add(name)
        constraint = f"uq_{name}_key"
        found = [u for u in inspect(conn).get_unique_constraints(name) if u["name"] == constraint]
        if not found or list(found[0]["column_names"]) == key:
            return
        # alembic loads only for a table an earlier version created
        from alembic.migration import MigrationContext
        from alembic.operations import Operations

        if "path" in key and "path" not in existing:
            conn.execute(text(f"ALTER TABLE {self.quote(name)} ADD COLUMN {self.quote('path')} VARCHAR(512)"))
            self._fill_paths(conn, name)
        operations = Operations(MigrationContext.configure(conn))
        with operations.batch_alter_table(name) as batch:
            batch.drop_constraint(constraint, type_="unique")
            batch.create_unique_constraint(constraint, key)

    def _fill_paths(self, conn: Connection, name: str) -> None:
        """Each row of `name` takes the path of the prediction with its bytes and version (one such row under the
        earlier key); a row without one is removed (a vector whose prediction is gone)."""
        rows, main = self.quote(name), self.quote(self.table)
        match = " AND ".join(f"p.{self.quote(c)} = {rows}.{self.quote(c)}" for c in ANSWER_KEY)
        conn.execute(text(f"UPDATE {rows} SET path = (SELECT MAX(p.path) FROM {main} p WHERE {match})"))
        conn.execute(text(f"DELETE FROM {rows} WHERE path IS NULL"))

    def current(self, model_name: str, paths: Sequence[str] | None = None) -> pd.DataFrame:
        listed = None if paths is None else list(dict.fromkeys(map(str, paths)))
        with self.engine.connect() as conn:
            predictions, rejects = (
                self._current_rows(conn, name, model_name, listed) for name in (self.table, self.rejects)
            )
        return latest_per_path(predictions, rejects)[CURRENT_COLUMNS]

    def _current_rows(self, conn: Connection, name: str, model_name: str, paths: list[str] | None) -> pd.DataFrame:
        """The rows of `name` not superseded, of `paths` only where given (read by the (model_name, path) index, a
        chunk of paths at a time)."""
        columns = self._columns(conn, name)
        if not columns:
            return pd.DataFrame()
        readable = ("path", "image_id", "model_name", "model_version", "scored_at", *LATER_COLUMNS, VERSION_COLUMN)
        where = "model_name = :m" + (" AND superseded_at IS NULL" if "superseded_at" in columns else "")
        query = (
            f"SELECT {', '.join(self.quote(c) for c in readable if c in columns)} FROM {self.quote(name)} WHERE {where}"
        )
        if paths is None:
            return pd.read_sql_query(text(query), conn, params={"m": model_name})
        statement = text(query + " AND path IN :paths").bindparams(bindparam("paths", expanding=True))
        chunks = [
            pd.read_sql_query(statement, conn, params={"m": model_name, "paths": paths[start : start + _IN_CHUNK]})
            for start in range(0, len(paths), _IN_CHUNK)
        ]
        return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame, run_key: str = "") -> None:
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
            key = int.from_bytes(hashlib.sha256(self.table.encode()).digest()[:8], "big", signed=True)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def _upsert(self, conn: Connection, name: str, frame: pd.DataFrame, key: list[str]) -> None:
        table = Table(name, MetaData(), autoload_with=conn)
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        statement = insert(table).values(records)
        update = {c: statement.excluded[c] for c in frame.columns if c not in key and c not in REVIEWER_COLUMNS}
        conn.execute(statement.on_conflict_do_update(index_elements=key, set_=update))

    def record_drift(self, rows: pd.DataFrame) -> None:
        name = self.drift
        frame = rows.assign(model_version=rows["model_version"].astype(str))
        with self.engine.begin() as conn:
            self._lock(conn)
            self._ensure(conn, name, frame, DRIFT_KEY, history=False)
            self._upsert(conn, name, frame, DRIFT_KEY)

    def review_rows(self) -> pd.DataFrame:
        """The current rows of `<table>_review`, most urgent first."""
        with self.engine.connect() as conn:
            columns = self._columns(conn, self.review)
            if not columns:
                return pd.DataFrame()
            where = " WHERE superseded_at IS NULL" if "superseded_at" in columns else ""
            order = " ORDER BY urgency DESC" if "urgency" in columns else ""
            return pd.read_sql_query(text(f"SELECT * FROM {self.quote(self.review)}{where}{order}"), conn)

    def record_reviews(self, answers: pd.DataFrame) -> int:
        """The answers into `<table>_review`, to every row of the answered bytes and version (ANSWER_KEY), in one
        transaction (columns added where missing)."""
        if answers.empty:
            return 0
        frame = answers[[*ANSWER_KEY, *REVIEWER_COLUMNS]].astype({"model_version": str})
        frame = frame.assign(reviewed_at=pd.to_datetime(frame["reviewed_at"], utc=True))
        with self.engine.begin() as conn:
            if not self._columns(conn, self.review):
                return 0
            self._lock(conn)
            self._ensure(conn, self.review, frame, KEY, history=False)
            sets = ", ".join(f"{self.quote(c)} = :{c}" for c in REVIEWER_COLUMNS)
            keys = " AND ".join(f"{self.quote(c)} = :{c}" for c in ANSWER_KEY)
            statement = text(f"UPDATE {self.quote(self.review)} SET {sets} WHERE {keys}")
            records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
            for record in records:
                if isinstance(record["reviewed_at"], pd.Timestamp):
                    record["reviewed_at"] = record["reviewed_at"].to_pydatetime()
            return sum(conn.execute(statement, record).rowcount for record in records)

    def finish(self) -> list[str]:
        with self.engine.connect() as conn:  # the side tables exist once a run wrote to them
            extra = [n for n in (self.review, self.embeddings, self.duplicates) if self._columns(conn, n)]
        return [f"{redact(self.url)}#{name}" for name in (self.table, self.rejects, *extra)]


_IN_CHUNK = 1000  # paths per `IN (...)` of a planning read
POOL_SIZE = 2  # connections a command holds to one PostgreSQL database at most (shards commit one at a time)
_engines: dict[tuple[str, Waits], Engine] = {}
_engines_lock = threading.Lock()


def _engine(url: str, backend: str, waits: Waits) -> Engine:
    """One engine per database and process, whatever number of sinks a run opens (every task opens its own): a
    PostgreSQL pool of POOL_SIZE connections, no overflow, checked before use (a server restarted since leaves
    dead ones), a message after `timeout_s` waiting for one; SQLite opens a connection per use (nothing to pool,
    and none held on a file someone replaced)."""
    with _engines_lock:
        key = (url, waits)
        if key not in _engines:
            arguments = _connect_args(backend, waits)
            if backend == "sqlite":
                engine = create_engine(parse_url(url), connect_args=arguments, poolclass=NullPool)
                _begin_immediate(engine)
            else:
                pool = {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": waits.timeout_s}
                engine = create_engine(parse_url(url), connect_args=arguments, pool_pre_ping=True, **pool)
            _engines[key] = engine
        return _engines[key]


def _connect_args(backend: str, waits: Waits) -> dict[str, Any]:
    """Bounded waits (cnn.waits): SQLite waits `lock_timeout_s` for another writer; PostgreSQL gives up connecting
    after `timeout_s` and a statement waiting for a lock (a table another session holds) after `lock_timeout_s`,
    with "canceling statement due to lock timeout", instead of waiting until someone kills the run."""
    if backend == "sqlite":
        return {"timeout": waits.lock_timeout_s}
    return {
        "connect_timeout": max(1, round(waits.timeout_s)),
        "options": f"-c lock_timeout={round(waits.lock_timeout_s * 1000)}",
    }


def _begin_immediate(engine: Any) -> None:
    """SQLite: take the write lock when a transaction begins, so concurrent writers queue on the busy timeout
    instead of failing at once when a read lock cannot be upgraded (SQLAlchemy's documented recipe)."""

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
    parsed = make_url(url)
    if parsed.host and "@" in parsed.host:
        extra, host = parsed.host.rsplit("@", 1)
        parsed = parsed.set(password=f"{parsed.password or ''}@{extra}", host=host)
    return parsed


def redact(url: str) -> str:
    """A database URL as SQLAlchemy renders it with the password hidden; text that is no URL is shown only when
    it cannot hold credentials."""
    try:
        return url_credentials.redact(str(parse_url(url).render_as_string(hide_password=True)))  # and query credentials
    except (ArgumentError, ValueError):
        return url if "@" not in url else "<a database URL that does not parse>"

"""SQL tables (SQLite, PostgreSQL): upserts, new columns, quoted identifiers, URLs people write."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.sql_sink import SqlSink
from cnn.errors import UserError
from tests.cnn.batch.rows import current_rows, table_rows
from tests.helpers import PG_URL, requires_postgres


def test_sql_sink_upserts_and_adds_columns(tmp_path: Path) -> None:
    sink = SqlSink.from_url(f"sqlite:///{tmp_path / 't.db'}#preds")
    preds, rejects = table_rows(3)
    sink.commit(0, preds, rejects)
    sink.commit(0, preds.assign(label="b"), rejects)  # same keys: updated, not doubled
    more = table_rows(1, version="2")[0].assign(claim_id="C9")
    sink.commit(1, more, table_rows(0, version="2")[1])
    import sqlite3

    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("select count(*), min(label) from preds where model_version='1'").fetchone() == (3, "b")
        assert db.execute("select claim_id from preds where model_version='2'").fetchone() == ("C9",)
        assert db.execute("select count(*) from preds_rejects").fetchone()[0] == 2
    assert "sqlite" in sink.finish()[0]


def test_identifiers_are_quoted_by_sqlalchemy(tmp_path: Path) -> None:
    sink = SqlSink.from_url(f"sqlite:///{tmp_path / 't.db'}#preds")
    preds, rejects = table_rows(1)
    sink.commit(0, preds, rejects)
    sink.commit(1, table_rows(1, version="2")[0].assign(**{'prob_x"y': 0.5, "order": "1"}), rejects.iloc[0:0])
    import sqlite3

    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute('select "prob_x""y", "order" from preds where model_version = \'2\'').fetchone() == (0.5, "1")


def test_unsupported_or_malformed_database_urls_are_refused_up_front() -> None:
    with pytest.raises(UserError, match="SQLite or PostgreSQL, not mysql"):
        SqlSink.from_url("mysql://user:pw@127.0.0.1/db#t")
    with pytest.raises(UserError, match="not a database URL"):
        SqlSink.from_url("predictions.db#t")


@requires_postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg"])
def test_postgresql_urls_as_people_write_them(scheme: str) -> None:
    import uuid

    from sqlalchemy import create_engine, text

    url = PG_URL.replace("postgresql+psycopg", scheme)
    table = f"preds_{uuid.uuid4().hex[:8]}"
    sink = SqlSink.from_url(f"{url}#{table}")
    try:
        sink.commit(0, *table_rows(2))
        sink.commit(0, *table_rows(2))  # a retried shard: upserted, not doubled
        assert set(current_rows(sink, "1")[0]) == {"id0", "id1"}
    finally:
        with create_engine(PG_URL).begin() as conn:
            conn.execute(text(f'drop table if exists "{table}"'))
            conn.execute(text(f'drop table if exists "{table}_rejects"'))


def test_sql_duplicates_table_collects_the_copies(tmp_path: Path) -> None:
    sink = SqlSink.from_url(f"sqlite:///{tmp_path / 't.db'}#preds")
    preds, rejects = table_rows(3)
    preds = preds.assign(
        duplicate_kind=[None, "near", "exact"],
        duplicate_of=[None, '{"image_id": "old1", "source": "training"}', '{"image_id": "old2", "source": "scored"}'],
    )
    sink.commit(0, preds, rejects)
    with sink.engine.connect() as conn:
        copies = pd.read_sql_query('select * from "preds_duplicates" order by image_id', conn)
    assert copies["image_id"].tolist() == ["id1", "id2"] and copies["earlier_image_id"].tolist() == ["old1", "old2"]
    assert copies["earlier_source"].tolist() == ["training", "scored"]
    assert "#preds_duplicates" in sink.finish()[-1]


@pytest.fixture
def limited_role() -> Iterator[str]:
    """A PostgreSQL role allowed 3 connections at once (a managed database's per-user limit), and its URL."""
    import psycopg

    role = f"cnn_limited_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 3")
        admin.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
    try:
        yield f"postgresql://{role}@127.0.0.1:5432/test"
    finally:
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as admin:
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            for name in ("", "_rejects", "_review", "_duplicates", "_embeddings", "_drift"):
                admin.execute(f"DROP TABLE IF EXISTS limited{name}")
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@requires_postgres
def test_a_run_holds_a_stated_number_of_connections_however_many_shards(limited_role: str) -> None:
    """Every task of a run opens its sinks again (a Prefect task gets its arguments, not open objects): 35 shards
    used to leave 35 pools' connections open, and a role limited to 3 failed on the fourth shard."""
    import psycopg

    from cnn.batch.sql_sink import POOL_SIZE

    for shard in range(35):
        sink = SqlSink(limited_role, "limited")
        sink.current("m")
        preds, rejects = table_rows(2)
        ids = [f"{shard}-{i}" for i in range(len(preds))]
        sink.commit(shard, preds.assign(image_id=ids, path=[f"/p/{i}.png" for i in ids]), rejects.iloc[:0])
    role = limited_role.split("//")[1].split("@")[0]
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test") as admin:
        held = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)).fetchone()
        rows = admin.execute("SELECT count(*) FROM limited").fetchone()
    assert held is not None and held[0] <= POOL_SIZE
    assert rows == (70,)


def _old_tables(url: str, table: str) -> None:
    """Tables as the versions before 2026-12 created them: predictions unique per (image_id, model, version), and an
    embeddings table without a path."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    stamp, blob = ("TIMESTAMP WITH TIME ZONE", "BYTEA") if engine.dialect.name == "postgresql" else ("DATETIME", "BLOB")
    key = "image_id, model_name, model_version"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {table} (image_id VARCHAR(512), path TEXT, label TEXT, confidence FLOAT, "
                f"needs_review BOOLEAN, model_name VARCHAR(512), model_version VARCHAR(512), scored_at {stamp}, "
                f"superseded_at {stamp}, CONSTRAINT uq_{table}_key UNIQUE ({key}))"
            )
        )
        conn.execute(text(f"CREATE INDEX ix_{table}_path ON {table} (model_name, path)"))
        conn.execute(
            text(
                f"CREATE TABLE {table}_embeddings (image_id VARCHAR(512), model_name VARCHAR(512), "
                f"model_version VARCHAR(512), dim BIGINT, scored_at {stamp}, embedding {blob}, "
                f"CONSTRAINT uq_{table}_embeddings_key UNIQUE ({key}))"
            )
        )
        for i in range(2):
            conn.execute(
                text(f"INSERT INTO {table} VALUES (:id, :path, 'a', 0.9, false, 'm', '1', :at, NULL)"),
                {"id": f"id{i}", "path": f"/p/{i}.png", "at": pd.Timestamp("2025-06-01", tz="UTC").to_pydatetime()},
            )
            conn.execute(
                text(f"INSERT INTO {table}_embeddings VALUES (:id, 'm', '1', 2, :at, :v)"),
                {"id": f"id{i}", "at": pd.Timestamp("2025-06-01", tz="UTC").to_pydatetime(), "v": b"\x00<\x00<"},
            )
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=requires_postgres)])
def test_a_table_keyed_by_bytes_alone_is_rekeyed_by_path_and_bytes(tmp_path: Path, backend: str) -> None:
    """A table an earlier version wrote (key: image_id, model, version) takes the new key at the first commit, keeping
    its rows; its vectors take their prediction's path; then a copy of an old image under a new path gets a row of
    its own instead of taking the old path's."""
    from sqlalchemy import create_engine, inspect, text

    table = f"old_{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else PG_URL
    _old_tables(url, table)
    try:
        sink = SqlSink(url, table)
        copy = table_rows(1)[0].assign(path="/p/new.png", scored_at=pd.Timestamp("2026-12-01", tz="UTC"))
        sink.commit(0, copy.assign(embedding=[[1.0, 2.0]]), table_rows(0)[1].iloc[0:0])
        with sink.engine.connect() as conn:
            keys = {u["name"]: u["column_names"] for u in inspect(conn).get_unique_constraints(table)}
            rows = pd.read_sql_query(text(f"SELECT path, image_id FROM {table} ORDER BY path"), conn)
            vectors = pd.read_sql_query(text(f"SELECT path, image_id FROM {table}_embeddings ORDER BY path"), conn)
            indexes = {i["name"] for i in inspect(conn).get_indexes(table)}
        assert keys == {f"uq_{table}_key": ["path", "image_id", "model_name", "model_version"]}
        assert rows.values.tolist() == [["/p/0.png", "id0"], ["/p/1.png", "id1"], ["/p/new.png", "id0"]]
        assert vectors.values.tolist() == rows.values.tolist()  # the old vectors found their paths
        assert f"ix_{table}_path" in indexes  # the rebuilt SQLite table keeps its index
        assert sorted(sink.current("m")["path"]) == ["/p/0.png", "/p/1.png", "/p/new.png"]  # each path current
        sink.commit(1, copy.assign(label="b"), table_rows(0)[1].iloc[0:0])  # upserts on the new key
        with sink.engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 3
    finally:
        if backend == "postgresql":
            with create_engine(PG_URL).begin() as conn:
                for side in ("", "_rejects", "_review", "_duplicates", "_embeddings"):
                    conn.execute(text(f'DROP TABLE IF EXISTS "{table}{side}"'))

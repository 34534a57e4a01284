"""What every sink keeps: current rows and history, retried rejects, the review queue, embeddings, drift rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.file_sink import FileSink
from cnn.batch.sql_sink import SqlSink
from tests.cnn.batch.rows import table_rows
from tests.helpers import PG_URL, requires_postgres


def _pg_table_sink() -> SqlSink:
    import uuid

    return SqlSink.from_url(f"{PG_URL}#hist_{uuid.uuid4().hex[:8]}")


def _sink(kind: str, tmp_path: Path) -> FileSink | SqlSink:
    if kind == "postgresql":
        return _pg_table_sink()
    if kind == "sqlite":
        return SqlSink.from_url(f"sqlite:///{tmp_path / 't.db'}#preds")
    return FileSink(tmp_path / f"out.{kind}")


def _tables(sink: FileSink | SqlSink) -> tuple[pd.DataFrame, pd.DataFrame]:
    if isinstance(sink, FileSink):
        sink.finish()
        read = pd.read_parquet if not sink.csv else lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)
        return read(sink.path), read(sink.rejects_path)
    with sink.engine.connect() as conn:
        return (
            pd.read_sql_query(f'select * from "{sink.table}"', conn),
            pd.read_sql_query(f'select * from "{sink.rejects}"', conn),
        )


def _drop(sink: FileSink | SqlSink) -> None:
    if isinstance(sink, SqlSink) and sink.engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with sink.engine.begin() as conn:
            conn.execute(text(f'drop table if exists "{sink.table}", "{sink.rejects}", "{sink.review}"'))


@pytest.mark.parametrize("kind", ["parquet", "csv", "sqlite", pytest.param("postgresql", marks=requires_postgres)])
def test_a_path_has_one_current_row_and_keeps_its_history(tmp_path: Path, kind: str) -> None:
    """Bytes replaced in place, then a truncated upload, then a rescore by another version: one current row per
    path at each step, and every earlier row kept with the time it was superseded."""
    sink = _sink(kind, tmp_path)
    t = [pd.Timestamp(f"2026-01-0{d}", tz="UTC") for d in range(1, 6)]
    preds, rejects = table_rows(2)
    empty = rejects.iloc[0:0]
    try:
        sink.commit(0, preds.assign(scored_at=t[0]), empty)
        sink.commit(0, preds.iloc[[0]].assign(image_id="new0", scored_at=t[1]), empty)  # /p/0.png replaced
        truncated = rejects.assign(path="/p/1.png", image_id="half1", reject_kind="truncated", scored_at=t[2])
        sink.commit(1, preds.iloc[0:0], truncated)  # /p/1.png replaced by a half-uploaded file
        sink.commit(2, preds.iloc[[1]].assign(image_id="full1", model_version="2", scored_at=t[3]), empty)

        current = sink.current("m").set_index("path")
        assert sorted(current.index) == ["/p/0.png", "/p/1.png"]
        assert current.loc["/p/0.png", "image_id"] == "new0" and current.loc["/p/0.png", "reject_kind"] == ""
        assert current.loc["/p/1.png", "image_id"] == "full1" and current.loc["/p/1.png", "model_version"] == "2"

        predictions, rejected = _tables(sink)
        history = pd.concat([predictions, rejected])
        history["superseded_at"] = pd.to_datetime(history["superseded_at"].replace("", None), utc=True)
        by_id = history.set_index("image_id")["superseded_at"]
        assert len(history) == 5  # nothing deleted
        assert by_id["id0"] == t[1] and by_id["id1"] == t[2] and by_id["half1"] == t[3]
        assert by_id[["new0", "full1"]].isna().all()
        if isinstance(sink, SqlSink):  # each shard looks up its paths' earlier rows: by index, not by a full scan
            from sqlalchemy import inspect

            with sink.engine.connect() as conn:
                for name in (sink.table, sink.rejects):
                    indexes = {i["name"]: i["column_names"] for i in inspect(conn).get_indexes(name)}
                    assert indexes[f"ix_{name}_path"] == ["model_name", "path"]
            assert pd.api.types.is_integer_dtype(rejected["attempts"])
    finally:
        _drop(sink)


def test_a_retried_reject_replaces_its_row_and_counts_attempts(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out.parquet")
    _, rejects = table_rows(1)
    slow = rejects.assign(reject_kind="time_limit", image_id="x")
    sink.commit(0, table_rows(0)[0], slow)
    sink.finish()
    sink.commit(0, table_rows(0)[0], slow.assign(attempts=2, scored_at=pd.Timestamp("2026-01-02", tz="UTC")))
    sink.finish()
    out = pd.read_parquet(sink.rejects_path)
    assert len(out) == 1 and out["attempts"].tolist() == [2] and out["superseded_at"].isna().all()
    assert sink.current("m")["attempts"].tolist() == [2]


def _review_rows(n: int, version: str = "1", when: str = "2026-01-01") -> pd.DataFrame:
    preds, _ = table_rows(n, version)
    return preds.assign(
        needs_review=[i % 2 == 0 for i in range(n)],  # ids 0, 2, 4, ...
        urgency=[i / 10 for i in range(n)],
        review_reason=["low confidence" if i % 2 == 0 else None for i in range(n)],
        scored_at=pd.Timestamp(when, tz="UTC"),
    )


def _review(sink: FileSink | SqlSink) -> pd.DataFrame:
    if isinstance(sink, FileSink):
        sink.finish()
        read = pd.read_parquet if not sink.csv else lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)
        return read(sink.review_path)
    with sink.engine.connect() as conn:
        rows = pd.read_sql_query(f'select * from "{sink.review}" where superseded_at is null', conn)
    return rows.sort_values("urgency", ascending=False, ignore_index=True)


def _fill(sink: FileSink | SqlSink, image_id: str, label: str) -> None:
    """What a reviewer does: write a label into the review table."""
    if isinstance(sink, FileSink):
        table = pd.read_parquet(sink.review_path) if not sink.csv else pd.read_csv(sink.review_path, dtype=str)
        table.loc[table["image_id"] == image_id, "reviewed_label"] = label
        table["reviewer"] = "dr. who"  # a column of the reviewer's own
        table.to_parquet(sink.review_path) if not sink.csv else table.to_csv(sink.review_path, index=False)
        return
    from sqlalchemy import text

    with sink.engine.begin() as conn:
        conn.execute(
            text(f'update "{sink.review}" set reviewed_label = :l where image_id = :i'), {"l": label, "i": image_id}
        )


@pytest.mark.parametrize("kind", ["parquet", "csv", "sqlite", pytest.param("postgresql", marks=requires_postgres)])
def test_the_review_queue_is_ordered_and_keeps_what_reviewers_wrote(tmp_path: Path, kind: str) -> None:
    sink = _sink(kind, tmp_path)
    try:
        sink.commit(0, _review_rows(6), table_rows(0)[1])
        queue = _review(sink)
        assert queue["image_id"].tolist() == ["id4", "id2", "id0"]  # most urgent first, only rows needing review
        assert queue["reviewed_label"].isna().all() or (queue["reviewed_label"] == "").all()
        assert not any(c.startswith("prob_") for c in queue.columns)
        _fill(sink, "id2", "b")
        sink.commit(1, _review_rows(6), table_rows(0)[1])  # the same rows again (a retried shard)
        queue = _review(sink)
        assert queue.set_index("image_id").loc["id2", "reviewed_label"] == "b"
        if isinstance(sink, FileSink):
            assert (queue["reviewer"] == "dr. who").all()
        # the path is scored again by version 2 (its review row is replaced): the reviewed row stays in the file
        sink.commit(2, _review_rows(6, version="2", when="2026-02-01"), table_rows(0)[1])
        queue = _review(sink)
        assert set(queue.loc[queue["model_version"].astype(str) == "2", "image_id"]) == {"id0", "id2", "id4"}
        if isinstance(sink, FileSink):
            kept = queue[queue["model_version"].astype(str) == "1"]
            assert kept["image_id"].tolist() == ["id2"] and kept["reviewed_label"].tolist() == ["b"]
    finally:
        _drop(sink)


@pytest.mark.parametrize("kind", ["parquet", "csv", "sqlite", pytest.param("postgresql", marks=requires_postgres)])
def test_embeddings_go_to_their_side_table_in_the_shard_commit(tmp_path: Path, kind: str) -> None:
    import numpy as np

    sink = _sink(kind, tmp_path)
    preds, rejects = table_rows(3)
    vectors = np.random.default_rng(0).normal(0, 1, (3, 8)).astype(np.float16)
    try:
        sink.commit(0, preds.assign(embedding=list(vectors)), rejects)
        sink.commit(0, preds.assign(embedding=list(vectors)), rejects)  # a retried shard: still one row each
        main, _ = _tables(sink)
        assert "embedding" not in main.columns and len(main) == 3
        if isinstance(sink, FileSink):
            side = pd.read_parquet(sink.embeddings_path)  # Parquet beside a CSV output too
            stored = np.stack(side.sort_values("image_id")["embedding"].to_numpy())
        else:
            with sink.engine.connect() as conn:
                side = pd.read_sql_query(f'select * from "{sink.embeddings}" order by image_id', conn)
            stored = np.stack([np.frombuffer(b, np.float16) for b in side["embedding"]])
        assert len(side) == 3 and (side["dim"] == 8).all() and np.array_equal(stored, vectors)
    finally:
        if isinstance(sink, SqlSink) and sink.engine.dialect.name == "postgresql":
            from sqlalchemy import text

            with sink.engine.begin() as conn:
                conn.execute(text(f'drop table if exists "{sink.embeddings}"'))
        _drop(sink)


def test_drift_rows_are_kept_once_per_run_and_statistic(tmp_path: Path) -> None:
    rows = pd.DataFrame({"name": ["format", "embedding"], "p_value": [0.5, 0.001], "flow_run_id": "r1",
                         "model_version": "1"})  # fmt: skip
    for sink in (FileSink(tmp_path / "out.parquet"), SqlSink.from_url(f"sqlite:///{tmp_path / 't.db'}#preds")):
        sink.record_drift(rows)
        sink.record_drift(rows.assign(p_value=[0.6, 0.002]))  # the same run again: replaced
        sink.record_drift(rows.assign(flow_run_id="r2"))
        if isinstance(sink, FileSink):
            table = pd.read_parquet(sink.drift_path)
        else:
            with sink.engine.connect() as conn:
                table = pd.read_sql_query('select * from "preds_drift"', conn)
        assert len(table) == 4 and set(table.loc[table["flow_run_id"] == "r1", "p_value"]) == {0.6, 0.002}


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path: Path) -> None:
    from cnn.batch.tables import read_csv_table, spreadsheet_safe, write_csv

    frame = pd.DataFrame(
        {
            "claim_id": ['=HYPERLINK("http://x","y")', "+1+cmd", "-2+3", "@SUM(A1)", "\tx", "C-1", "-12.5"],
            "confidence": [0.5] * 7,
        }
    )
    safe = spreadsheet_safe(frame)
    assert safe["claim_id"].tolist()[:5] == ["'" + v for v in frame["claim_id"][:5]]
    assert safe["claim_id"].tolist()[5:] == ["C-1", "-12.5"]  # text and plain numbers are data, left as they are
    write_csv(frame, tmp_path / "t.csv")
    again = read_csv_table(tmp_path / "t.csv")
    assert not again["claim_id"].str.match(r"^[=+@\t]").any()
    assert spreadsheet_safe(again).equals(again)  # written again, nothing is quoted twice

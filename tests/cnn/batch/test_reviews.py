"""Reviewers' answers in every kind of prediction table: a pull writes them into the review queue by row key, the
queue shows them, and the next scoring run keeps them (it never overwrites a reviewer's columns)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.delta_sink import DeltaSink
from cnn.batch.file_sink import FileSink
from cnn.batch.sql_sink import SqlSink
from cnn.batch.tables import REVIEWER_COLUMNS
from tests.cnn.batch.rows import table_rows

WHEN = pd.Timestamp("2026-12-05 10:00", tz="UTC")


def _flagged(n: int, version: str = "1", at: str = "2026-01-01") -> tuple[pd.DataFrame, pd.DataFrame]:
    preds, rejects = table_rows(n, version)
    preds["needs_review"] = True
    preds["urgency"] = [0.1 * i for i in range(n)]
    preds["decision"] = "a"
    preds["top_k"] = '[["a", 0.9], ["b", 0.1]]'
    preds["scored_at"] = pd.Timestamp(at, tz="UTC")
    rejects["scored_at"] = pd.Timestamp(at, tz="UTC")
    return preds, rejects


def _answers(*rows: tuple[str, str | None, str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"image_id": i, "model_name": "m", "model_version": "1", "reviewed_label": label,
             "review_verdict": verdict, "reviewed_by": by, "reviewed_at": WHEN}
            for i, label, verdict, by in rows
        ]
    )  # fmt: skip


def _blank(value: object) -> bool:
    """Missing, as each format reads it back (CSV: an empty cell)."""
    return bool(pd.isna(value)) or value == ""


def _sink(kind: str, tmp_path: Path) -> FileSink | DeltaSink | SqlSink:
    if kind == "parquet":
        return FileSink(tmp_path / "preds.parquet")
    if kind == "csv":
        return FileSink(tmp_path / "preds.csv")
    if kind == "delta":
        return DeltaSink(str(tmp_path / "tables"))
    return SqlSink.from_url(f"sqlite:///{tmp_path / 'p.db'}#preds")


@pytest.mark.parametrize("kind", ["parquet", "csv", "delta", "sql"])
def test_answers_land_in_the_review_queue_and_survive_the_next_run(kind: str, tmp_path: Path) -> None:
    sink = _sink(kind, tmp_path)
    preds, rejects = _flagged(4)
    sink.commit(0, preds, rejects, "run-1")
    sink.finish()
    queue = sink.review_rows()
    assert sorted(queue["image_id"]) == ["id0", "id1", "id2", "id3"]
    assert queue["image_id"].tolist()[0] == "id3"  # most urgent first
    assert "top_k" in queue.columns  # the calibrated top classes reach the reviewer

    answers = _answers(("id1", "b", "label", "3"), ("id2", None, "unusable", "3,4"), ("gone", "a", "label", "3"))
    assert sink.record_reviews(answers) == 2  # an answer to a row the table does not hold is not written
    queue = sink.review_rows().set_index("image_id")
    assert queue.loc["id1", "reviewed_label"] == "b" and str(queue.loc["id1", "reviewed_by"]) == "3"
    assert queue.loc["id2", "review_verdict"] == "unusable" and _blank(queue.loc["id2", "reviewed_label"])
    assert pd.Timestamp(queue.loc["id1", "reviewed_at"]).tz_convert("UTC") == WHEN
    assert all(_blank(queue.loc["id0", c]) for c in REVIEWER_COLUMNS)

    # the next night scores the same images again (a newer row of each path): the answers stay with their rows
    again, rejects = _flagged(4, at="2026-01-02")
    again["model_version"] = "1"
    sink.commit(1, again, rejects, "run-2")
    sink.finish()
    queue = sink.review_rows().set_index("image_id")
    assert queue.loc["id1", "reviewed_label"] == "b"
    assert queue.loc["id2", "review_verdict"] == "unusable"
    assert len(queue) == 4  # one row per image: the replaced rows left the queue


@pytest.mark.parametrize("kind", ["parquet", "csv", "delta", "sql"])
def test_an_answer_applies_to_every_path_holding_the_answered_bytes(kind: str, tmp_path: Path) -> None:
    """A Label Studio task is an image's bytes as a version read them (it carries no path). The same photo scored
    under two paths (two nights, two claims) is two rows of the queue, and the reviewer's answer lands on both."""
    sink = _sink(kind, tmp_path)
    preds, rejects = _flagged(2)
    sink.commit(0, preds, rejects, "run-1")
    copy = preds.iloc[[0]].assign(path="/claims/other.png", scored_at=pd.Timestamp("2026-01-02", tz="UTC"))
    sink.commit(1, copy, rejects.iloc[0:0], "run-2")
    sink.finish()
    queue = sink.review_rows()
    assert sorted(queue.loc[queue["image_id"] == "id0", "path"]) == ["/claims/other.png", "/p/0.png"]
    sink.record_reviews(_answers(("id0", "b", "label", "7")))
    queue = sink.review_rows()
    answered = queue.loc[queue["image_id"] == "id0"]
    assert sorted(answered["path"]) == ["/claims/other.png", "/p/0.png"]  # still one row per path
    assert answered["reviewed_label"].tolist() == ["b", "b"]
    assert all(_blank(v) for v in queue.loc[queue["image_id"] == "id1", "reviewed_label"])

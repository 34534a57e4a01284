"""Rows as a scoring shard commits them, and what a sink says is current: shared by the sink tests."""

from __future__ import annotations

import pandas as pd

from cnn.batch.file_sink import FileSink
from cnn.batch.sql_sink import SqlSink


def table_rows(n: int, version: str = "1") -> tuple[pd.DataFrame, pd.DataFrame]:
    preds = pd.DataFrame(
        {
            "image_id": [f"id{i}" for i in range(n)],
            "path": [f"/p/{i}.png" for i in range(n)],
            "label": "a",
            "confidence": 0.9,
            "needs_review": False,
            "model_name": "m",
            "model_version": version,
            "scored_at": pd.Timestamp("2026-01-01", tz="UTC"),
        }
    )
    rejects = pd.DataFrame(
        {
            "image_id": [""],
            "path": [f"/bad/{version}.png"],
            "reason": ["empty file (0 bytes)"],
            "reject_kind": "empty",
            "attempts": 1,
            "model_name": "m",
            "model_version": version,
            "scored_at": pd.Timestamp("2026-01-01", tz="UTC"),
        }
    )
    return preds, rejects


def current_rows(sink: FileSink | SqlSink, version: str) -> tuple[dict[str, str], set[str]]:
    """({image_id: path} predicted, paths rejected): the current rows of one version."""
    rows = sink.current("m")
    rows = rows[rows["model_version"] == version]
    predicted = rows[rows["reject_kind"] == ""]
    return dict(zip(predicted["image_id"], predicted["path"])), set(rows.loc[rows["reject_kind"] != "", "path"])

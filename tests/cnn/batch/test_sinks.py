"""Opening sinks: what --output and --table name, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn.batch.sinks import open_sink
from cnn.batch.sql_sink import SqlSink
from cnn.errors import UserError


def test_sink_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="invalid table name"):
        SqlSink.from_url(f"sqlite:///{tmp_path / 'x.db'}#1bad")
    with pytest.raises(UserError, match="cannot open") as unreachable:
        SqlSink.from_url("postgresql+psycopg://nobody:secret@127.0.0.1:1/none#t")
    assert "secret" not in str(unreachable.value) and "nobody:***@" in str(unreachable.value)
    with pytest.raises(UserError, match=".parquet or .csv"):
        open_sink(str(tmp_path / "x.txt"), None, "sqlite://#t")

"""The weekly upkeep of Delta prediction tables as a Prefect flow: compacted, vacuumed, reported as an artifact."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cnn.batch.delta_sink import DeltaSink, read_tables
from tests.cnn.batch.test_delta_sink import shard_rows

pytestmark = pytest.mark.e2e


def test_tables_flow_compacts_and_keeps_every_row(prefect_server: None, cnn_home: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.tables import tables_flow

    root = str(tmp_path / "preds")
    sink = DeltaSink(root)
    for shard in range(3):
        sink.commit(shard, *shard_rows(4 * shard, 4, datetime(2026, 11, 30, tzinfo=UTC)), run_key="k")
    done = tables_flow(root)
    compacted = {m.table: m for m in done[: len(done) // 2]}
    assert (compacted["predictions"].files_before, compacted["predictions"].files_after) == (3, 1)
    assert len(read_tables(sink)["predictions"]) == 12

    async def artifact() -> object:
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    keys = [a.key for a in asyncio.run(artifact())]  # type: ignore[attr-defined]
    assert "tables-maintained" in keys

"""Parquet and CSV tables: parts committed per shard, merged once, never lost between concurrent runs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.file_sink import FileSink
from tests.cnn.batch.rows import current_rows, table_rows
from tests.helpers import TinyDisk


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_file_sink_commits_parts_and_merges_once(tmp_path: Path, suffix: str) -> None:
    sink = FileSink(tmp_path / f"out{suffix}")
    preds, rejects = table_rows(3)
    sink.commit(0, preds, rejects)
    sink.commit(0, preds, rejects)  # a retried shard
    assert current_rows(sink, "1") == ({f"id{i}": f"/p/{i}.png" for i in range(3)}, {"/bad/1.png"})
    sink.finish()
    assert not (tmp_path / f"out{suffix}.parts").exists()
    out = pd.read_parquet(sink.path) if suffix == ".parquet" else pd.read_csv(sink.path)
    assert len(out) == 3
    sink.commit(1, *table_rows(2, version="2"))
    sink.finish()
    out = pd.read_parquet(sink.path) if suffix == ".parquet" else pd.read_csv(sink.path)
    assert len(out) == 5 and current_rows(sink, "2")[1] == {"/bad/2.png"}


def test_file_sink_finishes_over_a_killed_runs_temporary_files(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out.parquet")
    sink.commit(0, *table_rows(2))
    # kill -9 during a part write leaves the temporary file of atomic_path behind
    (sink.parts / ".shard-000001-abc.pred.parquet.x1y2.tmp").write_bytes(b"PAR1 half written")
    (tmp_path / ".out.parquet.k3j4.tmp").write_bytes(b"PAR1 half merged")  # ... or of the final merge
    assert current_rows(sink, "1")[0] == {"id0": "/p/0.png", "id1": "/p/1.png"}
    sink.finish()
    assert not sink.parts.exists() and len(pd.read_parquet(sink.path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".out.parquet.lock") == [
        "out.parquet",
        "out.rejects.parquet",
        "out.review.parquet",
    ]


def test_csv_with_nothing_to_write_does_not_break_the_next_run(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out.csv")
    preds, _ = table_rows(2)
    sink.commit(0, preds, table_rows(0)[1].iloc[0:0])  # a run without rejects
    sink.finish()
    assert current_rows(sink, "1")[1] == set()  # reading the empty rejects file back used to raise EmptyDataError
    sink.commit(1, table_rows(1, version="2")[0], table_rows(1, version="2")[1])
    sink.finish()
    assert len(pd.read_csv(tmp_path / "out.csv")) == 3 and len(pd.read_csv(tmp_path / "out.rejects.csv")) == 1


def test_carried_ids_stay_text_in_csv_across_runs(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out.csv")
    sink.commit(0, table_rows(1)[0].assign(claim_id="007123"), table_rows(1)[1])
    sink.finish()
    sink.commit(1, table_rows(1, version="2")[0].assign(claim_id="000042"), table_rows(1, version="2")[1])
    sink.finish()
    text = (tmp_path / "out.csv").read_text()
    assert "007123" in text and "000042" in text


def _commit_and_finish_many(path: str, worker: int) -> None:
    sink = FileSink(Path(path))
    for shard in range(12):
        preds = table_rows(3)[0].assign(image_id=[f"w{worker}-s{shard}-{i}" for i in range(3)])
        sink.commit(shard, preds, table_rows(0)[1].iloc[0:0])
        if shard % 3 == 2:
            sink.finish()  # a merge while the other run keeps committing


def test_two_runs_writing_the_same_file_lose_nothing(tmp_path: Path) -> None:
    """A manual run while the schedule fires: each run's merge must not delete the other's committed parts."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # not fork: this process runs threads (pyarrow, pools)
    runs = [context.Process(target=_commit_and_finish_many, args=(str(tmp_path / "out.parquet"), w)) for w in (1, 2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
        assert run.exitcode == 0
    FileSink(tmp_path / "out.parquet").finish()
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == 2 * 12 * 3 and out["image_id"].is_unique


def test_a_publish_on_a_full_disk_leaves_the_published_set_as_it_was(tiny_disk: TinyDisk) -> None:
    """Each table file is atomic; the set must be too: a disk that fills while the merge writes the fourth table
    used to leave three tables of the new run beside the old fourth."""
    sink = FileSink(tiny_disk.mount / "night.parquet")
    sink.commit(0, *table_rows(3))
    sink.finish()
    published = _tables(tiny_disk.mount)
    assert {"night.parquet", "night.rejects.parquet", "night.review.parquet"} <= set(published)
    preds, rejects = table_rows(400, version="2")
    reasons = [os.urandom(100).hex() for _ in range(len(preds))]  # 80 KB that no encoding shrinks
    sink.commit(1, preds.assign(review_reason=reasons, needs_review=True), rejects)  # the review table as big
    tiny_disk.fill(room=120 << 10)  # room for the new predictions table, not for the whole set
    with pytest.raises(OSError):
        sink.finish()
    assert _tables(tiny_disk.mount) == published
    assert not list(tiny_disk.mount.glob(".night.*.tmp"))
    tiny_disk.grow()
    sink.finish()  # the parts were kept: the next publish merges them
    assert len(pd.read_parquet(sink.path)) == 403 and not sink.parts.exists()


def _tables(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("night.*") if p.is_file()}


def test_vectors_an_earlier_version_kept_without_paths_take_their_predictions_path(tmp_path: Path) -> None:
    """Before a row's key held its path, `X.embeddings.parquet` had none; a publish gives each old vector its
    prediction's path, so a copy of an old image under a new path keeps its own vector beside the old one."""
    import numpy as np

    sink = FileSink(tmp_path / "out.parquet")
    old = table_rows(2)[0]
    old.to_parquet(sink.path, index=False)
    vectors = old[["image_id", "model_name", "model_version", "scored_at"]].assign(dim=2)
    vectors["embedding"] = [np.array([0.5, 1.0], np.float16)] * 2
    vectors.to_parquet(sink.embeddings_path, index=False)
    copy = table_rows(1)[0].assign(path="/p/new.png", scored_at=pd.Timestamp("2026-12-01", tz="UTC"))
    sink.commit(0, copy.assign(embedding=[[1.0, 2.0]]), table_rows(0)[1].iloc[0:0])
    sink.finish()
    merged = pd.read_parquet(sink.embeddings_path).sort_values("path")
    assert merged[["path", "image_id"]].values.tolist() == [
        ["/p/0.png", "id0"],
        ["/p/1.png", "id1"],
        ["/p/new.png", "id0"],
    ]
    assert sorted(pd.read_parquet(sink.path)["path"]) == ["/p/0.png", "/p/1.png", "/p/new.png"]

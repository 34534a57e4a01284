"""Prediction tables in an object store (a real S3-compatible server): committed shards, a publish that ends with a
manifest object, and kill -9 at every write of a publish followed by a re-run: no duplicate, no gap."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.object_sink import ObjectSink, PartitionedSink, read_manifest
from cnn.batch.sinks import open_sink
from cnn.io import storage
from tests.helpers import clean_env, read_table
from tests.s3 import S3Server


def _shard(
    first: int, n: int, run: str, when: datetime, bytes_tag: str = "", labels: tuple[str, ...] = ("cat",)
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n predictions (paths first..first+n-1; `bytes_tag` changes their content ids) and one reject, stamped like a
    scoring run's rows."""
    stamp = {"model_name": "m", "model_version": "1", "run_id": "r", "scored_at": when, "flow_run_id": run}
    predictions = pd.DataFrame(
        {
            "image_id": [f"id{bytes_tag}{i:04d}" for i in range(first, first + n)],
            "path": [f"s3://in/{i:04d}.jpg" for i in range(first, first + n)],
            "label": [labels[i % len(labels)] for i in range(first, first + n)],
            "confidence": 0.5,
            "needs_review": [i % 2 == 0 for i in range(first, first + n)],
            "urgency": 0.5,
            "source_version": "v1",
            **stamp,
        }
    )
    rejects = pd.DataFrame(
        {"image_id": [""], "path": [f"s3://in/bad{first}.jpg"], "reason": ["x"], "reject_kind": ["corrupt"]}
    ).assign(attempts=1, **stamp)
    for frame in (predictions, rejects):
        frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
    return predictions, rejects


def _exists(url: str) -> bool:
    try:
        storage.info(url)
        return True
    except FileNotFoundError:
        return False


def test_commit_then_publish_writes_the_tables_and_a_manifest_last(s3: S3Server) -> None:
    out = f"{s3.bucket('preds')}/nightly/2026-11-30.parquet"
    (sink,) = open_sink(out, None, "unused")
    assert isinstance(sink, ObjectSink)
    now = datetime.now(UTC)
    sink.commit(0, *_shard(0, 5, "run-a", now))
    sink.commit(1, *_shard(5, 5, "run-a", now))
    parts = storage.list_prefix(f"{out}.parts")
    assert len(parts) == 4 and all("/run-a/shard-" in p for p in parts)  # run-scoped prefix, pred + rej each
    with pytest.raises(Exception, match="not been published"):
        read_manifest(out)
    current = sink.current("m")
    assert len(current) == 12 and set(current["source_version"]) == {"v1", ""}  # parts count before the publish
    written = sink.finish()
    assert written[0] == f"{out}.manifest.json"
    predictions, rejects = read_table(out), read_table(out.replace(".parquet", ".rejects.parquet"))
    assert len(predictions) == 10 and predictions["path"].is_unique and len(rejects) == 2
    manifest = read_manifest(out)
    assert manifest["tables"]["predictions"]["rows"] == 10
    assert manifest["tables"]["predictions"]["version"] == storage.info(out).version
    assert len(manifest["merged_parts"]) == 4
    assert storage.list_prefix(f"{out}.parts") == []  # removed after the manifest


def test_a_second_run_supersedes_and_keeps_history(s3: S3Server) -> None:
    out = f"{s3.bucket('preds')}/p.csv"
    sink = ObjectSink(out)
    now = datetime.now(UTC)
    sink.commit(0, *_shard(0, 4, "run-a", now))
    sink.finish()
    sink.commit(0, *_shard(2, 4, "run-b", now + timedelta(seconds=5), bytes_tag="b"))  # 2, 3: new bytes
    sink.finish()
    table = pd.read_csv(io.BytesIO(storage.read_object(out)), dtype=str, keep_default_na=False)
    assert len(table) == 8  # the earlier rows of paths 2 and 3 stay, as history
    live = table[table["superseded_at"] == ""]
    assert sorted(live["path"]) == [f"s3://in/{i:04d}.jpg" for i in range(6)]
    replaced = table[table["superseded_at"] != ""]
    assert sorted(replaced["image_id"]) == ["id0002", "id0003"]


PUBLISH_IN_A_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from cnn.io import storage
    from cnn.batch.object_sink import ObjectSink, PartitionedSink

    out, die_at = sys.argv[1], int(sys.argv[2])
    original, writes = storage.write_object, []

    def write_then_maybe_die(url, data):
        original(url, data)
        writes.append(url)
        if len(writes) == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup, no finally

    storage.write_object = write_then_maybe_die
    if len(sys.argv) > 3:
        PartitionedSink(out, sys.argv[3].split(",")).finish()
    else:
        ObjectSink(out).finish()
    print(len(writes))
    """
)


def _publish_in_child(out: str, die_at: int, partitioned: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PUBLISH_IN_A_CHILD, out, str(die_at), *(["label"] if partitioned else [])],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kill_9_at_every_write_of_a_publish_then_a_rerun_leaves_no_duplicate_and_no_gap(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LOCK_LEASE_S", 1.0)  # the killed publish's lock is taken over after a second
    bucket = s3.bucket("killed")
    now = datetime.now(UTC)

    def committed(out: str) -> None:
        sink = ObjectSink(out)
        sink.commit(0, *_shard(0, 6, "run-a", now))
        sink.finish()  # an earlier night, published
        sink.commit(0, *_shard(6, 6, "run-b", now + timedelta(seconds=1)))
        sink.commit(1, *_shard(12, 6, "run-b", now + timedelta(seconds=1)))

    probe = f"{bucket}/probe.parquet"
    committed(probe)
    uninterrupted = _publish_in_child(probe, die_at=0)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    writes = int(uninterrupted.stdout.split()[-1])
    assert writes == 4  # predictions, rejects, review, then the manifest
    expected = read_table(probe).sort_values("path").reset_index(drop=True)
    assert len(expected) == 18

    for die_at in range(1, writes + 1):
        out = f"{bucket}/night-{die_at}.parquet"
        committed(out)
        before = read_manifest(out)
        killed = _publish_in_child(out, die_at)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert _exists(f"{out}.publish.lock")  # left behind by the killed holder
        if die_at < writes:  # killed before the manifest: readers of the manifest still see the earlier night
            assert read_manifest(out) == before
        ObjectSink(out).finish()  # the next run's publish
        table = read_table(out).sort_values("path").reset_index(drop=True)
        assert table["path"].is_unique and len(table) == 18, f"killed after write {die_at}"
        pd.testing.assert_frame_equal(
            table.drop(columns=["scored_at", "superseded_at"]), expected.drop(columns=["scored_at", "superseded_at"])
        )
        rejects = read_table(out.replace(".parquet", ".rejects.parquet"))
        assert sorted(rejects["path"]) == [f"s3://in/bad{i}.jpg" for i in (0, 12, 6)]
        assert storage.list_prefix(f"{out}.parts") == [] and not _exists(f"{out}.publish.lock")
        manifest = read_manifest(out)
        assert manifest["tables"]["predictions"]["version"] == storage.info(out).version
        assert json.dumps(manifest).count("canary") == 0


def _duckdb(root: str, columns: list[str]) -> pd.DataFrame:
    """The partitioned table as DuckDB reads it (straight from the bucket through fsspec, or from disk)."""
    import duckdb

    con = duckdb.connect()
    if storage.is_url(root):
        fs, _ = storage.filesystem(root)
        con.register_filesystem(fs)
    glob = f"{root}/{'/'.join(f'{c}=*' for c in columns)}/*.parquet"
    return con.sql(f"select * from read_parquet('{glob}', hive_partitioning = true)").df()


@pytest.mark.parametrize("where", ["bucket", "disk"])
def test_a_partitioned_table_reads_as_one_table_in_duckdb_and_pandas(s3: S3Server, tmp_path: Path, where: str) -> None:
    root = f"{s3.bucket('parted')}/preds" if where == "bucket" else str(tmp_path / "preds")
    (sink,) = open_sink(root, None, "unused", ["date", "label"])
    assert isinstance(sink, PartitionedSink)
    day = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    sink.commit(0, *_shard(0, 6, "night-1", day, labels=("cat", "dog")))
    sink.finish()
    sink.commit(0, *_shard(6, 4, "night-2", day + timedelta(hours=2), labels=("cat", "dog")))
    sink.commit(1, *_shard(0, 2, "night-2", day + timedelta(hours=2), bytes_tag="b", labels=("cat", "dog")))
    sink.finish()
    files = storage.list_prefix(root)
    data = sorted(f[len(root) + 1 :] for f in files if not f[len(root) + 1 :].startswith("_"))
    assert {d.rsplit("/", 1)[0] for d in data} == {
        "date=2026-11-30/label=cat", "date=2026-11-30/label=dog", "date=2026-12-01/label=cat",
        "date=2026-12-01/label=dog",
    }  # fmt: skip
    manifest = json.loads(storage.read_object(f"{root}/_manifest.json"))
    assert sorted(manifest["files"]) == data and manifest["partition_by"] == ["date", "label"]
    assert not any(str(tmp_path) in f for f in manifest["files"])  # keys relative to the table, never absolute

    table = _duckdb(root, ["date", "label"])
    assert len(table) == 12 and set(table["label"]) == {"cat", "dog"}
    assert sorted(table["path"].unique()) == [f"s3://in/{i:04d}.jpg" for i in range(10)]
    newest = table.sort_values("scored_at").drop_duplicates("path", keep="last")  # the current row of each path
    assert len(newest) == 10 and set(newest.loc[newest["path"] == "s3://in/0000.jpg", "image_id"]) == {"idb0000"}
    if where == "disk":  # pandas (pyarrow) reads the folder as one table and leaves the _ files out
        frame = pd.read_parquet(root)
        assert len(frame) == 12 and {"date", "label"} <= set(frame.columns)
    current = sink.current("m")
    assert len(current) == 12 and sorted(current.loc[current["reject_kind"] == "", "path"])[0] == "s3://in/0000.jpg"
    assert set(current.loc[current["path"] == "s3://in/0000.jpg", "image_id"]) == {"idb0000"}
    review = read_table(f"{root}/_review.parquet") if where == "bucket" else pd.read_parquet(f"{root}/_review.parquet")
    assert "idb0000" in set(review["image_id"]) and "id0000" not in set(review["image_id"])  # current rows only


def test_a_partitioned_publish_killed_at_every_write_then_rerun_has_no_duplicate(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LOCK_LEASE_S", 1.0)
    bucket = s3.bucket("parted-kill")
    day = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def committed(root: str) -> None:
        sink = PartitionedSink(root, ["label"])
        sink.commit(0, *_shard(0, 6, "night-1", day, labels=("cat", "dog")))
        sink.commit(1, *_shard(6, 6, "night-1", day, labels=("cat", "dog")))

    probe = f"{bucket}/probe"
    committed(probe)
    done = _publish_in_child(probe, 0, partitioned=True)
    assert done.returncode == 0, done.stderr[-2000:]
    writes = int(done.stdout.split()[-1])
    assert writes == 4 + 2 + 2  # 2 shards x 2 labels, 2 reject files, the review queue, the manifest
    for die_at in range(1, writes + 1):
        root = f"{bucket}/t{die_at}"
        committed(root)
        killed = _publish_in_child(root, die_at, partitioned=True)
        assert killed.returncode == -9, killed.stderr[-2000:]
        PartitionedSink(root, ["label"]).finish()
        table = _duckdb(root, ["label"])
        assert len(table) == 12 and table["path"].is_unique, f"killed after write {die_at}"
        assert not storage.list_prefix(f"{root}/_parts")


def test_publishes_take_turns_and_a_dead_holders_lock_is_taken_over(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"{s3.bucket('turns')}/p.parquet"
    sink = ObjectSink(out)
    now = datetime.now(UTC)
    sink.commit(0, *_shard(0, 3, "run-a", now))
    with storage.exclusive(f"{out}.publish.lock", lease_s=1.0):  # another publish, alive (it renews its lock)
        child = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_IN_A_CHILD, out, "0"], env=clean_env(), stdout=subprocess.PIPE, text=True
        )
        time.sleep(4)  # four leases: a live holder keeps it however long it takes
        assert child.poll() is None and storage.list_prefix(f"{out}.parts")  # waiting: nothing merged yet
        with pytest.raises(FileNotFoundError):
            storage.info(f"{out}.manifest.json")
    assert child.wait(timeout=120) == 0  # its turn came when the lock was released
    assert len(read_table(out)) == 3

    storage.create_exclusive(f"{out}.publish.lock", b"a holder killed -9: never renewed, never removed")
    sink.commit(0, *_shard(3, 3, "run-b", now + timedelta(seconds=1)))
    monkeypatch.setattr(storage, "LOCK_LEASE_S", 1.0)
    start = time.monotonic()
    sink.finish()
    assert 1.0 <= time.monotonic() - start < 30 and len(read_table(out)) == 6  # taken over after a lease
    assert not _exists(f"{out}.publish.lock")

"""Delta prediction tables, on disk and in a real S3-compatible server: a retried shard written once, the current row
derived at read time and time travel, one type per partition column, readers (pandas, Polars, DuckDB), two runs
writing one table at once, and kill -9 at every commit of a shard followed by a re-run: no duplicate, no gap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn.batch.delta_sink import DeltaSink, read_tables
from cnn.batch.sinks import open_sink
from cnn.errors import UserError
from tests.helpers import clean_env
from tests.s3 import S3Server


def shard_rows(
    first: int, n: int, when: datetime, tag: str = "", labels: tuple[str | None, ...] = ("cat",), reject: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n predictions (paths first..first+n-1; `tag` changes their content ids), with embeddings, and one reject,
    stamped like a scoring run's rows."""
    stamp = {"model_name": "m", "model_version": "1", "run_id": "r", "scored_at": when, "flow_run_id": "f"}
    numbers = range(first, first + n)
    predictions = pd.DataFrame(
        {
            "image_id": [f"id{tag}{i:04d}" for i in numbers],
            "path": [f"/in/{i:04d}.jpg" for i in numbers],
            "label": [labels[i % len(labels)] for i in numbers],
            "confidence": 0.5,
            "needs_review": [i % 2 == 0 for i in numbers],
            "urgency": 0.5,
            "explanation": None,
            "source_version": "v1",
            **stamp,
        }
    )
    predictions["embedding"] = [np.full(4, i, np.float16) for i in numbers]
    rejects = pd.DataFrame(
        {"image_id": [""], "path": [f"/in/bad{first}.jpg"], "reason": ["x"], "reject_kind": ["corrupt"]}
    ).assign(attempts=1, **stamp)
    if not reject:
        rejects = rejects.iloc[:0]
    for frame in (predictions, rejects):
        frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
    return predictions, rejects


@pytest.fixture(params=["disk", "bucket"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A place for the tables: a local folder, or a prefix in the suite's S3 server."""
    if request.param == "disk":
        return str(tmp_path / "preds")
    s3: S3Server = request.getfixturevalue("s3")
    return f"{s3.bucket('delta')}/preds"


def test_a_retried_shard_is_written_once_and_the_current_row_is_derived(root: str) -> None:
    (sink,) = open_sink(root, None, "unused")
    assert isinstance(sink, DeltaSink)
    night = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
    sink.commit(0, *shard_rows(0, 6, night), run_key="run-1")
    sink.commit(0, *shard_rows(0, 6, night), run_key="run-1")  # a Prefect retry of the same shard: nothing again
    sink.commit(1, *shard_rows(6, 4, night), run_key="run-1")
    time.sleep(1.1)  # an object's time has whole seconds in S3, and time travel goes by the commit's object time
    after_first = datetime.now(UTC)
    time.sleep(1.1)
    sink.commit(0, *shard_rows(4, 4, night + timedelta(days=1), tag="b"), run_key="run-2")  # 4-5 changed, 6-7 too
    tables = read_tables(sink, current=True)
    predictions = tables["predictions"]
    assert len(predictions) == 14 and not predictions.duplicated(["image_id", "model_name", "model_version"]).any()
    live = predictions[predictions["superseded_at"].isna()]
    assert len(live) == 10 and live["path"].is_unique
    replaced = predictions[predictions["superseded_at"].notna()]
    assert sorted(replaced["path"]) == [f"/in/{i:04d}.jpg" for i in (4, 5, 6, 7)]
    assert (replaced["superseded_at"] == pd.Timestamp(night + timedelta(days=1))).all()
    assert len(tables["rejects"]) == 3 and len(tables["embeddings"]) == 14
    vector = np.frombuffer(tables["embeddings"].sort_values("image_id")["embedding"].iloc[0], np.float16)
    assert vector.tolist() == [0.0] * 4  # float16 bytes, read back with numpy.frombuffer
    assert sorted(tables["review"]["path"]) == [f"/in/{i:04d}.jpg" for i in (0, 2, 4, 6, 8)]  # the current ones

    current = sink.current("m", ["/in/0005.jpg", "/in/0009.jpg", "/in/bad0.jpg", "/in/none.jpg"])
    assert sorted(current["path"]) == ["/in/0005.jpg", "/in/0009.jpg", "/in/bad0.jpg"]
    assert current.set_index("path").loc["/in/0005.jpg", "image_id"] == "idb0005"
    assert current.set_index("path").loc["/in/bad0.jpg", "reject_kind"] == "corrupt"
    assert len(sink.current("m")) == 13 and sink.current("other").empty

    drift = pd.DataFrame({"name": ["confidence", "label"], "p_value": [0.5, 0.01], "flow_run_id": "f"})
    sink.record_drift(drift)
    sink.record_drift(drift)  # a retried drift check of the same flow run: written once
    assert len(read_tables(sink)["drift"]) == 2
    assert set(sink.finish()) == {sink.uri(k) for k in ("predictions", "rejects", "drift")}

    then = read_tables(sink, as_of=after_first, current=True)["predictions"]  # what we said before the second night
    assert len(then) == 10 and then["superseded_at"].isna().all() and not then["image_id"].str.startswith("idb").any()


def test_partition_columns_keep_one_type_and_a_null_partition_follows_the_convention(root: str, tmp_path: Path) -> None:
    import duckdb
    import polars as pl

    (sink,) = open_sink(root, None, "unused", ["date", "label", "model_version"])
    night = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    sink.commit(0, *shard_rows(0, 6, night, labels=("cat", None)), run_key="k")
    sink.commit(1, *shard_rows(6, 4, night + timedelta(hours=2), labels=("dog",)), run_key="k")
    table = sink.table("predictions")
    assert table is not None and table.metadata().partition_columns == ["date", "label", "model_version"]
    files = [uri[len(sink.uri("predictions")) + 1 :] for uri in table.file_uris()]
    assert any("label=__HIVE_DEFAULT_PARTITION__" in f for f in files) and not any("label=nan" in f for f in files)
    assert {f.split("/")[0] for f in files} == {"date=2026-11-30", "date=2026-12-01"}

    dataset = table.to_pyarrow_dataset()
    pandas = dataset.to_table().to_pandas()
    polars = pl.from_arrow(dataset.to_table())
    ducked = duckdb.connect().sql("select model_version, label, date from dataset").df()
    for frame in (pandas, polars.to_pandas(), ducked):
        assert len(frame) == 10 and set(frame["model_version"]) == {"1"}  # text everywhere, as written
        assert int(frame["label"].isna().sum()) == 3  # the null partition reads back as null
    assert str(dataset.schema.field("model_version").type) == "string"
    assert str(dataset.schema.field("date").type) == "date32[day]"
    assert str(polars.schema["model_version"]) == "String"

    with pytest.raises(UserError, match="partitioned by date, label, model_version, not label"):
        DeltaSink(root, ["label"]).commit(2, *shard_rows(10, 1, night), run_key="k")


def test_what_an_output_names(tmp_path: Path, s3: S3Server) -> None:
    with pytest.raises(UserError, match="object store keeps the tables as Delta tables"):
        open_sink(f"{s3.bucket('x')}/night.parquet", None, "unused")
    with pytest.raises(UserError, match="--partition-by writes Delta tables"):
        open_sink(str(tmp_path / "night.parquet"), None, "unused", ["label"])
    with pytest.raises(UserError, match="cannot partition by colour"):
        open_sink(str(tmp_path / "t"), None, "unused", ["colour"])
    with pytest.raises(UserError, match="credentials"):
        open_sink("s3://user:pw@bucket/t", None, "unused")


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime, timedelta
    from cnn.batch import delta_sink
    from tests.cnn.batch.test_delta_sink import shard_rows

    root, first, shards, die_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    original, writes = delta_sink.write_deltalake, []

    def write_then_maybe_die(*args, **kwargs):
        original(*args, **kwargs)
        writes.append(1)
        if len(writes) == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup, no finally

    delta_sink.write_deltalake = write_then_maybe_die
    sink = delta_sink.DeltaSink(root)
    start = datetime(2026, 11, 30, tzinfo=UTC)
    for shard in range(shards):
        at = first + 5 * shard
        sink.commit(shard, *shard_rows(at, 5, start + timedelta(seconds=at)), run_key=f"writer-{first}")
    print(len(writes))
    """
)


def _writer(root: str, first: int, shards: int, die_at: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, root, str(first), str(shards), str(die_at)],
        env=clean_env(),
        cwd=Path(__file__).resolve().parents[3],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_runs_writing_one_table_at_once_lose_nothing(root: str) -> None:
    runs = [_writer(root, 0, 4), _writer(root, 1000, 4)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
    tables = read_tables(DeltaSink(root))
    expected = sorted(f"/in/{i:04d}.jpg" for start in (0, 1000) for i in range(start, start + 20))
    assert sorted(tables["predictions"]["path"]) == expected
    assert len(tables["rejects"]) == 8 and len(tables["embeddings"]) == 40
    history = DeltaSink(root).table("predictions").history()  # type: ignore[union-attr]
    assert len(history) == 8  # one commit per shard, none lost to the other run


def test_kill_9_after_every_commit_of_a_shard_then_a_rerun_leaves_no_duplicate_and_no_gap(root: str) -> None:
    """Each shard commits its rejects, then its predictions with their embeddings (2 writes); a run of 2 shards is
    killed after each of its 4 writes, and the re-run (planning from `current`, as `cnn score` does) scores only what
    is missing."""
    whole = _writer(f"{root}-probe", 0, 2)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    writes = int(out.split()[-1])
    assert writes == 4
    every = sorted(f"/in/{i:04d}.jpg" for i in range(10)) + ["/in/bad0.jpg", "/in/bad5.jpg"]
    for die_at in range(1, writes + 1):
        where = f"{root}-{die_at}"
        killed = _writer(where, 0, 2, die_at)
        killed.communicate(timeout=300)
        assert killed.returncode == -9
        sink = DeltaSink(where)
        done = set(sink.current("m", every)["path"])
        again = datetime(2026, 12, 1, tzinfo=UTC)
        missing = [i for i in range(10) if f"/in/{i:04d}.jpg" not in done]
        if missing:  # the re-run's plan: what no table holds yet, in one shard
            predictions, rejects = shard_rows(0, 10, again, reject=False)
            keep = predictions["path"].isin([f"/in/{i:04d}.jpg" for i in missing])
            sink.commit(0, predictions[keep], rejects, run_key=f"rerun-{die_at}")
        tables = read_tables(sink, current=True)
        predictions = tables["predictions"]
        assert sorted(predictions["path"]) == every[:10], f"killed after write {die_at}"  # each path once
        assert predictions["superseded_at"].isna().all()
        embeddings = tables["embeddings"]
        assert sorted(embeddings["image_id"]) == sorted(predictions["image_id"])  # each prediction's vector, once


def test_tables_cli_optimizes_vacuums_exports_and_migrates(cnn_home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cnn.batch.file_sink import FileSink
    from flows.cli import app

    runner = CliRunner()
    root = str(tmp_path / "preds")
    sink = DeltaSink(root)
    night = datetime(2026, 11, 30, tzinfo=UTC)
    for shard in range(4):
        sink.commit(shard, *shard_rows(5 * shard, 5, night), run_key="k")
    before = len(sink.table("predictions").file_uris())  # type: ignore[union-attr]
    optimized = runner.invoke(app, ["tables", "optimize", root])
    assert optimized.exit_code == 0, optimized.output
    assert before == 4 and len(sink.table("predictions").file_uris()) == 1  # type: ignore[union-attr]
    assert "predictions" in optimized.output
    vacuumed = runner.invoke(app, ["tables", "vacuum", root])
    assert vacuumed.exit_code == 0, vacuumed.output
    too_short = runner.invoke(app, ["tables", "vacuum", root, "--retain-hours", "1"])
    assert too_short.exit_code == 2 and "below 168" in too_short.output and "Traceback" not in too_short.output
    assert len(read_tables(sink)["predictions"]) == 20  # nothing a version needs was removed

    exported = runner.invoke(app, ["tables", "export", root, str(tmp_path / "now.csv")])
    assert exported.exit_code == 0, exported.output
    assert len(pd.read_csv(tmp_path / "now.csv")) == 20
    queue = runner.invoke(app, ["tables", "export", root, str(tmp_path / "review.csv"), "--table", "review"])
    assert queue.exit_code == 0, queue.output
    review = pd.read_csv(tmp_path / "review.csv")
    assert len(review) == 10 and "reviewed_label" in review.columns  # the even paths: needs_review
    unknown = runner.invoke(app, ["tables", "export", root, str(tmp_path / "x.csv"), "--table", "nope"])
    assert unknown.exit_code == 2 and "name one of predictions" in unknown.output
    bad = runner.invoke(app, ["tables", "export", root, str(tmp_path / "x.csv"), "--as-of", "yesterday"])
    assert bad.exit_code == 2 and "not an ISO time" in bad.output
    missing = runner.invoke(app, ["tables", "optimize", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "holds no Delta prediction tables" in missing.output

    old = FileSink(tmp_path / "old.csv")  # what an earlier version wrote: a CSV table and its side files
    old.commit(0, *shard_rows(0, 6, night))
    old.finish()
    queue = pd.read_csv(tmp_path / "old.review.csv", dtype=str, keep_default_na=False)
    queue.loc[queue["path"] == "/in/0002.jpg", "reviewed_label"] = "dog"  # a reviewer's answer, typed into the file
    queue.to_csv(tmp_path / "old.review.csv", index=False)
    old.commit(0, *shard_rows(6, 3, night))  # committed, never published: a part the migration includes
    for _ in range(2):  # a second migration writes nothing
        moved = runner.invoke(app, ["tables", "migrate", str(tmp_path / "old.csv"), str(tmp_path / "new")])
        assert moved.exit_code == 0, moved.output
    tables = read_tables(DeltaSink(str(tmp_path / "new")))
    assert sorted(tables["predictions"]["path"]) == [f"/in/{i:04d}.jpg" for i in range(9)]
    assert tables["predictions"]["confidence"].dtype == float and len(tables["embeddings"]) == 9
    assert len(tables["rejects"]) == 2
    answered = tables["review"].set_index("path")["reviewed_label"]
    assert answered["/in/0002.jpg"] == "dog" and answered.drop("/in/0002.jpg").isna().all()  # the answer kept


def test_a_partitioned_folder_of_an_earlier_version_migrates_with_its_rejects(tmp_path: Path) -> None:
    """The layout earlier versions wrote with --partition-by: data files under date=/label= folders (partition values
    only in the path; `label=nan` for a missing label), rejects and embeddings under `_` folders."""
    from cnn.batch.table_tools import migrate
    from cnn.batch.tables import split_embeddings

    old = tmp_path / "old"
    predictions, rejects = shard_rows(0, 6, datetime(2026, 11, 30, tzinfo=UTC), labels=("cat", "dog"))
    predictions, embeddings = split_embeddings(predictions.drop(columns="superseded_at"))
    for label, rows in predictions.groupby("label"):
        folder = old / "date=2026-11-30" / f"label={label}"
        folder.mkdir(parents=True)
        rows.drop(columns="label").to_parquet(folder / "shard-000000-a.parquet", index=False)
    for side, frame in (("_rejects", rejects), ("_embeddings", embeddings)):
        (old / side).mkdir()
        frame.to_parquet(old / side / "shard-000000-a.parquet", index=False)
    (old / "_manifest.json").write_text("{}")
    assert migrate(str(old), str(tmp_path / "new")) == {"predictions": 6, "rejects": 1}
    tables = read_tables(DeltaSink(str(tmp_path / "new")))
    assert sorted(tables["predictions"]["label"]) == ["cat"] * 3 + ["dog"] * 3
    assert "date" not in tables["predictions"].columns and len(tables["embeddings"]) == 6
    with pytest.raises(UserError, match="no prediction table there"):
        migrate(str(tmp_path / "nothing.parquet"), str(tmp_path / "new2"))

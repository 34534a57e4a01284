"""Planning: duplicates by content, reserved column names, objects read once, the copies of killed runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.plan import list_inputs, mark_duplicates, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions, summarise
from cnn.batch.shard import Scorer
from cnn.errors import UserError
from cnn.model.run import FitResult
from tests.cnn.batch.batches import incoming_batch, scoring_predictor
from tests.helpers import write_patterns
from tests.s3 import S3Server

MODEL = ModelRef("patterns", "1", "run-1")


def test_mark_duplicates_in_path_order_and_against_earlier_runs(tmp_path: Path) -> None:
    folder = write_patterns(tmp_path / "in", per_class=1)
    first = folder / "checker" / "checker000.png"
    shutil.copy(first, folder / "zz_copy.png")
    files = list_inputs(str(folder)).files
    marked = mark_duplicates(files).set_index("path")
    assert marked.loc[str(folder / "zz_copy.png"), "same_bytes_as"] == str(first)
    assert marked["same_bytes_as"].notna().sum() == 1
    earlier = {marked.loc[str(first), "image_id"]: "/old/place.png"}
    again = mark_duplicates(files, earlier).set_index("path")
    assert again.loc[str(first), "same_bytes_as"] == "/old/place.png"


@pytest.mark.parametrize(
    "column",
    ["shard", "reason", "label", "duplicate_of", "same_bytes_as", "neighbour_label", "reject_kind", "prob_cat"],
)
def test_id_columns_named_like_output_columns_are_refused_up_front(tmp_path: Path, column: str) -> None:
    folder = write_patterns(tmp_path / "in", per_class=1)
    pd.DataFrame({"path": ["checker/checker000.png"], column: ["x"]}).to_csv(folder / "m.csv", index=False)
    with pytest.raises(UserError, match=f"manifest column '{column}' has the name of a column the output has"):
        list_inputs(str(folder / "m.csv"))


def test_a_bucket_is_read_once_per_new_object_and_not_at_all_when_unchanged(
    trained: FitResult, tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnn.batch.delta_sink import DeltaSink
    from cnn.io import storage

    bucket = s3.bucket("scoring")
    folder = incoming_batch(tmp_path / "in")
    fs, root = storage.filesystem(bucket)
    fs.pipe({f"{root}/in/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    sink = DeltaSink(f"{bucket}/out/preds")
    inputs = list_inputs(f"{bucket}/in/")
    assert (inputs.files["source_version"].str.len() > 0).all()
    plan = plan_shards(inputs, [sink], MODEL, shard_size=4, run_dir=tmp_path / "run")
    copies = sorted((tmp_path / "run" / "objects").iterdir())
    assert plan.files == 12 and len(copies) == 11  # each object read once at planning; equal bytes kept once
    fs.rm(f"{root}/in", recursive=True)  # the shards decode the plan's copies: they never fetch an object again
    scorer = Scorer(scoring_predictor(trained), MODEL, ScoringOptions())
    results = [scorer.score_shard(plan, i, [sink]) for i in range(3)]
    summary = summarise(results, plan, MODEL, seconds=1.0, tables=sink.finish())
    assert (summary.predicted, summary.rejected) == (9, 3)
    assert summary.rejects_by_kind == {"empty": 1, "not_an_image": 1, "duplicate": 1}
    assert not list((tmp_path / "run" / "objects").iterdir())  # each shard removed its copies once committed
    plan.remove()
    assert not (tmp_path / "run" / "objects").exists()

    fs.pipe({f"{root}/in/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    reads: list[str] = []
    real_read = storage.read_object
    monkeypatch.setattr(storage, "read_object", lambda url, *a: reads.append(url) or real_read(url, *a))
    again = plan_shards(list_inputs(f"{bucket}/in/"), [sink], MODEL, shard_size=4, run_dir=tmp_path / "run")
    assert (again.files, again.skipped) == (0, 12)
    assert not [r for r in reads if "/in/" in r]  # same ETags: the recorded content ids, no object read


def test_copies_a_killed_run_left_are_swept_after_a_week_and_a_live_runs_are_kept(tmp_path: Path) -> None:
    import os
    import time

    from cnn.batch.plan import sweep_copies

    for run in ("killed", "live"):
        (tmp_path / run / "objects").mkdir(parents=True)
        (tmp_path / run / "objects" / "ab12").write_bytes(b"photo")
    week_ago = time.time() - 8 * 86400
    for path in (tmp_path / "killed" / "objects" / "ab12", tmp_path / "killed" / "objects"):
        os.utime(path, (week_ago, week_ago))
    assert sweep_copies(tmp_path) == 1
    assert not (tmp_path / "killed" / "objects").exists() and (tmp_path / "live" / "objects" / "ab12").is_file()


def test_unchanged_local_files_are_known_by_their_stat_without_reading_them(
    trained: FitResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second night reads none of the files the first scored; a file rewritten since is read again; and
    --verify-content reads everything (where timestamps cannot be trusted)."""
    from cnn.batch import plan as planning
    from cnn.batch.file_sink import FileSink

    folder = incoming_batch(tmp_path / "in")
    sink = FileSink(tmp_path / "out" / "preds.parquet")
    first = plan_shards(list_inputs(str(folder)), [sink], MODEL, shard_size=4, run_dir=tmp_path / "run")
    scorer = Scorer(scoring_predictor(trained), MODEL, ScoringOptions())
    for shard in range(first.shards):
        scorer.score_shard(first, shard, [sink])
    sink.finish()

    hashed: list[str] = []
    real = planning.content_ids
    monkeypatch.setattr(planning, "content_ids", lambda paths, **kw: hashed.extend(paths) or real(paths, **kw))
    again = plan_shards(list_inputs(str(folder)), [sink], MODEL, shard_size=4, run_dir=tmp_path / "run2")
    assert (again.files, hashed) == (0, [])
    changed = sorted(folder.rglob("*.png"))[0]
    changed.write_bytes(changed.read_bytes())  # the same bytes written again: its ctime moves, so it is read
    plan_shards(list_inputs(str(folder)), [sink], MODEL, shard_size=4, run_dir=tmp_path / "run3")
    assert hashed == [str(changed)]
    hashed.clear()
    verified = plan_shards(
        list_inputs(str(folder)), [sink], MODEL, shard_size=4, run_dir=tmp_path / "run4", verify_content=True
    )
    assert verified.files == 0 and len(hashed) == len(list_inputs(str(folder)).files)


def test_shards_hold_about_the_same_pixels_whatever_the_input_size() -> None:
    from cnn.batch.plan import MAX_SHARD_FILES, shard_files

    assert shard_files(224) == 256 and shard_files(512) == 256  # never fewer than at 224 px
    assert shard_files(112) == 1024 and shard_files(64) == 3136
    assert shard_files(28) == MAX_SHARD_FILES  # 16384 by pixels, capped
    assert shard_files(28, shard_size=32) == 32  # a size the user gives wins

"""Scoring shards: rows and rejects, exactly once, decode-ahead, increments, pseudonyms."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.file_sink import FileSink
from cnn.batch.masking import Masking
from cnn.batch.plan import list_inputs, mark_duplicates, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions, ScoringSummary, ShardPlan, summarise
from cnn.batch.shard import Scorer
from cnn.batch.sinks import Sink
from cnn.errors import UserError
from cnn.infer.predictor import Predictor
from cnn.io.decode import RejectKind
from cnn.model.run import FitResult
from tests.cnn.batch.batches import incoming_batch, scoring_predictor
from tests.helpers import PG_URL, requires_postgres, write_patterns

MODEL = ModelRef("patterns", "1", "run-1")


def test_score_files_rows_rejects_and_ids(trained: FitResult, tmp_path: Path) -> None:
    folder = incoming_batch(tmp_path / "in")
    files = mark_duplicates(list_inputs(str(folder)).files.assign(claim_id=lambda f: [f"C{i}" for i in f.index]))
    options = ScoringOptions(batch_size=4, top_k=2, review_below=0.99)
    scored = Scorer(scoring_predictor(trained), MODEL, options).score_files(files, ["claim_id"])
    preds, rejects = scored.predictions, scored.rejects
    assert len(preds) == 9 and len(rejects) == 3
    assert sorted(preds["path"].tolist() + rejects["path"].tolist()) == sorted(files["path"])
    assert dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["reject_kind"])) == {
        "empty.png": RejectKind.EMPTY,
        "notes.png": RejectKind.NOT_AN_IMAGE,
        "zz_copy.png": RejectKind.DUPLICATE,
    }
    assert rejects["claim_id"].notna().all() and preds["claim_id"].str.startswith("C").all()
    probs = preds[[f"prob_{c}" for c in trained.contract.classes]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-5
    assert (preds["label"] == [trained.contract.classes[i] for i in probs.argmax(axis=1)]).all()
    assert (preds["needs_review"] == (preds["confidence"] < 0.99)).all()
    assert preds["top_k"].map(lambda t: len(json.loads(t))).eq(2).all()
    assert set(preds["model_name"]) == {"patterns"} and set(rejects["model_version"]) == {"1"}


def test_plan_then_shards_then_summary_exactly_once(trained: FitResult, tmp_path: Path) -> None:
    folder = incoming_batch(tmp_path / "in")
    sink = FileSink(tmp_path / "out.parquet")
    inputs = list_inputs(str(folder))
    plan = plan_shards(inputs, [sink], MODEL, shard_size=4, run_dir=tmp_path)
    assert (plan.files, plan.shards, plan.skipped) == (12, 3, 0)
    predictor = scoring_predictor(trained)
    scorer = Scorer(predictor, MODEL, ScoringOptions())
    results = [scorer.score_shard(plan, i, [sink]) for i in range(plan.shards)]
    summary = summarise(results, plan, MODEL, seconds=1.0, tables=sink.finish())
    assert (summary.predicted, summary.rejected, summary.files) == (9, 3, 12)
    assert summary.rejects_by_kind == {"empty": 1, "not_an_image": 1, "duplicate": 1}
    assert sum(summary.labels.values()) == 9 and summary.model == "patterns v1"
    assert {"item": "rejected: duplicate", "count": 1} in summary.rows()
    again = plan_shards(inputs, [sink], MODEL, shard_size=4, run_dir=tmp_path)
    assert (again.files, again.shards, again.skipped) == (0, 0, 12)  # everything is accounted for
    new_champion = ModelRef("patterns", "2", "")
    assert plan_shards(inputs, [sink], new_champion, shard_size=4, run_dir=tmp_path).files == 0  # scored: by v1
    assert plan_shards(inputs, [sink], new_champion, shard_size=4, run_dir=tmp_path, rescore=True).files == 12


def test_decoding_the_next_shard_ahead_scores_the_same_rows(
    trained: FitResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With decode_ahead, shard k+1 decodes while shard k is in inference, and each shard takes its own decoded
    files from there (no second decode); the tables are the same as decoding each shard in turn."""
    from cnn.batch import shard as shards

    folder = incoming_batch(tmp_path / "in")
    predictor, tables = scoring_predictor(trained), {}
    decoded_now: list[int] = []
    real = shards.decode_rows
    for ahead in (False, True):
        sink = FileSink(tmp_path / f"ahead-{ahead}.parquet")
        plan = plan_shards(list_inputs(str(folder)), [sink], MODEL, shard_size=4, run_dir=tmp_path / str(ahead))
        decoded_now.clear()
        monkeypatch.setattr(shards, "decode_rows", lambda f, *a: decoded_now.append(len(f)) or real(f, *a))
        scorer = Scorer(predictor, MODEL, ScoringOptions(decode_ahead=ahead))
        for i in range(plan.shards):
            scorer.score_shard(plan, i, [sink])
        sink.finish()
        tables[ahead] = pd.read_parquet(tmp_path / f"ahead-{ahead}.parquet").drop(columns=["scored_at"])
        assert len(decoded_now) == plan.shards  # every shard decoded exactly once, ahead or in turn
    pd.testing.assert_frame_equal(tables[False], tables[True])


def _run(folder: Path, sink: FileSink, predictor: Predictor, tmp_path: Path, model: ModelRef = MODEL, **plan: object):
    inputs = list_inputs(str(folder))
    shards = plan_shards(inputs, [sink], model, shard_size=4, run_dir=tmp_path, **plan)  # type: ignore[arg-type]
    masking = plan.get("masking", Masking())
    scorer = Scorer(predictor, model, ScoringOptions(), masking)  # type: ignore[arg-type]
    results = [scorer.score_shard(shards, i, [sink]) for i in range(shards.shards)]
    return summarise(results, shards, model, seconds=1.0, tables=sink.finish())


def test_increments_follow_content_retry_transient_rejects_and_rescore_keeps_history(
    trained: FitResult, tmp_path: Path
) -> None:
    folder = write_patterns(tmp_path / "in", per_class=2, seed=3)
    photos = sorted(folder.rglob("*.png"))
    uploading = folder / "uploading.png"
    uploading.write_bytes(photos[0].read_bytes()[:120])  # an upload still in progress when the run starts
    stuck = folder / "stuck.png"
    stuck.write_bytes(photos[1].read_bytes()[:150])  # truncated for good
    sink, predictor = FileSink(tmp_path / "out.parquet"), scoring_predictor(trained)

    first = _run(folder, sink, predictor, tmp_path, max_attempts=2)
    assert (first.predicted, first.rejects_by_kind) == (6, {"truncated": 2})

    fresh = sorted(write_patterns(tmp_path / "fresh", per_class=1, seed=11).rglob("*.png"))
    shutil.copy(fresh[0], photos[3])  # replaced in place with other bytes
    shutil.copy(fresh[1], uploading)  # the upload finished
    second = _run(folder, sink, predictor, tmp_path, max_attempts=2)
    # the replaced photo and the finished upload are scored, the stuck file is tried a second (last) time
    assert (second.files, second.predicted, second.rejected, second.retried) == (3, 2, 1, 1)
    third = _run(folder, sink, predictor, tmp_path, max_attempts=2)
    assert (third.files, third.skipped) == (0, 8)

    table, rejects = pd.read_parquet(sink.path), pd.read_parquet(sink.rejects_path)
    assert rejects.set_index("path").loc[str(stuck), "attempts"] == 2
    history = pd.concat([table, rejects])
    current = history[history["superseded_at"].isna()]
    assert current["path"].is_unique and sorted(current["path"]) == sorted(map(str, folder.rglob("*.png")))
    assert len(history) == 8 + 2  # the replaced photo's and the half upload's earlier rows are kept
    replaced = history[history["path"] == str(photos[3])].sort_values("scored_at")
    assert replaced["superseded_at"].notna().tolist() == [True, False]

    v2 = ModelRef("patterns", "2", "run-2")
    rescored = _run(folder, sink, predictor, tmp_path, model=v2, rescore=True, max_attempts=2)
    assert rescored.files == 8
    table = pd.read_parquet(sink.path)
    current = table[table["superseded_at"].isna()]
    assert set(current["model_version"]) == {"2"} and len(current) == 7  # the stuck file: a v2 reject
    assert (table["model_version"] == "1").sum() == 6 + 2  # v1's rows kept, superseded
    again = _run(folder, sink, predictor, tmp_path, model=v2, rescore=True)
    assert (again.files, again.retried) == (1, 1)  # a rescore resumes: only v2's transient reject is tried again


def test_pseudonymized_columns_and_paths_still_make_increments_work(trained: FitResult, tmp_path: Path) -> None:
    folder = write_patterns(tmp_path / "in", per_class=2, seed=4)
    shutil.copy(next(folder.glob("checker/*.png")), folder / "zz_copy.png")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    pd.DataFrame({"path": files, "claim_id": [f"CLAIM-{i:04d}" for i in range(len(files))]}).to_csv(
        folder / "claims.csv", index=False
    )
    masking = Masking(("claim_id", "path"), b"key")
    sink, predictor = FileSink(tmp_path / "out.parquet"), scoring_predictor(trained)
    first = _run(folder / "claims.csv", sink, predictor, tmp_path, masking=masking)
    assert (first.predicted, first.rejected) == (6, 1)
    table, rejects = pd.read_parquet(sink.path), pd.read_parquet(sink.rejects_path)
    shown = pd.concat([table, rejects])
    assert shown["claim_id"].str.startswith("p-").all() and shown["path"].str.startswith("p-").all()
    text = shown.to_csv()
    assert "CLAIM-" not in text and str(folder) not in text and ".png" not in text  # nor in a duplicate's reason
    from cnn.io.pseudonyms import pseudonym

    assert pseudonym("CLAIM-0000", b"key") in set(shown["claim_id"])  # joins back through the key holder
    again = _run(folder / "claims.csv", sink, predictor, tmp_path, masking=masking)
    assert again.files == 0  # "already done" compares the pseudonymized paths
    with pytest.raises(UserError, match="cannot pseudonymize patient"):
        _run(folder / "claims.csv", sink, predictor, tmp_path, masking=Masking(("patient",), b"key"))


SINKS = ["parquet", "csv", "sqlite", pytest.param("postgresql", marks=requires_postgres), "delta"]


@pytest.fixture(params=SINKS)
def any_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    """A fresh sink of each kind: files, SQLite, PostgreSQL (tables of their own, dropped after), Delta."""
    from cnn.batch.delta_sink import DeltaSink
    from cnn.batch.sql_sink import SqlSink

    kind, table = request.param, f"preds_{uuid.uuid4().hex[:8]}"
    yield {
        "parquet": lambda: FileSink(tmp_path / "out.parquet"),
        "csv": lambda: FileSink(tmp_path / "out.csv"),
        "sqlite": lambda: SqlSink(f"sqlite:///{tmp_path / 'out.db'}", "preds"),
        "postgresql": lambda: SqlSink(PG_URL, table),
        "delta": lambda: DeltaSink(str(tmp_path / "delta")),
    }[kind]()
    if kind == "postgresql":
        from sqlalchemy import create_engine, text

        with create_engine(PG_URL).begin() as conn:
            for side in ("", "_rejects", "_review", "_duplicates", "_embeddings", "_drift"):
                conn.execute(text(f'DROP TABLE IF EXISTS "{table}{side}"'))


def held(sink: Sink, model: str = "patterns") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, rejects): the current rows the sink holds for `model`, one per path."""
    rows = sink.current(model)
    return rows[rows["reject_kind"] == ""], rows[rows["reject_kind"] != ""]


def _score(plan: ShardPlan, sink: Sink, predictor: Predictor) -> ScoringSummary:
    scorer = Scorer(predictor, MODEL, ScoringOptions())
    results = [scorer.score_shard(plan, i, [sink]) for i in range(plan.shards)]
    return summarise(results, plan, MODEL, seconds=1.0, tables=sink.finish())


def test_a_file_replaced_by_a_copy_after_planning_never_takes_another_files_row(
    trained: FitResult, tmp_path: Path, any_sink: Sink
) -> None:
    """Between planning and decoding, a file of a later shard is replaced by a copy of a file of an earlier shard (a
    duplicate photo still uploading at scan time). Its row must not replace the earlier file's (same bytes, model
    and version): it is the duplicate, and the summary's counts are what the sinks hold."""
    folder = write_patterns(tmp_path / "in", per_class=4, seed=8)
    plan = plan_shards(list_inputs(str(folder)), [any_sink], MODEL, shard_size=4, run_dir=tmp_path)
    first, last = plan.rows(0)["path"].iloc[0], plan.rows(plan.shards - 1)["path"].iloc[-1]
    shutil.copy(first, Path(last).with_name(".uploading"))  # the hook: after planning, before decoding
    Path(last).with_name(".uploading").replace(last)
    summary = _score(plan, any_sink, scoring_predictor(trained))
    predicted, rejected = held(any_sink)
    assert first in set(predicted["path"]) and list(rejected["path"]) == [last]  # the earlier file keeps its row
    assert (summary.predicted, summary.rejected) == (len(predicted), len(rejected)) == (11, 1)
    assert summary.rejects_by_kind == {"duplicate": 1}


def test_two_paths_with_the_same_bytes_never_share_a_row_across_runs(
    trained: FitResult, tmp_path: Path, any_sink: Sink
) -> None:
    """A row's identity is its path and its bytes. Tonight's batch holds a copy of a photo an earlier night scored
    under another path, and a file that turns into a copy of another of last night's photos after planning (a hook
    between planning and decoding): each keeps a row of its own, with the bytes that were decoded, and last night's
    rows stay as they were. (With a key of bytes alone, tonight's rows replaced last night's: paths lost in
    silence, and the summary said more than the tables held.)"""
    predictor = scoring_predictor(trained)
    night1 = sorted(write_patterns(tmp_path / "night1", per_class=2, seed=21).rglob("*.png"))
    first = _score(
        plan_shards(list_inputs(str(tmp_path / "night1")), [any_sink], MODEL, 4, tmp_path), any_sink, predictor
    )
    predicted, rejected = held(any_sink)
    assert (first.predicted, first.rejected) == (len(predicted), len(rejected)) == (6, 0)
    before = dict(zip(predicted["path"], predicted["image_id"]))

    night2 = sorted(write_patterns(tmp_path / "night2", per_class=2, seed=22).rglob("*.png"))
    shutil.copy(night1[0], night2[0])  # a copy of last night's photo, there at scan time
    plan = plan_shards(list_inputs(str(tmp_path / "night2")), [any_sink], MODEL, 4, tmp_path)
    shutil.copy(night1[1], night2[1].with_name(".uploading"))  # the hook: after planning, before decoding
    night2[1].with_name(".uploading").replace(night2[1])
    second = _score(plan, any_sink, predictor)

    predicted, rejected = held(any_sink)
    ids = dict(zip(predicted["path"], predicted["image_id"]))
    assert {path: ids.get(path) for path in before} == before  # last night's rows are all still there
    assert ids[str(night2[0])] == before[str(night1[0])] and ids[str(night2[1])] == before[str(night1[1])]
    assert len(predicted) == 12 and rejected.empty  # every path of both nights once
    assert (second.predicted, second.rejected) == (len(predicted) - first.predicted, 0)

"""Chaos: kill -9 at random moments of ingest and of scoring into Parquet, Delta tables, SQLite and PostgreSQL, again
and again.
After every re-run: each input exactly once (one current row per path, for its newest bytes), no duplicate key,
no temporary file left, and a dataset that loads whole after every kill."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from cnn.data.dataset import Dataset
from cnn.model.run import FitResult
from tests.helpers import PG_URL, requires_postgres, write_patterns

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[3]
ROUNDS = 2


def _start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos_worker", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its decode workers die with it, as when a node's pod is killed
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def _complete(*args: object) -> None:
    proc = _start(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _leftovers(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if p.name.endswith((".tmp", ".parts")) or p.name == "plan.parquet"]


def test_ingest_killed_at_random_moments_always_leaves_a_dataset_that_loads(tmp_path: Path) -> None:
    rng = random.Random(7)
    source, root = tmp_path / "src", tmp_path / "datasets" / "ds"
    write_patterns(source, per_class=20, seed=1)
    _complete("ingest", source, root)
    for round_ in range(ROUNDS):
        before = len(Dataset(root).manifest())
        write_patterns(source, per_class=20 + 10 * (round_ + 1), seed=2 + round_)  # new files, old ones replaced
        files = len(list(source.rglob("*.png")))
        proc = _start("ingest", source, root)
        time.sleep(rng.uniform(0.5, 4.0))  # a run takes about 4 s here: from imports to the commit
        _kill(proc)
        killed = Dataset(root)  # whatever the moment: the previous dataset or the new one, whole
        manifest, meta, cache = killed.manifest(), killed.meta(), killed.open_cache()
        assert len(manifest) in (before, files)
        assert set(manifest.loc[manifest["status"] == "ok", "image_id"]) <= set(cache.index())
        assert sorted(manifest.loc[manifest["status"] == "ok", "label"].unique()) == meta.classes
        _complete("ingest", source, root)
        done = Dataset(root)
        assert len(done.manifest()) == files and len(done.open_cache()) == done.manifest()["image_id"].nunique()
        assert not _leftovers(root)
        assert len(list((root / "generations").iterdir())) == 1 and len(list(done.cache_dir.iterdir())) == 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tables(output: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    if isinstance(output, Path) and not output.suffix:  # Delta tables: the current row derived as readers do
        from cnn.batch.delta_sink import DeltaSink, read_tables

        tables = read_tables(DeltaSink(str(output)), current=True)
        return tables["predictions"], tables["rejects"]
    if isinstance(output, Path):
        return pd.read_parquet(output), pd.read_parquet(output.with_name(f"{output.stem}.rejects.parquet"))
    from sqlalchemy import create_engine

    url, _, table = output.partition("#")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return (
                pd.read_sql_query(f'select * from "{table}"', conn),
                pd.read_sql_query(f'select * from "{table}_rejects"', conn),
            )
    finally:
        engine.dispose()


def _check_exactly_once(output: str | Path, folder: Path) -> None:
    predictions, rejects = _tables(output)
    assert not predictions.duplicated(["image_id", "model_name", "model_version"]).any()
    # Delta tables keep every attempt at every version of a rejected file (rows are never rewritten); the others keep
    # the last
    attempt = ["image_id", "attempts"] if isinstance(output, Path) and not output.suffix else []
    assert not rejects.duplicated(["path", "model_name", "model_version", *attempt]).any()
    rows = pd.concat([predictions, rejects], ignore_index=True)
    current = rows[rows["superseded_at"].isna()]
    files = {str(p): p for p in folder.rglob("*") if p.is_file()}
    assert current["path"].is_unique, f"{output}: a path with two current rows"
    assert set(current["path"]) == set(files), f"{output}: gaps {set(files) - set(current['path'])}"
    newest = {path: _sha256(files[path]) for path in current["path"]}
    assert (current["image_id"] == current["path"].map(newest)).all(), f"{output}: a row for bytes no longer there"


@requires_postgres
def test_scoring_killed_at_random_moments_then_rerun_leaves_every_input_exactly_once(
    trained: FitResult, tmp_path: Path
) -> None:
    rng = random.Random(11)
    incoming, run_dir = tmp_path / "incoming", tmp_path / "run"
    table = f"chaos_{uuid.uuid4().hex[:8]}"
    outputs: list[str | Path] = [
        tmp_path / "out" / "p.parquet",
        tmp_path / "out" / "delta",
        f"sqlite:///{tmp_path / 'p.db'}#preds",
        f"{PG_URL}#{table}",
    ]
    contract = trained.contract.save(tmp_path / "contract.json")
    args = ("score", incoming, trained.weights, contract, run_dir, *outputs)
    try:
        for round_ in range(ROUNDS):
            write_patterns(incoming, per_class=5 * (round_ + 1), seed=round_)  # new files, old ones replaced
            first = next(incoming.glob("checker/*.png"))
            (incoming / "half.png").write_bytes(first.read_bytes()[: 60 + round_])  # a transient reject
            (incoming / "copy.png").write_bytes(first.read_bytes())  # a duplicate
            proc = _start(*args)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "planned", proc.communicate()[1]
            time.sleep(rng.uniform(0.0, 3.0))  # from the first shard to past the merge
            _kill(proc)
            _complete(*args)
            for output in outputs:
                _check_exactly_once(output, incoming)
            assert not _leftovers(tmp_path / "out", run_dir)
    finally:
        from sqlalchemy import create_engine, text

        with create_engine(PG_URL).begin() as conn:
            conn.execute(text(f'drop table if exists "{table}", "{table}_rejects"'))

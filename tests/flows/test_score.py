"""`cnn score`: every input exactly once (prediction or reject), idempotent re-runs, kill -9 and re-run,
SQLite and PostgreSQL tables, id columns carried, and agreement with the MLflow pyfunc."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cnn.data.dataset import Dataset
from flows.cli import app
from tests.helpers import (
    PG_URL,
    api_json,
    clean_env,
    free_port,
    requires_postgres,
    unusable_compiler,
    write_patterns,
)

runner = CliRunner()
CNN = str(Path(sys.executable).with_name("cnn"))
pytestmark = [pytest.mark.slow, pytest.mark.slowest]  # minutes: in make test-all and CI


@pytest.fixture(scope="module")
def home(champion_home: Path) -> Path:
    """A workspace with the pattern dataset and a registered `patterns` champion (tests/flows/conftest.py)."""
    return champion_home


def _mixed_folder(base: Path, n_per_class: int = 4, seed: int = 7) -> tuple[Path, int]:
    folder = write_patterns(base, per_class=n_per_class, seed=seed)
    (folder / "bad").mkdir()
    (folder / "bad" / "empty.png").write_bytes(b"")
    (folder / "bad" / "notes.jpg").write_text("call the adjuster")
    first = next(folder.glob("checker/*.png"))
    (folder / "bad" / "half.png").write_bytes(first.read_bytes()[:100])
    shutil.copy(first, folder / "copy_of_first.png")
    return folder, 3 * n_per_class + 4


def _paths_once(predictions: pd.DataFrame, rejects: pd.DataFrame) -> list[str]:
    return sorted(predictions["path"].tolist() + rejects["path"].tolist())


def test_exactly_once_then_idempotent_then_incremental(home: Path, tmp_path: Path) -> None:
    folder, total = _mixed_folder(tmp_path / "incoming")
    out = tmp_path / "preds.parquet"
    args = [
        "score",
        str(folder),
        "--model",
        "patterns",
        "--output",
        str(out),
        "--review-below",
        "0.9",
        "--shard-size",
        "5",
        "--top-k",
        "2",
    ]
    result = runner.invoke(app, args + ["--table", f"sqlite:///{tmp_path / 'p.db'}#preds"])
    assert result.exit_code == 0, result.output
    preds, rejects = pd.read_parquet(out), pd.read_parquet(tmp_path / "preds.rejects.parquet")
    all_files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert len(all_files) == total
    assert _paths_once(preds, rejects) == all_files  # every input exactly once
    assert not list((home / "scoring").rglob("plan.parquet"))  # a finished run removes its plan (paths, ids)
    assert len(rejects) == 4 and rejects["reason"].str.contains("duplicate of").sum() == 1
    assert set(preds["label"]) <= {"horizontal", "vertical", "checker"}
    assert {
        "image_id",
        "confidence",
        "top_k",
        "needs_review",
        "prob_checker",
        "model_name",
        "model_version",
        "run_id",
        "scored_at",
        "flow_run_id",
    } <= set(preds.columns)
    assert (preds["model_version"].astype(str) == "1").all() and preds["flow_run_id"].str.len().min() > 10
    assert preds["scored_at"].dt.tz is not None
    assert (preds["needs_review"] == (preds["confidence"] < 0.9)).all()
    assert (preds["decision"] == preds["label"]).all()  # no operating points: the most probable class decides
    # the review queue: those rows, most urgent first, each with its Grad-CAM overlay beside the output
    review = pd.read_parquet(tmp_path / "preds.review.parquet")
    assert len(review) > 0 and sorted(review["image_id"]) == sorted(preds.loc[preds["needs_review"], "image_id"])
    assert review["urgency"].is_monotonic_decreasing and review["reviewed_label"].isna().all()
    assert review["review_reason"].str.startswith("low confidence").all()
    explained = preds["explanation"].dropna()
    assert sorted(explained.index) == sorted(preds.index[preds["needs_review"]])
    assert all((tmp_path / e).is_file() and e.startswith("preds.explanations/") for e in explained)
    with sqlite3.connect(tmp_path / "p.db") as db:
        assert db.execute("select count(*), count(distinct path) from preds").fetchone() == (len(preds), len(preds))
        assert db.execute("select count(*) from preds_rejects").fetchone()[0] == 4
        assert db.execute("select count(*) from preds_review").fetchone()[0] == len(review)

    again = runner.invoke(app, args + ["--table", f"sqlite:///{tmp_path / 'p.db'}#preds"])
    # only the truncated file is tried again (a transient reject: it may have been an upload in progress)
    retried = f"{total - 1} already scored, 1 transient rejects tried again"
    assert again.exit_code == 0 and f"0 predictions, 1 rejects, {retried}" in again.output
    assert len(pd.read_parquet(out)) == len(preds) and len(pd.read_parquet(tmp_path / "preds.rejects.parquet")) == 4

    write_patterns(folder / "more", per_class=1, seed=99)
    more = runner.invoke(app, args + ["--table", f"sqlite:///{tmp_path / 'p.db'}#preds"])
    assert more.exit_code == 0 and f"3 predictions, 1 rejects, {retried}" in more.output
    assert len(pd.read_parquet(out)) == len(preds) + 3
    with sqlite3.connect(tmp_path / "p.db") as db:
        assert db.execute("select count(*) from preds").fetchone()[0] == len(preds) + 3


def test_manifest_id_columns_csv_output_and_version_pin(home: Path, tmp_path: Path) -> None:
    folder = write_patterns(tmp_path / "claims", per_class=2, seed=3)
    files = sorted(folder.rglob("*.png"))
    manifest = pd.DataFrame(
        {
            "path": [str(p.relative_to(folder)) for p in files],
            "claim_id": [f"C{i:03d}" for i in range(len(files))],
            "policy_no": "P-1",
        }
    )
    manifest.to_csv(folder / "batch.csv", index=False)
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["score", str(folder / "batch.csv"), "--model", "patterns:1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    preds = pd.read_csv(out)
    assert sorted(preds["claim_id"]) == sorted(manifest["claim_id"]) and (preds["policy_no"] == "P-1").all()
    assert (tmp_path / "preds.rejects.csv").is_file()


def test_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["score", str(tmp_path), "--model", "nosuchmodel"])
    assert missing.exit_code == 2 and "not found in the registry" in missing.output
    bad_spec = runner.invoke(app, ["score", str(tmp_path), "--model", "a b"])
    assert bad_spec.exit_code == 2 and "MODEL@alias" in bad_spec.output
    no_model = runner.invoke(app, ["score", str(tmp_path)])
    assert no_model.exit_code == 2 and "--model is required" in no_model.output
    bad_choice = runner.invoke(app, ["score", str(tmp_path), "--model", "patterns", "--precision", "fp8"])
    assert bad_choice.exit_code == 2 and "'fp8' is not one of" in bad_choice.output
    nothing = runner.invoke(app, ["score", str(tmp_path / "nope"), "--model", "patterns"])
    assert nothing.exit_code == 2 and "nothing to score" in nothing.output
    bad_table = runner.invoke(
        app, ["score", str(tmp_path), "--model", "patterns", "--table", f"sqlite:///{tmp_path / 'x.db'}#drop table"]
    )
    assert bad_table.exit_code == 2 and "invalid table name" in bad_table.output
    bad_output = runner.invoke(app, ["score", str(tmp_path), "--model", "patterns", "--output", "x.json"])
    assert bad_output.exit_code == 2 and ".parquet or .csv" in bad_output.output


@requires_postgres
def test_postgresql_sink(home: Path, tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    folder, total = _mixed_folder(tmp_path / "incoming", n_per_class=2)
    table = f"preds_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG_URL)
    try:
        for _ in range(2):  # the second run must add nothing
            result = runner.invoke(
                app, ["score", str(folder), "--model", "patterns", "--table", f"{PG_URL}#{table}", "--shard-size", "3"]
            )
            assert result.exit_code == 0, result.output
        with engine.connect() as conn:
            rows = conn.execute(text(f'select count(*), count(distinct path) from "{table}"')).one()
            rejects = conn.execute(text(f'select count(*) from "{table}_rejects"')).scalar()
            review_type = conn.execute(
                text(
                    "select data_type from information_schema.columns "
                    f"where table_name = '{table}' and column_name = 'needs_review'"
                )
            ).scalar()
        assert rows[0] == rows[1] == total - 4 and rejects == 4
        assert review_type == "boolean"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'drop table if exists "{table}"'))
            conn.execute(text(f'drop table if exists "{table}_rejects"'))


@pytest.mark.e2e
def test_sigterm_then_kill_9_midway_then_rerun_leaves_no_duplicate_and_no_gap(home: Path, tmp_path: Path) -> None:
    """SIGTERM as Kubernetes and Prefect workers send it (the run ends within seconds, its children with it,
    committed shards stay committed, nothing half-written), then kill -9 at any moment of the next run, then a
    last run: every input exactly once."""
    import psutil

    folder = write_patterns(tmp_path / "big", per_class=40, seed=11)
    total = 120
    db = tmp_path / "k.db"
    args = [
        CNN,
        "score",
        str(folder),
        "--model",
        "patterns",
        "--table",
        f"sqlite:///{db}#preds",
        "--output",
        str(tmp_path / "k.parquet"),
        "--shard-size",
        "8",
        "--decode-workers",
        "1",
    ]

    def committed() -> int:
        if not db.is_file():
            return 0
        try:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("select count(*) from preds").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    from prefect.settings import get_current_settings

    # The first run starts its own temporary Prefect server (a child that must stop with it); the later ones
    # join the session's server, as runs join the one `cnn serve` runs, which saves two server start-ups.
    joined = clean_env(home, PREFECT_API_URL=str(get_current_settings().api.url))

    def start_and_wait_for(rows: int, env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while committed() < rows and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        return proc

    proc = start_and_wait_for(8, clean_env(home))
    children = psutil.Process(proc.pid).children(recursive=True)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and time.monotonic() - start < 30, stderr[-2000:]
    assert "Traceback" not in stderr and "terminated (SIGTERM)" in stderr
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"children left running: {[p.cmdline() for p in alive]}"
    after_term = committed()
    assert 0 < after_term < total, "the run must be stopped part-way for this test to mean anything"

    proc = start_and_wait_for(after_term + 8, joined)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert after_term < committed() < total, "the second run must be killed part-way too"

    finished = subprocess.run(args, env=joined, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*), count(distinct path) from preds").fetchone() == (total, total)
    parquet = pd.read_parquet(tmp_path / "k.parquet")
    assert len(parquet) == total and parquet["path"].is_unique
    assert not [p.name for p in tmp_path.glob(".*.tmp")] and not (tmp_path / "k.parquet.parts").exists()


def test_scoring_engine_and_pyfunc_agree(home: Path, tmp_path: Path) -> None:
    import mlflow

    folder = write_patterns(tmp_path / "agree", per_class=5, seed=21)
    out = tmp_path / "a.parquet"
    assert runner.invoke(app, ["score", str(folder), "--model", "patterns", "--output", str(out)]).exit_code == 0
    engine = pd.read_parquet(out).sort_values("path")
    pyfunc = mlflow.pyfunc.load_model("models:/patterns@champion")
    direct = pyfunc.predict(pd.DataFrame({"path": engine["path"].tolist()}))
    assert direct["label"].tolist() == engine["label"].tolist()


@pytest.mark.e2e
def test_served_deployment_triggered_through_the_api(home: Path, tmp_path: Path) -> None:
    """`cnn serve` starts a real `prefect server` on loopback; a run created through the REST API scores."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    folder = write_patterns(tmp_path / "incoming", per_class=2, seed=5)
    out = tmp_path / "served.parquet"
    env = clean_env(home)
    proc = subprocess.Popen(
        [
            CNN,
            "serve",
            "--model",
            "patterns",
            "--incoming",
            str(folder),
            "--output",
            str(out),
            "--train-cron",
            "",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def call(path: str, body: dict | None = None) -> Any:
        return api_json(f"{api}{path}", body)

    try:
        deployment, deadline = None, time.monotonic() + 180
        while deployment is None and time.monotonic() < deadline:
            try:
                deployment = call("/deployments/name/score/nightly")
            except OSError:
                time.sleep(1)
        assert deployment is not None, "the deployment never appeared"
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        run = call(f"/deployments/{deployment['id']}/create_flow_run", {})
        state, deadline = None, time.monotonic() + 240
        while state not in ("COMPLETED", "FAILED", "CRASHED") and time.monotonic() < deadline:
            time.sleep(1)
            state = call(f"/flow_runs/{run['id']}")["state_type"]
        assert state == "COMPLETED"
        preds = pd.read_parquet(out)
        assert len(preds) == 6 and set(preds["flow_run_id"]) == {run["id"]}
        # Other commands in this CNN_HOME join the served server instead of starting a throwaway one.
        other = write_patterns(tmp_path / "other", per_class=1, seed=6)
        joined = subprocess.run(
            [CNN, "score", str(other), "--model", "patterns", "--output", str(tmp_path / "other.parquet")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert "Starting temporary server" not in joined.stdout + joined.stderr
        runs = call("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
        assert len(runs) >= 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output


def test_dask_local_cluster_scores_what_the_single_process_run_scores(home: Path, tmp_path: Path) -> None:
    folder, total = _mixed_folder(tmp_path / "fan", n_per_class=6, seed=13)
    single, dask = tmp_path / "single.parquet", tmp_path / "dask.parquet"
    base = ["score", str(folder), "--model", "patterns", "--shard-size", "4", "--top-k", "2"]
    assert runner.invoke(app, base + ["--output", str(single)]).exit_code == 0
    result = runner.invoke(app, base + ["--output", str(dask), "--dask-workers", "2"])
    assert result.exit_code == 0, result.output
    ignore = ["scored_at", "flow_run_id"]
    a = pd.read_parquet(single).drop(columns=ignore).sort_values("path").reset_index(drop=True)
    b = pd.read_parquet(dask).drop(columns=ignore).sort_values("path").reset_index(drop=True)
    for frame, folder in ((a, "single.explanations/"), (b, "dask.explanations/")):  # beside each output
        assert frame["explanation"].dropna().str.startswith(folder).all()
        frame["explanation"] = frame["explanation"].str.removeprefix(folder)
    # the reuse check differs by design: the single run's shards see the shards before them, the fanned-out run's
    # shards run at the same time but see the first run's images in the history (under other paths)
    copies = ["duplicate_of", "duplicate_kind"]
    assert set(a.loc[a["duplicate_kind"].notna(), "path"]) <= set(b.loc[b["duplicate_kind"].notna(), "path"])
    pd.testing.assert_frame_equal(a.drop(columns=copies), b.drop(columns=copies))
    ra = pd.read_parquet(tmp_path / "single.rejects.parquet").drop(columns=ignore).sort_values("path")
    rb = pd.read_parquet(tmp_path / "dask.rejects.parquet").drop(columns=ignore).sort_values("path")
    pd.testing.assert_frame_equal(ra.reset_index(drop=True), rb.reset_index(drop=True))
    assert len(a) + len(ra) == total


@pytest.mark.e2e
def test_a_real_dask_scheduler_and_two_worker_processes_score_what_one_process_scores(
    home: Path, tmp_path: Path
) -> None:
    """`--cluster` against a scheduler and two workers started as their own processes on loopback (as in the compose
    file), not an in-process LocalCluster: the same tables as the single-process run, and the shards ran there.
    Ingest fans out to the same cluster: its parts decode there, each into a shard of the cache, into the same
    dataset a single-process ingest makes."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    from flows.processes import start_group, stop_group

    folder, total = _mixed_folder(tmp_path / "cluster", n_per_class=6, seed=31)
    port, dask = free_port(), str(Path(sys.executable).with_name("dask"))
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "CNN_HOME": str(home)}
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": str(tmp_path)}
    scheduler = start_group([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet)
    workers = [
        start_group([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"], **quiet)
        for _ in range(2)
    ]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            base = ["score", str(folder), "--model", "patterns", "--shard-size", "4", "--explain", "none"]
            single, spread = tmp_path / "single.parquet", tmp_path / "spread.parquet"
            assert runner.invoke(app, [*base, "--output", str(single)]).exit_code == 0
            result = runner.invoke(app, [*base, "--output", str(spread), "--cluster", address])
            assert result.exit_code == 0, result.output
            loaded = client.run(lambda: __import__("flows.versions").versions._cached_predictor.cache_info().currsize)
            source = write_patterns(tmp_path / "ingest", per_class=8, seed=5)
            ingest = ["ingest", str(source), "--image-size", "16", "--dataset"]
            assert runner.invoke(app, [*ingest, "here"]).exit_code == 0
            result = runner.invoke(app, [*ingest, "there", "--cluster", address, "--files-per-part", "5"])
            assert result.exit_code == 0, result.output
            decoded_there = client.run(lambda: "cnn.data.ingest" in sys.modules)
        assert len(loaded) == 2 and sum(loaded.values()) >= 1  # the worker processes loaded the model and scored
        assert any(decoded_there.values())  # the parts ran in the worker processes
        here, there = Dataset(home / "datasets" / "here"), Dataset(home / "datasets" / "there")
        assert len(here.meta().cache_shards) == 1 and len(there.meta().cache_shards) == 5  # 24 files, 5 per part
        columns = ["path", "image_id", "label", "split", "status"]
        pd.testing.assert_frame_equal(
            here.manifest()[columns].sort_values("path").reset_index(drop=True),
            there.manifest()[columns].sort_values("path").reset_index(drop=True),
        )
        cache_here, cache_there = here.open_cache(), there.open_cache()
        for image_id in here.usable()["image_id"]:
            np.testing.assert_array_equal(cache_here.get(image_id), cache_there.get(image_id))
        ignore = ["scored_at", "flow_run_id", "duplicate_of", "duplicate_kind"]  # reuse check: see the test above
        a, b = (
            pd.read_parquet(p).drop(columns=ignore).sort_values("path").reset_index(drop=True) for p in (single, spread)
        )
        pd.testing.assert_frame_equal(a, b)
        rejects = [tmp_path / "single.rejects.parquet", tmp_path / "spread.rejects.parquet"]
        ra, rb = (
            pd.read_parquet(p).drop(columns=ignore[:2]).sort_values("path").reset_index(drop=True) for p in rejects
        )
        pd.testing.assert_frame_equal(ra, rb)
        assert len(a) + len(ra) == total
    finally:
        for proc in (*workers, scheduler):
            stop_group(proc)


def test_compiled_scoring_matches_eager(home: Path, tmp_path: Path) -> None:
    folder = write_patterns(tmp_path / "c", per_class=3, seed=17)
    eager, compiled = tmp_path / "eager.parquet", tmp_path / "compiled.parquet"
    base = ["score", str(folder), "--model", "patterns", "--batch-size", "4", "--precision", "fp32"]
    assert runner.invoke(app, base + ["--output", str(eager)]).exit_code == 0
    result = runner.invoke(app, base + ["--output", str(compiled), "--compile"])
    assert result.exit_code == 0, result.output
    assert "fp32, compiled" in result.output
    a, b = (pd.read_parquet(p).sort_values("path").reset_index(drop=True) for p in (eager, compiled))
    assert len(a) == 9 and a["label"].tolist() == b["label"].tolist()
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert (a[probs] - b[probs]).abs().to_numpy().max() < 1e-4
    # Where compiling fails (no C++ compiler here), the run still scores, eagerly, and says so.
    fallback = tmp_path / "fallback.parquet"
    with unusable_compiler():
        result = runner.invoke(
            app,
            [
                "score",
                str(folder),
                "--model",
                "patterns",
                "--batch-size",
                "4",
                "--precision",
                "bf16",
                "--compile",
                "--output",
                str(fallback),
            ],
        )
    assert result.exit_code == 0, result.output
    assert "bf16, eager (torch.compile failed" in result.output
    # bf16 forced: used whatever the agreement, which is measured on the validation split and reported
    assert "precision: bf16 (forced, bf16 top-1 agreement" in " ".join(result.output.split())
    assert len(pd.read_parquet(fallback)) == 9


def test_auto_precision_takes_bf16_only_where_this_host_type_measured_it_faster(home: Path, tmp_path: Path) -> None:
    """bf16's speed is measured once per version and host type, kept as a version tag, and bf16 agreeing with fp32
    is not enough: where it is slower (AVX512-BF16 without AMX), `auto` stays fp32."""
    from mlflow.tracking import MlflowClient

    from cnn.model.precision import cpu_bf16_available, host_type

    folder = write_patterns(tmp_path / "p", per_class=2, seed=23)
    client = MlflowClient()
    version = client.get_model_version_by_alias("patterns", "champion").version
    key = f"cpu_bf16.speedup.{host_type()}"

    def score(name: str) -> str:
        args = ["score", str(folder), "--model", "patterns", "--precision", "auto", "--backend", "torch"]
        result = runner.invoke(app, [*args, "--output", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    client.set_model_version_tag("patterns", version, "cpu_bf16.agreement", "1.0")  # agreement is not the question
    if key in client.get_model_version("patterns", version).tags:  # another test of this module measured it
        client.delete_model_version_tag("patterns", version, key)
    said = score("measured.parquet")
    tags = client.get_model_version("patterns", version).tags
    if not cpu_bf16_available():
        assert "precision: fp32 (this CPU has no native bf16)" in said and key not in tags
        pytest.skip("this CPU has no native bf16: the speed rule that follows cannot be measured here")
    measured = float(tags[key])  # measured on the validation split, on this host, once
    assert measured > 0 and f"{measured:.2f}x fp32's speed on {host_type()}" in said
    client.set_model_version_tag("patterns", version, key, "0.50")  # what a host without AMX measures
    assert "precision: fp32 (bf16 is not 1.1x faster here" in score("slow.parquet")
    client.set_model_version_tag("patterns", version, key, "3.00")
    said = score("fast.parquet")
    assert "precision: bf16 (agrees with fp32" in said and "3.00x fp32's speed" in said


def test_backends_score_what_torch_scores_and_auto_measures_each_once(home: Path, tmp_path: Path) -> None:
    """The version carries its ONNX export (with a digest); ONNX Runtime and OpenVINO score what torch scores; `auto`
    measures each candidate's agreement and speed once, keeps them as version tags, and picks from the tags."""
    from mlflow.tracking import MlflowClient

    from cnn.model.precision import host_type

    folder = write_patterns(tmp_path / "b", per_class=3, seed=29)
    client = MlflowClient()
    version = client.get_model_version_by_alias("patterns", "champion").version
    assert len(client.get_model_version("patterns", version).tags["onnx.sha256"]) == 64  # exported at registration

    def score(name: str, *options: str) -> tuple[pd.DataFrame, str]:
        args = ["score", str(folder), "--model", "patterns", *options, "--output", str(tmp_path / name)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        frame = pd.read_parquet(tmp_path / name).sort_values("path").reset_index(drop=True)
        return frame, " ".join(result.output.split())

    reference, _ = score("torch.parquet", "--backend", "torch", "--precision", "fp32")
    probs = [c for c in reference.columns if c.startswith("prob_")]
    for runtime in ("onnxruntime", "openvino"):
        frame, said = score(f"{runtime}.parquet", "--backend", runtime, "--precision", "fp32")
        assert f"fp32 on {runtime} (forced" in said
        assert frame["label"].tolist() == reference["label"].tolist()
        assert (frame[probs] - reference[probs]).abs().to_numpy().max() < 1e-4

    _, said = score("auto.parquet", "--backend", "auto")
    tags = client.get_model_version("patterns", version).tags
    measured = {k: v for k, v in tags.items() if k.startswith("backend.") and k.endswith(".agreement")}
    assert {"backend.onnxruntime-int8.agreement", "backend.openvino-int8.agreement"} <= set(measured)
    assert all(0.0 <= float(v) <= 1.0 for v in measured.values())
    chosen = tags[f"backend.chosen.{host_type()}"]
    runtime, precision = chosen.split("-")
    assert f"{precision} on {runtime}" in said or (runtime == "torch" and "torch: the fastest here" in said)
    speeds = [k for k in tags if k.startswith("backend.") and k.endswith(f".speedup.{host_type()}")]
    assert speeds  # the candidates that agreed were timed, on this host type
    # later runs read the tags: a candidate tagged far faster than any measured (and agreeing) is taken without
    # measuring again (a tiny model's measured speeds vary widely by host: onnxruntime fp32 can exceed 50x torch's)
    fastest = round(10 * max(50.0, *(float(tags[k]) for k in speeds)), 1)  # as the tag below stores it
    client.set_model_version_tag("patterns", version, "backend.openvino-int8.agreement", "1.0")
    client.set_model_version_tag("patterns", version, f"backend.openvino-int8.speedup.{host_type()}", f"{fastest:.1f}")
    frame, said = score("fast.parquet", "--backend", "auto")
    assert "int8 on openvino (the fastest here" in said and f"{fastest:.2f}x torch fp32's speed" in said, said
    assert (frame["label"] == reference["label"]).mean() >= 0.8  # int8, calibrated on the validation split


def _process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (read from /proc: the runner may start its flow runs in their own
    session, where a kill of the group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


@pytest.mark.e2e
def test_a_run_killed_without_a_word_shows_as_crashed(home: Path, tmp_path: Path) -> None:
    """kill -9 of a `cnn score` run and its decode workers (as the OOM killer or a lost node would): nothing reports
    anything, and the automation (`cnn serve` and `cnn automations` set it up) sees the heartbeats stop and marks the
    run Crashed instead of leaving it Running forever."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from flows.automations import CRASH_DETECTION, ensure_crash_detection

    api = str(get_current_settings().api.url)
    folder = write_patterns(tmp_path / "incoming", per_class=100, seed=21)
    ensure_crash_detection(40)
    env = clean_env(home, PREFECT_API_URL=api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")  # Prefect's shortest
    command = [CNN, "score", str(folder), "--model", "patterns", "--output", str(tmp_path / "p.parquet")]
    since = datetime.now(UTC).isoformat()
    proc = subprocess.Popen(
        [*command, "--shard-size", "1", "--decode-workers", "1"],  # long enough to be killed midway
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        beats = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}, "occurred": {"since": since}}}
        deadline, events = time.monotonic() + 120, []
        while not events and time.monotonic() < deadline:
            time.sleep(0.5)
            events = api_json(f"{api}/events/filter", beats)["events"]
        assert events, "no heartbeat"
        run_id = events[0]["resource"]["prefect.resource.id"].removeprefix("prefect.flow-run.")
        assert api_json(f"{api}/flow_runs/{run_id}")["state_type"] == "RUNNING"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        state, deadline = "RUNNING", time.monotonic() + 120
        while state == "RUNNING" and time.monotonic() < deadline:
            time.sleep(2)
            state = api_json(f"{api}/flow_runs/{run_id}")["state_type"]
        assert state == "CRASHED"
        assert "no heartbeat for 40 s" in api_json(f"{api}/flow_runs/{run_id}")["state"]["message"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        with get_client(sync_client=True) as client:  # the session's other runs have other heartbeat settings
            for automation in client.read_automations_by_name(CRASH_DETECTION):
                client.delete_automation(automation.id)


def test_similar_cases_reuse_and_drift_through_the_flow(home: Path, tmp_path: Path) -> None:
    import json

    import numpy as np
    from PIL import Image

    first = write_patterns(tmp_path / "night1", per_class=12, seed=31)  # 36: enough for a drift verdict
    manifest = tmp_path / "night1.csv"
    files = sorted(first.rglob("*.png"))
    pd.DataFrame({"path": [str(p) for p in files], "claim": [f"C{i:03d}" for i in range(len(files))]}).to_csv(
        manifest, index=False
    )
    out1, out2 = tmp_path / "n1.parquet", tmp_path / "n2.parquet"
    result = runner.invoke(app, ["score", str(manifest), "--model", "patterns", "--output", str(out1)])
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(out1)
    assert scored["neighbour_label"].notna().all() and scored["neighbour_agreement"].between(0, 1).all()
    assert scored["phash"].str.len().eq(64).all()
    side = pd.read_parquet(tmp_path / "n1.embeddings.parquet")
    assert sorted(side["image_id"]) == sorted(scored["image_id"]) and (side["dim"] == 32).all()
    drift = pd.read_parquet(tmp_path / "n1.drift.parquet")
    assert set(drift["name"]) >= {"predicted_class", "confidence", "brightness", "embedding"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("cnn-scoring-patterns")
    assert experiment is not None
    [checked] = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags["flow_run_id"] == drift["flow_run_id"].iloc[0]
    ]
    assert "drift.embedding.p_value" in checked.data.metrics
    assert [a.path for a in client.list_artifacts(checked.info.run_id, "drift")] == ["drift/drift.png"]

    # the next night: a claim photo submitted again under another claim, once as is and once mirrored
    second = tmp_path / "night2"
    second.mkdir()
    shutil.copy(files[0], second / "resubmitted.png")
    mirrored = np.asarray(Image.open(files[1]))[:, ::-1]
    Image.fromarray(np.ascontiguousarray(mirrored)).save(second / "mirrored.png")
    new = np.asarray(Image.open(next(write_patterns(tmp_path / "new", per_class=1, seed=77).rglob("*.png"))))
    Image.fromarray(new).save(second / "a_new.png")  # a new photo, and its mirror image in a later shard
    Image.fromarray(np.ascontiguousarray(new[:, ::-1])).save(second / "b_new_mirrored.png")
    result = runner.invoke(
        app, ["score", str(second), "--model", "patterns", "--output", str(out2), "--shard-size", "1"]
    )
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(out2).set_index(pd.read_parquet(out2)["path"].map(lambda p: Path(p).name))
    exact = json.loads(again.loc["resubmitted.png", "duplicate_of"])
    assert again.loc["resubmitted.png", "duplicate_kind"] == "exact"
    assert exact["source"] == "scored" and exact["claim"] == "C000"  # the other claim's number
    near = json.loads(again.loc["mirrored.png", "duplicate_of"])
    assert again.loc["mirrored.png", "duplicate_kind"] == "near" and near["claim"] == "C001"
    assert "copies of earlier images" in result.output
    across = json.loads(again.loc["b_new_mirrored.png", "duplicate_of"])  # found in an earlier shard of this run
    assert again.loc["b_new_mirrored.png", "duplicate_kind"] == "near" and across["source"] == "this run"
    assert across["image_id"] == again.loc["a_new.png", "image_id"] and pd.isna(again.loc["a_new.png", "duplicate_of"])
    copies = pd.read_parquet(tmp_path / "n2.duplicates.parquet")  # the duplicates table collects them
    assert sorted(copies["duplicate_kind"]) == ["exact", "near", "near"]
    assert sorted(copies["earlier_source"]) == ["scored", "scored", "this run"]
    assert set(copies["earlier_image_id"]) == {exact["image_id"], near["image_id"], across["image_id"]}

    # cnn similar: the nearest training images and the nearest images scored before, with their claim numbers
    found = runner.invoke(
        app, ["similar", str(files[2]), "--model", "patterns", "--k", "3", "--out", str(tmp_path / "s.png")]
    )
    assert found.exit_code == 0, found.output
    assert "nearest training images" in found.output and "C002" in found.output and (tmp_path / "s.png").is_file()

    # an underexposed batch drifts (brightness; a model may well label it as before); --fail-on-drift makes the
    # run fail (exit 3) after writing its tables
    dark = tmp_path / "underexposed"
    dark.mkdir()
    for i, path in enumerate(sorted(write_patterns(tmp_path / "src3", per_class=12, seed=41).rglob("*.png"))):
        Image.fromarray((np.asarray(Image.open(path)) // 4).astype(np.uint8)).save(dark / f"{i}.png")
    out3 = tmp_path / "n3.parquet"
    failed = runner.invoke(app, ["score", str(dark), "--model", "patterns", "--output", str(out3), "--fail-on-drift"])
    assert failed.exit_code == 3 and "drift" in failed.output and len(pd.read_parquet(out3)) == 36, failed.output

"""Fault injection through the installed `cnn` command, as an operator meets each fault: a disk that fills under the
output (Parquet, CSV, SQLite) and under CNN_HOME, a PostgreSQL table another session holds, a tracking or
orchestration server that is not there, an address-space limit. Each run must end with one message that names the
fault, its exit code and no traceback, within a bounded time; once the fault is gone, a plain re-run completes the
work with every file once (no duplicate, no gap)."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cnn.errors import EXIT_IO, EXIT_OS, EXIT_TEMPORARY
from cnn.io.storage import local_path
from tests.helpers import (
    TinyDisk,
    api_json,
    clean_env,
    free_port,
    pattern_dataset,
    requires_postgres,
    tiny_config,
    wait_until_up,
    write_patterns,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slowest]  # whole commands, a minute or more: make test-all and CI

BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432/test"


def cnn(env: dict[str, str], *args: str, timeout: float = 300, limit_as: int = 0) -> tuple[int, str, float]:
    """Run `cnn ARGS`: (exit code, stdout and stderr together, seconds)."""

    def limited() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "cnn"), *args], env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=limited
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def assert_fault(result: tuple[int, str, float], code: int, *said: str, within_s: float = 120) -> None:
    returncode, output, seconds = result
    assert returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for words in said:
        assert words in output, output[-3000:]
    assert seconds < within_s, f"{seconds:.0f} s: {output[-2000:]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A workspace with a `patterns` champion, and a folder of 30 new images to score: (environment, folder)."""
    root = tmp_path_factory.mktemp("faults")
    env = clean_env(root / "home", drop=("PREFECT_", "MLFLOW_", "CNN_"))
    pattern_dataset(root / "home")
    tiny_config(root / "fast.yaml", epochs=1, batch_size=16)
    code, output, _ = cnn(
        env, "train", "--dataset", "patterns", "--config", str(root / "fast.yaml"), "--precision", "fp32"
    )
    assert code == 0, output[-3000:]
    yield env, write_patterns(root / "src", per_class=10, seed=5)


def _files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.png")}


def _held(output: str) -> pd.DataFrame:
    """The predictions and rejects a sink holds (current rows), from a .parquet, .csv or sqlite:///...#table."""
    if output.startswith("sqlite:///"):
        path, _, table = local_path(output.removeprefix("sqlite:///")).partition("#")
        with sqlite3.connect(path) as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            query = "SELECT path FROM {} WHERE superseded_at IS NULL"
            frames = [pd.read_sql(query.format(name), conn) for name in (table, f"{table}_rejects") if name in names]
    else:
        reader = pd.read_csv if output.endswith(".csv") else pd.read_parquet
        stem, suffix = output.rsplit(".", 1)
        frames = [reader(output), reader(f"{stem}.rejects.{suffix}")]
        frames = [f[f["superseded_at"].isna()] if "superseded_at" in f else f for f in frames]
    return pd.concat([f[["path"]] for f in frames if len(f)], ignore_index=True)


def assert_each_file_once(output: str, folder: Path) -> None:
    held = _held(output)
    assert not held["path"].duplicated().any(), held[held["path"].duplicated()]
    assert set(held["path"]) == _files(folder)


@pytest.mark.parametrize("kind", ["parquet", "csv", "sqlite"])
def test_a_full_output_disk_stops_the_run_with_a_message_and_a_rerun_completes(
    trained: tuple[dict[str, str], Path], tiny_disk: TinyDisk, kind: str
) -> None:
    env, src = trained
    output = {
        "parquet": ["--output", str(tiny_disk.mount / "night.parquet")],
        "csv": ["--output", str(tiny_disk.mount / "night.csv")],
        "sqlite": ["--table", f"sqlite:///{tiny_disk.mount / 'night.db'}#preds"],
    }[kind]
    tiny_disk.fill(room=16 << 10)
    assert_fault(cnn(env, "score", str(src), "--model", "patterns", *output), EXIT_IO, "no space left on the disk")
    tiny_disk.grow()
    code, said, _ = cnn(env, "score", str(src), "--model", "patterns", *output)
    assert code == 0, said[-3000:]
    assert_each_file_once(output[1], src)


def test_a_full_workspace_disk_stops_training_with_a_message(tmp_path: Path, tiny_disk: TinyDisk) -> None:
    tiny_disk.grow(48 << 20)
    home = tiny_disk.mount / "home"
    pattern_dataset(home, per_class=20)
    tiny_config(tmp_path / "fast.yaml", epochs=2, batch_size=16)
    env = clean_env(home, drop=("PREFECT_", "MLFLOW_", "CNN_"), PREFECT_HOME=str(tmp_path / "prefect"))
    tiny_disk.fill(room=64 << 10)
    result = cnn(env, "train", "--dataset", "patterns", "--config", str(tmp_path / "fast.yaml"), "--precision", "fp32")
    assert_fault(result, EXIT_IO, "no space left on the disk", "CNN_HOME")


@requires_postgres
def test_a_locked_table_stops_the_run_within_the_lock_timeout_and_a_rerun_completes(
    trained: tuple[dict[str, str], Path],
) -> None:
    import psycopg

    env, src = trained
    table = f"locked_{free_port()}"
    target = ["--table", f"{PG}#{table}"]
    code, said, _ = cnn(env, "score", str(src / "checker"), "--model", "patterns", *target)  # the tables exist
    assert code == 0, said[-3000:]
    holder = psycopg.connect(host="127.0.0.1", user="postgres", dbname="test")
    try:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # another session, as an admin's migration
        result = cnn({**env, "CNN_LOCK_TIMEOUT_S": "2"}, "score", str(src), "--model", "patterns", *target)
        assert_fault(result, EXIT_TEMPORARY, f"the table {table} is locked by another session: waited 2 s")
    finally:
        holder.rollback()
        holder.close()
    code, said, _ = cnn(env, "score", str(src), "--model", "patterns", *target)
    assert code == 0, said[-3000:]
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as conn:
        paths = [
            row[0]
            for name in (table, f"{table}_rejects")
            if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)
            for row in conn.execute(f"SELECT path FROM {name} WHERE superseded_at IS NULL")
        ]
        for name in ("", "_rejects", "_review", "_embeddings", "_duplicates", "_drift"):
            conn.execute(f"DROP TABLE IF EXISTS {table}{name}")
    assert sorted(paths) == sorted(_files(src))


def test_a_tracking_server_that_is_not_there_is_named_within_seconds(
    trained: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, src = trained
    dead = f"http://127.0.0.1:{free_port()}"
    output = ["--output", str(tmp_path / "p.parquet")]
    result = cnn({**env, "MLFLOW_TRACKING_URI": dead}, "score", str(src), "--model", "patterns", *output)
    assert_fault(result, EXIT_TEMPORARY, f"the MLflow tracking server at {dead} did not answer", within_s=60)


def test_an_orchestration_server_that_is_not_there_is_named_within_seconds(
    trained: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, src = trained
    api = f"http://127.0.0.1:{free_port()}/api"
    result = cnn(
        {**env, "PREFECT_API_URL": api},
        "score",
        str(src),
        "--model",
        "patterns",
        "--output",
        str(tmp_path / "p.parquet"),
    )
    assert_fault(result, EXIT_TEMPORARY, f"the Prefect server at {api} did not answer", within_s=60)


def test_an_address_space_limit_is_a_message(trained: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, src = trained
    result = cnn(
        env, "score", str(src), "--model", "patterns", "--output", str(tmp_path / "p.parquet"), limit_as=3 << 30
    )
    assert_fault(result, EXIT_OS, "not enough memory or address space", "ulimit -v", within_s=60)


def _mlflow_server(port: int, store: Path) -> subprocess.Popen[bytes]:
    """`mlflow server` on loopback with a SQLite store and served artifacts under `store`; its log in store/log."""
    store.mkdir(exist_ok=True)
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "art"),
    ]
    log = open(store / "log", "ab")  # the server writes to it until it is killed
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=store)
    wait_until_up(f"http://127.0.0.1:{port}/health")
    return server


def _kill_group(server: subprocess.Popen[bytes]) -> None:
    """A server and its workers (the processes in the group it leads), as an OOM kill would."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


class Tracking:
    """A real tracking server on loopback, killed and restarted on the same port and store."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.store = free_port(), tmp_path / "mlflow"
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _mlflow_server(self.port, self.store)

    def requests(self) -> bytes:
        return (self.store / "log").read_bytes()

    def kill(self) -> None:
        _kill_group(self.server)

    def restart(self) -> None:
        self.server = _mlflow_server(self.port, self.store)


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[Tracking]:
    server = Tracking(tmp_path)
    yield server
    server.kill()


def _seen(log: bytes, requests: tuple[bytes, ...]) -> bool:
    """Whether the server's log shows these requests in this order."""
    at = 0
    for request in requests:
        at = log.find(request, at)
        if at < 0:
            return False
        at += len(request)
    return True


def _train_until_killed(tmp_path: Path, tracking: Tracking, *after: bytes) -> tuple[dict[str, str], list[str]]:
    """Train `patterns` against `tracking` and kill the server once its log shows the requests `after` in order;
    assert the command's fault, restart the server: (environment, the train command)."""
    home = tmp_path / "home"
    pattern_dataset(home)
    tiny_config(tmp_path / "fast.yaml", epochs=3, batch_size=16)
    env = clean_env(home, drop=("PREFECT_", "MLFLOW_", "CNN_"), MLFLOW_TRACKING_URI=tracking.url, CNN_RETRIES="1")
    train = ["train", "--dataset", "patterns", "--config", str(tmp_path / "fast.yaml"), "--precision", "fp32"]
    running = subprocess.Popen([str(BIN / "cnn"), *train], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not _seen(tracking.requests(), after):
        assert running.poll() is None and time.monotonic() < deadline, running.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    tracking.kill()
    killed = time.monotonic()
    output = running.communicate(timeout=300)[0].decode()
    said = f"the MLflow tracking server at {tracking.url} did not answer"
    assert_fault((running.returncode, output, time.monotonic() - killed), EXIT_TEMPORARY, said)
    tracking.restart()
    return env, train


def test_a_tracking_server_killed_mid_training_and_the_next_training_marks_the_run_failed(
    tmp_path: Path, tracking_server: Tracking
) -> None:
    from mlflow.tracking import MlflowClient

    # the first epoch's metrics: the first batch of metrics after the run's config is logged
    env, train = _train_until_killed(tmp_path, tracking_server, b"config/config.yaml", b"runs/log-batch")
    client = MlflowClient(tracking_server.url)
    experiment = client.get_experiment_by_name("cnn-patterns")
    assert experiment is not None
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.data.tags["cnn.outcome"] == "running"  # the server was down when the command failed
    code, said, _ = cnn(env, *train)
    assert code == 0, said[-3000:]
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    abandoned = runs.pop(first.info.run_id)
    assert abandoned.info.status == "FAILED" and abandoned.data.tags["failure.reason"].startswith("abandoned")
    (done,) = runs.values()
    assert done.info.status == "FINISHED" and done.data.tags["cnn.outcome"] == "finished"


@pytest.mark.parametrize(
    "after",
    [
        (b"model-versions/create",),  # the version exists, nothing recorded on it
        (b"model-versions/create", b"model-versions/set-tag"),  # one digest recorded
        # digests and the gate's decision recorded, the card being written: the kill lands before the version is
        # marked complete even when it comes a few requests late (card.json, the description, then the marker)
        (b"model-versions/create", b"model_card/card.md"),
    ],
    ids=["created", "one-digest", "card"],
)
def test_a_registration_stopped_at_any_step_is_refused_then_marked_by_the_next_training(
    tmp_path: Path, tracking_server: Tracking, after: tuple[bytes, ...]
) -> None:
    from mlflow.tracking import MlflowClient

    env, train = _train_until_killed(tmp_path, tracking_server, *after)
    env = {**env, "MLFLOW_TRACKING_URI": tracking_server.url}
    client = MlflowClient(tracking_server.url)
    assert client.get_registered_model("patterns").aliases == {}  # no alias on a half-registered version
    refused = "model patterns v1 is not usable"
    output = ["--output", str(tmp_path / "p.parquet")]
    images = write_patterns(tmp_path / "src", per_class=3, seed=9)
    for command in (
        ["score", str(images), "--model", "patterns:1", *output],
        ["promote", "patterns", "--version", "1"],
    ):
        assert_fault(cnn(env, *command), 2, refused)
    assert_fault(cnn(env, "card", "patterns:1"), 2, refused)
    code, said, _ = cnn(env, *train)
    assert code == 0, said[-3000:]
    assert client.get_model_version("patterns", "1").tags["registration.complete"] == "false"
    latest = client.get_model_version("patterns", "2")
    assert latest.tags["registration.complete"] == "true" and client.get_registered_model("patterns").aliases == {
        "champion": "2"
    }
    code, said, _ = cnn(env, "score", str(images), "--model", "patterns", *output)
    assert code == 0, said[-3000:]


def _finished_tasks(api: str, name: str) -> int:
    """How many task runs named `name` the Prefect server at `api` holds as Completed (0 while it does not answer)."""
    body = {"task_runs": {"name": {"like_": name}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    try:
        return len(api_json(f"{api}/task_runs/filter", body, tries=1))
    except (OSError, ValueError):
        return 0


def test_an_orchestration_server_killed_mid_run_is_named_and_a_rerun_completes(
    trained: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, _ = trained
    src = write_patterns(tmp_path / "many", per_class=100, seed=11)  # 300 files in shards of 10: the run lasts
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    server_env = {**clean_env(), "PREFECT_HOME": str(tmp_path / "prefect-server")}
    with open(tmp_path / "prefect.log", "wb") as log:
        server = subprocess.Popen(command, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    output = ["--output", str(tmp_path / "night.parquet")]
    score = ["score", str(src), "--model", "patterns", "--shard-size", "10", *output]
    try:
        wait_until_up(f"{api}/health")
        running = subprocess.Popen(
            [str(BIN / "cnn"), *score],
            env={**env, "PREFECT_API_URL": api},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while _finished_tasks(api, "score-shard") < 2:
            assert running.poll() is None and time.monotonic() < deadline, running.communicate()[0].decode()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    killed = time.monotonic()
    said = running.communicate(timeout=300)[0].decode()
    assert_fault((running.returncode, said, time.monotonic() - killed), EXIT_TEMPORARY, f"the Prefect server at {api}")
    code, said, _ = cnn(env, *score)  # no PREFECT_API_URL: a throwaway server
    assert code == 0, said[-3000:]
    assert_each_file_once(output[1], src)


class Orchestration:
    """A real `prefect server start` on loopback (SQLite under `home`), killed and started again on the same port."""

    def __init__(self, home: Path) -> None:
        self.port, self.home = free_port(), home
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.start()

    def start(self) -> None:
        command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui"]
        env = {**clean_env(), "PREFECT_HOME": str(self.home)}
        with open(self.home.parent / "prefect.log", "ab") as log:
            self.server = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until_up(f"{self.api}/health")

    def kill(self) -> None:
        _kill_group(self.server)


def test_a_run_whose_server_died_is_marked_crashed_once_the_server_is_back(
    trained: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """The server goes down mid-run: the command stops with a message, and nothing can tell the server so. When the
    server is back, the crashed-run automation must still mark the run Crashed (it used to stay Running for good)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.automations import ensure_crash_detection

    env, _ = trained
    src = write_patterns(tmp_path / "many", per_class=100, seed=12)
    orchestration = Orchestration(tmp_path / "prefect-server")
    try:
        with temporary_settings({PREFECT_API_URL: orchestration.api}):
            ensure_crash_detection(20)
        score = [
            "score",
            str(src),
            "--model",
            "patterns",
            "--shard-size",
            "10",
            "--output",
            str(tmp_path / "p.parquet"),
        ]
        run_env = {**env, "PREFECT_API_URL": orchestration.api, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        running = subprocess.Popen(
            [str(BIN / "cnn"), *score], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while _finished_tasks(orchestration.api, "score-shard") < 1:
            assert running.poll() is None and time.monotonic() < deadline, running.communicate()[0].decode()[-3000:]
            time.sleep(0.1)
        orchestration.kill()
        assert running.wait(timeout=300) == EXIT_TEMPORARY
        time.sleep(30)  # down for longer than the automation's window, as a server down for minutes is
        orchestration.start()
        (run,) = api_json(f"{orchestration.api}/flow_runs/filter", {})
        # the automation alone may never judge it (its window passed while the server was down: the run stayed
        # Running for 3 minutes after the restart in one try); the next `cnn serve`, `cnn automations` or flow run
        # looks for runs whose heartbeats stopped
        code, said, _ = cnn({**env, "PREFECT_API_URL": orchestration.api}, "automations", "--crash-after", "20")
        assert code == 0, said[-3000:]
        state, deadline = run["state_type"], time.monotonic() + 180
        while state == "RUNNING" and time.monotonic() < deadline:
            time.sleep(2)
            state = api_json(f"{orchestration.api}/flow_runs/{run['id']}")["state_type"]
        assert state == "CRASHED", state
    finally:
        orchestration.kill()

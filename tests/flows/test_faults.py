"""Faults of the infrastructure, produced for real (a full tmpfs, a table another PostgreSQL session holds, a port
nothing listens on, an HTTP server that answers 503 like a failing S3 gateway), each turned into one message that
names what failed and an exit code; a bug keeps its traceback. The bounded waits come from one place and reach
MLflow's and Prefect's own settings."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa

from cnn.errors import EXIT_IO, EXIT_TEMPORARY, UserError
from cnn.waits import Waits
from flows import faults, workspace
from flows.faults import infrastructure_fault
from tests.helpers import TinyDisk, free_port, requires_postgres

PG = "postgresql://postgres@127.0.0.1:5432/test"


def _raised(call: object) -> BaseException:
    try:
        call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - whatever the library raises is what is classified
        return exc
    raise AssertionError("no fault happened")


def test_a_full_disk_shows_the_room_left_where_the_run_writes(
    tiny_disk: TinyDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "_PLACES", {})
    faults.note_place("--output", tiny_disk.mount / "night.parquet")  # not made yet: its disk counts
    tiny_disk.fill()
    target = tiny_disk.mount / "big.bin"
    error = _raised(lambda: target.write_bytes(b"x" * (1 << 20)))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_IO
    assert str(fault).startswith("no space left on the disk; free space now: ")
    assert re.search(r"--output \d+ (B|KB) \(full\)", str(fault)), str(fault)
    assert "run the same command again" in str(fault)


def test_sqlite_on_a_full_disk_through_sqlalchemy(tiny_disk: TinyDisk) -> None:
    engine = sa.create_engine(f"sqlite:///{tiny_disk.mount / 'tables.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (b BLOB)"))
    tiny_disk.fill(room=8 << 10)

    def insert() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (:b)"), {"b": os.urandom(1 << 20)})

    error = _raised(insert)
    assert isinstance(error, sa.exc.OperationalError)  # SQLAlchemy's wrapper: the cause is read from .orig
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_IO and "no space left" in str(fault)


@pytest.fixture
def locked_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A prediction table another session holds with ACCESS EXCLUSIVE until the test ends; a 1 s lock timeout."""
    import psycopg

    name = f"locked_{os.getpid()}"
    monkeypatch.setenv("CNN_LOCK_TIMEOUT_S", "1")
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as setup:
        setup.execute(f"DROP TABLE IF EXISTS {name}")
        setup.execute(f"CREATE TABLE {name} (path text, image_id text, model_name text, model_version text)")
    holder = psycopg.connect(host="127.0.0.1", user="postgres", dbname="test")
    holder.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
    try:
        yield name
    finally:
        holder.rollback()
        holder.close()
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as cleanup:
            cleanup.execute(f"DROP TABLE IF EXISTS {name}")


@requires_postgres
def test_a_locked_table_times_out_with_a_message(locked_table: str) -> None:
    from cnn.batch.sql_sink import SqlSink

    sink = SqlSink(PG, locked_table)
    started = time.monotonic()
    error = _raised(lambda: sink.current("patterns"))
    assert time.monotonic() - started < 15  # the lock timeout (1 s), not forever
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_TEMPORARY
    assert f"the table {locked_table} is locked by another session: waited 1 s" in str(fault), str(fault)


@requires_postgres
def test_a_database_that_refuses_connections_is_named() -> None:
    from cnn.batch.sql_sink import SqlSink

    error = _raised(lambda: SqlSink(f"postgresql://postgres@127.0.0.1:{free_port()}/test", "predictions"))
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_TEMPORARY
    assert "cannot open the table database" in str(fault) and "check that the database is up" in str(fault)


def test_a_dead_tracking_server_is_not_a_missing_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import versions

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    for key, value in workspace.client_waits(Waits(timeout_s=2, retries=1, backoff_s=1)).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    error = _raised(lambda: versions.find_version("patterns"))
    assert time.monotonic() - started < 20  # bounded: the client's defaults retried for about four minutes
    assert not (isinstance(error, UserError) and "not found" in str(error))  # "not found" would be a lie
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_TEMPORARY
    assert "the MLflow tracking server at http://127.0.0.1:" in str(fault) and "did not answer" in str(fault)


def test_a_dead_prefect_server_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    api = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", api)
    with temporary_settings({PREFECT_API_URL: api, PREFECT_CLIENT_MAX_RETRIES: 0}):
        with get_client(sync_client=True) as client:
            error = _raised(client.hello)
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_TEMPORARY
    assert f"the Prefect server at {api} did not answer" in str(fault), str(fault)


class _Unavailable(BaseHTTPRequestHandler):
    """Every request answered 503 with S3's error body: a store's gateway that is down."""

    def _fail(self) -> None:
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down for maintenance</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has no body
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _fail

    def log_message(self, *args: object) -> None:
        pass


def test_an_object_store_answering_503_is_named_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3fs import S3FileSystem

    from cnn.io import storage

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("CNN_RETRIES", "1")
    S3FileSystem.clear_instance_cache()  # fsspec reuses a client made for another endpoint by an earlier test
    try:
        started = time.monotonic()
        error = _raised(lambda: storage.read_object(f"s3://faults-{os.getpid()}/image.png"))
        assert time.monotonic() - started < 30
    finally:
        server.shutdown()
    fault = infrastructure_fault(error)
    assert fault is not None and fault.exit_code == EXIT_TEMPORARY
    assert "the object store answered with a server error" in str(fault) and "503" in str(fault)
    assert "tried again up to 1 time," in str(fault)


def test_a_bug_keeps_its_traceback() -> None:
    for bug in (ValueError("bad shape"), KeyError("label"), RuntimeError("CUDA error: device-side assert")):
        assert infrastructure_fault(bug) is None
    wrapped = RuntimeError("shard failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert infrastructure_fault(wrapped) is not None  # a cause anywhere in the chain counts


def test_waits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Waits.from_environment() == Waits()
    monkeypatch.setenv("CNN_TIMEOUT_S", "5")
    monkeypatch.setenv("CNN_RETRIES", "2")
    waits = Waits.from_environment()
    assert (waits.timeout_s, waits.retries, waits.lock_timeout_s) == (5.0, 2, 60.0)
    assert waits.longest_s() == 3 * 5 + 1 + 2
    bad_values = [("CNN_RETRIES", "1.5"), ("CNN_RETRIES", "99"), ("CNN_TIMEOUT_S", "soon"), ("CNN_TIMEOUT_S", "0")]
    for variable, bad in bad_values:
        monkeypatch.setenv(variable, bad)
        with pytest.raises(UserError, match=variable):
            Waits.from_environment()
        monkeypatch.delenv(variable)


def test_the_workspace_bounds_mlflow_and_prefect_but_never_overrides_the_user(
    cnn_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "PREFECT_CLIENT_MAX_RETRIES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CNN_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting wins
    workspace.configure()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["PREFECT_CLIENT_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_a_failed_training_run_ends_failed_and_an_abandoned_one_is_repaired(cnn_home: Path) -> None:
    import subprocess

    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    workspace.configure()
    experiment = mlflow.set_experiment("cnn-faults").experiment_id
    client = MlflowClient()

    def run(**tags: str) -> str:
        return str(client.create_run(experiment, tags=tags).info.run_id)

    failing, finishing = run(), run()
    with pytest.raises(ValueError), tracking.outcome(failing):
        raise ValueError("no usable images in split val")
    with tracking.outcome(finishing):
        pass
    assert client.get_run(failing).info.status == "FAILED"
    assert client.get_run(failing).data.tags["failure.reason"] == "ValueError: no usable images in split val"
    assert client.get_run(finishing).info.status == "FINISHED"

    ended = subprocess.Popen(["true"])  # a process that has ended: its pid names no process now
    ended.wait()
    ours = tracking._owner()  # this process, which is still running
    dead = run(**{**ours, "cnn.pid": str(ended.pid)})
    reused = run(**{**ours, "cnn.started": "1"})  # our pid, another start time: an earlier process with our pid
    alive = run(**ours)
    elsewhere = run(**{**ours, "cnn.host": "another-host", "cnn.pid": "1"})
    assert sorted(tracking.repair_abandoned(experiment)) == sorted([dead, reused])
    for run_id in (dead, reused):
        assert client.get_run(run_id).info.status == "FAILED"
        assert client.get_run(run_id).data.tags["failure.reason"].startswith("abandoned")
    for run_id in (alive, elsewhere):
        assert client.get_run(run_id).data.tags["cnn.outcome"] == "running"

"""PHI and secrets stay where they belong: DICOMs whose patient tags, folder names and a malformed WindowCenter carry
a canary go through ingest, train, register and score with the installed `cnn`, in a workspace whose path carries
the canary too, scoring into a table whose URL carries a canary password in its query string; afterwards the shared
stores (the MLflow database and artifacts, the Prefect database, everything else under CNN_HOME but the dataset
itself) and every line the commands printed hold no trace of either, the manifest's groups and the predictions hold
pseudonyms only, and what the workspace wrote is readable by its owner alone. MLflow's own record of where its
artifact folder is (a column of its database naming CNN_HOME) is the one place the workspace path may appear."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn.data.dataset import Dataset
from tests.helpers import (
    PG_URL,
    clean_env,
    free_port,
    requires_postgres,
    tiny_config,
    wait_until_up,
    with_window_center,
    write_dicom,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.slowest, requires_postgres]  # in make test-all and CI
CNN = str(Path(sys.executable).with_name("cnn"))


def _cnn(home: Path, api: str, *args: str) -> str:
    env = clean_env(home, PREFECT_API_URL=api)
    done = subprocess.run([CNN, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


WORKSPACE = f"WORKSPACE{uuid.uuid4().hex[:8].upper()}"  # in the workspace's path: the terminal shows it (yours)


@pytest.fixture
def prefect_under_home(tmp_path: Path) -> Iterator[str]:
    """One `prefect server start` for the three commands, its database under CNN_HOME (searched afterwards)."""
    port = free_port()
    home = tmp_path / f"ws-{WORKSPACE}" / "home"
    (home / "prefect").mkdir(parents=True)
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(None, PREFECT_HOME=str(home / "prefect")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/health")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_a_canary_patient_and_a_canary_password_leave_no_trace_in_what_is_shared(
    tmp_path: Path, prefect_under_home: str
) -> None:
    api = prefect_under_home
    canary = f"CANARY{uuid.uuid4().hex[:8].upper()}"
    password = f"Pw{uuid.uuid4().hex[:10]}"
    table = f"privacy_{uuid.uuid4().hex[:8]}"
    # trust auth: any password connects; this one sits in the query string, where SQLAlchemy does not hide it
    url = PG_URL.replace("postgresql+psycopg://", "postgresql://") + f"?sslmode=disable&password={password}"
    source, home = tmp_path / "scans", tmp_path / f"ws-{WORKSPACE}" / "home"
    rng = np.random.default_rng(0)
    for label, level in (("clear", 40), ("effusion", 200)):
        for patient in range(8):
            for scan in range(3):
                pixels = np.clip(rng.normal(level, 25, (24, 24)), 0, 255)
                folder = source / label / f"{canary}-{label}-{patient}"  # PACS exports name folders by patient
                write_dicom(folder / f"{scan}.dcm", pixels, f"{canary}-ID-{label}-{patient}", f"{canary}^Jane")
    with_window_center(source / "clear" / f"{canary}-clear-0" / "0.dcm", f"{canary}^Jane")  # a reject to report
    tiny_config(tmp_path / "fast.yaml")
    output = _cnn(home, api, "ingest", str(source), "--dataset", "scans", "--image-size", "24", "--channels", "1")
    output += _cnn(home, api, "train", "--dataset", "scans", "--config", str(tmp_path / "fast.yaml"), "--epochs", "2")
    preds = tmp_path / "preds.parquet"
    try:
        output += _cnn(
            home, api, "score", str(source), "--model", "scans", "--output", str(preds), "--pseudonymize", "path",
            "--table", f"{url}#{table}",
        )  # fmt: skip
        from sqlalchemy import create_engine, text

        with create_engine(PG_URL).connect() as conn:
            assert conn.execute(text(f'select count(*) from "{table}"')).scalar() == 47
    finally:
        from sqlalchemy import create_engine, text

        with create_engine(PG_URL).begin() as conn:
            conn.execute(text(f'drop table if exists "{table}", "{table}_rejects", "{table}_review"'))

    secret = password
    assert canary not in output and secret not in output
    dataset = home / "datasets"  # holds the source's paths by design: it is the owner's, never shared
    shared = [p for p in home.rglob("*") if p.is_file() and dataset not in p.parents and p.name != "mlflow.db"]
    assert (home / "mlflow.db").is_file() and list((home / "prefect").glob("*.db"))  # the stores searched
    needles = {"patient": canary, "password": secret, "workspace path": WORKSPACE}
    hits = [
        f"{p.relative_to(home)}: {what}"
        for p in shared
        for what, needle in needles.items()
        if needle.encode() in p.read_bytes()
    ]
    hits += [f"mlflow.db: {where}" for where in _mlflow_rows_with(home / "mlflow.db", tuple(needles.values()))]
    assert not hits, f"a canary is in {hits}"

    manifest = Dataset(home / "datasets" / "scans").manifest()
    assert (manifest["status"] == "rejected").sum() == 1  # the scan whose WindowCenter holds a name
    groups = manifest.loc[manifest["status"] == "ok", "group"]
    assert groups.str.startswith("p-").all() and groups.nunique() == 16
    table = pd.read_parquet(preds)
    assert len(table) == 47 and canary not in table.to_csv() and table["path"].str.startswith("p-").all()
    review = pd.read_parquet(tmp_path / "preds.review.parquet")  # the review queue shows paths as the table does
    assert canary not in review.to_csv() and review["path"].str.startswith("p-").all()
    assert not [p for p in (tmp_path / "preds.explanations").glob("*") if canary in p.name]

    private = [home / "mlflow.db", *Dataset(home / "datasets" / "scans").cache_dir.iterdir(), home / "datasets"]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in private), [oct(p.stat().st_mode) for p in private]


_STORE_LOCATIONS = {  # where MLflow keeps its artifact folder: the store's configuration, not shared content
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
}


def _mlflow_rows_with(db: Path, needles: tuple[str, ...]) -> list[str]:
    """table.column of every value in MLflow's database holding a needle, but MLflow's own artifact locations."""
    import sqlite3

    found = []
    with sqlite3.connect(db) as conn:
        for (name,) in conn.execute("select name from sqlite_master where type = 'table'"):
            columns = [row[1] for row in conn.execute(f'pragma table_info("{name}")')]
            for row in conn.execute(f'select * from "{name}"'):
                for column, value in zip(columns, row):
                    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                    if (name, column) not in _STORE_LOCATIONS and any(n in text for n in needles):
                        found.append(f"{name}.{column}")
    return sorted(set(found))

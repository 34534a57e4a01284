"""End to end on real servers, loopback only: `prefect server` on PostgreSQL, `mlflow server` on PostgreSQL
with basic auth, deployments created from deploy/prefect.yaml with `prefect deploy`, process workers,
train then score triggered through the Prefect API; the champion checked over MLflow's REST API and the
predictions in PostgreSQL. Secrets never appear in flow parameters or MLflow params/tags."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TINY, api_json, free_port, pattern_dataset, requires_postgres, wait_until_up, write_patterns

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
PG = "postgres@127.0.0.1:5432"
PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]
WORKER_PASSWORD = "w0rker-" + uuid.uuid4().hex[:8]
API_AUTH = f"cnn:api-{uuid.uuid4().hex[:8]}"  # PREFECT_SERVER_API_AUTH_STRING, as in the compose file


pytestmark = [requires_postgres, pytest.mark.e2e, pytest.mark.slowest]  # minutes: in make test-all and CI


def _databases(names: list[str], create: bool) -> None:
    import psycopg

    conn = psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True)
    with conn.cursor() as cur:
        for name in names:
            if create:
                cur.execute(f'CREATE DATABASE "{name}"')
            else:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Prefect and MLflow servers on fresh PostgreSQL databases, and two process workers."""
    tmp = tmp_path_factory.mktemp("stack")
    suffix = uuid.uuid4().hex[:8]
    dbs = [f"prefect_{suffix}", f"mlflow_{suffix}", f"mlauth_{suffix}", f"preds_{suffix}"]
    _databases(dbs, create=True)
    prefect_port, mlflow_port = free_port(), free_port()
    (tmp / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = postgresql+psycopg://{PG}/{dbs[2]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CNN_"))}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    env = {
        **base,
        "PREFECT_HOME": str(tmp / "prefect-client"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_TRACKING_USERNAME": "worker",  # not the admin, as in the compose file
        "MLFLOW_TRACKING_PASSWORD": WORKER_PASSWORD,
        "PREFECT_API_AUTH_STRING": API_AUTH,
        "CNN_HOME": str(tmp / "home"),
        "CNN_PROJECT_DIR": str(ROOT),
        "CNN_PREDICTIONS_URL": f"postgresql+psycopg://{PG}/{dbs[3]}#predictions",
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",  # as in the image: the project's commands on PATH
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs = tmp / "logs"
    logs.mkdir()

    def start(name: str, command: list[str], extra: dict[str, str]) -> None:
        log = (logs / f"{name}.log").open("wb")
        processes.append(
            subprocess.Popen(
                command, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        )

    try:
        start(
            "prefect",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
                "--analytics-off",
                "--no-ui",
            ],
            {
                "PREFECT_API_URL": "",
                "PREFECT_SERVER_API_AUTH_STRING": API_AUTH,
                "PREFECT_HOME": str(tmp / "prefect-server"),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG}/{dbs[0]}",
            },
        )
        start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--app-name",
                "basic-auth",
                "--backend-store-uri",
                f"postgresql+psycopg://{PG}/{dbs[1]}",
                "--artifacts-destination",
                str(tmp / "mlartifacts"),
                "--serve-artifacts",
                "--allowed-hosts",  # as in the compose file: workers call it by its service name
                f"mlflow,mlflow:5000,localhost,localhost:{mlflow_port},127.0.0.1,127.0.0.1:{mlflow_port}",
            ],
            {
                "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"),
                "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
            },
        )
        wait_until_up(f"{env['PREFECT_API_URL']}/health")
        wait_until_up(f"{env['MLFLOW_TRACKING_URI']}/health")
        users = subprocess.run(  # the compose file's mlflow-users service: the workers' user, not the admin
            [str(BIN / "python"), "deploy/mlflow_users.py"],
            env={
                **env,
                "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                "WORKER_USERNAME": "worker",
                "WORKER_PASSWORD": WORKER_PASSWORD,
            },
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert users.returncode == 0, users.stderr[-2000:]
        for pool in ("cpu", "gpu"):
            subprocess.run(
                [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
                env=env,
                check=True,
                capture_output=True,
                cwd=ROOT,
            )
        deployed = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        # deploy time, once (the compose file's prefect-automations service): crashed-run detection
        automations = subprocess.run([str(BIN / "cnn"), "automations"], env=env, capture_output=True, text=True)
        assert automations.returncode == 0, automations.stdout[-2000:] + automations.stderr[-2000:]
        for pool in ("cpu", "gpu"):
            worker = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
            start(f"worker-{pool}", worker, {"PREFECT_WORKER_QUERY_SECONDS": "1"})  # a run starts within a second
        yield {**env, "tmp": str(tmp), "preds_db": dbs[3]}
    finally:
        for proc in processes:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        _databases(dbs, create=False)


PREFECT_AUTH = "Basic " + base64.b64encode(API_AUTH.encode()).decode()


def _run_deployment(env: dict[str, str], name: str, parameters: dict) -> dict:
    api = env["PREFECT_API_URL"]
    deployment = api_json(f"{api}/deployments/name/{name}", auth=PREFECT_AUTH)
    run = api_json(
        f"{api}/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}, auth=PREFECT_AUTH
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = api_json(f"{api}/flow_runs/{run['id']}", auth=PREFECT_AUTH)
        if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise AssertionError(f"{name} did not finish")


def test_train_then_score_on_real_servers(stack: dict[str, str]) -> None:
    tmp = Path(stack["tmp"])
    pattern_dataset(Path(stack["CNN_HOME"]))
    config = {**TINY, "epochs": 2, "batch_size": 16}
    trained = _run_deployment(stack, "train/scheduled", {"dataset": "patterns", "config": config})
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (tmp / "logs").glob("worker-*.log"))
    assert trained["state_type"] == "COMPLETED", logs
    # crashed-run detection was set up once at deploy time, and the runs did not add a second one
    automations = api_json(f"{stack['PREFECT_API_URL']}/automations/filter", {}, auth=PREFECT_AUTH)
    assert [a["name"] for a in automations] == ["cnn: mark flow runs Crashed when their heartbeats stop"]

    mlflow_api = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
    auth = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    alias = api_json(f"{mlflow_api}/registered-models/alias?name=patterns&alias=champion", auth=auth)
    # the workers logged in as their own user (the stack's environment), which is no admin, and it was enough
    worker = api_json(f"{mlflow_api}/users/get?username=worker", auth=auth)
    assert worker["user"]["is_admin"] is False
    assert alias["model_version"]["version"] == "1"
    with pytest.raises(urllib.error.HTTPError) as denied:
        api_json(f"{mlflow_api}/registered-models/alias?name=patterns&alias=champion")
    assert denied.value.code == 401

    incoming = write_patterns(tmp / "incoming", per_class=2, seed=8)
    scored = _run_deployment(stack, "score/nightly", {"source": str(incoming), "config": {"model": "patterns"}})
    assert scored["state_type"] == "COMPLETED"

    from sqlalchemy import create_engine, text

    engine = create_engine(f"postgresql+psycopg://{PG}/{stack['preds_db']}")
    with engine.connect() as conn:
        rows = conn.execute(text("select count(*), count(distinct path), min(model_version) from predictions")).one()
    engine.dispose()
    assert rows == (6, 6, "1")

    # No secret in any run's flow parameters (the table URL stays in the environment) or in MLflow's params and
    # tags: neither the workers' own password (the one they hold), nor the admin's, nor the Prefect API's.
    secrets = {"worker password": WORKER_PASSWORD, "admin password": PASSWORD, "API auth": API_AUTH.split(":")[1]}
    for run in (trained, scored):
        shown = json.dumps(run["parameters"])
        assert not [name for name, value in secrets.items() if value in shown], run["name"]
        assert "postgresql" not in shown, run["name"]
    run_id = alias["model_version"]["run_id"]
    mlflow_run = json.dumps(api_json(f"{mlflow_api}/runs/get?run_id={run_id}", auth=auth)["run"]["data"])
    assert not [name for name, value in secrets.items() if value in mlflow_run]


def test_the_servers_are_closed_by_default(stack: dict[str, str]) -> None:
    """The Prefect API answers only with the auth string (health stays open for probes); MLflow answers a worker
    that calls it by its compose service name and refuses a Host it does not know."""
    api = stack["PREFECT_API_URL"]
    with pytest.raises(urllib.error.HTTPError) as denied:
        api_json(f"{api}/flow_runs/filter", {}, tries=1)
    assert denied.value.code == 401
    assert isinstance(api_json(f"{api}/flow_runs/filter", {}, auth=PREFECT_AUTH), list)
    assert api_json(f"{api}/health") is True

    mlflow_url = stack["MLFLOW_TRACKING_URI"]
    auth = "Basic " + base64.b64encode(f"worker:{WORKER_PASSWORD}".encode()).decode()

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host, "Authorization": auth},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    assert status("mlflow:5000") == 200  # the compose service name
    assert status("attacker.example") == 403  # DNS rebinding and other hosts are refused

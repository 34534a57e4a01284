"""deploy/prefect.yaml: every deployment points at a real flow, with parameters it accepts and valid schedules."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import clean_env, requires_postgres

PREFECT_YAML = Path(__file__).parents[2] / "deploy" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_deployment_entrypoints_and_parameters(deployment: dict) -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    path, _, attribute = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute)
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment.get("parameters", {})) <= accepted
    flow.validate_parameters(deployment.get("parameters", {}))  # types check against the flow's signature
    for schedule in deployment.get("schedules", []):
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployment["work_pool"]["name"] in {"cpu", "gpu"}


def test_shard_retries_only_for_transient_failures() -> None:
    from types import SimpleNamespace

    from sqlalchemy.exc import IntegrityError, OperationalError

    from cnn.errors import UserError
    from flows.score import _transient

    def retried(exc: BaseException) -> bool:
        return _transient(None, None, SimpleNamespace(data=exc))

    assert retried(OperationalError("select 1", {}, Exception("server closed the connection")))
    assert retried(ConnectionResetError("reset by peer")) and retried(TimeoutError())
    assert not retried(UserError("invalid table name"))
    assert not retried(IntegrityError("insert", {}, Exception("duplicate key")))
    assert not retried(ValueError("bad input"))


COMPOSE = PREFECT_YAML.with_name("docker-compose.yml")


def test_compose_file_validates_and_mirrors_the_tested_setup() -> None:
    import shutil
    import subprocess

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"} <= set(services)
    # the Dask scheduler and its workers, which `cluster: tcp://dask-scheduler:8786` fans shards out to
    assert services["dask-scheduler"]["command"].startswith("dask scheduler --host 0.0.0.0 --port 8786")
    assert "dask worker tcp://dask-scheduler:8786" in services["dask-worker"]["command"]
    assert "ports" not in services["dask-scheduler"]  # no authentication: never published
    assert (
        services["dask-worker"]["volumes"]
        == services["worker-cpu"]["volumes"]
        == ["data:/data", "review-files:/review-files"]
    )
    nightly = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "nightly")
    assert "cluster" in nightly["parameters"]["config"] and "tcp://dask-scheduler:8786" in PREFECT_YAML.read_text()
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "--app-name basic-auth" in " ".join(services["mlflow"]["command"])
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "--pool cpu" in services["worker-cpu"]["command"] and "--pool gpu" in services["worker-gpu"]["command"]
    text = COMPOSE.read_text()
    assert "PASSWORD: ${" in text and "change-me" not in text  # secrets only from the environment
    # closed by default: API auth on the server and its clients, ports on loopback, one role per service
    auth = "${PREFECT_API_AUTH_STRING:?set PREFECT_API_AUTH_STRING (user:password)}"
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == auth
    assert compose["x-pipeline"]["environment"]["PREFECT_API_AUTH_STRING"] == auth
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("${CNN_BIND_ADDRESS:-127.0.0.1}:") for port in published)
    assert '--allowed-hosts "mlflow,mlflow:5000,' in " ".join(services["mlflow"]["command"])
    assert "://prefect:" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "://mlflow:" in services["mlflow"]["environment"]["STORE_DB"]
    assert "://predictions_writer:" in compose["x-pipeline"]["environment"]["CNN_PREDICTIONS_URL"]
    assert compose["x-pipeline"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_WORKER_USERNAME:-worker}"
    # the S3-compatible store: MLflow's artifacts, incoming images and prediction tables, one identity each
    store = services["seaweedfs"]
    assert "weed server" in store["command"][0] and "-s3 " in store["command"][0] and "ports" not in store
    assert '"secretKey": "$$S3_PIPELINE_SECRET_KEY"' in store["command"][0]  # from the environment at start
    assert '"Read:images", "List:images", "Read:predictions", "Write:predictions"' in store["command"][0]
    assert "--artifacts-destination s3://mlflow-artifacts/" in " ".join(services["mlflow"]["command"])
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert services["mlflow"]["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${S3_MLFLOW_SECRET_KEY:?")
    pipeline_env = compose["x-pipeline"]["environment"]
    assert pipeline_env["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert pipeline_env["AWS_SECRET_ACCESS_KEY"].startswith("${S3_PIPELINE_SECRET_KEY:?")
    assert "'images', 'predictions', 'mlflow-artifacts'" in services["s3-buckets"]["command"][-1]
    assert nightly["parameters"]["source"].startswith("s3://images/")
    assert nightly["parameters"]["config"]["output"].startswith("s3://predictions/")
    # Label Studio: its own database and role, not published, the pictures on a volume the workers share with it
    review = services["label-studio"]
    assert review["image"] == "heartexlabs/label-studio:1.23.2" and "ports" not in review
    assert review["environment"]["POSTGRE_USER"] == review["environment"]["POSTGRE_NAME"] == "label_studio"
    assert review["environment"]["POSTGRE_PASSWORD"].startswith("${LABEL_STUDIO_DB_PASSWORD:?")
    assert (
        "review-files:/label-studio/files" in review["volumes"]
        and "review-files:/review-files" in (services["worker-cpu"]["volumes"])
    )
    assert pipeline_env["CNN_LABEL_STUDIO_FILES_IN_SERVER"] == review["environment"]["LOCAL_FILES_DOCUMENT_ROOT"]
    assert pipeline_env["CNN_LABEL_STUDIO_TOKEN"] == "${LABEL_STUDIO_TOKEN:-}"  # by reference, never in a file
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (Debian's 1.29 package) is not installed; .ci/run installs it")
    env = {"PATH": "/usr/bin:/bin"} | {
        name: "x"
        for name in (
            "POSTGRES_PASSWORD",
            "PREFECT_DB_PASSWORD",
            "MLFLOW_DB_PASSWORD",
            "PREDICTIONS_DB_PASSWORD",
            "LABEL_STUDIO_DB_PASSWORD",
            "LABEL_STUDIO_ADMIN_EMAIL",
            "LABEL_STUDIO_ADMIN_PASSWORD",
            "PREFECT_API_AUTH_STRING",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_WORKER_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "S3_ADMIN_SECRET_KEY",
            "S3_MLFLOW_SECRET_KEY",
            "S3_PIPELINE_SECRET_KEY",
        )
    }
    checked = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env)
    assert checked.returncode == 0, checked.stderr
    missing = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


def test_kubernetes_gpu_template() -> None:
    import json

    template = json.loads((PREFECT_YAML.parent / "k8s" / "gpu-base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    variables = template["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1
    assert variables["tolerations"]["default"][0]["key"] == "nvidia.com/gpu"
    placeholders = {"gpu_count", "node_selector", "tolerations", "data_claim"}
    assert placeholders <= set(variables)
    # pinned: a run cannot swap the image, the secret or the service account
    assert not {"image", "secret_name", "service_account_name"} & set(variables)
    assert "{{" not in container["image"] + pod["serviceAccountName"] + json.dumps(container["envFrom"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_prefect_yaml_covers_every_flow() -> None:
    entrypoints = {d["entrypoint"] for d in _deployments()}
    assert {
        "flows/score.py:score_flow",
        "flows/train.py:train_flow",
        "flows/ingest.py:ingest_flow",
        "flows/pipeline.py:pipeline_flow",
        "flows/tables.py:tables_flow",
    } <= entrypoints
    pools = {d["work_pool"]["name"] for d in _deployments()}
    assert pools == {"cpu", "gpu"}


def test_scoring_defaults_live_in_one_place() -> None:
    """The CLI, the flow, `cnn serve` and prefect.yaml take their defaults from ScoreConfig, so they cannot drift."""
    import inspect

    from typer.testing import CliRunner

    from cnn.config import ScoreConfig
    from flows.cli import app
    from flows.score import score_flow
    from flows.serve import Schedules, deployments

    assert set(inspect.signature(score_flow.fn).parameters) == {"source", "config", "home"}
    defaults = ScoreConfig(model="m")
    help_text = " ".join(CliRunner().invoke(app, ["score", "--help"], terminal_width=200).output.split())
    for option in ("review_below", "top_k", "batch_size", "shard_size", "precision"):
        assert f"(default: {getattr(defaults, option)})" in help_text, option
    nightly = next(d for d in _deployments() if d["name"] == "nightly")["parameters"]["config"]
    assert ScoreConfig(**nightly).review_below == defaults.review_below  # not restated, so the same
    served = deployments(Schedules("/in", ScoreConfig(model="m"), train_cron=""))[0].parameters["config"]
    assert ScoreConfig(**served) == defaults


def test_flow_configs_load_yaml_and_let_options_override(tmp_path: Path) -> None:
    from cnn.config import ScoreConfig
    from cnn.data.ingest import IngestOptions
    from cnn.errors import UserError

    path = tmp_path / "score.yaml"
    path.write_text("model: xray@challenger\nreview_below: 0.8\nshard_size: 32\n")
    cfg = ScoreConfig.load(path, shard_size=8, output=None)
    assert (cfg.model, cfg.review_below, cfg.shard_size, cfg.output) == ("xray@challenger", 0.8, 8, None)
    with pytest.raises(UserError, match="invalid scoring config: model: Field required"):
        ScoreConfig.load(None)
    path.write_text("image_size: 64\nworkers: 2\n")
    with pytest.raises(UserError, match="invalid ingest config: workers: Extra inputs are not permitted"):
        IngestOptions.load(path)


def _documented_deployments() -> dict[str, dict[str, str]]:
    readme = (PREFECT_YAML.parents[1] / "docs" / "operations" / "deployments.md").read_text()
    start = readme.index("| deployment | pool | schedule (UTC) | concurrency | writes |")
    rows = {}
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, pool, cron, limit, writes = (cell.strip().strip("`") for cell in line.strip("|").split("|"))
        rows[name] = {"pool": pool, "cron": cron, "limit": limit, "writes": writes}
    return rows


def test_the_documented_deployment_table_matches_prefect_yaml() -> None:
    readme = _documented_deployments()
    shipped = {f"{d['entrypoint'].split(':')[1].removesuffix('_flow')}/{d['name']}": d for d in _deployments()}
    assert set(readme) == set(shipped)
    for name, deployment in shipped.items():
        row = readme[name]
        crons = [s["cron"] for s in deployment.get("schedules", [])]
        assert row["pool"] == deployment["work_pool"]["name"], name
        assert row["cron"] == (crons[0] if crons else "on demand"), name
        assert row["limit"] == str(deployment.get("concurrency_limit")), name
        config = deployment["parameters"].get("config") if name.startswith("score/") else None
        if config:
            if config.get("output"):
                assert config["output"] in row["writes"], name
            writes_table = config.get("table") == "default" or not config.get("output")
            assert ("default table" in row["writes"]) == writes_table, name


def test_served_deployments_run_one_at_a_time() -> None:
    from cnn.config import ScoreConfig, TrainConfig
    from flows.serve import Schedules, deployments

    served = deployments(Schedules("/in", ScoreConfig(model="m"), dataset="d", training=TrainConfig()))
    assert [d.name for d in served] == ["nightly", "scheduled"]
    assert all(d.concurrency_limit == 1 for d in served)


def test_table_default_means_the_workspace_table_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnn.batch.file_sink import FileSink
    from cnn.batch.sql_sink import SqlSink
    from flows.score import _sinks

    monkeypatch.setenv("CNN_HOME", str(tmp_path))
    monkeypatch.setenv("CNN_PREDICTIONS_URL", f"sqlite:///{tmp_path / 'preds.db'}#nightly")
    sinks = _sinks(str(tmp_path / "out.parquet"), "default")
    assert [type(s) for s in sinks] == [FileSink, SqlSink]
    assert isinstance(sinks[1], SqlSink) and sinks[1].table == "nightly"
    assert [type(s) for s in _sinks(str(tmp_path / "out.parquet"), None)] == [FileSink]


def test_deployment_files_set_up_crashed_run_detection() -> None:
    """The heartbeat automation is set up once at deploy time (the compose file's one-shot service; never in a pull
    step, which would run it before every flow run), and the workers send heartbeats."""
    import json

    steps = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert not [s for s in steps if "prefect.deployments.steps.run_shell_script" in s]
    compose = yaml.safe_load(COMPOSE.read_text())
    once = compose["services"]["prefect-automations"]
    assert once["command"] == ["cnn", "automations"] and once["restart"] == "no"
    assert compose["x-pipeline"]["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    template = json.loads((PREFECT_YAML.parent / "k8s" / "gpu-base-job-template.json").read_text())
    assert template["variables"]["properties"]["env"]["default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"


def test_cnn_automations_is_idempotent_and_needs_a_server(prefect_server: None, cnn_home: Path) -> None:
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from flows.automations import CRASH_DETECTION
    from flows.cli import app

    runner = CliRunner()
    for crash_after in ("300", "120"):
        result = runner.invoke(app, ["automations", "--crash-after", crash_after])
        assert result.exit_code == 0, result.output
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(CRASH_DETECTION)
    assert len(found) == 1 and found[0].trigger.within.total_seconds() == 120  # updated, not doubled
    assert found[0].actions[0].type == "change-flow-run-state" and found[0].actions[0].state.value == "CRASHED"
    cnn = str(Path(sys.executable).with_name("cnn"))
    env = clean_env(cnn_home, PREFECT_HOME=str(cnn_home / "no-profile"))  # no server in the environment or profile
    refused = subprocess.run([cnn, "automations"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "set PREFECT_API_URL" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr


@requires_postgres
def test_postgres_init_script_gives_each_service_only_its_own_database() -> None:
    """deploy/postgres-init.sql against the real server (it is idempotent: run twice): the predictions writer
    creates and writes tables in `predictions` and can do nothing else."""
    import shutil

    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    script = PREFECT_YAML.with_name("postgres-init.sql")
    admin = [psql, "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-q"]
    passwords = ["-v", "prefect_password=a", "-v", "mlflow_password=b", "-v", "writer_password=c"]
    passwords += ["-v", "label_studio_password=d"]
    for _ in range(2):
        ran = subprocess.run([*admin, *passwords, "-f", str(script)], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr

    def as_writer(database: str, sql: str) -> subprocess.CompletedProcess[str]:
        command = [psql, "-h", "127.0.0.1", "-U", "predictions_writer", "-d", database, "-v", "ON_ERROR_STOP=1"]
        return subprocess.run([*command, "-c", sql], capture_output=True, text=True)

    wrote = as_writer("predictions", "create table probe_t(x int); insert into probe_t values (1); drop table probe_t")
    assert wrote.returncode == 0, wrote.stderr
    for database in ("prefect", "mlflow", "mlflow_auth", "label_studio"):
        assert "CONNECT privilege" in as_writer(database, "select 1").stderr
    assert "permission denied to create database" in as_writer("predictions", "create database nope").stderr
    assert "permission denied" in as_writer("predictions", "create role intruder").stderr

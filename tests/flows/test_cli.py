"""The `cnn` CLI: help everywhere, clear errors without tracebacks, and ingest/augment through Prefect."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cnn.data.dataset import Dataset
from flows.cli import app
from tests.helpers import clean_env, free_port, wait_until_up

runner = CliRunner()
CNN = str(Path(sys.executable).with_name("cnn"))


def _commands() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]  # all have one


def test_version_and_help_on_every_command() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("cnn ")
    assert set(_commands()) >= {"ingest", "augment", "demo-data", "demo"}
    for command in _commands():
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage" in result.output


def _run_cli(args: list[str], home: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CNN, *args], capture_output=True, text=True, env=clean_env(home, COLUMNS="120"), timeout=timeout
    )


def test_missing_source_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _run_cli(["ingest", str(tmp_path / "nowhere"), "--dataset", "x"], tmp_path / "home")
    assert result.returncode == 2
    assert "source not found" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "s3://bucket/scans/?X-Amz-Signature=CANARY", "--dataset", "x"],
        ["score", "az://box/in/?sv=1&sig=CANARY", "--model", "x"],
        ["score", "in", "--model", "x", "--output", "s3://bucket/p.parquet?token=CANARY"],
    ],
)
def test_a_url_with_a_credential_is_refused_before_any_flow_run_records_it(tmp_path: Path, args: list[str]) -> None:
    result = _run_cli(args, tmp_path / "home")
    assert result.returncode == 2 and "never in the URL" in result.stderr, result.stderr
    assert "CANARY" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file()]  # no flow run: no server, no database


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "bad name!"], "invalid name"),
        (["--dataset", "ok", "--channels", "2"], "channels"),
        (["--dataset", "ok", "--val-fraction", "0.7", "--test-fraction", "0.5"], "leave some data"),
        (["--dataset", "ok", "--resize", "stretch"], "resize"),
    ],
)
def test_option_errors(tmp_path: Path, cnn_home: Path, args: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    result = runner.invoke(app, ["ingest", str(tmp_path / "src"), *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.slow
def test_ingest_and_augment_through_prefect(
    prefect_server: None, cnn_home: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    made = runner.invoke(app, ["demo-data", "xray", "--n", "80", "--out", str(tmp_path / "xray")])
    assert made.exit_code == 0, made.output
    result = runner.invoke(
        app,
        [
            "ingest",
            str(tmp_path / "xray" / "manifest.csv"),
            "--dataset",
            "xray",
            "--image-size",
            "32",
            "--channels",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "images per class and split" in result.output and "rejected files" in result.output
    manifest = pd.read_parquet(Dataset(cnn_home / "datasets" / "xray").manifest_path)
    assert len(manifest) == 85 and (manifest["status"] == "rejected").sum() == 4  # 80 + 1 copy + 4 corrupt
    assert (cnn_home / "datasets" / "xray" / "report.md").is_file()

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ingest"])))
        assert runs and all(r.state is not None and r.state.is_completed() for r in runs)
        keys = ["dataset-xray-report", "dataset-xray-classes", "ingest-decode"]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        assert {a.key for a in artifacts} == set(keys)

    preview = tmp_path / "preview.png"
    result = runner.invoke(
        app,
        [
            "augment",
            "--dataset",
            "xray",
            "--policy",
            "xray",
            "--preview",
            str(preview),
            "--rows",
            "3",
            "--samples",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert preview.is_file() and preview.stat().st_size > 1000

    bad = runner.invoke(app, ["augment", "--dataset", "xray", "--policy", "glitter", "--preview", str(preview)])
    assert bad.exit_code == 2 and "unknown augmentation policy" in bad.output
    missing = runner.invoke(app, ["augment", "--dataset", "nope", "--policy", "xray", "--preview", str(preview)])
    assert missing.exit_code == 2 and "cnn ingest" in missing.output


@pytest.mark.slow
def test_user_error_inside_the_flow_has_no_traceback(
    prefect_server: None, cnn_home: Path, write_images: Callable[..., Path], capfd: pytest.CaptureFixture[str]
) -> None:
    src = write_images(classes=("only",), per_class=3)
    result = runner.invoke(app, ["ingest", str(src), "--dataset", "single", "--image-size", "16"])
    captured = capfd.readouterr()
    assert result.exit_code == 2
    assert "at least two are needed" in result.output
    assert "Traceback" not in result.output + captured.err + captured.out


@pytest.mark.e2e
def test_real_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `cnn` against Prefect's local server, as a user runs it."""
    home = tmp_path / "home"
    made = _run_cli(["demo-data", "claims", "--n", "24", "--size", "96"], home)
    assert made.returncode == 0, made.stderr
    result = _run_cli(["ingest", str(home / "demo" / "claims"), "--dataset", "claims", "--image-size", "32"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoding images" in result.stderr
    assert Dataset(home / "datasets" / "claims").manifest_path.is_file()
    assert (home / "prefect").is_dir()  # Prefect's state stays inside CNN_HOME
    again = _run_cli(["ingest", str(home / "demo" / "claims"), "--dataset", "claims", "--image-size", "32"], home)
    assert again.returncode == 0 and "decoded 0 files, 24 unchanged" in again.stdout


@pytest.mark.e2e
def test_ui_serves_the_workspace_store(tmp_path: Path) -> None:
    import socket
    import urllib.request

    port = free_port()
    env = clean_env(tmp_path / "home", drop=("PREFECT_", "MLFLOW_"))
    proc = subprocess.Popen(
        [CNN, "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", timeout=90)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
        proc.terminate()  # SIGTERM to `cnn ui` alone, as a process manager sends it: its MLflow server goes too
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in output, output[-2000:]
    assert f"http://127.0.0.1:{port}" in output and "mlflow.db" in output
    with pytest.raises(OSError):  # nothing listens any more: the server the command started was stopped
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# The command line's option names where they differ from the config field they set.
RENAMED = {
    "decode_time_limit": "decode_time_limit_s",
    "operating_point": "operating_points",
    "similar_cases": "similar",
}


def test_each_option_is_described_once_by_the_config_field_it_sets() -> None:
    """An option that sets a config field shows that field's description and default, word for word: the config is
    the one place that describes it (the docs' config reference shows the same text)."""
    from typer.main import get_command

    from cnn.config import IngestOptions, ScoreConfig, TrainConfig

    commands = get_command(app).commands  # type: ignore[attr-defined]  # a group of commands
    checked = []
    for name, config in (("ingest", IngestOptions), ("train", TrainConfig), ("score", ScoreConfig)):
        for param in commands[name].params:
            field = RENAMED.get(param.name, param.name)
            if param.param_type_name == "option" and field in config.model_fields:
                assert param.help == config.described(field) + ".", (name, param.name)
                checked.append(f"{name} {field}")
    assert len(checked) >= 60  # every option of the three commands that sets a field
    for config in (IngestOptions, TrainConfig, ScoreConfig):
        undescribed = [f for f, info in config.model_fields.items() if not (info.description or "").strip()]
        assert not undescribed, (config.__name__, undescribed)


def test_help_shows_the_configs_default() -> None:
    result = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "200"})
    assert "Images per forward pass (default: 64)." in " ".join(result.output.split())

"""`cnn serve`: run the scheduled deployments, on a local Prefect server under CNN_HOME unless one is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnn.config import ScoreConfig, TrainConfig
from cnn.errors import UserError
from flows.processes import start_group, stop_group
from flows.workspace import Workspace


@dataclass(frozen=True)
class Schedules:
    """What `cnn serve` deploys: nightly scoring of a folder, and (unless its cron is empty) weekly training."""

    incoming: str
    scoring: ScoreConfig
    score_cron: str = "0 2 * * *"
    train_cron: str = "0 3 * * 0"
    dataset: str = ""
    training: TrainConfig | None = None


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def server_marker(ws: Workspace) -> Path:
    """Where `cnn serve` notes the API URL of the local server it runs, so other commands can join it."""
    return ws.prefect_home / "server.json"


@contextmanager
def local_server(ws: Workspace, port: int, timeout_s: float = 120) -> Iterator[str]:
    """PREFECT_API_URL when set; else a healthy server on 127.0.0.1:port; else `prefect server start` with its
    state under CNN_HOME, stopped (and its marker removed) when the block ends. Sets PREFECT_API_URL inside."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    api_url = f"http://127.0.0.1:{port}/api"
    proc = None if healthy(api_url) else _start(ws, port, api_url, timeout_s)
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
    try:
        yield api_url
    finally:
        if proc is not None:
            server_marker(ws).unlink(missing_ok=True)
            stop_group(proc, timeout_s=30)  # the server and its own children; killed if it will not stop


def _start(ws: Workspace, port: int, api_url: str, timeout_s: float) -> subprocess.Popen[bytes]:
    ws.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(ws.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = (ws.prefect_home / "server.log").open("ab")
    prefect = Path(sys.executable).with_name("prefect")
    proc = start_group(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(api_url):
            server_marker(ws).write_text(json.dumps({"api_url": api_url, "pid": proc.pid}))
            return proc
        if proc.poll() is not None:
            raise UserError(
                f"the local Prefect server exited (code {proc.returncode}); see {ws.prefect_home / 'server.log'}"
            )
        time.sleep(0.5)
    stop_group(proc)
    raise UserError(f"the local Prefect server did not answer on {api_url} within {timeout_s:.0f} s")


def deployments(schedules: Schedules) -> list[Any]:
    """The `score` and `train` deployments with their schedules (imports Prefect: call after configuring)."""
    from flows.credentials import by_reference
    from flows.score import score_flow
    from flows.train import train_flow

    scoring = schedules.scoring.model_copy(update={"table": by_reference(schedules.scoring.table)})
    score_parameters = {"source": schedules.incoming, "config": scoring.model_dump(mode="json")}
    deployed = [
        score_flow.to_deployment(
            concurrency_limit=1,  # one run at a time: a run still going when the next is due makes it wait
            name="nightly",
            cron=schedules.score_cron,
            parameters=score_parameters,
            description="Score new images in the incoming folder with @champion",
        )
    ]
    if schedules.train_cron:
        train_parameters: dict[str, Any] = {"dataset": schedules.dataset}
        if schedules.training is not None:
            train_parameters["config"] = schedules.training.model_dump(mode="json")
        deployed.append(
            train_flow.to_deployment(
                concurrency_limit=1,
                name="scheduled",
                cron=schedules.train_cron,
                parameters=train_parameters,
                description="Retrain, register and gate the model",
            )
        )
    return deployed


def serve(
    ws: Workspace, schedules: Schedules, port: int, started: Any = None, crash_after_s: int | None = None
) -> None:
    """Serve the deployments until interrupted, on the server `local_server` provides, with the automation that
    marks runs whose heartbeats stop as Crashed."""
    with local_server(ws, port) as api_url:
        from prefect import serve as prefect_serve  # after PREFECT_API_URL is set: Prefect reads it on import

        from flows.automations import ensure_crash_detection

        ensure_crash_detection(crash_after_s)

        if started is not None:
            started(api_url)
        try:
            prefect_serve(*deployments(schedules))
        except KeyboardInterrupt:
            pass

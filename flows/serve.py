"""`cnn serve`: run the scheduled deployments, on a local Prefect server under CNN_HOME unless one is given."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cnn.errors import UserError
from flows.workspace import Workspace


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def server_marker(ws: Workspace) -> Path:
    """Where `cnn serve` notes the API URL of the local server it runs, so other commands can join it."""
    return ws.prefect_home / "server.json"


def start_local_server(ws: Workspace, port: int, timeout_s: float = 120) -> tuple[str, subprocess.Popen[bytes] | None]:
    """Reuse a healthy server on 127.0.0.1:port, or start `prefect server start` with its state under CNN_HOME."""
    import json

    api_url = f"http://127.0.0.1:{port}/api"
    if healthy(api_url):
        return api_url, None
    ws.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(ws.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = (ws.prefect_home / "server.log").open("ab")
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(api_url):
            server_marker(ws).write_text(json.dumps({"api_url": api_url, "pid": proc.pid}))
            return api_url, proc
        if proc.poll() is not None:
            raise UserError(f"the local Prefect server exited (code {proc.returncode}); see {ws.prefect_home / 'server.log'}")
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the local Prefect server did not answer on {api_url} within {timeout_s:.0f} s")


def deployments(params: dict[str, Any]) -> list[Any]:
    """The `score` and `train` deployments with their schedules (imports Prefect: call after configuring)."""
    from flows.score import score_flow
    from flows.train import train_flow

    score_parameters = {"source": params["incoming"], "model": params["model"]}
    for key in ("output", "table"):
        if params.get(key):
            score_parameters[key] = params[key]
    deployed = [score_flow.to_deployment(name="nightly", cron=params["score_cron"], parameters=score_parameters,
                                         description="Score new images in the incoming folder with @champion")]
    if params.get("train_cron"):
        train_parameters: dict[str, Any] = {"dataset": params["dataset"]}
        if params.get("config"):
            train_parameters["config"] = params["config"]
        deployed.append(train_flow.to_deployment(name="scheduled", cron=params["train_cron"],
                                                 parameters=train_parameters,
                                                 description="Retrain, register and gate the model"))
    return deployed

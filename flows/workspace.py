"""The workspace: where everything `cnn` writes lives (CNN_HOME), and the defaults it gives Prefect and MLflow.

Nothing happens at import time: `configure()` is called by the CLI (or a deployment's entry point)
before Prefect or MLflow are imported, because both read their settings when they load.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cnn.data.dataset import Dataset, validate_name
from cnn.waits import Waits
from flows.automations import HEARTBEAT_S

DEFAULT_HOME = "./data"


@dataclass(frozen=True)
class Workspace:
    """Paths under CNN_HOME."""

    home: Path

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def dataset(self, name: str) -> Dataset:
        """The folder of dataset `name` (validated, not necessarily ingested yet)."""
        return Dataset(self.datasets_dir / validate_name(name))

    @property
    def pseudonym_key_file(self) -> Path:
        return self.home / "pseudonym.key"

    def pseudonym_key(self) -> bytes:
        """The key of the keyed pseudonyms: CNN_PSEUDONYM_KEY when set (share it where tables must join), else a
        random key the workspace creates once in `pseudonym.key`, readable by its owner only (0600)."""
        given = os.environ.get("CNN_PSEUDONYM_KEY")
        if given:
            return given.encode("utf-8")
        path = self.pseudonym_key_file
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, even briefly
        except FileExistsError:  # another process created it meanwhile
            return path.read_bytes()
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
        return path.read_bytes()


def current(home: str | os.PathLike[str] | None = None) -> Workspace:
    """The workspace for `home`, else $CNN_HOME, else ./data (made absolute)."""
    raw = home if home is not None else os.environ.get("CNN_HOME") or DEFAULT_HOME
    return Workspace(Path(raw).expanduser().resolve())


def configure(home: str | os.PathLike[str] | None = None) -> Workspace:
    """Create the workspace and set environment defaults for Prefect and MLflow (never overriding the user's)."""
    ws = current(home)
    _private_files()
    ws.home.mkdir(parents=True, exist_ok=True)
    os.environ["CNN_HOME"] = str(ws.home)
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),  # crashed runs are detected from these
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": ws.default_tracking_uri,
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",  # our models are pickle-free; a rewritten MLmodel is refused
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one tqdm line per artifact file buries the rich output
        **client_waits(Waits.from_environment()),
    }
    if not os.environ.get("PREFECT_API_URL") and (served := _served_api_url(ws)):
        os.environ["PREFECT_API_URL"] = served  # `cnn serve` is running here: runs show up in its UI
    if not os.environ.get("PREFECT_API_URL"):
        # No server given: Prefect runs a throwaway local server on a database under CNN_HOME.
        defaults.update(
            {
                "PREFECT_HOME": str(ws.prefect_home),
                "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            }
        )
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return ws


def client_waits(waits: Waits) -> dict[str, str]:
    """The MLflow and Prefect clients' own settings for the bounded waits (cnn.waits): their defaults retry a dead
    server for about four minutes (MLflow: 7 tries with a backoff factor of 2 and 120 s timeouts) before saying so."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(waits.retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(max(1, round(waits.backoff_s))),  # MLflow reads a whole number
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(waits.timeout_s))),
        "PREFECT_CLIENT_MAX_RETRIES": str(waits.retries),
        "PREFECT_API_REQUEST_TIMEOUT": f"{waits.timeout_s:g}",
    }


def _private_files() -> None:
    """Files and folders this process creates are its owner's only (0600 / 0700: caches, tables, stores and
    models hold patient images and identifiers), unless CNN_UMASK says otherwise (e.g. 027 for a group)."""
    os.umask(int(os.environ.get("CNN_UMASK", "077"), 8))


def _served_api_url(ws: Workspace) -> str | None:
    """The API URL of the local server `cnn serve` started for this workspace, if it still answers."""
    import json
    import urllib.request

    marker = ws.prefect_home / "server.json"
    try:
        api_url = json.loads(marker.read_text())["api_url"]
        with urllib.request.urlopen(f"{api_url}/health", timeout=0.5) as response:
            return api_url if response.status == 200 else None
    except (OSError, ValueError, KeyError):
        return None

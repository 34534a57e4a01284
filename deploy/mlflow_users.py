"""Create (or update) the MLflow user the workers log in as: not the admin. Run with the admin's credentials in
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and the worker's in WORKER_USERNAME / WORKER_PASSWORD."""

from __future__ import annotations

import os
import time
import urllib.request

from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient


def main() -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    for _ in range(60):  # the server may still be starting
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                break
        except OSError:
            time.sleep(2)
    client = AuthServiceClient(uri)
    user, password = os.environ["WORKER_USERNAME"], os.environ["WORKER_PASSWORD"]
    try:
        client.create_user(user, password)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(user, password)
    print(f"MLflow user {user!r} ready (not an admin)")


if __name__ == "__main__":
    main()

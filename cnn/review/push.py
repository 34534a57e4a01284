"""`cnn review push`: the open rows of a review queue become Label Studio tasks of the model's project.

- One project per registered model (`cnn review: NAME`), created on the first push with a labeling config made from
  the classes of the newest version pushed (updated when they change), a data manager tab sorted by urgency, and
  a local-files storage that lets its users see the task pictures.
- The image id is the task's key: a row already pushed updates its task when the row changed (another version, a
  new reason) and is left alone otherwise; a new row becomes a new task with the model's decision as its
  pre-annotation (tagged `NAME vVERSION`; the prediction of an earlier version is replaced). Rows are pushed most
  urgent first.
- Pictures are written below Label Studio's LOCAL_FILES_DOCUMENT_ROOT (`cnn-review/NAME/`), named by image id and
  version, before the task that shows them exists; a task names them by that relative path only.
- Rows a reviewer answered already (in the table) are not pushed again; a file that can no longer be read is
  counted and skipped, never a failed push.
- Pushes of one model take turns (a file lock in its picture folder, which every pusher shares), so two pushes at
  once never create the same image's task twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from filelock import FileLock, Timeout

from cnn.batch.tables import REVIEWER_COLUMNS
from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.io.decode import DecodeError
from cnn.review.labelstudio import LabelStudio
from cnn.review.render import Rendered, ReviewModel, render
from cnn.review.tasks import TaskImages, label_config, model_tag, prediction, project_title, task_data, version_tag

FOLDER = "cnn-review"  # below Label Studio's document root
LOCK_WAIT_S = 600
URGENCY_VIEW = "By urgency"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# what a row's task shows: a change in any of these updates the task
_SHOWN = ["image_id", "model_name", "model_version", "scored_at", "label", "confidence", "decision", "top_k"]
_SHOWN += ["review_reason", "urgency", "neighbour_label", "neighbour_agreement", "duplicate_of", "duplicate_kind"]


@dataclass(frozen=True)
class PushOutcome:
    """What one push did, per task."""

    project: int
    created: int
    updated: int
    unchanged: int
    unreadable: int  # rows whose file could not be read again (moved, deleted): not pushed

    def describe(self) -> str:
        said = f"{self.created} new task(s), {self.updated} updated, {self.unchanged} unchanged"
        return said + (f", {self.unreadable} image(s) no longer readable (not pushed)" if self.unreadable else "")


def answered(rows: pd.DataFrame) -> pd.Series:
    """Which rows a reviewer answered: a label or a verdict (by hand or from a pull) is there."""
    given = pd.Series(False, index=rows.index)
    for column in [c for c in REVIEWER_COLUMNS if c in rows.columns and c != "reviewed_at"]:
        given |= rows[column].fillna("").astype(str).str.strip() != ""
    return given


def open_rows(queue: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """The queue's rows of this model that no reviewer answered yet, most urgent first, one per image: a task shows an
    image's bytes, so the same photo under two paths is one task (its answer lands on both rows)."""
    if queue.empty or "model_name" not in queue.columns:
        return queue.iloc[0:0]
    rows = queue.loc[queue["model_name"].astype(str) == model_name]
    if "superseded_at" in rows.columns:
        rows = rows.loc[rows["superseded_at"].isna()]
    rows = rows.loc[~answered(rows)]
    if "urgency" in rows.columns:
        rows = rows.assign(_u=pd.to_numeric(rows["urgency"], errors="coerce"))
        rows = rows.sort_values("_u", ascending=False, na_position="last", kind="stable").drop(columns="_u")
    return rows.drop_duplicates("image_id").reset_index(drop=True)


def push(
    client: LabelStudio,
    rows: pd.DataFrame,
    models: Mapping[str, ReviewModel],
    reviewers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PushOutcome:
    """Push `rows` (open_rows of one model; `models` holds each of their versions) to the model's project; with
    `reviewers`, each image is answered by that many reviewers (else the project keeps its setting, 1 when new)."""
    newest = models[max(models, key=int)]
    folder = picture_folder(client, newest.name)
    try:  # pushes of one model take turns (a second would not see the tasks the first is creating)
        with FileLock(folder / ".push.lock", timeout=LOCK_WAIT_S):
            return _push(client, rows, models, newest, folder, reviewers, progress)
    except Timeout:
        raise UserError(
            f"another push of {newest.name} has held the review folder for {LOCK_WAIT_S // 60} minutes; "
            "try again when it has finished"
        ) from None


def _push(
    client: LabelStudio,
    rows: pd.DataFrame,
    models: Mapping[str, ReviewModel],
    newest: ReviewModel,
    folder: Path,
    reviewers: int | None,
    progress: Callable[[int, int], None] | None,
) -> PushOutcome:
    project = ensure_project(client, newest, reviewers)
    existing = {str(t["data"].get("image_id")): t for t in client.tasks(project) if t.get("data")}
    created: list[dict[str, Any]] = []
    updated = unchanged = unreadable = 0
    for done, (_, row) in enumerate(rows.iterrows(), start=1):
        digest = _row_digest(row)
        task = existing.get(str(row["image_id"]))
        if task is not None and task["data"].get("row") == digest:
            unchanged += 1
        else:
            try:
                pictures = render(models[str(row["model_version"])], str(row["path"]), str(row["label"]))
            except DecodeError:
                unreadable += 1
                continue
            data = task_data(row, _write(pictures, folder, row, client), pictures.neighbours, newest.points)
            data["row"] = digest
            if task is None:
                created.append({"data": data, "predictions": [prediction(row)]})
            else:
                _update(client, task, data, row)
                _remove_older(folder, row)
                updated += 1
        if progress is not None:
            progress(done, len(rows))
    if created:
        client.create_tasks(project, created)
    return PushOutcome(project, len(created), updated, unchanged, unreadable)


def ensure_project(client: LabelStudio, model: ReviewModel, reviewers: int | None) -> int:
    """The model's project (created, or its labeling config brought up to the model's classes), with its tab by
    urgency and the storage that serves the task pictures."""
    title, config = project_title(model.name), label_config(model.classes)
    found = client.project(title)
    # the newest version's predictions pre-fill the choice a reviewer sees (Label Studio's "prelabel" setting)
    wanted: dict[str, Any] = {"label_config": config, "model_version": version_tag(model.name, model.version)}
    if reviewers is not None:  # a nightly push leaves what an admin set in Label Studio alone
        wanted["maximum_annotations"] = reviewers
    if found is None:
        found = client.create_project(
            {
                "title": title,
                "description": f"Review queue of {model.name}: images the model flagged for a person to check. "
                "Pushed by `cnn review push`; answers return with `cnn review pull`.",
                "show_collab_predictions": True,
                "sampling": "Sequential sampling",
                **wanted,
            }
        )
    elif any(found.get(k) != v for k, v in wanted.items()):
        found = client.update_project(int(found["id"]), wanted)
    project = int(found["id"])
    folder = picture_folder(client, model.name)
    in_server = f"{client.server.files_dir_in_server}/{FOLDER}/{folder.name}"
    if not any(s.get("path", "").rstrip("/") == in_server for s in client.local_storages(project)):
        client.add_local_storage(project, in_server, "cnn review pictures")
    if not any(v.get("data", {}).get("title") == URGENCY_VIEW for v in client.views(project)):
        client.add_view(project, {"title": URGENCY_VIEW, "ordering": ["-tasks:data.urgency"]})
    return project


def picture_folder(client: LabelStudio, model_name: str) -> Path:
    """Where a model's task pictures live, below Label Studio's document root (made if missing)."""
    folder = client.server.pictures() / FOLDER / _UNSAFE.sub("_", model_name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _image_part(row: pd.Series) -> str:
    """The start of every picture name of a row's image (its id, made safe and short)."""
    return _UNSAFE.sub("_", str(row["image_id"]))[:40]


def _stem(row: pd.Series) -> str:
    """The picture names of a row's image as one version showed it."""
    return f"{_image_part(row)}-v{_UNSAFE.sub('_', str(row['model_version']))}"


def _write(pictures: Rendered, folder: Path, row: pd.Series, client: LabelStudio) -> TaskImages:
    """Write the pictures (atomically) and name them as Label Studio serves them."""
    named = (("image.png", pictures.image), ("overlay.jpg", pictures.overlay), ("similar.png", pictures.similar))
    return TaskImages(*(_store(folder / f"{_stem(row)}-{suffix}", content, client) for suffix, content in named))


def _store(path: Path, content: bytes, client: LabelStudio) -> str:
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    relative = path.relative_to(client.server.pictures()).as_posix()
    return f"/data/local-files/?d={quote(relative)}"


def _update(client: LabelStudio, task: dict[str, Any], data: dict[str, Any], row: pd.Series) -> None:
    """New data for the task, and the pre-annotation of this version in place of earlier ones."""
    client.update_task(int(task["id"]), data)
    tag = model_tag(row)
    predictions = client.predictions(int(task["id"]))
    for earlier in predictions:
        if earlier.get("model_version") != tag and earlier.get("id") is not None:
            client.delete_prediction(int(earlier["id"]))
    if not any(p.get("model_version") == tag for p in predictions):
        client.add_prediction(int(task["id"]), prediction(row))


def _remove_older(folder: Path, row: pd.Series) -> None:
    """The pictures an earlier version's task showed, once the task shows this version's."""
    current = f"{_stem(row)}-"
    for stale in folder.glob(f"{_image_part(row)}-v*"):
        if not stale.name.startswith(current):
            stale.unlink(missing_ok=True)


def _row_digest(row: pd.Series) -> str:
    shown = {c: str(row.get(c)) for c in _SHOWN}
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:16]

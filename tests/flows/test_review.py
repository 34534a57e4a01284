"""The review queue in Label Studio, against a real Label Studio: the nightly run pushes its review rows as tasks
with pre-annotations (idempotent, most urgent first, pictures served by Label Studio, no path or identifier), a
Label Studio that is down never fails scoring, and `cnn review pull` brings reviewers' answers back (one rule for
several reviewers) so that `cnn ingest` adds the labels and drops what a reviewer called unusable."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from cnn.data.dataset import Dataset
from cnn.errors import UserError
from flows.cli import app
from tests.helpers import free_port, tiny_config, write_patterns
from tests.labelstudio import EMAIL, PASSWORD, LabelStudioServer

runner = CliRunner()
CHROMIUM = os.environ.get("CNN_TEST_CHROMIUM", "/usr/bin/chromium")  # Debian's (`make browser`): nothing downloaded
# headless as root, and quiet: no calls out (this machine's closed network refuses them, many at a time)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SCREENSHOTS = Path(os.environ["CNN_DOCS_SCREENSHOTS"]) if os.environ.get("CNN_DOCS_SCREENSHOTS") else None
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.slowest]  # a trained model, a real Label Studio


@pytest.fixture(scope="module")
def home(champion_home: Path) -> Path:
    """A workspace with the pattern dataset and a registered `patterns` champion (tests/flows/conftest.py)."""
    return champion_home


@pytest.fixture
def reviewing(label_studio: LabelStudioServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's environment names the session's Label Studio, as a worker's would."""
    for name, value in label_studio.env().items():
        monkeypatch.setenv(name, value)


def _score(folder: Path, out: Path, *extra: str) -> str:
    result = runner.invoke(
        app, ["score", str(folder), "--model", "patterns", "--output", str(out), "--review-below", "0.999", *extra]
    )
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _tasks(label_studio: LabelStudioServer) -> tuple[int, list[dict[str, Any]]]:
    with label_studio.api() as api:
        project = next(p for p in api.get("/api/projects").json()["results"] if p["title"] == "cnn review: patterns")
        params = {"exportType": "JSON", "download_all_tasks": "true", "download_resources": "false"}
        return project["id"], api.get(f"/api/projects/{project['id']}/export", params=params).json()


def test_down_label_studio_never_fails_scoring(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("CNN_LABEL_STUDIO_TOKEN", "legacy-token")
    monkeypatch.setenv("CNN_LABEL_STUDIO_FILES", str(tmp_path / "files"))
    said = _score(write_patterns(tmp_path / "incoming", per_class=2, seed=3), tmp_path / "preds.parquet")
    assert "review queue not pushed: Label Studio at" in said and "the next run pushes it" in said
    assert len(pd.read_parquet(tmp_path / "preds.parquet")) == 6  # the predictions are written all the same


def test_push_then_pull_then_ingest(
    home: Path, tmp_path: Path, label_studio: LabelStudioServer, reviewing: None
) -> None:
    incoming = write_patterns(tmp_path / "incoming", per_class=3, seed=11)
    out = tmp_path / "preds.parquet"
    said = _score(incoming, out)  # the nightly run pushes its review rows itself
    queue = pd.read_parquet(tmp_path / "preds.review.parquet")
    assert len(queue) >= 4, "the test needs several rows to review"
    assert f"review queue pushed: {len(queue)} new task(s)" in said

    project, tasks = _tasks(label_studio)
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(queue["image_id"])
    by_id = {t["data"]["image_id"]: t for t in tasks}
    with label_studio.api() as api:
        for _, row in queue.iterrows():
            task = by_id[row["image_id"]]
            made = api.get("/api/predictions", params={"task": task["id"]}).json()
            assert [p["model_version"] for p in made] == ["patterns v1"]
            assert made[0]["result"][0]["value"]["choices"] == [row["decision"]]
            assert task["data"]["urgency"] == pytest.approx(row["urgency"], abs=1e-6)
    values = [str(v) for t in tasks for v in t["data"].values()]
    assert not any("/tmp" in v or str(home) in v for v in values)  # no absolute path
    assert not any(Path(p).name in v for p in queue["path"] for v in values)  # no file name either
    pictures = [v for v in values if v.endswith((".png", ".jpg"))]
    assert len(pictures) == 3 * len(tasks) and all(v.startswith("/data/local-files/?d=cnn-review/") for v in pictures)
    ids_in_creation_order = [t["data"]["image_id"] for t in sorted(tasks, key=lambda t: t["id"])]
    assert ids_in_creation_order == queue["image_id"].tolist()  # pushed most urgent first
    with label_studio.api() as api:  # the pictures are served by Label Studio to its users
        picture = api.get(tasks[0]["data"]["image"])
        assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
        assert api.get(tasks[0]["data"]["overlay"]).content.startswith(b"\xff\xd8")
        views = api.get("/api/dm/views", params={"project": project}).json()
        assert any(v["data"].get("ordering") == ["-tasks:data.urgency"] for v in views)

    again = runner.invoke(app, ["review", "push", str(out), "--model", "patterns"])
    assert again.exit_code == 0, again.output
    assert f"0 new task(s), 0 updated, {len(queue)} unchanged" in again.output
    assert len(_tasks(label_studio)[1]) == len(queue)  # re-pushing never duplicates

    # reviewers answer: one relabels, two disagree on another, one calls an image unusable
    second = ("second.reviewer@example.org", "another-long-password-2")
    second_id = label_studio.add_user(*second)
    first, torn, unusable = (by_id[i]["id"] for i in queue["image_id"][:3])
    classes = ["checker", "horizontal", "vertical"]
    relabel = next(c for c in classes if c != queue["decision"].iloc[0])
    label_studio.annotate(first, relabel)
    label_studio.annotate(torn, "horizontal")
    label_studio.annotate(torn, "vertical", as_user=second)
    label_studio.annotate(unusable, "(unusable image)")

    pulled = runner.invoke(app, ["review", "pull", str(out), "--model", "patterns"])
    assert pulled.exit_code == 0, pulled.output
    assert "3 answered task(s), 3 new or changed answer(s) written (1 disputed, 1 unusable)" in pulled.output
    review = pd.read_parquet(tmp_path / "preds.review.parquet").set_index("image_id")
    ids = queue["image_id"].tolist()
    assert review.loc[ids[0], "reviewed_label"] == relabel and review.loc[ids[0], "review_verdict"] == "label"
    assert review.loc[ids[0], "reviewed_by"] == "1"  # Label Studio's user id, not a name or an e-mail
    assert review.loc[ids[1], "review_verdict"] == "disputed" and pd.isna(review.loc[ids[1], "reviewed_label"])
    assert review.loc[ids[1], "reviewed_by"] == f"1,{second_id}"
    assert review.loc[ids[2], "review_verdict"] == "unusable"
    assert pd.notna(review.loc[ids[0], "reviewed_at"])
    quiet = runner.invoke(app, ["review", "pull", str(out), "--model", "patterns"])
    assert "0 new or changed answer(s) written" in quiet.output  # nothing new: nothing written

    # the unusable image was in the dataset already: the review removes it; the relabelled one is added
    unusable_path = str(Path(queue["path"].iloc[2]).resolve())
    before = runner.invoke(app, ["ingest", str(incoming), "--dataset", "patterns", "--add"])
    assert before.exit_code == 0, before.output
    assert unusable_path in set(Dataset(home / "datasets" / "patterns").manifest()["path"])
    added = runner.invoke(
        app, ["ingest", str(tmp_path / "preds.review.parquet"), "--dataset", "patterns", "--allow-outside"]
    )
    assert added.exit_code == 0, added.output
    manifest = Dataset(home / "datasets" / "patterns").manifest().set_index("path")
    relabelled = str(Path(queue["path"].iloc[0]).resolve())
    assert manifest.loc[relabelled, "label"] == relabel and bool(manifest.loc[relabelled, "reviewed"])
    assert unusable_path not in manifest.index
    assert str(Path(queue["path"].iloc[1]).resolve()) in manifest.index  # disputed: left as the source had it


def test_a_reviewer_works_the_queue_in_a_real_browser(
    home: Path, tmp_path: Path, label_studio: LabelStudioServer, reviewing: None
) -> None:
    """Log in to Label Studio's own page, open the most urgent task, see the image, the overlay and the model's
    choice, pick another class, submit; `cnn review pull` and `cnn ingest` carry that label into the dataset."""
    from playwright.sync_api import sync_playwright

    incoming = write_patterns(tmp_path / "incoming", per_class=2, seed=21)
    out = tmp_path / "night.parquet"
    _score(incoming, out, "--no-review-push")
    pushed = runner.invoke(app, ["review", "push", str(out), "--model", "patterns"])
    assert pushed.exit_code == 0 and "new task(s)" in pushed.output, pushed.output
    queue = pd.read_parquet(tmp_path / "night.review.parquet")
    first = queue.iloc[0]
    project, tasks = _tasks(label_studio)
    task = next(t for t in tasks if t["data"]["image_id"] == first["image_id"])
    other = next(c for c in ("checker", "horizontal", "vertical") if c != first["decision"])

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)  # logged in: Label Studio's home page
            if SCREENSHOTS:  # the project's task list, as the docs show it
                page.goto(f"{label_studio.url}/projects/{project}/data")
                page.locator("img[src*='local-files']").first.wait_for(timeout=60_000)
                page.screenshot(path=str(SCREENSHOTS / "review-queue.png"))
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task['id']}")
            choices = page.locator("label.lsf-choice__checkbox")
            choices.first.wait_for(timeout=60_000)
            shown = page.locator("img[src*='local-files']")
            shown.nth(2).wait_for(timeout=60_000)
            srcs = [shown.nth(i).get_attribute("src") or "" for i in range(shown.count())]
            assert any("-image.png" in s for s in srcs) and any("-overlay.jpg" in s for s in srcs)
            page.wait_for_function(
                "() => [...document.querySelectorAll(\"img[src*='local-files']\")].every(i => i.naturalWidth > 0)"
            )
            checked = page.locator("label.lsf-choice__checkbox.ant-radio-wrapper-checked")
            assert checked.inner_text().startswith(str(first["decision"]))  # the model's choice, pre-filled
            choices.filter(has_text=re.compile(rf"^{other}")).click()
            assert checked.inner_text().startswith(other)
            page.screenshot(path=str(SCREENSHOTS / "review-task.png") if SCREENSHOTS else str(tmp_path / "task.png"))
            page.get_by_role("button", name="Submit").click()
            with label_studio.api() as api:
                deadline = time.monotonic() + 60
                while not api.get(f"/api/tasks/{task['id']}/annotations").json():
                    assert time.monotonic() < deadline, "the submitted answer never reached Label Studio"
                    time.sleep(0.5)
        finally:
            browser.close()

    pulled = runner.invoke(app, ["review", "pull", str(out), "--model", "patterns", "--out", str(tmp_path / "a.csv")])
    assert pulled.exit_code == 0 and "1 new or changed answer(s) written" in pulled.output, pulled.output
    added = runner.invoke(app, ["ingest", str(tmp_path / "a.csv"), "--dataset", "patterns", "--allow-outside"])
    assert added.exit_code == 0, added.output
    manifest = Dataset(home / "datasets" / "patterns").manifest().set_index("path")
    path = str(Path(first["path"]).resolve())
    assert manifest.loc[path, "label"] == other and bool(manifest.loc[path, "reviewed"])


def test_training_takes_the_reviews_first(
    home: Path, tmp_path: Path, label_studio: LabelStudioServer, reviewing: None
) -> None:
    """The weekly training pulls before it trains: an answer given in Label Studio is in the dataset it trains on."""
    incoming = write_patterns(tmp_path / "incoming", per_class=2, seed=31)
    out = tmp_path / "week.parquet"
    _score(incoming, out)
    first = pd.read_parquet(tmp_path / "week.review.parquet").iloc[0]
    _, tasks = _tasks(label_studio)
    task = next(t for t in tasks if t["data"]["image_id"] == first["image_id"])
    other = next(c for c in ("checker", "horizontal", "vertical") if c != first["decision"])
    label_studio.annotate(task["id"], other)

    config = tmp_path / "fast.yaml"
    tiny_config(config, epochs=1, batch_size=16)
    trained = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(config), "--reviews", str(out)])
    assert trained.exit_code == 0, trained.output
    manifest = Dataset(home / "datasets" / "patterns").manifest().set_index("path")
    path = str(Path(first["path"]).resolve())
    assert manifest.loc[path, "label"] == other and bool(manifest.loc[path, "reviewed"])


def test_the_token_can_live_in_a_prefect_secret_block(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret

    from flows.review import review_server

    monkeypatch.setenv("CNN_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CNN_LABEL_STUDIO_FILES", "/srv/label-studio/files")
    monkeypatch.delenv("CNN_LABEL_STUDIO_TOKEN", raising=False)
    Secret(value="a.personal.token").save("review-token", overwrite=True)
    assert review_server("review-token").token == "a.personal.token"
    monkeypatch.setenv("CNN_LABEL_STUDIO_TOKEN_SECRET", "review-token")  # unattended: the worker names the block
    assert review_server().token == "a.personal.token"
    monkeypatch.delenv("CNN_LABEL_STUDIO_TOKEN_SECRET")
    with pytest.raises(UserError, match="no API token"):
        review_server()
    monkeypatch.setenv("CNN_LABEL_STUDIO_TOKEN", "legacy-token")
    monkeypatch.delenv("CNN_LABEL_STUDIO_FILES")
    without = review_server()  # a pull needs no picture folder; a push says what to set
    with pytest.raises(UserError, match="CNN_LABEL_STUDIO_FILES is not set"):
        without.pictures()


def test_two_pushes_at_once_create_each_task_once(
    home: Path, tmp_path: Path, label_studio: LabelStudioServer, reviewing: None
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cnn.review.labelstudio import LabelStudio
    from cnn.review.push import open_rows, push
    from flows.review import review_models, review_server, review_table

    out = tmp_path / "race.parquet"
    _score(write_patterns(tmp_path / "incoming", per_class=2, seed=41), out, "--no-review-push")
    rows = open_rows(review_table(str(out)).review_rows(), "patterns")
    models = review_models("patterns", rows["model_version"].astype(str).unique().tolist())

    def one_push(_: int) -> int:
        with LabelStudio(review_server()) as client:
            return push(client, rows, models).created

    with ThreadPoolExecutor(2) as pool:
        created = list(pool.map(one_push, range(2)))
    assert sorted(created) == [0, len(rows)]  # the second waited, then found every task made
    _, tasks = _tasks(label_studio)
    mine = [t for t in tasks if t["data"]["image_id"] in set(rows["image_id"])]
    assert len(mine) == len(rows)

"""Prefect flows `review-push` and `review-pull`: a prediction table's review queue to and from Label Studio.

Each wraps the library (cnn.review) around what only orchestration knows: the table a reference names, the
registered versions that scored the rows, the server and token from the worker's environment or a Prefect Secret
block (never from parameters), progress as a Prefect artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from cnn.batch.delta_sink import DeltaSink
from cnn.batch.file_sink import FileSink
from cnn.batch.sinks import output_sink
from cnn.batch.sql_sink import SqlSink
from cnn.batch.tables import write_csv
from cnn.config import IngestOptions
from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.review.labelstudio import URL_VARIABLE, LabelStudio, ReviewServer
from cnn.review.pull import pull
from cnn.review.push import PushOutcome, answered, open_rows, push
from cnn.review.render import ReviewModel
from cnn.similarity.reference import Reference
from flows import credentials, versions, workspace
from flows.logfilter import quiet_user_errors
from flows.progress import reported_progress

quiet_user_errors()
ReviewTable = FileSink | DeltaSink | SqlSink
TOKEN_SECRET_VARIABLE = "CNN_LABEL_STUDIO_TOKEN_SECRET"  # a worker's way to name a Secret block holding the token
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")


@dataclass(frozen=True)
class PullSummary:
    """What a pull brought back, for the CLI, the artifact and the training flow."""

    model: str
    said: str


def review_table(target: str) -> ReviewTable:
    """The prediction table a target names, as `cnn score` takes it: a SQL `URL#table` (or `env:`/`secret:`
    reference, or `default`: the workspace's table), else an --output file, folder or object-store prefix."""
    scheme = target.partition(":")[0].partition("+")[0].lower()
    if (
        scheme in SQL_SCHEMES
        or target == credentials.DEFAULT_TABLE
        or target.startswith((credentials.ENV, credentials.SECRET))
    ):
        return SqlSink.from_url(credentials.resolve(target))
    return output_sink(target)


def review_server(token_secret: str | None = None) -> ReviewServer:
    """The Label Studio this worker's environment names; the token from the Prefect Secret block `token_secret`
    (or the one CNN_LABEL_STUDIO_TOKEN_SECRET names, for unattended runs), else from CNN_LABEL_STUDIO_TOKEN."""
    token = None
    token_secret = token_secret or os.environ.get(TOKEN_SECRET_VARIABLE) or None
    if token_secret:
        token = credentials.resolve(f"{credentials.SECRET}{token_secret}").rstrip("#")
    server = ReviewServer.from_environment(os.environ, token)
    if server is None:
        raise UserError(
            f"no Label Studio configured: set {URL_VARIABLE} (and CNN_LABEL_STUDIO_TOKEN, CNN_LABEL_STUDIO_FILES); "
            "see docs/review.md"
        )
    return server


def review_models(name: str, wanted: list[str]) -> dict[str, ReviewModel]:
    """The registered versions the rows name, loaded to decode, explain and look up neighbours."""
    ws = workspace.current()
    models = {}
    for version in sorted(set(wanted), key=int):
        ref, predictor = versions.load_version(versions.find_version(f"{name}:{version}"), "cpu")
        reference: Reference | None = versions.reference(ref)
        dataset = predictor.contract.dataset
        models[version] = ReviewModel(name, version, predictor, reference, ws.dataset(dataset) if dataset else None)
    return models


@task(cache_policy=NO_CACHE)
def push_queue(target: str, model: str, reviewers: int | None, token_secret: str | None) -> PushOutcome | None:
    """Push the open review rows of `model` in the table to its Label Studio project; None when there are none."""
    rows = open_rows(review_table(target).review_rows(), model)
    if rows.empty:
        return None
    server = review_server(token_secret)
    models = review_models(model, [str(v) for v in rows["model_version"].unique()])
    with LabelStudio(server) as client, reported_progress("pushing review tasks", key="review-push") as progress:
        client.version()  # an unreachable server fails here, before anything is rendered
        return push(client, rows, models, reviewers, progress)


@task(cache_policy=NO_CACHE)
def pull_answers(target: str, model: str, token_secret: str | None) -> PullSummary:
    """Bring the project's answers into the table's review queue; only new or changed answers are written."""
    table = review_table(target)
    queue = table.review_rows()
    classes = _classes(queue, model)
    with LabelStudio(review_server(token_secret)) as client:
        pulled = pull(client, model, classes, queue)
    written = table.record_reviews(pulled.changed) if len(pulled.changed) else 0
    rows = [{"item": k, "count": v} for k, v in pulled.counts().items()]
    create_table_artifact(rows, key="review-pull", description=f"Review answers pulled for {model}")
    return PullSummary(model, pulled.describe(written))


def _classes(queue: pd.DataFrame, model: str) -> list[str] | None:
    """The classes of the newest version in the queue: an answer outside them is disputed, not trusted."""
    if queue.empty or "model_name" not in queue.columns:
        return None
    mine = queue.loc[queue["model_name"].astype(str) == model, "model_version"].astype(str)
    if mine.empty:
        return None
    return list(versions.load_contract(model, max(mine.unique(), key=int)).classes)


@flow(name="review-push", log_prints=True)
def review_push_flow(table: str, model: str, reviewers: int | None = None, token_secret: str | None = None) -> str:
    """Send the review queue of MODEL in TABLE to Label Studio (a project per model; idempotent)."""
    workspace.configure(None)
    outcome = push_queue(table, model, reviewers, token_secret)
    return "no open review rows" if outcome is None else outcome.describe()


@flow(name="review-pull", log_prints=True)
def review_pull_flow(table: str, model: str, token_secret: str | None = None) -> PullSummary:
    """Bring reviewers' answers for MODEL from Label Studio into TABLE's review queue."""
    workspace.configure(None)
    return pull_answers(table, model, token_secret)


def write_answered(target: str, model: str, out: Path) -> int:
    """The answered rows of MODEL's review queue in the table, as a file `cnn ingest` takes; the rows written."""
    queue = review_table(target).review_rows()
    rows = queue.loc[queue["model_name"].astype(str) == model] if len(queue) else queue
    rows = rows.loc[answered(rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        write_csv(rows, tmp) if out.suffix.lower() == ".csv" else rows.to_parquet(tmp, index=False)
    return len(rows)


def take_reviews(table: str, model: str, dataset: str) -> str:
    """Before a training: pull the answers for MODEL into TABLE's review queue, then add every answered row to
    DATASET (a label where reviewers agreed; out, where they called the image unusable or none of the classes).
    Label Studio down or not configured: the training goes on with what the dataset holds, and says so."""
    if not os.environ.get(URL_VARIABLE):
        return "reviews not pulled: no Label Studio configured (CNN_LABEL_STUDIO_URL)"
    try:
        pulled = pull_answers(table, model, None)
    except UserError as exc:  # Label Studio down, a refused token, a table not there yet: train all the same
        return f"reviews not pulled: {exc} - training on the dataset as it is"
    folder = workspace.current().home / "reviews" / dataset
    answered = folder / "answered.parquet"
    if not write_answered(table, model, answered):
        return f"reviews pulled ({pulled.said}); none to add to {dataset}"
    # imported here: the ingest flow imports this module's neighbours; only a training that takes reviews needs it
    from flows.ingest import ingest_flow

    meta = workspace.current().dataset(dataset).meta()
    options = IngestOptions(
        image_size=meta.image_size,
        channels=meta.channels,  # type: ignore[arg-type]  # 1 or 3, as the dataset recorded it
        resize=meta.resize,  # type: ignore[arg-type]  # pad or crop, as recorded
        seed=meta.seed,
        val_fraction=meta.val_fraction,
        test_fraction=meta.test_fraction,
        group_column=meta.group_column,
        allow_outside=True,  # the rows come from our own prediction table, whose files live where scoring read them
    )
    ingest_flow(source=str(answered), dataset=dataset, options=options)
    return f"reviews pulled ({pulled.said}) and added to {dataset}"


def push_after_scoring(target: str, model: str, token_secret: str | None = None) -> str:
    """The nightly run's push: what it did, or why it did not (Label Studio down: tried again at the next run, which
    pushes every open row again). Never fails the scoring run."""
    if not os.environ.get(URL_VARIABLE):
        return ""
    try:
        outcome = push_queue(target, model, None, token_secret)
    except UserError as exc:  # down, a refused token, a setting missing: the predictions stand; said, not raised
        return f"review queue not pushed: {exc} - the next run pushes it"
    return "review queue: nothing open to push" if outcome is None else f"review queue pushed: {outcome.describe()}"

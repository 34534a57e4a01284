"""Prefect flow `ingest`: scan -> plan, decode in parts (here, or on a Dask cluster), finish -> split -> commit ->
report, each task one library call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from cnn.config import IngestOptions
from cnn.data import ingest as lib
from cnn.data.report import DatasetReport, build_report, save_report
from flows import cluster, workspace
from flows.logfilter import quiet_user_errors
from flows.processes import sigterm_at_safe_points
from flows.progress import reported_progress

quiet_user_errors()


@dataclass(frozen=True)
class IngestOutcome:
    """Where the ingested dataset, its manifest and its report are."""

    dataset_dir: str
    manifest: str
    report: str


@task(name="scan-source", cache_policy=NO_CACHE)
def scan_source(source: str, dataset_dir: str, options: IngestOptions) -> str:
    """List the source's files and labels."""
    return str(lib.stage_scan(source, Path(dataset_dir), options))


@task(name="plan-decode", cache_policy=NO_CACHE)
def plan_decode(dataset_dir: str, options: IngestOptions) -> int:
    """Find the new and changed files; return the number of parts to decode them in."""
    return lib.plan_decode(Path(dataset_dir), options).parts


@task(name="decode-part", cache_policy=NO_CACHE)
def decode_part(dataset_dir: str, options: IngestOptions, part: int) -> str:
    """Decode one part's files once each into a new shard of the cache; return the part's token."""
    if options.fan_out:  # one of many parts on a Dask worker: the flow reports the parts done
        return lib.decode_part(Path(dataset_dir), options, part)
    with reported_progress("decoding images", key="ingest-decode") as progress:
        return lib.decode_part(Path(dataset_dir), options, part, progress)


@task(name="finish-decode", cache_policy=NO_CACHE)
def finish_decode(dataset_dir: str, options: IngestOptions, parts: list[str]) -> str:
    """Gather the parts' outcomes; choose the cache's shards (compacting them when they hold mostly dead images)."""
    return str(lib.finish_decode(Path(dataset_dir), options, parts))


def decode_images(dataset_dir: str, options: IngestOptions) -> str:
    """Decode new and changed files: here in one part with a pool of processes, or in parts on a Dask cluster."""
    parts = plan_decode(dataset_dir, options)
    with cluster.fan_out(options) as dask:
        if dask is None:
            tokens = [decode_part(dataset_dir, options, part) for part in range(parts)]
        else:
            tokens = _decode_on(dask, dataset_dir, options, parts)
    return finish_decode(dataset_dir, options, tokens)


def _decode_on(dask: TaskRunner[PrefectFuture[Any]], dataset_dir: str, options: IngestOptions, parts: int) -> list[str]:
    """The parts on the Dask cluster, with the parts done as the run's progress."""
    args = {"dataset_dir": dataset_dir, "options": options}
    futures = [dask.submit(decode_part, {**args, "part": part}) for part in range(parts)]
    tokens: list[str] = []
    with reported_progress("decoding images (parts)", key="ingest-decode") as progress:
        progress(0, parts)
        for future in futures:
            tokens.append(future.result())
            progress(len(tokens), parts)
    return tokens


@task(name="assign-splits", cache_policy=NO_CACHE)
def assign_splits(dataset_dir: str, options: IngestOptions) -> str:
    """Draw stratified, group-aware train/val/test splits."""
    return str(lib.stage_split(Path(dataset_dir), options, workspace.current().pseudonym_key()))


@task(name="commit-dataset", cache_policy=NO_CACHE)
def commit_dataset(dataset_dir: str, options: IngestOptions) -> str:
    """Publish the manifest and cache atomically."""
    return str(lib.commit_dataset(Path(dataset_dir), options))


@task(name="dataset-report", cache_policy=NO_CACHE)
def write_report(dataset_dir: str) -> str:
    """Save the dataset report beside the manifest and publish it as artifacts."""
    report = build_report(Path(dataset_dir), lib.staged_stats(Path(dataset_dir)))
    path = save_report(report, Path(dataset_dir))
    lib.clear_staging(Path(dataset_dir))
    _publish(report)
    return str(path)


def _publish(report: DatasetReport) -> None:
    key = "dataset-" + "".join(c if c.isalnum() else "-" for c in report.dataset.lower())
    create_markdown_artifact(report.to_markdown(), key=f"{key}-report", description="Dataset report")
    table = report.class_table().reset_index(names="class")
    create_table_artifact(
        table.to_dict(orient="records"), key=f"{key}-classes", description="Images per class and split"
    )


@flow(name="ingest")
def ingest_flow(
    source: str, dataset: str, options: IngestOptions | None = None, home: str | None = None
) -> IngestOutcome:
    """Ingest SOURCE into dataset DATASET under CNN_HOME; return the manifest and report paths."""
    options = options or IngestOptions()
    dataset_dir = str(workspace.configure(home).dataset(dataset).root)
    create_markdown_artifact(f"```yaml\n{options.to_yaml()}```\n", key="ingest-config", description="Ingest config")
    with sigterm_at_safe_points(), lib.ingest_lock(dataset_dir):  # the tasks run here: the lock spans them all
        scan_source(source, dataset_dir, options)
        decode_images(dataset_dir, options)
        assign_splits(dataset_dir, options)
        manifest = commit_dataset(dataset_dir, options)
        report = write_report(dataset_dir)
    return IngestOutcome(dataset_dir, manifest, report)

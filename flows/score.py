"""Prefect flow `score`: resolve the model -> plan shards -> score each shard (committed on its own) -> publish."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.scoring import ModelRef, list_inputs, mark_duplicates, score_files
from cnn.sinks import Sink, open_sink
from flows import models, workspace
from flows.logfilter import quiet_user_errors
from flows.progress import reported_progress

quiet_user_errors()


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost connections and I/O hiccups; never bad input or user mistakes."""
    exc = getattr(state, "data", None)
    if isinstance(exc, UserError):
        return False
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, DBAPIError):
        return isinstance(exc, OperationalError) or bool(getattr(exc, "connection_invalidated", False))
    return isinstance(exc, (ConnectionError, TimeoutError))


def _sinks(output: str | None, table: str | None) -> list[Sink]:
    """The sinks of a run. The default table is CNN_PREDICTIONS_URL (kept in the environment, so a password
    never becomes a flow parameter), else SQLite under CNN_HOME."""
    default = os.environ.get("CNN_PREDICTIONS_URL") or f"sqlite:///{workspace.current().home / 'predictions.db'}"
    if "#" not in default:
        default += "#predictions"
    return open_sink(output, table, default)


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(spec: str, device: str, precision: str, compile: bool) -> dict[str, Any]:
    """Pin MODEL[@alias|:version] to one version for the whole run and fetch its weights and contract."""
    return models.resolve(spec, device, precision, compile)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(source: str, output: str | None, table: str | None, model: dict[str, Any], shard_size: int,
                run_dir: str) -> dict[str, Any]:
    """List the inputs, drop those already accounted for by this model version, and cut the rest into shards."""
    inputs = list_inputs(source)
    done: set[str] | None = None
    owners: dict[str, str] = {}
    for sink in _sinks(output, table):
        predicted, rejected = sink.scored(model["name"], model["version"])
        owners.update(predicted)
        paths = set(predicted.values()) | rejected
        done = paths if done is None else done & paths  # done only when every sink has it
    files = inputs.files[~inputs.files["path"].isin(done or set())].reset_index(drop=True)
    files = mark_duplicates(files, owners)
    files["shard"] = files.index // shard_size
    plan = Path(run_dir) / "plan.parquet"
    with atomic_path(plan) as tmp:
        files.to_parquet(tmp, index=False)
    return {"plan": str(plan), "shards": int(files["shard"].max() + 1) if len(files) else 0, "files": len(files),
            "skipped": len(inputs.files) - len(files), "id_columns": inputs.id_columns}


@task(name="score-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=_transient)
def score_shard(plan: dict[str, Any], shard: int, model: dict[str, Any], output: str | None, table: str | None,
                options: dict[str, Any]) -> dict[str, Any]:
    """Decode, predict and commit one shard to every sink (one transaction or one atomic part file each)."""
    files = pd.read_parquet(plan["plan"])
    files = files[files["shard"] == shard].drop(columns="shard")
    predictor = models.load_predictor(model)
    ref = ModelRef(model["name"], model["version"], model["run_id"])
    start = time.perf_counter()
    sinks = _sinks(output, table)
    # Duplicates were resolved for the whole run in the plan, so shards need no shared state.
    preds, rejects = score_files(files, plan["id_columns"], predictor, ref, options["flow_run_id"],
                                 options["batch_size"], options["top_k"], options["review_below"],
                                 options["workers"])
    for sink in sinks:
        sink.commit(shard, preds, rejects)
    seconds = time.perf_counter() - start
    return {"files": len(files), "predicted": len(preds), "rejected": len(rejects), "seconds": seconds,
            "compile_failed": predictor.compile_failed,
            "labels": preds["label"].value_counts().to_dict(), "review": int(preds["needs_review"].sum()),
            "reasons": rejects["reason"].str.split(":").str[0].str.split(" of ").str[0].value_counts().to_dict()}


@task(name="publish-tables", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=_transient)
def publish(output: str | None, table: str | None) -> list[str]:
    """Merge file parts into the output files atomically; return where every table lives."""
    locations: list[str] = []
    for sink in _sinks(output, table):
        locations += sink.finish()
    return locations


@flow(name="score")
def score_flow(source: str, model: str, output: str | None = None, table: str | None = None, batch_size: int = 64,
               device: str = "auto", top_k: int = 3, review_below: float = 0.0, workers: int = 0,
               shard_size: int = 256, precision: str = "auto", home: str | None = None,
               fan_out: bool = False, compile: bool = False) -> dict[str, Any]:
    """Score every new image of SOURCE with MODEL into prediction tables, exactly once."""
    ws = workspace.configure(home)
    if top_k < 1 or batch_size < 1 or shard_size < 1 or not 0.0 <= review_below <= 1.0:
        raise UserError("--top-k, --batch-size and the shard size must be positive; --review-below in [0, 1]")
    context = get_run_context()
    flow_run_id = str(context.flow_run.id) if getattr(context, "flow_run", None) else ""
    run_dir = ws.home / "scoring" / (flow_run_id or "local")
    run_dir.mkdir(parents=True, exist_ok=True)
    pinned = resolve_model(model, device, precision, compile)
    plan = plan_shards(source, output, table, pinned, shard_size, str(run_dir))
    # On a Dask cluster the shards fan out to its workers, which decode in-process (they are daemons).
    options = {"batch_size": batch_size, "top_k": top_k, "review_below": review_below,
               "workers": 1 if fan_out else workers, "flow_run_id": flow_run_id}
    results, start = [], time.perf_counter()
    with reported_progress(f"scoring with {pinned['name']} v{pinned['version']}", key="score-progress") as progress:
        progress(0, plan["files"])
        if fan_out:
            futures = [score_shard.submit(plan, shard, pinned, output, table, options) for shard in range(plan["shards"])]
            for future in futures:
                results.append(future.result())
                progress(sum(r["files"] for r in results), plan["files"])
        else:
            for shard in range(plan["shards"]):
                results.append(score_shard(plan, shard, pinned, output, table, options))
                progress(sum(r["files"] for r in results), plan["files"])
    locations = publish(output, table)
    summary = _summarise(results, plan, pinned, time.perf_counter() - start, locations)
    create_table_artifact(summary["table"], key="score-summary", description="Scoring summary")
    return summary


def on_dask(cluster: str | None = None, workers: int = 0) -> Any:
    """`score_flow` whose shards run on an existing Dask scheduler (`cluster`) or a local cluster of `workers`."""
    from prefect_dask import DaskTaskRunner

    if cluster:
        runner = DaskTaskRunner(address=cluster)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})
    return score_flow.with_options(task_runner=runner)


def _summarise(results: list[dict[str, Any]], plan: dict[str, Any], model: dict[str, Any], seconds: float,
               locations: list[str]) -> dict[str, Any]:
    labels: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["labels"].items():
            labels[k] = labels.get(k, 0) + v
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    predicted = sum(r["predicted"] for r in results)
    rejected = sum(r["rejected"] for r in results)
    table = [{"item": f"label {k}", "count": v} for k, v in sorted(labels.items())]
    table += [{"item": f"rejected: {k}", "count": v} for k, v in sorted(reasons.items())]
    table += [{"item": "needs review", "count": sum(r["review"] for r in results)},
              {"item": "already scored (skipped)", "count": plan["skipped"]},
              {"item": "images/s", "count": round(plan["files"] / seconds, 1) if seconds > 0 else 0}]
    return {"model": f"{model['name']} v{model['version']}", "precision": _precision(model, results), "files": plan["files"],
            "predicted": predicted, "rejected": rejected, "skipped": plan["skipped"], "labels": labels,
            "review": sum(r["review"] for r in results), "seconds": seconds, "tables": locations, "table": table}


def _precision(model: dict[str, Any], results: list[dict[str, Any]]) -> str:
    if not model["compile"]:
        return model["precision"]
    failed = any(r["compile_failed"] for r in results)
    return model["precision"] + (", eager (torch.compile failed, see the log)" if failed else ", compiled")

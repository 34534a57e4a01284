"""Prefect flow `score`: resolve the model -> plan shards -> score each shard (committed on its own) -> publish.

Each task wraps one library call (`cnn.batch`) and passes typed references: the pinned `ModelRef`, the
`ShardPlan`, each `ShardResult`; the flow returns the `ScoringSummary`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from cnn import stopping
from cnn.batch import plan as planning
from cnn.batch.delta_sink import DeltaSink
from cnn.batch.file_sink import Sink
from cnn.batch.masking import Masking
from cnn.batch.run import ModelRef, ScoringOptions, ScoringSummary, ShardPlan, ShardResult, merged_drift, summarise
from cnn.batch.shard import Scorer
from cnn.batch.shard import extend_history as add_to_history
from cnn.batch.sinks import open_sink, output_sink
from cnn.batch.sql_sink import redact
from cnn.config import ScoreConfig
from cnn.errors import UserError
from cnn.io import storage
from cnn.metrics import drift
from cnn.metrics.drift import DriftReport
from cnn.review.labelstudio import URL_VARIABLE
from cnn.trust.plots import plot_drift
from flows import automations, cluster, credentials, tracking, versions, workspace
from flows.logfilter import quiet_user_errors
from flows.processes import sigterm_at_safe_points
from flows.progress import reported_progress

quiet_user_errors()
DEFAULT_TABLE = credentials.DEFAULT_TABLE  # `table: default`: the workspace's table, beside an --output file


class DriftDetected(UserError):
    """The batch drifted and the run was asked to fail on it (a deployment's alert); exit code 3."""

    exit_code = 3


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost connections and I/O hiccups; never bad input or user mistakes."""
    exc = getattr(state, "data", None)
    if isinstance(exc, UserError):
        return False
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, DBAPIError):
        return isinstance(exc, OperationalError) or bool(getattr(exc, "connection_invalidated", False))
    return isinstance(exc, (ConnectionError, TimeoutError))


def _sinks(output: str | None, table: str | None, partition_by: list[str] | None = None) -> list[Sink]:
    """The sinks of a run: the default table (credentials.default_table) where none is named; `env:`/`secret:`
    references resolve here."""
    default = credentials.default_table()
    named = default if table == DEFAULT_TABLE else (credentials.resolve(table) if table else None)
    return open_sink(output, named, default, partition_by)


def _masking(config: ScoreConfig) -> Masking:
    """The run's pseudonymized columns, keyed in this process (the key is never a parameter)."""
    if not config.pseudonymize:
        return Masking()
    return Masking(tuple(config.pseudonymize), workspace.current().pseudonym_key())


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(config: ScoreConfig) -> ModelRef:
    """Pin MODEL[@alias|:version] to one version for the whole run, fetch its files, choose its backend and
    precision."""
    return versions.resolve(config.model, config.device, config.precision, config.compile, config.backend)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(source: str, config: ScoreConfig, model: ModelRef, run_dir: str) -> ShardPlan:
    """List and hash the inputs, drop those the tables already hold with the same bytes, cut the rest into shards."""
    inputs = planning.list_inputs(source, config.allow_outside)
    sinks = _sinks(config.output, config.table, config.partition_by)
    contract = versions.contract(model)
    return planning.plan_shards(
        inputs,
        sinks,
        model,
        planning.shard_files(contract.image_size, config.shard_size),
        Path(run_dir),
        rescore=config.rescore,
        max_attempts=config.max_attempts,
        masking=_masking(config),
        max_file_bytes=contract.max_file_bytes,
        verify_content=config.verify_content,
    )


@task(name="score-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=_transient)
def score_shard(
    plan: ShardPlan, shard: int, model: ModelRef, config: ScoreConfig, options: ScoringOptions
) -> ShardResult:
    """Decode, predict and commit one shard to every sink (one transaction or one atomic part file each)."""
    sinks = _sinks(config.output, config.table, config.partition_by)
    return _scorer(model, options, config).score_shard(plan, shard, sinks)


_held: dict[tuple[object, ...], Scorer] = {}  # the Scorer of the run this process scores shards of


def _scorer(model: ModelRef, options: ScoringOptions, config: ScoreConfig) -> Scorer:
    """One Scorer per run and process: shards run one after another here (or on the same Dask worker), so the model
    is loaded once and the next shard's decoding can start during this shard's inference."""
    similar = config.similar and config.embeddings
    key = (model, options, similar, tuple(config.pseudonymize))
    if key not in _held:
        for old in _held.values():
            old.close()
        _held.clear()
        _held[key] = Scorer(
            versions.load_predictor(model),
            model,
            options,
            _masking(config),
            versions.load_explainer(model) if options.explain != "none" else None,
            versions.load_lookup(model) if similar else None,
        )
    return _held[key]


@task(name="publish-tables", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=_transient)
def publish(config: ScoreConfig) -> list[str]:
    """Merge a file output's parts into its files atomically (Delta and SQL tables have nothing to publish); return
    where every table lives."""
    return [location for sink in _sinks(config.output, config.table, config.partition_by) for location in sink.finish()]


@task(name="extend-history", cache_policy=NO_CACHE)
def extend_history(model: ModelRef, run_dir: str) -> int:
    """Add what this run scored to the version's history (for `cnn similar` and the next runs' reuse check)."""
    return add_to_history(Path(run_dir) / "history", versions.history(model))


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(
    model: ModelRef, config: ScoreConfig, results: list[ShardResult], flow_run_id: str, run_dir: str
) -> DriftReport | None:
    """Compare the batch with the version's validation reference; record it in the drift table, an artifact
    and MLflow (with a plot of the batch against the reference)."""
    found = versions.reference(model)
    if not found.exists:
        return None
    batch, reference = merged_drift(results), found.drift()
    report = drift.check_drift(reference, found.drift_embeddings(), batch, drift.DriftRules(alpha=config.drift_alpha))
    mlflow_run = ""
    if report.statistics:
        plot = plot_drift(reference, batch, Path(run_dir) / "drift.png")
        mlflow_run = tracking.log_drift(model.name, model.version, flow_run_id, report, plot)
        frame = pd.DataFrame(report.rows()).assign(
            model_name=model.name, model_version=model.version, flow_run_id=flow_run_id,
            checked_at=pd.Timestamp.now(tz="UTC"), images=report.images,
        )  # fmt: skip
        for sink in _sinks(config.output, config.table, config.partition_by):
            sink.record_drift(frame)
    where = f"\nThe plot: MLflow run {mlflow_run} (experiment cnn-scoring-{model.name}), artifact drift/drift.png.\n"
    create_markdown_artifact(_drift_markdown(report) + (where if mlflow_run else ""), key="drift", description="Drift")
    return report


def _drift_markdown(report: DriftReport) -> str:
    lines = [
        f"## {report.describe()}",
        "",
        "| statistic | test | p | effect | drifted | detail |",
        "|---|---|---|---|---|---|",
    ]
    for s in report.statistics:
        bar = "█" * min(20, int(20 * s.effect))
        lines.append(
            f"| {s.name} | {s.test} | {s.p_value:.4g} | {s.effect:.4f} {bar} | "
            f"{'**yes**' if s.drifted else 'no'} | {s.detail} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="score")
def score_flow(source: str, config: ScoreConfig, home: str | None = None) -> ScoringSummary:
    """Score every new image of SOURCE with the configured model into prediction tables, exactly once."""
    ws = workspace.configure(home)
    credentials.refuse_passwords(config.table)
    automations.crash_stale_runs_quietly()  # runs that died while the server was down
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    flow_run_id = str(flow_run.id) if flow_run is not None else ""
    run_dir = ws.home / "scoring" / (flow_run_id or "local")
    run_dir.mkdir(parents=True, exist_ok=True)
    planning.sweep_copies(ws.home / "scoring")  # what killed runs left of the objects they had fetched
    with sigterm_at_safe_points():
        _log_config(config, run_dir)
        model = resolve_model(config)
        plan = plan_shards(source, config, model, str(run_dir))
        options = ScoringOptions.from_config(config, flow_run_id, *_explanations(config, ws.home))
        if config.similar and config.embeddings:
            options = replace(options, history_dir=str(run_dir / "history"))
        results: list[ShardResult] = []
        start = time.perf_counter()
        with reported_progress(f"scoring with {model.label}", key="score-progress") as progress:
            progress(0, plan.files)
            with cluster.fan_out(config) as dask:
                if dask is not None:
                    args = {"plan": plan, "model": model, "config": config, "options": options}
                    futures = [dask.submit(score_shard, {**args, "shard": shard}) for shard in range(plan.shards)]
                    shard_results = (future.result() for future in futures)
                else:
                    shard_results = (score_shard(plan, shard, model, config, options) for shard in range(plan.shards))
                for result in shard_results:
                    stopping.check()  # a safe point: between shards (what is committed stays committed)
                    results.append(result)
                    progress(sum(r.files for r in results), plan.files)
        summary = summarise(results, plan, model, time.perf_counter() - start, publish(config))
        plan.remove()
        if config.similar and config.embeddings:
            extend_history(model, str(run_dir))
        report = check_drift(model, config, results, flow_run_id, str(run_dir)) if config.drift else None
    if report is not None:
        summary = replace(summary, drift=report.describe(), drifted=report.drifted)
    if config.review_push:  # also with nothing new to review: what an earlier night could not push goes now
        summary = replace(summary, review_push=push_review(config, model.name))
    create_table_artifact(summary.rows(), key="score-summary", description="Scoring summary")
    if report is not None and report.drifted and config.fail_on_drift:
        raise DriftDetected(f"{report.describe()} (--fail-on-drift); the predictions are written")
    return summary


def push_review(config: ScoreConfig, model_name: str) -> str:
    """The run's review queue to Label Studio, where one is configured (flows.review.push_after_scoring)."""
    if not os.environ.get(URL_VARIABLE):
        return ""
    # imported here: the push's modules (Label Studio's client, rendering) load only where a push happens
    from flows.review import push_after_scoring

    return push_after_scoring(config.output or config.table or DEFAULT_TABLE, model_name)


def _explanations(config: ScoreConfig, home: Path) -> tuple[str, str]:
    """(folder of the overlays, folder the `explanation` column is relative to): beside an --output file as
    X.explanations/, in a Delta tables' folder or prefix as explanations/ (both relative paths), else under
    CNN_HOME/explanations/TABLE (absolute paths)."""
    if config.explain == "none":
        return "", ""
    if config.output:
        sink = output_sink(config.output, config.partition_by)
        if isinstance(sink, DeltaSink):
            return storage.join(sink.root, "explanations"), sink.root
        return str(sink.path.with_name(f"{sink.path.stem}.explanations")), str(sink.path.parent)
    table = (config.table or "").rpartition("#")[2] or "predictions"
    return str(home / "explanations" / table), ""


def _log_config(config: ScoreConfig, run_dir: Path) -> None:
    """The run's config beside its plan and as a Prefect artifact (database passwords masked)."""
    shown = config.model_copy(update={"table": redact(config.table) if config.table else None})
    (run_dir / "config.yaml").write_text(shown.to_yaml(), encoding="utf-8")
    create_markdown_artifact(f"```yaml\n{shown.to_yaml()}```\n", key="score-config", description="Scoring config")


def score(source: str, config: ScoreConfig) -> ScoringSummary:
    """Check the model spec, then run the flow. The caller has configured the workspace (the CLI does, once per
    command)."""
    versions.parse_spec(config.model)
    config = config.model_copy(update={"table": credentials.by_reference(config.table)})  # no password in parameters
    return score_flow(source=source, config=config)

"""Prefect flow `train`: start run -> fit -> evaluate -> log model -> register and gate.

`train` is the entry point for every node of a job: node 0 runs the flow (tracking, registering, gating);
other nodes of a multi-node DDP job only compute their share.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cnn.config import TrainConfig
from cnn.data.dataset import Dataset, validate_name
from cnn.errors import UserError
from cnn.fsio import write_json_atomic
from cnn.infer import backends
from cnn.model.run import EpochRecord, FitResult, RunFolder
from cnn.model.train import check_config, fit, resolved_config
from cnn.similarity import reference
from cnn.trust.card import GateSummary, build_card
from cnn.trust.evaluation import CalibrationResult, calibrate_run, evaluate_run, record_checks
from flows import automations, registry, tracking, workspace
from flows.logfilter import quiet_user_errors
from flows.processes import sigterm_at_safe_points
from flows.progress import reported_progress
from flows.registry import GateDecision, GateRules
from flows.review import take_reviews

quiet_user_errors()


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run produced: its MLflow run, checkpoints, test metrics and the gate's decision."""

    run_id: str
    run_dir: str
    model_uri: str
    test_metrics: dict[str, float]
    gate: GateDecision
    budget: str = ""  # how a --max-minutes budget was planned and spent


@dataclass(frozen=True)
class NodeOutcome:
    """What a non-zero node of a multi-node job did (node 0 tracks and registers)."""

    node_rank: int
    run_dir: str


def run_directory(home: Path, model_name: str, resume: bool) -> Path:
    """A new run folder, or with `resume` the latest unfinished one."""
    root = home / "runs" / model_name
    if resume:
        runs = [RunFolder(p) for p in sorted(root.glob("*"))]
        candidates = [r.root for r in runs if r.checkpoint.is_file() and not r.done.exists()]
        if not candidates:
            raise UserError(f"nothing to resume: no unfinished run of {model_name!r} under {root}")
        return candidates[-1]
    return root / datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


def train(
    dataset: str, config: TrainConfig, resume: bool = False, reviews: str | None = None
) -> TrainOutcome | NodeOutcome:
    """Check the config, then run the flow on node 0 or this node's share of a multi-node job. The caller has
    configured the workspace (the CLI does, once per command)."""
    ws = workspace.current()
    ws.dataset(dataset).require()
    validate_name(config.register_as or dataset)
    check_config(config)
    if config.node_rank == 0:
        return train_flow(dataset=dataset, config=config, resume=resume, reviews=reviews)
    name = config.register_as or dataset
    run_dir = run_directory(ws.home, name, resume) if resume else ws.home / "runs" / name / f"node-{config.node_rank}"
    launch_distributed(str(ws.dataset(dataset).root), str(run_dir), config, "", resume)
    return NodeOutcome(config.node_rank, str(run_dir))


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(dataset_dir: str, run_dir: str, config: TrainConfig, model_name: str) -> str:
    """Open (or, on resume, reopen) the MLflow run of this training."""
    id_file = RunFolder(Path(run_dir)).tracking_id
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        tracking.reopen(run_id)
        return run_id
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(Dataset(dataset_dir), config, model_name)
    id_file.write_text(run_id)
    return run_id


@task(name="fit-model", cache_policy=NO_CACHE)
def fit_model(dataset_dir: str, run_dir: str, run_id: str, config: TrainConfig, resume: bool) -> str:
    """Train with per-epoch checkpoints; each epoch's metrics go to MLflow as they come."""
    if config.distributed:
        return str(launch_distributed(dataset_dir, run_dir, config, run_id, resume))
    with reported_progress(f"training {config.model}", key="train-epochs") as progress:

        def on_epoch(record: EpochRecord) -> None:
            tracking.log_epoch(run_id, record)
            progress(record.epoch, config.epochs)

        result = fit(config, dataset_dir, run_dir, resume=resume, on_epoch=on_epoch)
    return str(result.save())


def launch_distributed(dataset_dir: str, run_dir: str, config: TrainConfig, run_id: str, resume: bool) -> Path:
    """Run `fit` in `nproc_per_node` processes per node with torchrun (DDP); rank 0 writes fit.json."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    config_file = Path(run_dir) / "ddp_config.json"
    write_json_atomic(config_file, config.model_dump(mode="json"))
    # One node: a standalone rendezvous on a free port; several: node 0's address and port.
    topology = (
        ["--standalone"]
        if config.nnodes == 1
        else [
            "--nnodes",
            str(config.nnodes),
            "--node-rank",
            str(config.node_rank),
            "--master-addr",
            config.master_addr,
            "--master-port",
            str(config.master_port),
        ]
    )
    logs = Path(run_dir) / "ddp-logs"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(config.nproc_per_node),
        *topology,
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "flows.ddp_fit",
        "--dataset-dir",
        dataset_dir,
        "--run-dir",
        run_dir,
        "--config",
        str(config_file),
        "--run-id",
        run_id,
    ] + (["--resume"] if resume else [])
    result = subprocess.run(command, capture_output=True, text=True)
    rank_output = "".join(p.read_text(errors="replace") for p in sorted(logs.rglob("std*.log")))
    print(rank_output[-4000:], end="")
    if result.returncode != 0:
        errors = [line for line in rank_output.splitlines() if line.startswith("error:")]
        if errors:
            raise UserError(errors[-1].removeprefix("error: "))
        raise RuntimeError(
            f"distributed training failed (exit {result.returncode}); rank output:\n"
            f"{rank_output[-3000:]}\n{result.stderr[-1500:]}"
        )
    return RunFolder(Path(run_dir)).fit


@task(name="calibrate-model", cache_policy=NO_CACHE)
def calibrate_model(dataset_dir: str, run_dir: str, run_id: str, config: TrainConfig) -> CalibrationResult:
    """Temperature scaling and the operating points' thresholds on the validation split, into the contract."""
    result = calibrate_run(run_dir, dataset_dir, config.point_specs())
    tracking.log_calibration(run_id, result)
    return result


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(dataset_dir: str, run_dir: str, run_id: str) -> dict[str, float]:
    """Test-split metrics with intervals, the operating points' checks and plots, logged to the run."""
    evaluation = evaluate_run(run_dir, dataset_dir, "test")
    tracking.log_results(run_id, FitResult.load(run_dir), evaluation.metrics.flat(), evaluation.files)
    tracking.log_checks(run_id, evaluation.checks)
    record_checks(run_dir, evaluation.checks)
    if evaluation.checks:
        create_markdown_artifact(
            "\n".join(f"- {c.describe()}" for c in evaluation.checks),
            key="operating-points",
            description="Operating points on the test split",
        )
    return evaluation.metrics.headline()


@task(name="build-reference", cache_policy=NO_CACHE)
def build_reference(dataset_dir: str, run_dir: str) -> str:
    """The version's reference: training embeddings, labels and hashes (similar cases, reuse check) and the
    validation split's statistics (drift); logged with the model."""
    return str(reference.build_reference(Path(run_dir), Path(dataset_dir)).folder)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_onnx(run_dir: str) -> str:
    """The model in ONNX, logged with the version: what the ONNX Runtime and OpenVINO backends run, and what users'
    own serving stacks can load."""
    folder = RunFolder(Path(run_dir))
    return str(backends.export_onnx(folder.weights, folder.contract, folder.onnx))


@task(name="log-model", cache_policy=NO_CACHE)
def log_model(dataset_dir: str, run_dir: str, run_id: str) -> str:
    """Log the pyfunc model (weights as a state_dict, the contract as metadata)."""
    return tracking.log_model(run_id, Path(run_dir))


@task(name="register-and-gate", cache_policy=NO_CACHE)
def register_and_gate(
    model_uri: str, model_name: str, run_id: str, dataset_dir: str, run_dir: str, config: TrainConfig
) -> GateDecision:
    """Register a version and decide @champion or @challenger against the current champion."""
    rules = GateRules(
        config.gate_metric,
        config.min_improvement,
        config.gate_min_score,
        config.gate_confidence,
        config.replace_task,
        config.gate_operating_points,
    )
    files = RunFolder(Path(run_dir)).model_files()  # what was logged: their digests
    decision = registry.register_and_gate(model_uri, model_name, run_id, Dataset(dataset_dir), files, rules)
    create_markdown_artifact(
        f"## {decision.model} v{decision.version}: **@{decision.decision}**\n\n{decision.reason}\n",
        key="promotion-gate",
        description="Promotion gate decision",
    )
    return decision


@task(name="write-model-card", cache_policy=NO_CACHE)
def write_model_card(dataset_dir: str, run_dir: str, run_id: str, config: TrainConfig, decision: GateDecision) -> str:
    """The version's model card: logged with the run and set as the version's description in the registry."""
    folder = RunFolder(Path(run_dir))
    card = build_card(
        folder.root,
        Dataset(dataset_dir),
        decision.model,
        decision.version,
        config.model_dump(mode="json"),
        GateSummary(decision.decision, decision.reason, decision.test, decision.p_value),
        [f"evaluation/{p.name}" for p in sorted(folder.eval_dir.glob("*_explanations.png"))],
    )
    markdown, _ = card.save(folder.card_dir)
    tracking.log_card(run_id, decision.model, decision.version, card)
    create_markdown_artifact(card.to_markdown(brief=True), key="model-card", description="Model card")
    return str(markdown)


@task(name="publish-version", cache_policy=NO_CACHE)
def publish_version(decision: GateDecision) -> None:
    """Mark the version's registration complete, then move the aliases the gate decided."""
    registry.publish(decision)


@flow(name="train", log_prints=True)
def train_flow(
    dataset: str,
    config: TrainConfig | None = None,
    resume: bool = False,
    home: str | None = None,
    reviews: str | None = None,
) -> TrainOutcome:
    """Train a classifier on DATASET, track it in MLflow, register it and gate its promotion. With REVIEWS (a
    prediction table, as `cnn score` named it), reviewers' answers in Label Studio are pulled and added first."""
    ws = workspace.configure(home)
    automations.crash_stale_runs_quietly()  # runs that died while the server was down
    config = config or TrainConfig()
    check_config(config)
    model_name = config.register_as or dataset
    if reviews:
        print(take_reviews(reviews, model_name, dataset))
    dataset_dir = str(ws.dataset(dataset).require().root)
    config = resolved_config(config, Dataset(dataset_dir))  # MLflow, the card and the run log what was decided
    run_dir = str(run_directory(ws.home, model_name, resume))
    with sigterm_at_safe_points():  # training stops between steps, keeping the last epoch's checkpoint
        run_id = start_run(dataset_dir, run_dir, config, model_name)
        with tracking.outcome(run_id):  # FAILED with its reason, never FINISHED with nothing in it
            fit_model(dataset_dir, run_dir, run_id, config, resume)
            calibrate_model(dataset_dir, run_dir, run_id, config)
            test_metrics = evaluate_model(dataset_dir, run_dir, run_id)
            build_reference(dataset_dir, run_dir)
            export_onnx(run_dir)
            model_uri = log_model(dataset_dir, run_dir, run_id)
            decision = register_and_gate(model_uri, model_name, run_id, dataset_dir, run_dir, config)
            write_model_card(dataset_dir, run_dir, run_id, config, decision)
            publish_version(decision)  # complete, then the aliases: never an alias on a half-registered version
    RunFolder(Path(run_dir)).done.write_text(run_id)
    create_table_artifact(
        [{"metric": k, "test": round(v, 4)} for k, v in test_metrics.items()],
        key="test-metrics",
        description=f"{model_name}: test metrics",
    )
    spent = FitResult.load(run_dir).budget
    return TrainOutcome(run_id, run_dir, model_uri, test_metrics, decision, spent.describe() if spent else "")

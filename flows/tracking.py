"""MLflow tracking: one run per training, its params, metrics, artifacts, dataset input and logged model."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import requires, version
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from packaging.requirements import Requirement

import cnn
from cnn.config import TrainConfig
from cnn.data.dataset import Dataset, usable_rows
from cnn.metrics.drift import DriftReport
from cnn.metrics.operating_points import PointCheck
from cnn.model.contract import ModelContract
from cnn.model.run import EpochRecord, FitResult, RunFolder
from cnn.trust.card import ModelCard
from cnn.trust.evaluation import CalibrationResult
from flows import workspace

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PROJECT = "cnn-pipeline"  # the distribution whose runtime requirements the logged model carries
DESCRIPTION_LIMIT = 5000
LIBRARY = Path(cnn.__file__).parent


def experiment_for(dataset: str) -> str:
    """Create (or reuse) the experiment of a dataset; artifacts go under CNN_HOME on the default store."""
    name = f"cnn-{dataset}"
    if mlflow.get_experiment_by_name(name) is None:
        ws = workspace.current()
        local = mlflow.get_tracking_uri() == ws.default_tracking_uri
        location = (ws.mlflow_artifacts / name).as_uri() if local else None
        mlflow.create_experiment(name, artifact_location=location)
    return name


def _shared_path(dataset: Dataset) -> str:
    """The manifest's place relative to CNN_HOME: MLflow is shared, the home folder's absolute path is not."""
    return str(Path("datasets", dataset.name, dataset.manifest_path.relative_to(dataset.root)))


def start_run(dataset: Dataset, cfg: TrainConfig, model_name: str) -> str:
    """Open the run: params (flattened config), environment tags, the dataset as an MLflow input."""
    import torch

    experiment = mlflow.set_experiment(experiment_for(dataset.name))
    repair_abandoned(experiment.experiment_id)
    with mlflow.start_run(run_name=f"{model_name}-{cfg.model}", tags=_owner()) as run:  # owned from its creation
        mlflow.log_params(cfg.for_sharing().flat())
        manifest_digest = hashlib.sha256(dataset.manifest_path.read_bytes()).hexdigest()
        mlflow.set_tags(
            {
                "cnn.version": cnn.__version__,
                "torch.version": torch.__version__,
                "cuda.version": str(torch.version.cuda),
                "cuda.available": str(torch.cuda.is_available()),
                "python.version": platform.python_version(),
                "dataset.name": dataset.name,
                "dataset.manifest_sha256": manifest_digest,
                "model.name": model_name,
            }
        )
        manifest = dataset.manifest()
        ok = usable_rows(manifest)[["image_id", "path", "label", "split", "group"]]
        with warnings.catch_warnings():  # MLflow cannot tell which local source class a path is; both are fine
            warnings.simplefilter("ignore", UserWarning)
            source = mlflow.data.from_pandas(ok, source=_shared_path(dataset), name=dataset.name, targets="label")
        mlflow.log_input(source, context="training")
        mlflow.log_dict(
            {"manifest_sha256": manifest_digest, "rows": len(manifest), "ok": len(ok)}, "dataset/manifest_digest.json"
        )
        for path in (dataset.root / "report.md", dataset.root / "report.json"):
            if path.is_file():
                mlflow.log_artifact(str(path), "dataset")
        mlflow.log_dict(dataset.meta().for_sharing(), f"dataset/{dataset.meta_path.name}")  # no host paths
        mlflow.log_text(cfg.for_sharing().to_yaml(), "config/config.yaml")
        return run.info.run_id


OUTCOME = "cnn.outcome"  # running | finished | failed | killed: what the command that owns the run last said
_ABANDONED = (
    "abandoned: the command that ran it ended without closing it (killed, or the tracking server did not answer "
    "when it failed)"
)


def _owner() -> dict[str, str]:
    """Who runs it, so that a later command on this host can tell a training that still runs from one that died."""
    pid = str(os.getpid())
    return {OUTCOME: "running", "cnn.host": socket.gethostname(), "cnn.pid": pid, "cnn.started": _started()}


def _started(pid: int | None = None) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): with the pid, one process."""
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


@contextmanager
def outcome(run_id: str) -> Iterator[None]:
    """The training run ends FINISHED when the block completes, FAILED with `failure.reason` when it raises (KILLED
    when interrupted). Where the server does not answer at that moment the run keeps `cnn.outcome=running`, and the
    next training on this host marks it FAILED (`repair_abandoned`)."""
    try:
        yield
    except BaseException as exc:
        killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
        _end(run_id, "KILLED" if killed else "FAILED", _reason(exc))
        raise
    _end(run_id, "FINISHED")


def _reason(exc: BaseException) -> str:
    # imported here: the classifier is needed only by a run that failed
    from flows.faults import infrastructure_fault
    from flows.logfilter import shareable

    said = str(infrastructure_fault(exc) or exc).strip().splitlines()
    return shareable(f"{type(exc).__name__}: {said[0] if said else ''}")[:DESCRIPTION_LIMIT]


def _end(run_id: str, status: str, reason: str = "") -> None:
    tags = {OUTCOME: status.lower(), **({"failure.reason": reason} if reason else {})}
    try:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the tracking server may be what failed; the next training repairs it
        logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


def reopen(run_id: str) -> None:
    """A resumed training's run: owned by this process from now on (RUNNING again, whatever its last outcome)."""
    client = MlflowClient()
    for key, value in _owner().items():
        client.set_tag(run_id, key, value)
    client.update_run(run_id, status="RUNNING")


def repair_abandoned(experiment_id: str) -> list[str]:
    """Mark FAILED the runs of this experiment that a command on this host opened and never closed, whose process is
    gone (a kill -9, an OOM kill, or a failure while the tracking server was down); the ids marked."""
    client, host, repaired = MlflowClient(), socket.gethostname(), []
    running = client.search_runs([experiment_id], filter_string=f"tags.`{OUTCOME}` = 'running'", max_results=500)
    for run in running:
        tags = run.data.tags
        pid = tags.get("cnn.pid", "")
        if tags.get("cnn.host") != host or not pid.isdigit():
            continue  # another host's runs: only that host can tell whether they still run
        if _started(int(pid)) and _started(int(pid)) == tags.get("cnn.started"):
            continue  # still running
        client.set_tag(run.info.run_id, OUTCOME, "failed")
        client.set_tag(run.info.run_id, "failure.reason", _ABANDONED)
        client.set_terminated(run.info.run_id, "FAILED")
        repaired.append(run.info.run_id)
    return repaired


def log_epoch(run_id: str, record: EpochRecord) -> None:
    """All of one epoch's metrics in one batched call."""
    stamp = int(1000 * time.time())
    metrics = [mlflow.entities.Metric(k, v, stamp, record.epoch) for k, v in record.metrics().items() if v == v]
    MlflowClient().log_batch(run_id, metrics=metrics)


def log_results(run_id: str, fit: FitResult, test_metrics: dict[str, float], files: list[Path]) -> None:
    """Final metrics, plots, report and the augmentation policy."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items()})
        mlflow.log_metrics({"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run})
        mlflow.set_tags({"device": fit.device, "stopped": fit.stopped, "train_precision": fit.precision_reason})
        if fit.budget is not None:  # how the budget was spent, next to the epochs it bought
            mlflow.log_metrics({f"budget_{k}": float(v) for k, v in asdict(fit.budget).items()})
            mlflow.set_tag("budget", fit.budget.describe())
        for path in files:
            mlflow.log_artifact(str(path), "evaluation")
        mlflow.log_dict(fit.contract.policy, "config/augmentation_policy.json")


def log_calibration(run_id: str, result: CalibrationResult) -> None:
    """The temperature, ECE and NLL before and after, and the chosen thresholds."""
    metrics = {f"calibration.{k}": v for k, v in result.calibration.metrics().items()}
    metrics.update({f"operating_point.{p.class_name}.threshold": p.threshold for p in result.points})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result.to_dict(), "evaluation/calibration.json")


def log_checks(run_id: str, checks: list[PointCheck]) -> None:
    """Each operating point's test sensitivity, specificity and precision with their interval ends."""
    metrics: dict[str, float] = {}
    for c in checks:
        for name in ("sensitivity", "specificity", "precision"):
            interval = getattr(c, name)
            for part in ("value", "low", "high"):
                value = getattr(interval, part)
                if value == value:  # NaN where undefined
                    metrics[f"test_op.{c.point.class_name}.{name}{'' if part == 'value' else '_' + part}"] = value
    if metrics:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(metrics)


def log_card(run_id: str, model: str, version: str, card: ModelCard) -> None:
    """The card as run artifacts (model_card/card.md, card.json) and as the version's description."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text(card.to_markdown(), "model_card/card.md")
        mlflow.log_dict(card.to_dict(), "model_card/card.json")
    description = card.to_markdown(brief=True)
    if len(description) > DESCRIPTION_LIMIT:  # the registry's column holds 5,000 characters
        description = (
            description[: DESCRIPTION_LIMIT - 80] + "\n\n_(cut: the full card is run artifact model_card/card.md)_"
        )
    MlflowClient().update_model_version(model, version, description=description)


def log_drift(model: str, version: str, flow_run_id: str, report: DriftReport, plot: Path | None = None) -> str:
    """A scoring run's drift check as an MLflow run of the experiment `cnn-scoring-MODEL`: p-value and effect of
    each statistic, whether the batch drifted, and the plot; returns the run id."""
    name = f"cnn-scoring-{model}"
    if mlflow.get_experiment_by_name(name) is None:
        ws = workspace.current()
        local = mlflow.get_tracking_uri() == ws.default_tracking_uri
        mlflow.create_experiment(name, artifact_location=(ws.mlflow_artifacts / name).as_uri() if local else None)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None  # created just above
    tags = {"model.name": model, "model.version": version, "flow_run_id": flow_run_id, "drifted": str(report.drifted)}
    run = client.create_run(experiment.experiment_id, run_name=f"score-{flow_run_id[:8] or 'local'}", tags=tags)
    stamp = int(1000 * time.time())
    metrics = [mlflow.entities.Metric("drift.images", float(report.images), stamp, 0)]
    metrics.append(mlflow.entities.Metric("drift.drifted", float(report.drifted), stamp, 0))
    for s in report.statistics:
        metrics.append(mlflow.entities.Metric(f"drift.{s.name}.p_value", s.p_value, stamp, 0))
        metrics.append(mlflow.entities.Metric(f"drift.{s.name}.effect", s.effect, stamp, 0))
    client.log_batch(run.info.run_id, metrics=metrics)
    if plot is not None:
        client.log_artifact(run.info.run_id, str(plot), "drift")
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def signature_for(contract: ModelContract) -> ModelSignature:
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema(
        [ColSpec("string", "label"), ColSpec("double", "confidence"), ColSpec("string", "decision")]
        + [ColSpec("double", f"prob_{c}") for c in contract.classes]
        + [ColSpec("string", "error")]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(run_id: str, run_dir: Path) -> str:
    """Log the pyfunc (models from code, state_dict weights, the contract, the ONNX export, the reference) and
    return its model URI."""
    folder = RunFolder(run_dir)
    contract = ModelContract.load(folder.contract)
    extras = {"reference": folder.reference, "onnx": folder.onnx}
    # MLflow tries the input example on a copy that is not registered yet, which the pyfunc refuses to load (it checks
    # its files against the registry first): MLflow's warning about it is expected, not news.
    with mlflow.start_run(run_id=run_id), _quiet("mlflow.models.model"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={
                "weights": str(folder.weights),
                "contract": str(folder.contract),
                **{key: str(path) for key, path in extras.items() if path.exists()},
            },
            code_paths=[str(LIBRARY)],
            signature=signature_for(contract),
            input_example=pd.DataFrame({"path": ["example.png"]}),  # never a real file's path: MLflow is shared
            pip_requirements=model_requirements(),
            metadata={"cnn_contract": asdict(contract)},
        )
    _share_mlmodel(info.model_id)
    return info.model_uri


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _share_mlmodel(model_id: str) -> None:
    """MLflow writes the logging host's absolute paths into MLmodel (each artifact's source `uri`, the code file's
    `model_code_path`, the store's `artifact_path`); none is read back (loaders use the relative `path` and the code
    file's name), and the registry is shared: rewrite MLmodel with paths relative to the model, before it is
    registered and its digests recorded."""
    location = mlflow.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=tmp))
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        flavor = data["flavors"]["python_function"]
        for spec in flavor.get("artifacts", {}).values():
            spec["uri"] = spec["path"]
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
        data.pop("artifact_path", None)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        MlflowClient().log_model_artifact(model_id, str(path))


def model_requirements() -> list[str]:
    """The pyfunc's pip requirements, generated from the project's runtime set: every runtime dependency the
    project declares (the DICOM codec plugins among them), pinned at the version installed here, which is the
    version `requirements.lock` pins. Nothing is listed by hand, so a new dependency cannot be forgotten."""
    out = []
    for text in requires(PROJECT) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement (s3, dev, ...), not the runtime set
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        out.append(f"{requirement.name}{extras}=={version(requirement.name)}")
    return sorted(out)

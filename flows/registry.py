"""Model registry: register each training, gate it against @champion, and move aliases by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.choices import Metric
from cnn.dataset import Dataset
from cnn.errors import UserError
from cnn.evaluation import score_split
from flows import versions

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


@dataclass(frozen=True)
class GateDecision:
    """What the promotion gate decided for a new version, and why."""

    model: str
    version: str
    decision: Literal["champion", "challenger"]
    reason: str
    metric: Metric
    split: str
    new_score: float
    champion_version: str | None = None
    champion_score: float | None = None


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def gate_split(dataset: Dataset) -> str:
    """The split the gate scores on: test (validation if the dataset has no test split)."""
    for split in ("test", "val"):
        if len(dataset.usable(split)):
            return split
    raise UserError(f"dataset {dataset.name} has neither a test nor a validation split to compare models on")


def score_version(model: str, version: str, dataset: Dataset, split: str, metric: Metric) -> float | None:
    """A registered version's `metric` on a split, loaded with the project's own loader; None if it predicts
    other classes than the split holds."""
    predictor = versions.load(model, version)
    if set(dataset.usable(split)["label"]) - set(predictor.contract.classes):
        return None
    value = score_split(predictor, dataset, split).metrics().score(metric)
    return float("nan") if value is None else value  # undefined (AUROC of one class): never beats anything


def register_and_gate(
    model_uri: str, model: str, run_id: str, dataset: Dataset, metric: Metric, min_improvement: float
) -> GateDecision:
    """Register a new version, compare it with @champion on the same split and metric, move the aliases."""
    client = MlflowClient()
    version = str(mlflow.register_model(model_uri, model, tags={"run_id": run_id, "dataset": dataset.name}).version)
    split = gate_split(dataset)
    new_score = score_version(model, version, dataset, split, metric)
    if new_score is None:
        raise UserError(f"the new version of {model} cannot score its own {split} split")
    champion = alias_version(client, model, CHAMPION)
    champion_score = score_version(model, champion, dataset, split, metric) if champion else None
    if champion is None:
        decision, reason = CHAMPION, "no champion yet"
    elif champion_score is None:
        decision, reason = CHAMPION, f"champion v{champion} predicts other classes; the new class set replaces it"
    elif new_score >= champion_score + min_improvement:
        decision = CHAMPION
        reason = (
            f"{metric} {new_score:.4f} >= champion v{champion} {champion_score:.4f}"
            f" + min improvement {min_improvement:g} on {dataset.name}/{split}"
        )
    else:
        decision = CHALLENGER
        reason = (
            f"{metric} {new_score:.4f} < champion v{champion} {champion_score:.4f}"
            f" + min improvement {min_improvement:g} on {dataset.name}/{split}"
        )
    decision_kind: Literal["champion", "challenger"] = "champion" if decision == CHAMPION else "challenger"
    if decision == CHAMPION:
        _crown(client, model, version, champion)
    else:
        client.set_registered_model_alias(model, CHALLENGER, version)
    result = GateDecision(model, version, decision_kind, reason, metric, split, new_score, champion, champion_score)
    client.set_model_version_tag(model, version, "gate.decision", decision)
    client.set_model_version_tag(model, version, "gate.reason", reason)
    client.set_model_version_tag(model, version, f"gate.{split}_{metric}", f"{new_score:.6f}")
    return result


def _crown(client: MlflowClient, model: str, version: str, old: str | None) -> None:
    if old is not None and old != version:
        client.set_registered_model_alias(model, PREVIOUS, old)
    client.set_registered_model_alias(model, CHAMPION, version)
    if alias_version(client, model, CHALLENGER) == version:
        client.delete_registered_model_alias(model, CHALLENGER)


def promote(model: str, version: str) -> str:
    """Make `version` the champion by hand; the replaced champion keeps @previous."""
    client = MlflowClient()
    try:
        client.get_model_version(model, version)
    except MlflowException:
        raise UserError(f"model {model!r} has no version {version}") from None
    old = alias_version(client, model, CHAMPION)
    if old == version:
        return f"{model} v{version} is already @champion"
    _crown(client, model, version, old)
    client.set_model_version_tag(model, version, "gate.decision", "champion (promoted by hand)")
    return f"{model} v{version} is now @champion" + (f"; v{old} is @previous" if old else "")


def rollback(model: str) -> str:
    """Swap @champion and @previous: the previous champion serves again (run twice to undo)."""
    client = MlflowClient()
    previous = alias_version(client, model, PREVIOUS)
    if previous is None:
        raise UserError(f"model {model!r} has no @previous version to roll back to")
    current = alias_version(client, model, CHAMPION)
    client.set_registered_model_alias(model, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(model, PREVIOUS, current)
        client.set_model_version_tag(model, current, "rolled_back", "true")
    return f"{model}: @champion is v{previous} again" + (f"; v{current} is @previous" if current else "")

"""Model registry: register each training, gate it against @champion, and move aliases by hand."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.dataset import Dataset
from cnn.errors import UserError
from cnn.metrics import compute_metrics

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


@dataclass
class GateDecision:
    """What the promotion gate decided for a new version, and why."""

    model: str
    version: str
    decision: str  # "champion" | "challenger"
    reason: str
    metric: str
    split: str
    new_score: float
    champion_version: str | None = None
    champion_score: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def gate_split(dataset: Dataset) -> tuple[str, pd.DataFrame]:
    """The rows the gate scores: the test split (validation if the dataset has no test split)."""
    manifest = dataset.manifest()
    ok = manifest[manifest["status"] == "ok"].drop_duplicates("image_id")
    for split in ("test", "val"):
        rows = ok[ok["split"] == split]
        if len(rows):
            return split, rows
    raise UserError(f"dataset {dataset.name} has neither a test nor a validation split to compare models on")


def score_version(model: str, version: str, rows: pd.DataFrame, metric: str) -> float | None:
    """Load a registered version as MLflow users do and score it on `rows`; None if its classes differ."""
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model}/{version}")
    out = pyfunc.predict(pd.DataFrame({"path": rows["path"].tolist()}))
    classes = [c[len("prob_"):] for c in out.columns if c.startswith("prob_")]
    if set(rows["label"]) - set(classes):
        return None
    ok = out["error"].isna().to_numpy()
    probs = out.loc[ok, [f"prob_{c}" for c in classes]].to_numpy()
    labels = np.array([classes.index(label) for label in rows["label"].to_numpy()[ok]])
    return float(compute_metrics(probs, labels, classes).headline().get(metric, float("nan")))


def register_and_gate(model_uri: str, model: str, run_id: str, dataset: Dataset, metric: str,
                      min_improvement: float) -> GateDecision:
    """Register a new version, compare it with @champion on the same split and metric, move the aliases."""
    client = MlflowClient()
    version = str(mlflow.register_model(model_uri, model, tags={"run_id": run_id, "dataset": dataset.name}).version)
    split, rows = gate_split(dataset)
    new_score = score_version(model, version, rows, metric)
    if new_score is None:
        raise UserError(f"the new version of {model} cannot score its own {split} split")
    champion = alias_version(client, model, CHAMPION)
    champion_score = score_version(model, champion, rows, metric) if champion else None
    if champion is None:
        decision, reason = CHAMPION, "no champion yet"
    elif champion_score is None:
        decision, reason = CHAMPION, f"champion v{champion} predicts other classes; the new class set replaces it"
    elif new_score >= champion_score + min_improvement:
        decision = CHAMPION
        reason = (f"{metric} {new_score:.4f} >= champion v{champion} {champion_score:.4f}"
                  f" + min improvement {min_improvement:g} on {dataset.name}/{split}")
    else:
        decision = CHALLENGER
        reason = (f"{metric} {new_score:.4f} < champion v{champion} {champion_score:.4f}"
                  f" + min improvement {min_improvement:g} on {dataset.name}/{split}")
    if decision == CHAMPION:
        _crown(client, model, version, champion)
    else:
        client.set_registered_model_alias(model, CHALLENGER, version)
    result = GateDecision(model, version, decision, reason, metric, split, new_score, champion, champion_score)
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

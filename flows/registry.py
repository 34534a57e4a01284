"""Model registry: register each training, gate it against @champion, and move aliases by hand."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.choices import CHALLENGER, CHAMPION, PREVIOUS, Metric
from cnn.data.dataset import Dataset
from cnn.errors import UserError
from cnn.metrics.classification import SplitScores
from cnn.metrics.comparison import compare_paired
from cnn.metrics.operating_points import check
from cnn.model.contract import ModelContract
from cnn.trust.evaluation import score_split
from flows import tracking, versions
from flows.faults import unreachable


@dataclass(frozen=True)
class GateRules:
    """How the promotion gate decides (from the training config)."""

    metric: Metric = "macro_f1"
    min_improvement: float = 0.0
    min_score: float | None = None
    confidence: float = 0.95
    replace_task: bool = False
    operating_points: bool = False  # every operating point must hold on the gate's split


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
    test: str = ""  # the statistical test, when there was a champion to compare with
    p_value: float | None = None
    images_sha256: str = ""


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as exc:
        if unreachable(exc):  # "no champion" only when the server says so, never when it is down
            raise
        return None


def gate_split(dataset: Dataset) -> str:
    """The split the gate scores on: test (validation if the dataset has no test split)."""
    for split in ("test", "val"):
        if len(dataset.usable(split)):
            return split
    raise UserError(f"dataset {dataset.name} has neither a test nor a validation split to compare models on")


def register_and_gate(
    model_uri: str, model: str, run_id: str, dataset: Dataset, files: dict[str, Path], rules: GateRules
) -> GateDecision:
    """Register a new version (with the sha256 of its weights, contract and ONNX export) and compare it with
    @champion on the same images, recording the decision as version tags; `publish` moves the aliases once the card
    is written. A gate that cannot decide tags the version `gate_failed` and raises."""
    client = MlflowClient()
    mark_incomplete(model)  # earlier registrations that stopped part way: refused from now on, and said so
    tags = {"run_id": run_id, "dataset": dataset.name, versions.REGISTERED_TAG: "pending"}
    version = str(mlflow.register_model(model_uri, model, tags=tags).version)
    versions.record_digests(model, version, files)
    try:
        decision = _decide(client, model, version, dataset, rules)
    except Exception as exc:
        client.set_model_version_tag(model, version, "gate.decision", "gate_failed")
        client.set_model_version_tag(model, version, "gate.reason", str(exc)[:5000])
        raise
    tags = {
        "gate.decision": decision.decision,
        "gate.reason": decision.reason,
        f"gate.{decision.split}_{decision.metric}": f"{decision.new_score:.6f}",
        "gate.test": decision.test,
        "gate.p_value": "" if decision.p_value is None else f"{decision.p_value:.6f}",
        "gate.images_sha256": decision.images_sha256,
    }
    for key, value in tags.items():
        if value:
            client.set_model_version_tag(model, version, key, value)
    return decision


def publish(decision: GateDecision) -> None:
    """The last step of a registration, after the gate's tags and the card: mark the version complete, then move the
    aliases the gate decided. A registration stopped before this leaves a version every loader refuses and no alias
    pointing at it; the next training of the model marks it incomplete (`mark_incomplete`)."""
    client, model, version = MlflowClient(), decision.model, decision.version
    client.set_model_version_tag(model, version, versions.REGISTERED_TAG, "true")
    if decision.decision == CHAMPION:
        _crown(client, model, version, decision.champion_version)
    else:
        client.set_registered_model_alias(model, CHALLENGER, version)


def mark_incomplete(model: str) -> list[str]:
    """Tag `registration.complete=false` on the versions of `model` whose registration stopped part way (killed, or
    the tracking server gone) and whose training is no longer running; the versions marked."""
    client, marked = MlflowClient(), []
    try:
        found = client.search_model_versions(f"name = '{model}'")
    except MlflowException as exc:
        if unreachable(exc):
            raise
        return []  # no such model yet
    for mv in found:
        if versions.registration_state(mv) != "unfinished":
            continue
        try:
            still = client.get_run(mv.run_id).data.tags.get(tracking.OUTCOME) == "running" if mv.run_id else False
        except MlflowException as exc:
            if unreachable(exc):
                raise
            still = False  # its run was deleted
        if not still:
            client.set_model_version_tag(model, str(mv.version), versions.REGISTERED_TAG, "false")
            marked.append(str(mv.version))
    return marked


TASK_FIELDS = ("dataset", "dataset_id", "classes", "channels", "image_size", "resize", "mean", "std")  # same task


def task_changes(old: ModelContract, new: ModelContract) -> list[str]:
    """How `new`'s task differs from `old`'s: the dataset, the classes and the data contract (channels, image size,
    resize, normalisation); a model that sees other inputs is not a better model of the same task. Empty when the
    task is the same."""
    return [
        f"{field} {getattr(new, field)!r} where the champion has {getattr(old, field)!r}"
        for field in TASK_FIELDS
        if getattr(old, field) != getattr(new, field) and (field != "dataset_id" or (old.dataset_id and new.dataset_id))
    ]


def _decide(client: MlflowClient, model: str, version: str, dataset: Dataset, rules: GateRules) -> GateDecision:
    split, metric = gate_split(dataset), rules.metric
    new_predictor = versions.load(model, version)
    new = score_split(new_predictor, dataset, split)
    new_score = _finite(new.metrics().score(metric))
    if new_score is None:
        raise UserError(
            f"{metric} of {model} v{version} on {dataset.name}/{split} is undefined, so it cannot be compared; "
            "the version is not crowned (use another --gate-metric, or check the split)"
        )
    decided = functools.partial(GateDecision, model, version, metric=metric, split=split, new_score=new_score)
    failing = _failing_points(new, new_predictor.contract) if rules.operating_points else []
    if failing:
        reason = "operating points do not hold (the interval's lower end is below the target): " + "; ".join(failing)
        return decided(decision=CHALLENGER, reason=reason, champion_version=alias_version(client, model, CHAMPION))
    if rules.min_score is not None and new_score < rules.min_score:
        reason = f"{metric} {new_score:.4f} is below the floor gate_min_score {rules.min_score:g}"
        return decided(decision=CHALLENGER, reason=reason, champion_version=alias_version(client, model, CHAMPION))
    champion = alias_version(client, model, CHAMPION)
    if champion is None:
        return decided(decision=CHAMPION, reason="no champion yet")
    old_predictor = versions.load(model, champion)
    changed = task_changes(old_predictor.contract, new_predictor.contract)
    if changed:
        task = "; ".join(changed) + f" (against champion v{champion})"
        if not rules.replace_task:
            reason = f"trained on another task: {task}; pass --replace-task to let it replace the champion"
            return decided(decision=CHALLENGER, reason=reason, champion_version=champion)
        return decided(
            decision=CHAMPION, reason=f"replaces the task (--replace-task): {task}", champion_version=champion
        )
    old = score_split(old_predictor, dataset, split)
    old_score = _finite(old.metrics().score(metric))
    if old_score is None:
        reason = f"champion v{champion}'s {metric} on {dataset.name}/{split} is undefined; a defined score replaces it"
        return decided(decision=CHAMPION, reason=reason, champion_version=champion)
    test = compare_paired(new, old, metric, rules.min_improvement, rules.confidence)
    verdict = "better" if test.better else "not shown better"
    return decided(
        decision=CHAMPION if test.better else CHALLENGER,
        reason=f"{verdict} than champion v{champion} on {dataset.name}/{split}: {test.describe()}",
        champion_version=champion,
        champion_score=old_score,
        test=test.test,
        p_value=test.p_value,
        images_sha256=test.images_sha256,
    )


def _failing_points(scores: SplitScores, contract: ModelContract) -> list[str]:
    """The operating points whose targeted metric's 95% interval reaches below the target on `scores`."""
    checks = [check(p, scores.probs, scores.labels, scores.classes, scores.split) for p in contract.points()]
    return [c.describe() for c in checks if c.holds is False]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


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
        mv = client.get_model_version(model, version)
    except MlflowException as exc:
        if unreachable(exc):
            raise
        raise UserError(f"model {model!r} has no version {version}") from None
    versions.require_registered(mv)
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

"""Classification metrics: accuracy, balanced accuracy, macro-F1, per-class P/R/F1, sensitivity and
specificity, one-vs-rest AUROC, confusion matrix and expected calibration error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from cnn.choices import Metric


@dataclass(frozen=True)
class Interval:
    """A value with its bootstrap 95% interval (NaN where undefined, such as precision with nothing predicted)."""

    value: float
    low: float
    high: float

    def describe(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class ClassMetrics:
    precision: float
    recall: float  # = sensitivity
    f1: float
    specificity: float
    auroc: float | None
    support: int


@dataclass
class ClassificationMetrics:
    """Metrics of predicted probabilities against true labels."""

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    auroc_macro: float | None
    ece: float
    loss: float | None
    confusion: list[list[int]]
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)

    def headline(self) -> dict[str, float]:
        """The scalar metrics (for MLflow and tables)."""
        out = {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
        }
        if self.auroc_macro is not None:
            out["auroc_macro"] = self.auroc_macro
        if self.loss is not None:
            out["loss"] = self.loss
        return out

    def score(self, metric: Metric) -> float | None:
        """One headline metric (None where it is undefined, such as AUROC with one class present)."""
        value: float | None = getattr(self, metric)
        return value

    def flat(self) -> dict[str, float]:
        """Headline plus per-class metrics as `name.class` keys."""
        out = self.headline()
        for name, m in self.per_class.items():
            for key in ("precision", "recall", "f1", "specificity", "auroc"):
                value = getattr(m, key)
                if value is not None:
                    out[f"{key}.{name}"] = float(value)
        return out

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def report(self) -> str:
        """A classification report as text."""
        lines = [f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>8}{'specif.':>9}{'auroc':>8}{'support':>9}"]
        for name, m in self.per_class.items():
            auroc = f"{m.auroc:.3f}" if m.auroc is not None else "-"
            lines.append(
                f"{name:<20}{m.precision:>10.3f}{m.recall:>10.3f}{m.f1:>8.3f}{m.specificity:>9.3f}"
                f"{auroc:>8}{m.support:>9}"
            )
        lines.append("")
        lines += [f"{k:<20}{v:.4f}" for k, v in self.headline().items()]
        return "\n".join(lines) + "\n"


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Weighted gap between confidence and accuracy over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], loss: float | None = None
) -> ClassificationMetrics:
    """All metrics for `probs` (N, C) against integer `labels` (N,)."""
    k = len(classes)
    pred = probs.argmax(axis=1)
    # imported here: scikit-learn costs most of a second to import, and scoring never computes metrics
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=list(range(k)), zero_division=0
    )
    per_class: dict[str, ClassMetrics] = {}
    aurocs = []
    total = cm.sum()
    for c, name in enumerate(classes):
        tn = total - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        specificity = float(tn / (tn + fp)) if tn + fp else 0.0
        positives = labels == c
        auroc = float(roc_auc_score(positives, probs[:, c])) if 0 < positives.sum() < len(labels) else None
        if auroc is not None:
            aurocs.append(auroc)
        per_class[name] = ClassMetrics(
            float(precision[c]), float(recall[c]), float(f1[c]), specificity, auroc, int(support[c])
        )
    present = support > 0
    return ClassificationMetrics(
        accuracy=float((pred == labels).mean()) if len(labels) else 0.0,
        balanced_accuracy=float(balanced_accuracy_score(labels, pred)) if len(labels) else 0.0,
        macro_f1=float(np.mean(f1[present])) if present.any() else 0.0,
        auroc_macro=float(np.mean(aurocs)) if aurocs else None,
        ece=expected_calibration_error(probs, labels) if len(labels) else 0.0,
        loss=loss,
        confusion=cm.tolist(),
        per_class=per_class,
    )


def class_intervals(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], rounds: int = 1000, seed: int = 0
) -> dict[str, dict[str, Interval]]:
    """Per-class precision, recall (sensitivity), specificity and F1 of the argmax with percentile-bootstrap 95%
    intervals (images resampled with replacement; the confusion matrix of each resample in one product)."""
    k, n = len(classes), len(labels)
    if not n:
        return {}
    predicted = probs.argmax(axis=1)
    cell = np.zeros((n, k * k))
    cell[np.arange(n), labels * k + predicted] = 1.0
    rng = np.random.default_rng(seed)
    weights = np.concatenate(
        [rng.multinomial(n, np.full(n, 1.0 / n), size=min(250, rounds - s)) for s in range(0, rounds, 250)]
    )
    confusions = np.concatenate([(np.ones((1, n)) @ cell), weights @ cell]).reshape(-1, k, k)  # row 0: the sample
    diagonal = np.diagonal(confusions, axis1=1, axis2=2)
    truth, called, total = confusions.sum(axis=2), confusions.sum(axis=1), confusions.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        table = {
            "precision": diagonal / called,
            "recall": diagonal / truth,
            "specificity": (total[:, None] - truth - called + diagonal) / (total[:, None] - truth),
        }
        table["f1"] = 2 * table["precision"] * table["recall"] / (table["precision"] + table["recall"])
    out: dict[str, dict[str, Interval]] = {}
    for c, name in enumerate(classes):
        out[name] = {}
        for metric, values in table.items():
            sample, resampled = float(values[0, c]), values[1:, c]
            finite = resampled[np.isfinite(resampled)]
            low, high = np.quantile(finite, [0.025, 0.975]) if len(finite) else (np.nan, np.nan)
            out[name][metric] = Interval(sample, float(low), float(high))
    return out


@dataclass(frozen=True)
class SplitScores:
    """A predictor's probabilities on one split of a dataset, one row per distinct image, with true labels."""

    split: str
    classes: list[str]
    probs: np.ndarray  # (N, C) in the predictor's class order
    labels: np.ndarray  # (N,) indices into `classes`
    image_ids: list[str]

    def metrics(self) -> ClassificationMetrics:
        return compute_metrics(self.probs, self.labels, self.classes)

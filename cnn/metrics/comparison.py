"""Is a new model better than the current one on the same images? A paired bootstrap of the metric difference.

Both models score the same images; resampling images (with replacement) and recomputing the metric of each model
on the resample gives the distribution of the difference new - old under the variation of the test set. The new
model counts as better when the lower end of the one-sided interval at `confidence` clears `margin`; the p-value is
the share of resamples where it does not. Noise alone (two equally good models) therefore rarely promotes, and a
tie never does.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from cnn.choices import Metric
from cnn.metrics.classification import SplitScores, compute_metrics

ROUNDS = 2000  # resamples for the confusion-based metrics (vectorised: well under a second for 10k images)
AUROC_ROUNDS = 200  # AUROC is recomputed per resample with scikit-learn


@dataclass(frozen=True)
class PairedComparison:
    """The outcome of comparing two models on the same images."""

    metric: Metric
    new: float
    old: float
    diff_low: float  # lower end of the one-sided interval of new - old at `confidence`
    p_value: float  # share of resamples where new - old <= margin
    confidence: float
    margin: float
    images: int
    images_sha256: str  # digest of the sorted image ids the comparison was made on
    test: str

    @property
    def better(self) -> bool:
        return self.diff_low > self.margin

    def describe(self) -> str:
        return (
            f"{self.metric} {self.new:.4f} vs {self.old:.4f} on {self.images} images; {self.test}: "
            f"new - old >= {self.diff_low:+.4f} at {self.confidence:.0%} confidence, p = {self.p_value:.4f} "
            f"(margin {self.margin:g})"
        )


def compare_paired(
    new: SplitScores, old: SplitScores, metric: Metric, margin: float = 0.0, confidence: float = 0.95, seed: int = 0
) -> PairedComparison:
    """Paired bootstrap of `metric(new) - metric(old)` on the images both scored (matched by image id)."""
    if new.classes != old.classes:
        raise ValueError("paired comparison needs the same classes in the same order")
    common = sorted(set(new.image_ids) & set(old.image_ids))
    if not common:
        raise ValueError("the two models scored no image in common")
    new_at = {image_id: i for i, image_id in enumerate(new.image_ids)}
    old_at = {image_id: i for i, image_id in enumerate(old.image_ids)}
    labels = new.labels[[new_at[i] for i in common]]
    new_probs, old_probs = new.probs[[new_at[i] for i in common]], old.probs[[old_at[i] for i in common]]
    k, n = len(new.classes), len(common)
    rng = np.random.default_rng(seed)
    if metric == "auroc_macro":
        rounds = AUROC_ROUNDS
        diffs = np.empty(rounds)
        for r in range(rounds):
            pick = rng.integers(0, n, n)
            diffs[r] = _auroc(new_probs[pick], labels[pick], new.classes) - _auroc(
                old_probs[pick], labels[pick], new.classes
            )
        value_new, value_old = _auroc(new_probs, labels, new.classes), _auroc(old_probs, labels, new.classes)
    else:
        rounds = ROUNDS
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(np.float64)  # (R, N)
        new_cm = _confusions(weights, labels, new_probs.argmax(1), k)
        old_cm = _confusions(weights, labels, old_probs.argmax(1), k)
        diffs = _from_confusion(new_cm, metric) - _from_confusion(old_cm, metric)
        ones = np.ones((1, n))
        value_new = float(_from_confusion(_confusions(ones, labels, new_probs.argmax(1), k), metric)[0])
        value_old = float(_from_confusion(_confusions(ones, labels, old_probs.argmax(1), k), metric)[0])
    diffs = diffs[np.isfinite(diffs)]
    low = float(np.quantile(diffs, 1 - confidence)) if len(diffs) else math.nan
    p_value = float((diffs <= margin).mean()) if len(diffs) else 1.0
    digest = hashlib.sha256("\n".join(common).encode()).hexdigest()
    test = f"paired bootstrap, {rounds} resamples of the images"
    return PairedComparison(metric, value_new, value_old, low, p_value, confidence, margin, n, digest, test)


def _auroc(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    value = compute_metrics(probs, labels, classes).auroc_macro
    return math.nan if value is None else value


def _confusions(weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """(R, K, K) confusion matrices of R weighted resamples (weights: how often each image was drawn)."""
    cell = np.zeros((len(labels), k * k))
    cell[np.arange(len(labels)), labels * k + predicted] = 1.0
    return (weights @ cell).reshape(-1, k, k)


def _from_confusion(cm: np.ndarray, metric: Metric) -> np.ndarray:
    """accuracy, balanced accuracy or macro F1 of each confusion matrix, as `compute_metrics` defines them (the
    class averages run over the classes present in the true labels)."""
    diagonal = np.diagonal(cm, axis1=1, axis2=2)
    truth, predicted = cm.sum(axis=2), cm.sum(axis=1)
    present = truth > 0
    if metric == "accuracy":
        return np.asarray(diagonal.sum(1) / cm.sum(axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, diagonal / truth, 0.0)
        if metric == "balanced_accuracy":
            return np.asarray((recall * present).sum(1) / present.sum(1))
        precision = np.where(predicted > 0, diagonal / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return np.asarray((f1 * present).sum(1) / present.sum(1))

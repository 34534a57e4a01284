"""PNG plots: confusion matrix, ROC curves, reliability diagram and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnn.fsio import atomic_path
from cnn.metrics.classification import expected_calibration_error
from cnn.metrics.drift import CATEGORICAL, CONTINUOUS, DriftReference, DriftSample
from cnn.model.run import EpochRecord


def pyplot() -> Any:
    """matplotlib.pyplot, with the Agg backend (files only): imported on first use."""
    # imported here: heavy: only when a plot is drawn (and the Agg backend must be chosen first)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], classes: list[str], path: Path) -> Path:
    plt = pyplot()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_title("confusion matrix")
    return _save(fig, path)


def plot_roc(probs: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> Path:
    # imported here: heavy (about a second): only where these metrics are computed
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c, name in enumerate(classes):
        positives = labels == c
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    centers, accuracy = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            centers.append(float(confidence[mask].mean()))
            accuracy.append(float(correct[mask].mean()))
    return centers, accuracy


def plot_reliability(
    probs: np.ndarray, labels: np.ndarray, path: Path, bins: int = 10, before: np.ndarray | None = None
) -> Path:
    """Accuracy against confidence per bin; with `before`, the uncalibrated probabilities beside the calibrated."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    if before is not None and len(labels):
        ece = expected_calibration_error(before, labels)
        ax.plot(*_reliability_curve(before, labels, bins), "s--", color="grey", label=f"before (ECE {ece:.3f})")
    label = f"calibrated (ECE {expected_calibration_error(probs, labels):.3f})" if len(labels) else "model"
    ax.plot(*_reliability_curve(probs, labels, bins), "o-", label=label if before is not None else "model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_history(records: Sequence[EpochRecord], path: Path) -> Path:
    plt = pyplot()
    epochs = [r.epoch for r in records]
    history = [r.metrics() for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        left.plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    for key in ("val_accuracy", "val_macro_f1", "val_balanced_accuracy"):
        right.plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    left.set_xlabel("epoch")
    right.set_xlabel("epoch")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle("training curves")
    return _save(fig, path)


def plot_drift(reference: DriftReference, batch: DriftSample, path: Path) -> Path:
    """The batch against the version's reference: histograms of the continuous statistics, shares of the classes
    and formats."""
    plt = pyplot()
    continuous, categorical = CONTINUOUS, CATEGORICAL
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, name in zip(axes.flat, continuous):
        ref = np.asarray(reference.values(name), dtype=float)
        got = np.asarray(getattr(batch, name), dtype=float)
        if len(ref) and len(got):
            lo, hi = float(min(ref.min(), got.min())), float(max(ref.max(), got.max()))
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
            ax.hist(ref, bins, density=True, alpha=0.5, label="reference")
            ax.hist(got, bins, density=True, alpha=0.5, label="batch")
        ax.set_title(name)
        ax.legend(fontsize=7)
    for ax, name in zip(list(axes.flat)[len(continuous) :], categorical):
        ref_values = [str(v) for v in reference.values(name)]
        got_values = [str(v) for v in getattr(batch, name)]
        names = sorted(set(ref_values) | set(got_values))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [ref_values.count(n) / max(len(ref_values), 1) for n in names], 0.4, label="reference")
        ax.bar(x + 0.2, [got_values.count(n) / max(len(got_values), 1) for n in names], 0.4, label="batch")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{name} (share)")
        ax.legend(fontsize=7)
    fig.suptitle("this batch against the version's validation reference")
    fig.tight_layout()
    return _save(fig, path)

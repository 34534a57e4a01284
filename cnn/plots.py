"""PNG plots: confusion matrix, ROC curves, reliability diagram and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:  # matplotlib.pyplot, imported late: the Agg backend must be chosen first
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from cnn.fsio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], classes: list[str], path: Path) -> Path:
    plt = _pyplot()
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
    from sklearn.metrics import roc_curve

    plt = _pyplot()
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
    from cnn.metrics import expected_calibration_error

    plt = _pyplot()
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


def plot_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
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

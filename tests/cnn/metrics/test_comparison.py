"""The gate's paired test: the bootstrap metric matches compute_metrics, ties and noise never promote, a real
improvement does."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.metrics.classification import SplitScores, compute_metrics
from cnn.metrics.comparison import compare_paired

CLASSES = ["a", "b", "c", "d"]


def _scores(labels: np.ndarray, accuracy: float, seed: int) -> SplitScores:
    """Probabilities of a model that is right on about `accuracy` of the images, wrong at random elsewhere."""
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(labels)) < accuracy, labels, rng.integers(0, len(CLASSES), len(labels)))
    probs = rng.random((len(labels), len(CLASSES))) * 0.5
    probs[np.arange(len(labels)), predicted] += 1.0
    probs /= probs.sum(1, keepdims=True)
    return SplitScores("test", CLASSES, probs, labels, [f"img{i:05d}" for i in range(len(labels))])


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "macro_f1", "auroc_macro"])
def test_the_compared_values_are_the_metrics_the_project_reports(metric: str) -> None:
    labels = np.random.default_rng(0).choice(4, 300, p=[0.5, 0.3, 0.15, 0.05])
    new, old = _scores(labels, 0.8, 1), _scores(labels, 0.6, 2)
    result = compare_paired(new, old, metric)  # type: ignore[arg-type]
    assert result.new == pytest.approx(compute_metrics(new.probs, labels, CLASSES).score(metric))  # type: ignore[arg-type]
    assert result.old == pytest.approx(compute_metrics(old.probs, labels, CLASSES).score(metric))  # type: ignore[arg-type]
    assert result.better and result.p_value < 0.05 and result.images == 300


def test_a_tie_never_promotes_and_noise_rarely_does() -> None:
    labels = np.random.default_rng(3).integers(0, 4, 400)
    same = _scores(labels, 0.7, 4)
    tie = compare_paired(same, same, "macro_f1")
    assert not tie.better and tie.p_value == 1.0
    promoted = sum(
        compare_paired(_scores(labels, 0.7, 100 + s), _scores(labels, 0.7, 200 + s), "macro_f1", seed=s).better
        for s in range(40)
    )
    assert promoted <= 6  # equally good models: about 5 % at 95 % confidence


def test_only_images_both_scored_count_and_their_digest_is_recorded() -> None:
    labels = np.random.default_rng(5).integers(0, 4, 100)
    new, old = _scores(labels, 0.9, 6), _scores(labels, 0.5, 7)
    fewer = SplitScores("test", CLASSES, old.probs[10:], labels[10:], old.image_ids[10:])
    result = compare_paired(new, fewer, "accuracy")
    assert result.images == 90 and len(result.images_sha256) == 64
    assert result.images_sha256 != compare_paired(new, old, "accuracy").images_sha256

"""Classification metrics on predictions whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.metrics.classification import compute_metrics, expected_calibration_error


def test_metrics_on_known_predictions() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 2])
    m = compute_metrics(probs, labels, ["a", "b", "c"])
    assert m.accuracy == 0.75
    assert m.confusion == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m.per_class["c"].recall == 0.5 and m.per_class["c"].specificity == 1.0
    assert m.per_class["a"].specificity == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx((1 + 1 + 0.5) / 3)
    assert m.per_class["a"].auroc == 1.0
    assert m.score("accuracy") == 0.75 and m.score("macro_f1") == m.macro_f1
    perfect = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(perfect, np.array([0, 1, 2])) == 0.0
    assert expected_calibration_error(np.array([[0.9, 0.1]] * 10), np.array([1] * 10)) == pytest.approx(0.9)


def test_auroc_is_undefined_with_one_class_present() -> None:
    m = compute_metrics(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 0]), ["a", "b"])
    assert m.auroc_macro is None and m.score("auroc_macro") is None and "auroc_macro" not in m.headline()

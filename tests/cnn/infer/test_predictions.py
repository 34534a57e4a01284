"""The one builder of prediction columns: label, decision by the operating points, review reasons and urgency."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.infer.predictions import prediction_columns
from cnn.metrics.operating_points import OperatingPoint

CLASSES = ["normal", "tumour"]


def test_review_reasons_and_urgency() -> None:
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.98, 0.02]])
    mirrored = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6]])
    point = OperatingPoint("tumour", "sensitivity", 0.95, 0.42, True)
    frame = prediction_columns(probs, CLASSES, 2, 0.6, [point], mirrored)
    assert frame["label"].tolist() == ["normal", "normal", "tumour", "normal"]
    assert frame["decision"].tolist() == ["normal", "tumour", "tumour", "normal"]  # 0.45 >= 0.42
    assert frame["needs_review"].tolist() == [False, True, False, True]
    reason = frame["review_reason"].tolist()
    assert "low confidence 0.55" in reason[1] and "near the tumour operating point" in reason[1]
    assert reason[3] == "mirrored image says tumour, not normal" and reason[0] is None
    assert frame["urgency"].tolist() == pytest.approx([0.1, 0.45, 0.7, 0.02])  # the tumour probability
    plain = prediction_columns(probs, CLASSES, None, 0.6)
    assert plain["urgency"].tolist() == pytest.approx([0.1, 0.45, 0.3, 0.02])  # no point: how unsure it is
    assert "decision" in plain.columns and plain["decision"].equals(plain["label"])


def test_a_row_that_could_not_be_scored_has_no_label() -> None:
    frame = prediction_columns(np.array([[np.nan, np.nan], [0.2, 0.8]]), CLASSES, top_k=1)
    assert frame["label"].tolist() == [None, "tumour"] and np.isnan(frame["confidence"].iloc[0])
    assert frame["top_k"].iloc[0] is None and frame["top_k"].iloc[1] == '[["tumour", 0.8]]'

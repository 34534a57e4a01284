"""Operating points: parsed from what people write, chosen on validation for their target, checked with bootstrap
intervals, deciding in priority order, and sending rows near them (or unsure, or flip-unstable) to review."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.errors import UserError
from cnn.infer.predictions import prediction_columns
from cnn.metrics.operating_points import OperatingPoint, PointSpec, check, check_classes, choose, decide, measure

CLASSES = ["normal", "tumour"]


def _scores(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p = np.clip(0.35 * labels + rng.uniform(0, 0.65, n), 0, 1)
    return np.stack([1 - p, p], axis=1), labels


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("tumour:sensitivity>=0.95", PointSpec("tumour", "sensitivity", 0.95)),
        (" tumour : recall >= .9", PointSpec("tumour", "sensitivity", 0.9)),
        ("broken glass:precision>=0.8", PointSpec("broken glass", "precision", 0.8)),
        ("tumour:specificity>=0.99", PointSpec("tumour", "specificity", 0.99)),
        ("tumour:0.3", PointSpec("tumour", "threshold", 0.3)),
    ],
)
def test_specs_parse(text: str, spec: PointSpec) -> None:
    assert PointSpec.parse(text) == spec
    assert PointSpec.parse(spec.describe()) == spec


@pytest.mark.parametrize("text", ["tumour", "tumour:auc>=0.9", "tumour:sensitivity>=1.5", ":0.3", "tumour:>=0.9"])
def test_bad_specs_say_how_to_write_them(text: str) -> None:
    with pytest.raises(UserError, match="operating point"):
        PointSpec.parse(text)


def test_classes_are_checked() -> None:
    with pytest.raises(UserError, match="names no class.*normal, tumour"):
        check_classes([PointSpec("cancer", "threshold", 0.5)], CLASSES)
    with pytest.raises(UserError, match="at most one"):
        check_classes([PointSpec("tumour", "threshold", 0.5), PointSpec("tumour", "threshold", 0.2)], CLASSES)


@pytest.mark.parametrize("target", ["sensitivity", "specificity", "precision"])
def test_the_chosen_threshold_meets_the_target_and_is_the_least_costly(target: str) -> None:
    probs, labels = _scores()
    point = choose(PointSpec("tumour", target, 0.9), probs, labels, CLASSES)  # type: ignore[arg-type]
    assert point.attained and point.val[target] >= 0.9
    positive = labels == 1
    met = measure(probs[:, 1] >= point.threshold, positive)
    assert met == pytest.approx(point.val, nan_ok=True)
    # one step further along the curve misses the target: the threshold is the edge, not merely somewhere safe
    others = np.unique(probs[:, 1])
    step = others[others > point.threshold].min() if target == "sensitivity" else others[others < point.threshold].max()
    assert measure(probs[:, 1] >= step, positive)[target] < 0.9 or target == "precision"


def test_an_unattainable_target_is_marked() -> None:
    probs, labels = _scores()
    probs = np.full_like(probs, 0.5)  # no information: precision is the base rate at every threshold
    point = choose(PointSpec("tumour", "precision", 0.99), probs, labels, CLASSES)
    assert not point.attained


def test_the_test_check_has_intervals_and_a_verdict() -> None:
    val_probs, val_labels = _scores(seed=0)
    test_probs, test_labels = _scores(seed=1)
    point = choose(PointSpec("tumour", "sensitivity", 0.9), val_probs, val_labels, CLASSES)
    result = check(point, test_probs, test_labels, CLASSES, "test")
    for interval in (result.sensitivity, result.specificity, result.precision):
        assert interval.low <= interval.value <= interval.high
    assert result.sensitivity.high - result.sensitivity.low < 0.1  # 2000 images: a tight interval
    assert result.holds is (result.sensitivity.low >= 0.9)
    easy = OperatingPoint("tumour", "sensitivity", 0.5, point.threshold, True)  # a target far below what it does
    assert check(easy, test_probs, test_labels, CLASSES, "test").holds is True
    assert (
        "does NOT hold"
        in check(
            OperatingPoint("tumour", "sensitivity", 0.999, 0.99, True), test_probs, test_labels, CLASSES, "test"
        ).describe()
    )


def test_points_decide_in_priority_order() -> None:
    classes = ["none", "dent", "glass"]
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.35, 0.45], [np.nan] * 3])
    points = [
        OperatingPoint("glass", "threshold", 0.3, 0.3, True),
        OperatingPoint("dent", "threshold", 0.25, 0.25, True),
    ]
    assert decide(probs, classes, points).tolist() == [1, 2, 2, -1]
    assert decide(probs, classes, points[::-1]).tolist() == [1, 2, 1, -1]
    assert decide(probs, classes, []).tolist()[:3] == [0, 0, 2]


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

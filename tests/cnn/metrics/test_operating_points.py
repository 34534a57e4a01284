"""Operating points: parsed from what people write, chosen on validation for their target, checked with bootstrap
intervals, deciding in priority order, and sending rows near them (or unsure, or flip-unstable) to review."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.errors import UserError
from cnn.metrics.operating_points import OperatingPoint, PointSpec, check, check_classes, choose, decide

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


# Ten images whose curve is worked out by hand: positives score 0.9 0.8 0.7 0.4 0.2, negatives 0.6 0.5 0.3 0.1 0.05.
# At threshold 0.4: 4 of 5 positives, 2 negatives flagged. At 0.6: 3 positives and 1 negative. At 0.5: 3 and 2.
EDGE = np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.6, 0.5, 0.3, 0.1, 0.05]), np.array([1] * 5 + [0] * 5)


@pytest.mark.parametrize(
    ("target", "value", "threshold", "figures"),
    [
        # the highest threshold that still finds 4 of 5 positives (0.7 finds 3)
        ("sensitivity", 0.8, 0.4, {"sensitivity": 0.8, "specificity": 0.6, "precision": 4 / 6}),
        # the lowest threshold that flags at most one negative (0.5 flags two): the most sensitivity kept
        ("specificity", 0.8, 0.6, {"sensitivity": 0.6, "specificity": 0.8, "precision": 0.75}),
        # the lowest threshold with precision 0.75 (0.5 gives 3/5, 0.4 gives 4/6): again 0.6
        ("precision", 0.75, 0.6, {"sensitivity": 0.6, "specificity": 0.8, "precision": 0.75}),
    ],
)
def test_the_chosen_threshold_is_the_edge_of_the_target(
    target: str, value: float, threshold: float, figures: dict[str, float]
) -> None:
    scores, labels = EDGE
    probs = np.stack([1 - scores, scores], axis=1)
    point = choose(PointSpec("tumour", target, value), probs, labels, CLASSES)  # type: ignore[arg-type]
    assert point.attained and point.threshold == pytest.approx(threshold)
    assert point.val == pytest.approx(figures)


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

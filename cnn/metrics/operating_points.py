"""Operating points: a decision threshold per class, chosen on the validation split for a target the user sets
(`tumour:sensitivity>=0.95`, `precision>=`, `specificity>=`, or a plain threshold `tumour:0.3`), and checked on
the test split with bootstrap 95% intervals.

A class's point fires when its calibrated probability reaches the threshold (one class against the rest).
Several points are taken in the order given: the first that fires decides; when none does, the most probable
class without a point decides (or the most probable class, when every class has one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from cnn.errors import UserError
from cnn.metrics.classification import Interval

Target = Literal["sensitivity", "specificity", "precision", "threshold"]
_SPEC = re.compile(
    r"^\s*(?P<cls>[^:]+?)\s*:\s*(?:(?P<metric>sensitivity|specificity|precision|recall)\s*>=\s*)?"
    r"(?P<value>[0-9]*\.?[0-9]+)\s*$"
)
ROUNDS = 2000


@dataclass(frozen=True)
class PointSpec:
    """What the user asked for: a class, a metric and its target (or a plain threshold)."""

    class_name: str
    target: Target
    value: float

    @classmethod
    def parse(cls, text: str) -> PointSpec:
        match = _SPEC.match(text)
        if not match:
            raise UserError(
                f"invalid operating point {text!r}: use CLASS:sensitivity>=0.95, CLASS:specificity>=0.9, "
                "CLASS:precision>=0.8 or CLASS:0.3 (a plain threshold)"
            )
        metric = match["metric"] or "threshold"
        value = float(match["value"])
        if not 0.0 <= value <= 1.0:
            raise UserError(f"operating point {text!r}: the value must lie between 0 and 1")
        return cls(match["cls"], "sensitivity" if metric == "recall" else metric, value)  # type: ignore[arg-type]

    def describe(self) -> str:
        return (
            f"{self.class_name}:{self.value:g}"
            if self.target == "threshold"
            else (f"{self.class_name}:{self.target}>={self.value:g}")
        )


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen threshold and how it did on the split it was chosen on (validation)."""

    class_name: str
    target: Target
    value: float
    threshold: float
    attained: bool  # the validation split reached the target at this threshold
    val: dict[str, float] = field(default_factory=dict)  # sensitivity, specificity, precision on validation
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # the same on test: value, low, high

    @property
    def spec(self) -> PointSpec:
        return PointSpec(self.class_name, self.target, self.value)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> OperatingPoint:
        return cls(**data)  # type: ignore[arg-type]  # written by to_dict


@dataclass(frozen=True)
class PointCheck:
    """An operating point's sensitivity, specificity and precision on a split, with intervals."""

    point: OperatingPoint
    split: str
    images: int
    sensitivity: Interval
    specificity: Interval
    precision: Interval

    @property
    def holds(self) -> bool | None:
        """The lower end of the targeted metric's interval reaches the target (None for a plain threshold)."""
        if self.point.target == "threshold":
            return None
        low = getattr(self, self.point.target).low
        return bool(np.isfinite(low) and low >= self.point.value)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["holds"] = self.holds
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointCheck:
        """From `to_dict` (`holds` is derived, so it is not read back)."""
        metrics = {m: Interval(**data[m]) for m in ("sensitivity", "specificity", "precision")}
        return cls(OperatingPoint.from_dict(data["point"]), str(data["split"]), int(data["images"]), **metrics)

    def recorded(self) -> OperatingPoint:
        """The point with this check's figures in `test` (what the contract keeps)."""
        figures = {m: asdict(getattr(self, m)) for m in ("sensitivity", "specificity", "precision")}
        return replace(self.point, test=figures)

    def describe(self) -> str:
        verdict = {True: "holds", False: "does NOT hold", None: "plain threshold"}[self.holds]
        return (
            f"{self.point.spec.describe()} (threshold {self.point.threshold:.4f}) on {self.split}, {self.images} "
            f"images: sensitivity {self.sensitivity.describe()}, specificity {self.specificity.describe()}, "
            f"precision {self.precision.describe()}: {verdict}"
        )


def check_classes(specs: Sequence[PointSpec], classes: Sequence[str]) -> None:
    """Every point names a class of the model, at most once."""
    for spec in specs:
        if spec.class_name not in classes:
            raise UserError(
                f"operating point {spec.describe()!r} names no class of the data; classes: {', '.join(classes)}"
            )
    named = [s.class_name for s in specs]
    if len(set(named)) != len(named):
        raise UserError("give at most one operating point per class")


def _curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, ...]:
    """(thresholds, sensitivity, specificity, precision) for `score >= threshold`, from the highest threshold
    that predicts nothing down to the lowest score."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.float64)
    tp, fp = np.cumsum(y), np.cumsum(1.0 - y)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    thresholds = np.r_[np.nextafter(s[0], np.inf) if len(s) else 1.0, s[last_of_tie]]
    tp, fp = np.r_[0.0, tp[last_of_tie]], np.r_[0.0, fp[last_of_tie]]
    p, n = y.sum(), len(y) - y.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / p if p else np.full_like(tp, np.nan)
        specificity = 1.0 - fp / n if n else np.full_like(fp, np.nan)
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
    return thresholds, sensitivity, specificity, precision


def choose(spec: PointSpec, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> OperatingPoint:
    """The threshold for `spec` on a split's calibrated probabilities: the highest that keeps sensitivity at
    the target, the lowest that reaches specificity or precision (keeping the most sensitivity)."""
    c = list(classes).index(spec.class_name)
    scores, positive = probs[:, c], labels == c
    if spec.target != "threshold" and not (positive.any() and (~positive).any()):
        raise UserError(
            f"operating point {spec.describe()}: the validation split needs images of {spec.class_name} and of "
            "other classes to choose a threshold"
        )
    thresholds, sens, spec_, prec = _curve(scores, positive)
    if spec.target == "threshold":
        threshold, attained = spec.value, True
    else:
        metric = {"sensitivity": sens, "specificity": spec_, "precision": prec}[spec.target]
        ok = np.nan_to_num(metric, nan=-1.0) >= spec.value
        if ok.any():
            # thresholds fall along the curve: sensitivity rises, specificity and precision (mostly) fall
            index = int(np.argmax(ok)) if spec.target == "sensitivity" else int(np.flatnonzero(ok)[-1])
            attained = True
        else:
            index, attained = int(np.nanargmax(np.nan_to_num(metric, nan=-1.0))), False
        threshold = float(thresholds[index])
    measured = measure(scores >= threshold, positive)
    return OperatingPoint(spec.class_name, spec.target, spec.value, threshold, attained, measured)


def measure(predicted: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity and precision of a one-vs-rest decision."""
    tp = float((predicted & positive).sum())
    fp = float((predicted & ~positive).sum())
    p, n = float(positive.sum()), float((~positive).sum())
    return {
        "sensitivity": tp / p if p else math.nan,
        "specificity": 1.0 - fp / n if n else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
    }


def check(
    point: OperatingPoint, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], split: str, seed: int = 0
) -> PointCheck:
    """The point's metrics on a split with percentile-bootstrap 95% intervals (resampling images)."""
    c = list(classes).index(point.class_name)
    predicted, positive = probs[:, c] >= point.threshold, labels == c
    values = measure(predicted, positive)
    rng = np.random.default_rng(seed)
    n = len(labels)
    cells = np.stack([predicted & positive, predicted & ~positive, positive, ~positive], axis=1).astype(np.float64)
    counts = []
    for start in range(0, ROUNDS, 250):  # (250, N) weights at a time: memory stays small for large splits
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(250, ROUNDS - start)) if n else np.zeros((0, 0))
        counts.append(weights @ cells)
    tp, fp, p, neg = np.concatenate(counts).T if n else (np.zeros(0),) * 4
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = {
            "sensitivity": tp / p,
            "specificity": 1.0 - fp / neg,
            "precision": tp / (tp + fp),
        }

    def interval(name: str) -> Interval:
        finite = resampled[name][np.isfinite(resampled[name])]
        if not len(finite) or math.isnan(values[name]):
            return Interval(values[name], math.nan, math.nan)
        low, high = np.quantile(finite, [0.025, 0.975])
        return Interval(values[name], float(low), float(high))

    return PointCheck(point, split, n, interval("sensitivity"), interval("specificity"), interval("precision"))


def decide(probs: np.ndarray, classes: Sequence[str], points: Sequence[OperatingPoint]) -> np.ndarray:
    """The class index each row is decided as (see the module's docstring); -1 for rows of NaN."""
    probs = np.asarray(probs, dtype=np.float64)
    filled = np.nan_to_num(probs, nan=-1.0)
    with_point = {list(classes).index(p.class_name) for p in points}
    rest = [j for j in range(len(classes)) if j not in with_point] or list(range(len(classes)))
    decision = np.asarray(rest)[filled[:, rest].argmax(axis=1)] if len(probs) else np.zeros(0, dtype=np.int64)
    decided = np.zeros(len(probs), dtype=bool)
    for point in points:
        c = list(classes).index(point.class_name)
        fires = (filled[:, c] >= point.threshold) & ~decided
        decision[fires] = c
        decided |= fires
    decision[np.isnan(probs).any(axis=1)] = -1
    return decision

"""The one builder of prediction columns, shared by the scoring engine and the MLflow pyfunc."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cnn.metrics.operating_points import OperatingPoint, decide

NEAR_POINT = 0.05  # a probability this close to an operating point's threshold is sent for review


def prob_columns(classes: Sequence[str]) -> list[str]:
    """`prob_<class>` for each class, in the model's order."""
    return [f"prob_{name}" for name in classes]


def prediction_columns(
    probs: np.ndarray,
    classes: Sequence[str],
    top_k: int | None = None,
    review_below: float | None = None,
    points: Sequence[OperatingPoint] = (),
    mirrored: np.ndarray | None = None,
    near: float = NEAR_POINT,
) -> pd.DataFrame:
    """One row per row of `probs` (N, C): label, confidence, decision, [top_k], [needs_review, review_reason,
    urgency], prob_<class>...

    `label` is the most probable class, `decision` the class the operating points decide (the label where there
    are none). With `review_below`, a row needs review when its confidence is below it, its probability lies
    within `near` of an operating point's threshold, or the mirrored image (`mirrored`, probabilities of the
    test-time flip) gets another label. A row of NaN (an input that could not be scored) gets label None and NaN
    confidence. Text columns are object columns so that None stays None (JSON null) instead of becoming NaN."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), len(classes))
    scored = np.asarray(~np.isnan(probs).any(axis=1), dtype=bool)
    filled = np.nan_to_num(probs, nan=-1.0)
    best = filled.argmax(axis=1)
    names = np.array(classes, dtype=object)
    decision = decide(probs, classes, points)
    frame = pd.DataFrame(
        {
            "label": pd.Series(np.where(scored, names[best] if len(classes) else None, None), dtype=object),
            "confidence": np.where(scored, filled.max(axis=1, initial=0.0), np.nan),
            "decision": pd.Series(
                np.where(scored, names[np.maximum(decision, 0)] if len(classes) else None, None), dtype=object
            ),
        }
    )
    if top_k is not None:
        frame["top_k"] = pd.Series(_top_k_json(filled, probs, scored, classes, top_k), dtype=object)
    if review_below is not None:
        reasons = _review_reasons(filled, classes, review_below, points, mirrored, near)
        frame["needs_review"] = scored & np.array([bool(r) for r in reasons], dtype=bool)
        frame["review_reason"] = pd.Series(
            ["; ".join(r) if r and ok else None for r, ok in zip(reasons, scored)], dtype=object
        )
        frame["urgency"] = np.where(scored, _urgency(filled, classes, points), np.nan)
    for j, column in enumerate(prob_columns(classes)):
        frame[column] = probs[:, j]
    return frame


def _top_k_json(
    filled: np.ndarray, probs: np.ndarray, scored: np.ndarray, classes: Sequence[str], top_k: int
) -> list[str | None]:
    """Each scored row's `top_k` most probable classes as JSON, `[["name", p], ...]` with p rounded to 6 places (the
    text json.dumps writes, built from the classes' JSON once: json.dumps per row was a tenth of a shard's rows)."""
    order = np.argsort(-filled, axis=1)[:, : max(1, top_k)]
    names = [json.dumps(name) for name in classes]
    chosen = np.take_along_axis(probs, order, axis=1).tolist()
    return [
        "[" + ", ".join(f"[{names[j]}, {round(p, 6)!r}]" for j, p in zip(row, values)) + "]" if ok else None
        for row, values, ok in zip(order.tolist(), chosen, scored.tolist())
    ]


def _review_reasons(
    probs: np.ndarray,
    classes: Sequence[str],
    below: float,
    points: Sequence[OperatingPoint],
    mirrored: np.ndarray | None,
    near: float,
) -> list[list[str]]:
    reasons: list[list[str]] = [[] for _ in range(len(probs))]
    confidence = probs.max(axis=1, initial=0.0)
    for i in np.flatnonzero(confidence < below):
        reasons[i].append(f"low confidence {confidence[i]:.2f} < {below:g}")
    for point in points:
        c = list(classes).index(point.class_name)
        for i in np.flatnonzero(np.abs(probs[:, c] - point.threshold) <= near):
            reasons[i].append(
                f"near the {point.class_name} operating point ({probs[i, c]:.2f}, threshold {point.threshold:.2f})"
            )
    if mirrored is not None and len(mirrored):
        flipped = np.nan_to_num(np.asarray(mirrored, dtype=np.float64), nan=-1.0).argmax(axis=1)
        for i in np.flatnonzero(flipped != probs.argmax(axis=1)):
            reasons[i].append(f"mirrored image says {classes[flipped[i]]}, not {classes[probs[i].argmax()]}")
    return reasons


def _urgency(probs: np.ndarray, classes: Sequence[str], points: Sequence[OperatingPoint]) -> np.ndarray:
    """How soon a reviewer should look: the highest probability of a class with an operating point (the
    findings someone must act on come first), else how unsure the model is (1 - confidence)."""
    if points:
        columns = [list(classes).index(p.class_name) for p in points]
        return np.asarray(probs[:, columns].max(axis=1))
    return np.asarray(1.0 - probs.max(axis=1, initial=0.0))

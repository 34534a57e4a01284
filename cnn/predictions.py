"""The one builder of prediction columns, shared by the scoring engine and the MLflow pyfunc."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd


def prob_columns(classes: Sequence[str]) -> list[str]:
    """`prob_<class>` for each class, in the model's order."""
    return [f"prob_{name}" for name in classes]


def prediction_columns(
    probs: np.ndarray, classes: Sequence[str], top_k: int | None = None, review_below: float | None = None
) -> pd.DataFrame:
    """One row per row of `probs` (N, C): label, confidence, [top_k], [needs_review], prob_<class>...

    A row of NaN (an input that could not be scored) gets label None and NaN confidence. `label` is an
    object column so that None stays None (JSON null) instead of becoming NaN."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), len(classes))
    scored = np.asarray(~np.isnan(probs).any(axis=1), dtype=bool)
    filled = np.nan_to_num(probs, nan=-1.0)
    best = filled.argmax(axis=1)
    names = np.array(classes, dtype=object)
    frame = pd.DataFrame(
        {
            "label": pd.Series(np.where(scored, names[best] if len(classes) else None, None), dtype=object),
            "confidence": np.where(scored, filled.max(axis=1, initial=0.0), np.nan),
        }
    )
    if top_k is not None:
        order = np.argsort(-filled, axis=1)[:, : max(1, top_k)]
        frame["top_k"] = pd.Series(
            [
                json.dumps([[classes[j], round(float(p[j]), 6)] for j in row]) if ok else None
                for row, p, ok in zip(order, probs, scored)
            ],
            dtype=object,
        )
    if review_below is not None:
        frame["needs_review"] = scored & (frame["confidence"].to_numpy() < review_below)
    for j, column in enumerate(prob_columns(classes)):
        frame[column] = probs[:, j]
    return frame

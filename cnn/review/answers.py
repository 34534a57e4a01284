"""Reviewers' answers from Label Studio, one per image, by a stated rule:

1. Skipped (cancelled) annotations and annotations without a choice do not count; each reviewer's newest
   annotation of a task is their one vote.
2. An annotation marked as ground truth (Label Studio's star, a lead reviewer settling a case) decides.
3. Otherwise the votes must agree: one vote, or several that agree, give the answer; any disagreement gives
   `review_verdict = disputed` and no label, until someone settles it (2.) or the reviewers converge.

An answer is a class (`reviewed_label`, verdict `label`) or one of the reserved choices: `unusable` (the image
cannot be read) or `none_of_these` (not any class the model knows); neither becomes a training label.
`reviewed_by` holds Label Studio user ids (comma-separated), never names or e-mail addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cnn.batch.tables import ANSWER_KEY, REVIEW_COLUMN
from cnn.review.tasks import CHOICES, VERDICTS

VERDICT_COLUMN = "review_verdict"  # label | unusable | none_of_these | disputed
REVIEWER_COLUMNS = [REVIEW_COLUMN, VERDICT_COLUMN, "reviewed_by", "reviewed_at"]


@dataclass(frozen=True)
class Vote:
    """One reviewer's newest answer to one task."""

    user: str
    choice: str
    at: pd.Timestamp
    ground_truth: bool


def answers(tasks: Iterable[dict[str, Any]], classes_of: dict[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """One row per answered task: ANSWER_KEY (from the task's data) and REVIEWER_COLUMNS. A choice that is no longer a
    class of the model (`classes_of[model]`, where given) is disputed rather than trusted."""
    rows = []
    for task in tasks:
        data = task.get("data") or {}
        votes = _votes(task.get("annotations") or [])
        if not votes or not data.get("image_id"):
            continue
        label, verdict = _decide(votes)
        known = (classes_of or {}).get(str(data.get("model")))
        if label is not None and known is not None and label not in known:
            label, verdict = None, "disputed"
        counted = sorted(votes, key=lambda v: v.at)
        rows.append(
            {
                "image_id": str(data["image_id"]),
                "model_name": str(data.get("model", "")),
                "model_version": str(data.get("model_version", "")),
                REVIEW_COLUMN: label,
                VERDICT_COLUMN: verdict,
                "reviewed_by": ",".join(dict.fromkeys(v.user for v in counted)),
                "reviewed_at": counted[-1].at,
            }
        )
    frame = pd.DataFrame(rows, columns=[*ANSWER_KEY, *REVIEWER_COLUMNS])
    frame["reviewed_at"] = pd.to_datetime(frame["reviewed_at"], utc=True)
    return frame


def _votes(annotations: Iterable[dict[str, Any]]) -> list[Vote]:
    newest: dict[str, Vote] = {}
    for annotation in annotations:
        if annotation.get("was_cancelled"):
            continue
        choice = _choice(annotation.get("result") or [])
        if choice is None:
            continue
        who = annotation.get("completed_by")
        user = str(who.get("id") if isinstance(who, dict) else who)
        at = pd.Timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        at = at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")
        vote = Vote(user, choice, at, bool(annotation.get("ground_truth")))
        if user not in newest or newest[user].at <= at:
            newest[user] = vote
    return list(newest.values())


def _choice(result: Iterable[dict[str, Any]]) -> str | None:
    for region in result:
        if region.get("from_name") == CHOICES and region.get("type") == "choices":
            chosen = (region.get("value") or {}).get("choices") or []
            if chosen:
                return str(chosen[0])
    return None


def _decide(votes: Sequence[Vote]) -> tuple[str | None, str]:
    settled = [v for v in votes if v.ground_truth]
    if settled:
        return _as_answer(max(settled, key=lambda v: v.at).choice)
    chosen = {v.choice for v in votes}
    if len(chosen) > 1:
        return None, "disputed"
    return _as_answer(chosen.pop())


def _as_answer(choice: str) -> tuple[str | None, str]:
    if choice in VERDICTS:
        return None, VERDICTS[choice]
    return choice, "label"
